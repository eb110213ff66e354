"""The frozen-feature baseline of the discovery benchmarks: spherical k-means (true K,
10 restarts, one seed per benchmark seed) on frozen features of the same crops, merged to
image level with the same area weights, per category as ncd's evaluation.

Variants: DINOv2-S/14 (the benchmark's backbone, blocks 4..8, CLS / mean patch /
region-mask-weighted mean patch) and EfficientNet-Lite0 (mean / mask-weighted pool of the
last feature map), each at 112 / 160 / 224 px, on the whole crop resized (``resize``), on
ncd's test view (``eval``) and on the resized crop averaged over its 8 dihedral transforms
(``d8``, ``ncd.infer.features``; DINOv2 at 112 and 160 px only: 224 px costs 2.5x as much
and was never its strongest size); and ``ensemble``, the strongest DINOv2 variant and the
strongest EfficientNet variant concatenated (each L2-normalised). Features are computed
once per (backbone, size, view), all blocks in one pass, and cached under the work folder;
always in float32, also where ncd's ``train.amp`` computes in bf16: the baseline is never
weakened for speed.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pyarrow as pa

from mtd_common import METRICS, image_level

from ncd.cluster.kmeans import kmeans
from ncd.config import ExperimentConfig, RefineConfig, apply_overrides
from ncd.infer.features import frozen_region_features
from ncd.evaluate.k_estimation import estimate_k, l2_normalise
from ncd.evaluate.metrics import per_category_metrics
from ncd.model.backbone import load_backbone
from ncd.model.weights import efficientnet
from ncd.train.refine import refine_prototypes

SIZES = (112, 160, 224)
BLOCKS = tuple(range(4, 9))
KMEANS_RESTARTS = 10
DINO = "dinov2-s"
EFFNET = "effnet-lite0"
ENSEMBLE = "ensemble"
VIEWS = {"eval": ("eval", False), "resize": ("resize", False), "d8": ("resize", True)}  # name: (view, dihedral)
D8_SIZES = {DINO: (112, 160), EFFNET: SIZES}


def cache_key(regions: pa.Table) -> str:
    """Fingerprint of the crops (ids, crop and mask bytes): a cached feature file is reused only
    for the very same crops."""
    h = hashlib.sha1()
    for column in ("region_id", "crop_png", "mask_png"):
        for value in regions.column(column).to_pylist():
            h.update(value if isinstance(value, bytes) else value.encode())
    return h.hexdigest()[:12]


def _vit(cfg: ExperimentConfig, size: int):
    backbone = load_backbone(apply_overrides(cfg, [f"model.image_size={size}"]).model, cfg.s3)
    if len(backbone.blocks) <= max(BLOCKS):
        raise SystemExit(f"the baseline reads blocks {BLOCKS[0]}..{BLOCKS[-1]}; {cfg.model.backbone} with "
                         f"model.keep_blocks={cfg.model.keep_blocks} has {len(backbone.blocks)}")
    return backbone


def feature_sets(cfg: ExperimentConfig, regions: pa.Table, cache: str,
                 progress: Callable[[str], None] = print) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """{variant: (R, D) region features} for every backbone, size, view and pooling, and the
    seconds spent per (backbone, size, view); cached as ``cache/<backbone>_<size>_<view>_<key>.npz``."""
    os.makedirs(cache, exist_ok=True)
    key = cache_key(regions)
    backbones: list[tuple[str, Callable[[int], object], tuple[int, ...]]] = [(DINO, lambda s: _vit(cfg, s), BLOCKS)]
    if efficientnet.available():
        backbones.append((EFFNET, lambda s: efficientnet.load_efficientnet_lite0(0), ()))
    else:
        progress(f"baseline: {efficientnet.missing_message()}; its variants are skipped")
    feats: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for name, build, blocks in backbones:
        for size in SIZES:
            model = None
            for view, (view_kind, dihedral) in VIEWS.items():
                if dihedral and size not in D8_SIZES[name]:
                    continue
                path = f"{cache}/{name}_{size}_{view}_{key}.npz"
                t0 = time.perf_counter()
                if os.path.exists(path):
                    part = dict(np.load(path))
                else:
                    model = model or build(size)
                    part = frozen_region_features(regions, model, blocks, size, view_kind, crop_pct=cfg.model.crop_pct,
                                                  dihedral=dihedral)
                    np.savez(path, **part)
                seconds[f"{name}/{size}/{view}"] = round(time.perf_counter() - t0, 1)
                progress(f"baseline features {name} {size} px {view}: {seconds[f'{name}/{size}/{view}']:.1f}s")
                feats.update({f"{name}/{size}px/{view}/{k}": v for k, v in part.items()})
    return feats, seconds


def image_features(regions: pa.Table, feats: np.ndarray, temperature: float) -> tuple[list, list, np.ndarray]:
    """Image categories, gt types and unit features (region features normalised, merged, normalised)."""
    truth, pooled = image_level(regions, l2_normalise(feats), temperature)
    return _image_categories(regions), truth, l2_normalise(pooled)


def _image_categories(regions: pa.Table) -> list[str]:
    seen: dict[str, str] = {}
    for image_id, category in zip(regions.column("image_id").to_pylist(), regions.column("category").to_pylist()):
        seen.setdefault(image_id, category)
    return list(seen.values())


def cluster_images(categories: list, truth: list, x: np.ndarray, seed: int) -> dict[str, float]:
    """Spherical k-means per category with that category's true K; metrics averaged over categories."""
    cats = np.asarray(categories)
    labels = np.zeros(len(x), np.int64)
    for c in dict.fromkeys(categories):
        idx = np.flatnonzero(cats == c)
        k = len({truth[i] for i in idx})
        labels[idx] = kmeans(x[idx], k, seed=seed, spherical=True, nredo=KMEANS_RESTARTS).labels
    return per_category_metrics(categories, truth, labels)["mean"]


