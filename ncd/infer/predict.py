"""Predictions: region probabilities from the selected head, region merging, tables.

Region level (METHOD.md 6.1): softmax over the K novel columns at the student
temperature. Image level (6.2): area-softmax merge of an image's regions. An optional
open-set rule labels a region or image "unknown" (cluster -1) when its best
probability is below ``infer.unknown_threshold`` (0 disables it).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import torch

from ncd.train import checkpoint
from ncd.config import ConfigError, ExperimentConfig, S3Config, public_dict, stored_config
from ncd.infer.merge import merge_regions, novel_probs
from ncd.methods import build_model, prediction_temperature
from ncd.model.ncd_model import NCDModel

log = logging.getLogger(__name__)
UNKNOWN = -1
TOP_K = 3
REGION_PRED_SCHEMA = pa.schema([
    ("region_id", pa.string()), ("image_id", pa.string()), ("category", pa.string()), ("gt_type", pa.string()),
    ("cluster", pa.int32()), ("probability", pa.float32()), ("top3", pa.list_(pa.int32())),
    ("top3_prob", pa.list_(pa.float32())), ("area", pa.int64()),
])
IMAGE_PRED_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("category", pa.string()), ("gt_type", pa.string()), ("cluster", pa.int32()),
    ("probability", pa.float32()), ("top3", pa.list_(pa.int32())), ("top3_prob", pa.list_(pa.float32())),
    ("num_regions", pa.int32()),
])


@dataclass
class TrainedModel:
    """A model ready for inference with what is needed to read its outputs."""

    model: NCDModel
    cfg: ExperimentConfig
    class_map: dict[str, Any]
    head: int
    bank: np.ndarray | None = None  # unit features of the training regions (ncd.infer.rejection)
    bank_images: list[str] = field(default_factory=list)


def _labels(probs: np.ndarray, unknown_threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """cluster (argmax or -1), probability, top-3 ids and their probabilities."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :TOP_K]
    top_p = np.take_along_axis(probs, order, axis=1)
    cluster = order[:, 0].astype(np.int32)
    best = top_p[:, 0]
    if unknown_threshold > 0:
        cluster = np.where(best < unknown_threshold, UNKNOWN, cluster).astype(np.int32)
    return cluster, best.astype(np.float32), order.astype(np.int32), top_p.astype(np.float32)


def region_predictions(regions: pa.Table, probs: np.ndarray, unknown_threshold: float = 0.0) -> pa.Table:
    """Region prediction table from (R,K) novel probabilities aligned with ``regions``."""
    cluster, best, top, top_p = _labels(probs, unknown_threshold)
    return pa.table({
        "region_id": regions.column("region_id"), "image_id": regions.column("image_id"),
        "category": regions.column("category"), "gt_type": regions.column("gt_type"),
        "cluster": cluster, "probability": best, "top3": top.tolist(), "top3_prob": top_p.tolist(),
        "area": regions.column("area"),
    }, schema=REGION_PRED_SCHEMA)


def image_predictions(regions: pa.Table, probs: np.ndarray, area_temperature: float,
                      unknown_threshold: float = 0.0) -> tuple[pa.Table, np.ndarray]:
    """Image prediction table (and (I,K) merged probabilities) by area-softmax merging."""
    image_ids = regions.column("image_id").to_pylist()
    areas = np.asarray(regions.column("area").to_pylist(), np.float64)
    ids, merged = merge_regions(image_ids, probs, areas, area_temperature)
    first: dict[str, int] = {}
    counts: dict[str, int] = {}
    for i, image_id in enumerate(image_ids):
        first.setdefault(image_id, i)
        counts[image_id] = counts.get(image_id, 0) + 1
    rows = [first[i] for i in ids]
    cluster, best, top, top_p = _labels(merged, unknown_threshold)
    table = pa.table({
        "image_id": ids, "category": regions.column("category").take(rows),
        "gt_type": regions.column("gt_type").take(rows),  # an image's label is its first crop's (6.2)
        "cluster": cluster, "probability": best, "top3": top.tolist(), "top3_prob": top_p.tolist(),
        "num_regions": [counts[i] for i in ids],
    }, schema=IMAGE_PRED_SCHEMA)
    return table, merged


