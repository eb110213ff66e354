"""Held-out-type protocol for open-set rejection (ProtoAnomalyNCD extension, PROTO.md).

For one defect type: train without any of its regions (K = the seen types, in its own
folder ``<output>/openset/<type>``, so no split resumes another's model), infer on
every image, and measure how well the rejection score separates the held-out type's
images from the seen types' images (AUROC; 1.0 = every held-out image scores lower).
The model is refined on the seen regions first, as ``ncd train`` does. Three rejection
scores of an image are measured: ``posterior``, its merged best novel probability (the
vMF posterior in ProtoAnomalyNCD mode, the softmax posterior in AnomalyNCD mode),
``similarity``, its best area-merged cosine to a novel prototype (PROTO.md allows
either), and ``nearest``, the area-merged cosine of its regions to the nearest training
region of another image; ``nearest_half`` the same with a bank of half the seen images
(by a hash of the image id), scoring the other half as new images of the seen types.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ncd.config import ExperimentConfig, apply_overrides
from ncd.data import io
from ncd.data.region_table import category_dir
from ncd.infer.forward import RegionOutputs
from ncd.infer.merge import merge_regions
from ncd.infer.rejection import attach_bank, image_familiarity, region_familiarity
from ncd.infer.predict import image_predictions, region_probabilities
from ncd.proto.openset import auroc
from ncd.train.refine import head_logits, refine_trained

log = logging.getLogger(__name__)


def in_bank_half(image_id: str) -> bool:
    """Whether an image belongs to the half of the seen images the stricter familiarity
    score keeps in the bank (a fixed hash of its id)."""
    return int(hashlib.sha1(str(image_id).encode()).hexdigest(), 16) % 2 == 0


def held_out_auroc(cfg: ExperimentConfig, regions: pa.Table, held_out: str, stages: Any,
                   base: pa.Table | None = None) -> dict[str, Any]:
    """Train on every type but ``held_out`` and score the rejection of its images."""
    types = regions.column("gt_type")
    seen = regions.filter(pc.not_equal(types, held_out))
    if seen.num_rows == regions.num_rows:
        raise ValueError(f"held-out type {held_out!r} has no regions")
    k_seen = len(set(seen.column("gt_type").to_pylist()))
    split_cfg = apply_overrides(cfg, [f"train.num_novel={k_seen}",
                                      f"output={io.join(cfg.output, 'openset', category_dir(held_out))}"])
    trained = stages.train(split_cfg, seen, base)
    outputs = stages.infer(trained, regions)
    is_seen = np.asarray(types.to_pylist()) != held_out
    trained, _, _ = refine_trained(trained, RegionOutputs(outputs.feat[is_seen], [z[is_seen] for z in outputs.logits]),
                                   split_cfg.train.seed)  # as ncd train: the model file holds refined prototypes
    outputs = RegionOutputs(outputs.feat, head_logits(trained, outputs.feat))
    probs = region_probabilities(trained, outputs.logits)
    images, merged = image_predictions(regions, probs, cfg.infer.area_temperature)
    is_held = np.asarray(images.column("gt_type").to_pylist()) == held_out
    score = merged.max(axis=1)
    cosines = np.asarray(outputs.logits[trained.head])[:, trained.class_map["num_base"]:]
    _, merged_cos = merge_regions(regions.column("image_id").to_pylist(), cosines,
                                  np.asarray(regions.column("area").to_pylist(), np.float64), cfg.infer.area_temperature)
    similarity = merged_cos.max(axis=1)
    image_ids = regions.column("image_id").to_pylist()
    ids = np.asarray(image_ids, dtype=object)
    attach_bank(trained, outputs.feat[is_seen], ids[is_seen].tolist())
    nearest = image_familiarity(regions, region_familiarity(trained, outputs.feat, image_ids), cfg.infer.area_temperature)
    # stricter: a bank of half the seen images; the other half is scored as new images of seen types
    in_half = np.asarray([in_bank_half(i) for i in ids])
    attach_bank(trained, outputs.feat[is_seen & in_half], ids[is_seen & in_half].tolist())
    half = image_familiarity(regions, region_familiarity(trained, outputs.feat, image_ids), cfg.infer.area_temperature)
    image_in_half = np.asarray([in_bank_half(i) for i in images.column("image_id").to_pylist()])
    new_seen = ~is_held & ~image_in_half
    return {"auroc": auroc(score[~is_held], score[is_held]),
            "auroc_similarity": auroc(similarity[~is_held], similarity[is_held]),
            "auroc_nearest": auroc(nearest[~is_held], nearest[is_held]),
            "auroc_nearest_half": auroc(half[new_seen], half[is_held]), "k_seen": k_seen,
            "held_out_images": int(is_held.sum()), "seen_images": int((~is_held).sum()),
            "mean_score_seen": float(score[~is_held].mean()), "mean_score_held_out": float(score[is_held].mean())}


def open_set_protocol(cfg: ExperimentConfig, regions: pa.Table, stages: Any, types: list[str] | None = None,
                      base: pa.Table | None = None) -> dict[str, Any]:
    """``held_out_auroc`` for each type in turn; ``auroc`` is the mean over types."""
    types = types or sorted(set(regions.column("gt_type").to_pylist()))
    per_type = {}
    for t in types:
        per_type[t] = held_out_auroc(cfg, regions, t, stages, base)
        log.info("held out %s: AUROC %.3f (posterior), %.3f (similarity), %.3f (nearest)", t, per_type[t]["auroc"],
                 per_type[t]["auroc_similarity"], per_type[t]["auroc_nearest"])
    return {"auroc": float(np.mean([r["auroc"] for r in per_type.values()])),
            "auroc_similarity": float(np.mean([r["auroc_similarity"] for r in per_type.values()])),
            "auroc_nearest": float(np.mean([r["auroc_nearest"] for r in per_type.values()])),
            "per_type_nearest": {t: r["auroc_nearest"] for t, r in per_type.items()},
            "auroc_nearest_half": float(np.mean([r["auroc_nearest_half"] for r in per_type.values()])),
            "per_type_nearest_half": {t: r["auroc_nearest_half"] for t, r in per_type.items()},
            "per_type": {t: r["auroc"] for t, r in per_type.items()},
            "per_type_similarity": {t: r["auroc_similarity"] for t, r in per_type.items()}, "details": per_type}
