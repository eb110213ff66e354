"""Label-free K on real data: every criterion's estimate per dataset, against the truth.

    python benchmarks/bench_k.py [DATASET ...] [--seeds 3] [--max-per-type N] [--work DIR]

DATASET: a folder of ``<Type>/Imgs/<stem>.jpg`` with ``<stem>.png`` masks (MTD, DeepPCB...)
or ``demo``; default: ``../shared/datasets/mtd``, ``../shared/datasets/deeppcb`` and
``demo``. Crops come from ``benchmarks/mtd_common.prepare`` (gt-derived maps, the
evaluation split; MTD: its six classes) and ``ncd.pipeline.local_preprocess``; K is
estimated per category as ``train.per_category`` would (the demo: per product).

Features (frozen, computed once per dataset and cached under the work folder):
``start``, the model before training (mask-guided CLS, what ``train.num_novel=auto``
reads), and ``block6/mask_patch``, ``block8/mask_patch`` (DINOv2-S region-mask-weighted
mean patch tokens, 112 px; ``ncd.infer.features``). Criteria: every ``ncd.evaluate.k_criteria.CRITERIA``
over ``infer.k_min..k_max`` with shared spherical k-means partitions per seed, and the
GCD criterion (Vaze et al. 2022: the K whose k-means over labelled base rows and the rows
together best recovers the base classes; Hungarian accuracy) with each base set at
hand: ncd's synthetic base families, and every other real dataset of the run.

Last line: JSON with ``k_true`` and ``auto`` (``infer.k_criterion`` on ``start``, seed 0)
per dataset/category, ``estimates[dataset][variant][criterion]`` (one K per seed),
``within_1[variant][criterion]`` (every seed's K within 1 of the truth everywhere) and
``criterion`` (auto's).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings

import numpy as np
import pyarrow as pa

from frozen_baseline import cache_key
from mtd_common import DEMO, prepare

from ncd.cluster.kmeans import kmeans
from ncd.config import ExperimentConfig, apply_overrides
from ncd.infer.features import frozen_region_features
from ncd.evaluate.k_criteria import CRITERIA, Partitions, l2_normalise
from ncd.evaluate.k_estimation import DEFAULT_CRITERION, estimate_k
from ncd.evaluate.metrics import cluster_metrics
from ncd.model.backbone import load_backbone
from ncd.pipeline import LOCAL_STAGES, base_set, category_groups, frozen_features, local_preprocess, true_k
from ncd.data.splits import MTD_NORMAL_IMAGES

DEFAULT_DATASETS = ("../shared/datasets/mtd", "../shared/datasets/deeppcb", DEMO)
BLOCKS = (6, 8)
SIZE = 112
START = "start"
VARIANTS = (START, "block6/mask_patch", "block8/mask_patch")
SYNTHETIC = "synthetic"


def gcd_criterion(x: np.ndarray, ks: range, base: np.ndarray, base_labels: list[str],
                  seed: int) -> tuple[int, dict[int, float]]:
    """GCD's K: spherical k-means of base and novel unit rows with (base classes + K) clusters;
    the score is the Hungarian accuracy of the base rows; ties go to the smaller K."""
    n_base = len(set(base_labels))
    z = np.concatenate([base, x]).astype(np.float32)
    scores = {k: cluster_metrics(base_labels, kmeans(z, n_base + k, seed=seed, spherical=True, nredo=3)
                                 .labels[: len(base)])["f1"] for k in ks}
    return max(scores, key=lambda k: (scores[k], -k)), scores


def cached(path: str, make) -> dict[str, np.ndarray]:
    if os.path.exists(path):
        return dict(np.load(path))
    feats = make()
    np.savez(path, **feats)
    return feats


def region_features(cfg: ExperimentConfig, regions: pa.Table, work: str) -> dict[str, np.ndarray]:
    """{variant: (R, D)} for ``VARIANTS``, rows in the table's order, cached in ``work``."""
    def make() -> dict[str, np.ndarray]:
        backbone = load_backbone(apply_overrides(cfg, [f"model.image_size={SIZE}"]).model, cfg.s3)
        blocks = frozen_region_features(regions, backbone, BLOCKS, SIZE, "eval", crop_pct=cfg.model.crop_pct)
        return {START: frozen_features(cfg, regions), **{v: blocks[v] for v in VARIANTS[1:]}}

    return cached(f"{work}/k_features_{cache_key(regions)}.npz", make)  # reused only for the same crops