def refined_images(categories: list, truth: list, x: np.ndarray, seed: int, cfg: RefineConfig,
                   temperature: float) -> dict[str, float]:
    """``cluster_images`` followed by ncd's refinement (``ncd.train.refine``, k-means start) of each
    category's clusters on the same image features: the refinement stage without training."""
    cats = np.asarray(categories)
    labels = np.zeros(len(x), np.int64)
    start = replace(cfg, init="kmeans", kmeans_restarts=KMEANS_RESTARTS)
    for c in dict.fromkeys(categories):
        idx = np.flatnonzero(cats == c)
        k = len({truth[i] for i in idx})
        protos = refine_prototypes(x[idx], np.zeros((k, x.shape[1]), np.float32), temperature, start, seed).prototypes
        labels[idx] = (x[idx] @ protos.T).argmax(1)
    return per_category_metrics(categories, truth, labels)["mean"]


def summarise(runs: list[dict[str, float]]) -> dict[str, float]:
    """Mean over seeds of each metric, and the spread (population std) of each."""
    out = {k: round(float(np.mean([r[k] for r in runs])), 4) for k in METRICS}
    out.update({f"{k}_std": round(float(np.std([r[k] for r in runs])), 4) for k in METRICS})
    return out


def evaluate_variants(regions: pa.Table, feats: dict[str, np.ndarray], seeds: int,
                      temperature: float) -> dict[str, dict[str, float]]:
    """{variant: mean and spread over ``seeds`` k-means seeds of NMI, ARI, F1}."""
    out = {}
    for variant, f in feats.items():
        categories, truth, x = image_features(regions, f, temperature)
        out[variant] = summarise([cluster_images(categories, truth, x, seed) for seed in range(seeds)])
    return out


def add_ensemble(regions: pa.Table, feats: dict[str, np.ndarray], variants: dict[str, dict[str, float]],
                 seeds: int, temperature: float) -> str | None:
    """Add ``ensemble/<dino variant>+<effnet variant>``, the strongest variant of each backbone
    concatenated (each L2-normalised), to ``feats`` and ``variants``; its name, or None with
    one backbone only."""
    best = {}
    for backbone in (DINO, EFFNET):
        mine = [v for v in variants if v.startswith(backbone + "/")]
        if mine:
            best[backbone] = max(mine, key=lambda v: variants[v]["nmi"])
    if len(best) < 2:
        return None
    name = f"{ENSEMBLE}/{best[DINO]}+{best[EFFNET]}"
    feats[name] = np.concatenate([l2_normalise(feats[best[DINO]]), l2_normalise(feats[best[EFFNET]])], axis=1)
    variants.update(evaluate_variants(regions, {name: feats[name]}, seeds, temperature))
    return name


def k_estimate(regions: pa.Table, feats: np.ndarray, cfg: ExperimentConfig) -> dict[str, int]:
    """Label-free K per category: ``infer.k_criterion`` (``ncd.evaluate.k_estimation``, what ``--k auto``
    uses) on the variant's image features, K in ``infer.k_min..k_max``."""
    categories, _, x = image_features(regions, feats, cfg.infer.area_temperature)
    cats = np.asarray(categories)
    return {c: estimate_k(x[cats == c], cfg.infer.k_min, cfg.infer.k_max, seed=0, criterion=cfg.infer.k_criterion).k
            for c in dict.fromkeys(categories)}
