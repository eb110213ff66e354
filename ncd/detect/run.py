"""``ncd detect`` as a plan of per-category jobs, and the in-process run of it.

Per category: zero-shot (every image scored against a fixed-size, seeded, stratified
reference sample of the category, itself excluded) or few-shot (a memory bank of the
category's normal images: from ``detect.normal`` or the layout's normal types).
Scoring runs per stratified subset of ``detect.subset_size`` images; a subset's scores do
not depend on the split (the reference is fixed), so subsets are units of parallel work
only. ``ray_jobs/detect.py`` runs the same steps on Ray.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ncd.config import DetectConfig, ExperimentConfig, S3Config
from ncd.data import io
from ncd.data.catalog import catalog_images
from ncd.data.io import DataError
from ncd.detect.features import PatchFeatureExtractor, check_detect_config
from ncd.detect.maps import map_uri, write_maps
from ncd.detect.scoring import bank_scores, mutual_scores, rescore

log = logging.getLogger(__name__)
ZERO_SHOT, FEW_SHOT = "zero_shot", "few_shot"
NORMAL_PREFIX = "_normal"  # image ids of images from detect.normal (never written as maps)
SCORES_FILE = "image_scores"
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class CategoryJob:
    """One category to detect: the images that get maps and, few-shot, the bank's images."""

    category: str
    images: tuple[dict, ...]
    normals: tuple[dict, ...] = ()

    @property
    def mode(self) -> str:
        return FEW_SHOT if self.normals else ZERO_SHOT


@dataclass
class Features:
    """Stored features of some images, stacked: ids (N,), layers (N, L, h, w, C) fp16,
    cls (N, C), shapes (N, 2) = the images' (H, W)."""

    ids: list[str]
    layers: np.ndarray
    cls: np.ndarray
    shapes: np.ndarray

    def take(self, ids: Sequence[str]) -> "Features":
        pos = {i: n for n, i in enumerate(self.ids)}
        idx = np.array([pos[i] for i in ids], np.int64)
        return Features(list(ids), self.layers[idx], self.cls[idx], self.shapes[idx])

    @staticmethod
    def concat(parts: Sequence["Features"]) -> "Features":
        return Features([i for p in parts for i in p.ids], np.concatenate([p.layers for p in parts]),
                        np.concatenate([p.cls for p in parts]), np.concatenate([p.shapes for p in parts]))


@dataclass
class CategoryResult:
    """Patch-grid maps (N, h, w) and image scores of one category's images."""

    job: CategoryJob
    patch_maps: np.ndarray
    raw_scores: np.ndarray
    scores: np.ndarray

    @property
    def range(self) -> tuple[float, float]:
        return float(self.patch_maps.min()), float(self.patch_maps.max())


def maps_root(cfg: ExperimentConfig) -> str:
    return cfg.detect.output or io.join(cfg.output, "maps")


def _normal_folder_rows(folder: str, category: str, s3: S3Config | None) -> list[dict]:
    """``<folder>/<category>/**`` when that exists, else every image under ``folder``."""
    root = io.join(folder, category) if io.is_dir(io.join(folder, category), s3) else folder
    files = io.list_files(root, s3, io.IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"detect.normal: no images under {root}")
    return [dict(image_id=f"{NORMAL_PREFIX}/{category}/{rel.rsplit('.', 1)[0]}", image_uri=io.join(root, rel),
                 category=category, gt_type="", gt_mask_uri="") for rel in files]


def plan_detection(rows: Sequence[dict], cfg: DetectConfig, s3: S3Config | None = None) -> list[CategoryJob]:
    """One job per category; a category that cannot be scored is an error before any work."""
    check_detect_config(cfg)
    by_category: dict[str, list[dict]] = {}
    for r in rows:
        by_category.setdefault(r["category"], []).append(r)
    jobs = []
    for category, images in sorted(by_category.items()):
        normals: list[dict] = []
        if cfg.mode != ZERO_SHOT:
            if cfg.normal:
                normals = _normal_folder_rows(cfg.normal, category, s3)
            else:
                normals = [r for r in images if r["gt_type"] in cfg.normal_types]
            if cfg.mode == FEW_SHOT and not normals:
                raise DataError(f"detect.mode=few_shot: category {category!r} has no normal images (types "
                                f"{', '.join(cfg.normal_types)}); set detect.normal to a folder of normal images")
        n_refs = len(normals) if normals else len(images)
        if n_refs < 2:
            what = "normal image" if normals else "image"
            raise DataError(f"detect: category {category!r} has {n_refs} {what}; scoring needs at least 2 "
                            f"(add images, or set detect.normal to a folder of normal images)")
        jobs.append(CategoryJob(category, tuple(images), tuple(normals)))
    return jobs