class UnseenCategoryWarning(UserWarning):
    """A model is applied to a category it was not trained on."""


def warn_unseen_categories(trained: TrainedModel, categories: Iterable[str]) -> list[str]:
    """The categories among ``categories`` that ``trained`` never saw in training, with a
    warning when there are any (its labels for them are confident guesses). A model file
    without the record of its categories is not checked."""
    seen = trained.class_map.get("categories")
    unseen = sorted(set(categories) - set(seen)) if seen else []
    if unseen:
        warnings.warn(f"the model was trained on categor{'y' if len(seen) == 1 else 'ies'} {', '.join(seen)} and "
                      f"never saw {', '.join(unseen)}: its clusters for those regions are not meaningful; "
                      "train on them (ncd discover) or use the model of their category", UnseenCategoryWarning,
                      stacklevel=2)
    return unseen


def head_probabilities(logits: list[np.ndarray], head: int, num_base: int, temperature: float) -> np.ndarray:
    """(R,K) novel probabilities of the selected head."""
    return novel_probs(logits[head], num_base, temperature)


def region_probabilities(trained: TrainedModel, logits: list[np.ndarray]) -> np.ndarray:
    """(R,K) novel probabilities of ``trained``'s selected head at its method's temperature
    (the vMF posterior ``softmax(kappa cos)`` in ProtoAnomalyNCD mode)."""
    return head_probabilities(logits, trained.head, trained.class_map["num_base"], prediction_temperature(trained.cfg))


def model_state(trained: TrainedModel) -> dict[str, Any]:
    """Everything needed to rebuild ``trained`` (``model_from_state``)."""
    state = {"model": trained.model.state_dict(), "config": public_dict(trained.cfg), "class_map": trained.class_map,
             "head": trained.head}
    if trained.bank is not None:
        state["bank"] = torch.from_numpy(np.ascontiguousarray(trained.bank, np.float16))
        state["bank_images"] = list(trained.bank_images)
    return state


def save_model(trained: TrainedModel, uri: str, s3: S3Config | None = None) -> None:
    """A self-contained model file for inductive inference (``ncd predict``), written atomically."""
    checkpoint.save(model_state(trained), uri, s3)


def model_from_state(state: dict[str, Any], device: torch.device | str = "cpu") -> TrainedModel:
    """Rebuild a model from a saved state (a model file or a training checkpoint)."""
    cfg = stored_config(state["config"])
    cm = state["class_map"]
    with warnings.catch_warnings():  # the weights come from the state, not from the source
        warnings.simplefilter("ignore")
        backbone_log = logging.getLogger("ncd.model.backbone")
        level = backbone_log.level
        backbone_log.setLevel(logging.ERROR)
        try:
            model = build_model(replace(cfg, model=replace(cfg.model, weights="random")), cm["num_base"],
                                cm["num_novel"])
        finally:
            backbone_log.setLevel(level)
    model.load_state_dict(state["model"])
    head = state.get("head")
    if head is None:
        from ncd.model.heads import select_head

        head = select_head(state["head_losses"])
    bank = state.get("bank")
    return TrainedModel(model.to(device).eval(), cfg, cm, int(head), None if bank is None else bank.numpy(),
                        list(state.get("bank_images", [])))


def load_model(uri: str, s3: S3Config | None = None, device: torch.device | str = "cpu") -> TrainedModel:
    """The model in a model file or training checkpoint (local or ``s3://``), loaded weights-only;
    a ModelFileError naming the file when it cannot be."""
    state = checkpoint.load(uri, s3, what="model file")
    try:
        return model_from_state(state, device)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        what = f"missing {err}" if isinstance(err, KeyError) else str(err).strip().splitlines()[0]
        if isinstance(err, ConfigError):
            what = f"its config is not valid here: {what}"
        raise checkpoint.ModelFileError(f"cannot load model file {uri}: not an ncd model ({what}); re-create it with "
                                        "ncd (discover or train)") from None
