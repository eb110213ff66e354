"""Familiarity: how close a region is to the regions the model was trained on.

The model file keeps a bank of its training regions' unit features (float16) with their
image ids. A region's familiarity is its highest cosine similarity to a bank region of
another image (PatchCore's nearest-neighbour rule; the region's own image is left out, so
an image the model was trained on is not its own neighbour); an image's is the
area-softmax merge of its regions'. ``infer.unknown_familiarity`` (> 0) labels samples
below it "unknown": a defect type unlike any the model has seen (open-set rejection).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ncd.evaluate.k_criteria import l2_normalise
from ncd.infer.merge import merge_regions
from ncd.infer.forward import RegionOutputs
from ncd.infer.predict import UNKNOWN, TrainedModel, image_predictions, region_predictions, region_probabilities


def nearest_other_image_similarity(feat: np.ndarray, image_ids: list[str], bank: np.ndarray,
                                   bank_images: list[str], max_chunk_cells: int = 1 << 23) -> np.ndarray:
    """Each region's highest cosine similarity to a ``bank`` row (unit features) of another
    image; -1 where the bank holds only the region's own image. Works in row chunks of at
    most ``max_chunk_cells`` similarities (32 MiB), whatever the bank's size."""
    x = l2_normalise(feat)
    bank = np.asarray(bank, np.float32)
    _, codes = np.unique(np.asarray([*map(str, image_ids), *map(str, bank_images)], dtype=object).astype(str),
                         return_inverse=True)
    ids, owners = codes[:len(x)], codes[len(x):]
    out = np.full(len(x), -1.0, np.float32)
    if len(bank) == 0:
        return out
    chunk = max(1, max_chunk_cells // len(bank))
    for start in range(0, len(x), chunk):
        sim = x[start:start + chunk] @ bank.T
        sim[ids[start:start + chunk, None] == owners[None, :]] = -np.inf
        out[start:start + chunk] = np.maximum(sim.max(axis=1), -1.0)
    return out


def image_familiarity(regions: pa.Table, familiarity: np.ndarray, area_temperature: float) -> np.ndarray:
    """Area-softmax merge of region familiarity, images in ``image_predictions``' order."""
    _, merged = merge_regions(regions.column("image_id").to_pylist(), familiarity[:, None],
                              np.asarray(regions.column("area").to_pylist(), np.float64), area_temperature)
    return merged[:, 0]


def with_familiarity(table: pa.Table, familiarity: np.ndarray, threshold: float) -> pa.Table:
    """``table`` with a ``familiarity`` column; rows below ``threshold`` (when > 0) become unknown."""
    if threshold > 0:
        cluster = np.where(familiarity < threshold, UNKNOWN, table.column("cluster").to_numpy()).astype(np.int32)
        table = table.set_column(table.schema.get_field_index("cluster"), "cluster", pa.array(cluster, pa.int32()))
    return table.append_column("familiarity", pa.array(np.asarray(familiarity, np.float32), pa.float32()))


def attach_bank(trained: TrainedModel, feat: np.ndarray, image_ids: list[str]) -> TrainedModel:
    """``trained`` holding the unit features of its training regions (float16) and their images."""
    trained.bank = l2_normalise(feat).astype(np.float16)
    trained.bank_images = [str(i) for i in image_ids]
    return trained


def region_familiarity(trained: TrainedModel, feat: np.ndarray, image_ids: list[str]) -> np.ndarray | None:
    """Familiarity of each region to ``trained``'s bank; None for a model saved without one."""
    if trained.bank is None:
        return None
    return nearest_other_image_similarity(feat, image_ids, trained.bank, trained.bank_images)


def prediction_tables(trained: TrainedModel, regions: pa.Table, outputs: RegionOutputs) -> tuple[pa.Table, pa.Table]:
    """Region and image prediction tables of ``outputs`` (aligned with ``regions``): clusters of
    the selected head, ``infer.unknown_threshold`` on the posterior, and with a bank the
    ``familiarity`` column and ``infer.unknown_familiarity``."""
    cfg = trained.cfg.infer
    probs = region_probabilities(trained, outputs.logits)
    region_table = region_predictions(regions, probs, cfg.unknown_threshold)
    image_table = image_predictions(regions, probs, cfg.area_temperature, cfg.unknown_threshold)[0]
    familiarity = region_familiarity(trained, outputs.feat, regions.column("image_id").to_pylist())
    if familiarity is not None:
        region_table = with_familiarity(region_table, familiarity, cfg.unknown_familiarity)
        image_table = with_familiarity(image_table, image_familiarity(regions, familiarity, cfg.area_temperature),
                                       cfg.unknown_familiarity)
    return region_table, image_table