def feature_rows(jobs: Sequence[CategoryJob]) -> list[dict]:
    """Every image whose features a plan needs, once."""
    seen: dict[str, dict] = {}
    for job in jobs:
        for r in (*job.images, *job.normals):
            seen.setdefault(r["image_id"], r)
    return list(seen.values())


def _seeded(seed: int, text: str) -> np.random.Generator:
    import zlib

    return np.random.default_rng([seed, zlib.crc32(text.encode())])


def reference_sample(types: Sequence[str], size: int, seed: int) -> np.ndarray:
    """Sorted positions of a seeded reference sample of ``size`` images, stratified by type
    (proportional, largest remainders); all images when ``size`` is 0 or not smaller."""
    n = len(types)
    if size <= 0 or size >= n:
        return np.arange(n)
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(types):
        groups.setdefault(t, []).append(i)
    names = sorted(groups)
    quota = np.array([size * len(groups[t]) / n for t in names])
    take = np.floor(quota).astype(int)
    for j in np.argsort(-(quota - take), kind="stable")[: size - int(take.sum())]:
        take[j] += 1
    chosen = [_seeded(seed, t).choice(groups[t], int(c), replace=False) for t, c in zip(names, take) if c]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def stratified_subsets(types: Sequence[str], size: int, seed: int) -> list[np.ndarray]:
    """Positions split into ceil(n / size) subsets, each type dealt evenly across them (seeded)."""
    n = len(types)
    count = max(1, math.ceil(n / size)) if size > 0 else 1
    order: list[int] = []
    for t in sorted(set(types)):
        members = [i for i, x in enumerate(types) if x == t]
        order += _seeded(seed, t).permutation(members).tolist()
    return [np.sort(np.array(order[s::count], np.int64)) for s in range(count)]


def extract_local(rows: Sequence[dict], cfg: DetectConfig, s3: S3Config | None = None,
                  progress: Progress | None = None, model_kwargs: Mapping[str, Any] | None = None) -> Features:
    """Features of ``rows`` in this process, in batches of ``detect.batch_size``."""
    extractor = PatchFeatureExtractor(cfg, s3, model_kwargs=model_kwargs)
    parts = []
    for start in range(0, len(rows), cfg.batch_size):
        batch = rows[start:start + cfg.batch_size]
        parts.append(feature_batch(extractor, batch, s3))
        if progress:
            progress("features", start + len(batch), len(rows))
    return Features.concat(parts)


def feature_batch(extractor: PatchFeatureExtractor, rows: Sequence[dict], s3: S3Config | None = None) -> Features:
    images = [io.read_image(r["image_uri"], s3) for r in rows]
    layers, cls = extractor(images)
    return Features([r["image_id"] for r in rows], layers, cls, np.array([im.shape[:2] for im in images], np.int64))


def score_subset(query: np.ndarray, self_index: np.ndarray, reference: np.ndarray, mode: str,
                 cfg: DetectConfig) -> np.ndarray:
    """Patch-grid maps of one subset (its stored tokens) against a category's reference."""
    score = bank_scores if mode == FEW_SHOT else mutual_scores
    return score(query, reference, self_index, cfg)


SubsetRunner = Callable[[np.ndarray, list[tuple[np.ndarray, np.ndarray]], str, DetectConfig], list[np.ndarray]]


def run_subsets_local(reference: np.ndarray, subsets: list[tuple[np.ndarray, np.ndarray]], mode: str,
                      cfg: DetectConfig) -> list[np.ndarray]:
    return [score_subset(q, s, reference, mode, cfg) for q, s in subsets]