def load_dataset(dataset: str, work: str, args: argparse.Namespace) -> tuple[str, ExperimentConfig, pa.Table,
                                                                               dict[str, np.ndarray]]:
    name = DEMO if dataset == DEMO else os.path.basename(os.path.abspath(dataset).rstrip("/"))
    folder = f"{work}/{name}"
    os.makedirs(folder, exist_ok=True)
    t0 = time.perf_counter()
    cfg, manifest = prepare(dataset, folder, args.overrides, max_per_type=args.max_per_type,
                            normal_images=MTD_NORMAL_IMAGES)
    regions = local_preprocess(cfg, manifest)
    feats = region_features(cfg, regions, folder)
    print(f"{name}: {manifest.num_rows} images, {regions.num_rows} regions, features in "
          f"{time.perf_counter() - t0:.0f}s", flush=True)
    return name, cfg, regions, feats


def synthetic_base(cfg: ExperimentConfig, work: str) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """ncd's synthetic base families (``train.base_table=synthetic``) and their features."""
    base_cfg = apply_overrides(cfg, [f"output={work}/{SYNTHETIC}", "train.base_table=synthetic"])
    table = base_set(base_cfg, LOCAL_STAGES)
    return table, region_features(cfg, table, f"{work}/{SYNTHETIC}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="*", default=list(DEFAULT_DATASETS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-per-type", type=int, default=0, help="seeded sample of N images per defect type (0: all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work", default="/tmp/ncd_bench_k", help="working folder; crops and features are cached here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    t_all = time.perf_counter()

    loaded = [load_dataset(d, work, args) for d in args.datasets]
    cfg = loaded[0][1]
    base_table, base_feats = synthetic_base(cfg, work)
    bases = {SYNTHETIC: (base_table.column("gt_type").to_pylist(), base_feats)}
    for name, _, regions, feats in loaded:
        if name != DEMO:
            bases[name] = (regions.column("gt_type").to_pylist(), feats)

    ks = range(cfg.infer.k_min, cfg.infer.k_max + 1)
    truth, auto, estimates = {}, {}, {}
    for name, dcfg, regions, feats in loaded:
        rows = np.arange(regions.num_rows)
        parts = category_groups(apply_overrides(dcfg, ["train.per_category=true"]),
                                regions.append_column("_row", pa.array(rows)))
        for category, part in parts:
            key = name if len(parts) == 1 else f"{name}/{category}"
            idx = np.asarray(part.column("_row").to_pylist())
            truth[key] = true_k(part)
            auto[key] = estimate_k(feats[START][idx], dcfg.infer.k_min, dcfg.infer.k_max, seed=0,
                                   criterion=dcfg.infer.k_criterion).k
            estimates[key] = {}
            for variant in VARIANTS:
                x = l2_normalise(feats[variant][idx])
                per: dict[str, list[int]] = {c: [] for c in CRITERIA}
                for seed in range(args.seeds):
                    shared = Partitions(x, ks, seed)
                    for criterion, fn in CRITERIA.items():
                        per[criterion].append(int(fn(x, shared, seed)[0]))
                    for base, (labels, bf) in bases.items():
                        if base != name:
                            per.setdefault(f"gcd[{base}]", []).append(
                                gcd_criterion(x, ks, l2_normalise(bf[variant]), labels, seed)[0])
                estimates[key][variant] = per
                print(f"{key} (truth {truth[key]}) {variant}: "
                      + ", ".join(f"{c} {v}" for c, v in per.items()), flush=True)

    within = {v: {} for v in VARIANTS}
    for variant in VARIANTS:
        names = sorted({c for e in estimates.values() for c in e[variant]})
        print(f"\n{variant}: K per seed (truth)\n\n| criterion | " + " | ".join(f"{k} ({truth[k]})" for k in truth)
              + " |\n| --- |" + " --- |" * len(truth))
        for c in names:
            cells = [estimates[k][variant].get(c) for k in truth]
            print(f"| {c} | " + " | ".join(",".join(map(str, e)) if e else "-" for e in cells) + " |")
            if all(cells):
                within[variant][c] = all(abs(v - truth[k]) <= 1 for k, e in zip(truth, cells) for v in e)
    print(f"\nauto (infer.k_criterion={cfg.infer.k_criterion} on {START}, seed 0): "
          + ", ".join(f"{k} {auto[k]} (truth {truth[k]})" for k in truth))
    print(json.dumps({"k_true": truth, "auto": auto, "criterion": cfg.infer.k_criterion,
                      "default_criterion": DEFAULT_CRITERION, "estimates": estimates, "within_1": within,
                      "seconds": round(time.perf_counter() - t_all, 1)}))


if __name__ == "__main__":
    main()