def detect_category(job: CategoryJob, features: Features, cfg: DetectConfig,
                    run_subsets: SubsetRunner = run_subsets_local) -> CategoryResult:
    """Score one category: reference (sample or bank), subsets, image scores."""
    ids = [r["image_id"] for r in job.images]
    types = [r["gt_type"] for r in job.images]
    query = features.take(ids)
    if job.mode == FEW_SHOT:
        ref_ids = [r["image_id"] for r in job.normals]
    else:
        ref_ids = [ids[i] for i in reference_sample(types, cfg.reference_images, cfg.seed)]
    reference = features.take(ref_ids).layers
    ref_pos = {i: n for n, i in enumerate(ref_ids)}
    self_index = np.array([ref_pos.get(i, -1) for i in ids], np.int64)
    parts = stratified_subsets(types, cfg.subset_size, cfg.seed)
    maps = run_subsets(reference, [(query.layers[p], self_index[p]) for p in parts], job.mode, cfg)
    patch_maps = np.empty((len(ids), *maps[0].shape[1:]), np.float32)
    for p, m in zip(parts, maps):
        patch_maps[p] = m
    raw = patch_maps.reshape(len(ids), -1).max(1)
    scores = rescore(raw, query.cls, cfg.rescore_k) if job.mode == ZERO_SHOT else raw.astype(np.float64)
    return CategoryResult(job, patch_maps, raw, scores)


def score_table(results: Sequence[CategoryResult], root: str) -> pa.Table:
    rows = []
    for res in results:
        for r, raw, score in zip(res.job.images, res.raw_scores, res.scores):
            rows.append(dict(image_id=r["image_id"], image_uri=r["image_uri"], map_uri=map_uri(root, r["image_id"]),
                             category=r["category"], gt_type=r["gt_type"], gt_mask_uri=r.get("gt_mask_uri", ""),
                             mode=res.job.mode, max_score=float(raw), score=float(score)))
    return pa.Table.from_pylist(rows)


def write_scores(table: pa.Table, root: str, s3: S3Config | None = None) -> None:
    io.write_table(table, io.join(root, f"{SCORES_FILE}.parquet"), s3)
    io.write_table(table, io.join(root, f"{SCORES_FILE}.csv"), s3)


def write_category(res: CategoryResult, features: Features, root: str, cfg: DetectConfig,
                   s3: S3Config | None = None) -> None:
    lo, hi = res.range
    ids = [r["image_id"] for r in res.job.images]
    write_maps(ids, res.patch_maps, features.take(ids).shapes, lo, hi, root,
               cfg.blur_sigma if res.job.mode == FEW_SHOT else 0.0, cfg.image_size, cfg.write_npy, s3)


def detect_local(cfg: ExperimentConfig, rows: Sequence[dict] | None = None, progress: Progress | None = None,
                 model_kwargs: Mapping[str, Any] | None = None) -> pa.Table:
    """``ncd detect`` in this process: maps under ``maps_root(cfg)`` and the image-score
    table (also written there as ``image_scores.parquet`` / ``.csv``), returned."""
    rows = list(rows) if rows is not None else catalog_images(cfg.data, cfg.s3)
    jobs = plan_detection(rows, cfg.detect, cfg.s3)
    features = extract_local(feature_rows(jobs), cfg.detect, cfg.s3, progress, model_kwargs)
    root = maps_root(cfg)
    results = []
    for n, job in enumerate(jobs):
        res = detect_category(job, features, cfg.detect)
        write_category(res, features, root, cfg.detect, cfg.s3)
        results.append(res)
        log.info("detect: %s (%s, %d images) done", job.category, job.mode, len(job.images))
        if progress:
            progress("score", n + 1, len(jobs))
    table = score_table(results, root)
    write_scores(table, root, cfg.s3)
    return table


def write_detector_maps(rows: Sequence[dict], maps_dir: str, cfg: DetectConfig | None = None,
                        s3: S3Config | None = None, progress: Progress | None = None,
                        model_kwargs: Mapping[str, Any] | None = None) -> pa.Table:
    """The detector's maps for catalog rows (``catalog_images`` / ``catalog_mtd_images``)
    written to ``<maps_dir>/<image_id>.png``, the place the catalog reads (MTD:
    ``<maps_dir>/MTD/MT_<Type>/<stem>.png``); returns the image-score table."""
    detect = dataclasses.replace(cfg or DetectConfig(), output=maps_dir)
    return detect_local(ExperimentConfig(detect=detect, s3=s3 or S3Config()), rows, progress, model_kwargs)
