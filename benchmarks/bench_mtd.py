"""Defect-type discovery on any masked-defect folder: AnomalyNCD mode, ProtoAnomalyNCD mode
and a strong frozen-feature baseline on the same crops, several seeds, in one run.

    python benchmarks/bench_mtd.py ../shared/datasets/mtd
    python benchmarks/bench_mtd.py ../shared/datasets/deeppcb --max-per-type 100
    python benchmarks/bench_mtd.py demo
    python benchmarks/bench_mtd.py DATASET --seeds 1 --arms baseline --work /tmp/w

Data: a folder of ``<Type>/Imgs/<stem>.jpg`` with ``<stem>.png`` gt masks (MTD's ``MT_``
prefix optional), or ``demo`` (ncd's synthetic set, 2 products x (5 families x 24 + 6
normal), generated into the work folder, evaluated per product as ncd does). A normal
class (``MT_Free``, ``good``...) is sampled to ``--normal-images`` (191: MTD's protocol,
METHOD.md 7.2); without one every defect image is used. ``--max-per-type N`` takes a
seeded sample of N images per defect type. Anomaly maps (``--maps``): ``gt`` makes them
from the gt masks (``ncd.data.gt_maps``: blurred, noisy, with false positives; no detector
is run, so the figures are not comparable one-to-one with published detector-map
numbers), or a folder of a detector's maps laid out as the dataset.

Arms (same MEBin crops; settings of ``ncd/configs/mtd_bench.yaml`` plus ``--set``):
- ``ncd``: ``ncd discover`` in AnomalyNCD mode;
- ``proto``: ``ncd discover --method protoanomalyncd`` (k-means prototype init);
- ``frozen``: ``ncd discover --method frozen`` (nothing trained: k-means and refinement on
  DINOv2 block 7 at 160 px and EfficientNet-Lite0 at 224 px, dihedral-averaged);
- ``baseline``: spherical k-means (10 restarts, true K) on frozen features of the same
  crops (``benchmarks/frozen_baseline.py``: DINOv2-S/14 blocks 4..8 x CLS / mean patch /
  mask-weighted mean patch, EfficientNet-Lite0, at 112 / 160 / 224 px, whole crop resized,
  test view, and resized averaged over the 8 dihedral transforms; and the two backbones'
  strongest variants concatenated). ``baseline`` is the strongest variant by mean NMI, chosen with the
  labels: this favours the baseline.
Each arm runs ``--seeds`` times (``train.seed`` = 0..N-1; the baseline's k-means seeds
likewise); reported: the mean over seeds and the spread (std) as ``*_std``.

K estimates (label-free, never from embeddings trained with the true K): each arm's
``--k auto`` (``infer.k_criterion`` over its K range) on the features the arm starts from
(its model before training, region level); ``baseline`` the silhouette on its strongest
variant's image features. K in 2..12. Each arm also reports ``start_nmi``, k-means (true K)
on its model's features before training, and ``gain_over_start``: a run that ends below
its start says so here. A seed whose model collapsed (``ncd.evaluate.health``) is listed in
``collapsed_seeds`` and printed as FAILED; its metrics stay in the mean. A seed whose trained
heads collapsed before the refinement re-spread them is listed in ``heads_collapsed_seeds``.

Last line: JSON with ``ncd``, ``proto``, ``frozen``, ``baseline`` (``nmi``, ``ari``, ``f1``,
``nmi_std``..., ``k_estimate``), ``baseline_variants``, ``k_true``, ``seconds``,
``dataset`` and ``settings``.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
import warnings

import pyarrow as pa

import numpy as np
from frozen_baseline import (add_ensemble, cluster_images, evaluate_variants, feature_sets, image_features, k_estimate,
                             refined_images, summarise)
from mtd_common import METRICS, bench_parser, prepare_args, work_dir

from ncd.config import ExperimentConfig, apply_overrides
from ncd.methods import prediction_temperature
from ncd.pipeline import category_groups, discover, estimate_novel_k, frozen_features, local_preprocess
from ncd.data.splits import type_counts

ARMS = {
    "ncd": ["method=anomalyncd"],
    # prototypes start from k-means (PROTO.md); the masked CLS: pooled patch tokens lost 0.07 on MTD here
    "proto": ["method=protoanomalyncd", "train.kmeans_init=true", "model.feature=cls"],
    # nothing trained: DINOv2 block 7 at 160 px and EfficientNet-Lite0 at 224 px, dihedral-averaged
    "frozen": ["method=frozen", "model.image_size=224", "model.frozen_vit_size=160", "model.feature_block=7"],
}
ARM_TITLES = {"ncd": "ncd, AnomalyNCD mode", "proto": "ncd, ProtoAnomalyNCD mode",
              "frozen": "ncd, frozen features (nothing trained)"}
BASELINE = "baseline"


USER_SETTINGS: list[str] = []  # the command line's --set, applied after an arm's own settings (set in main)


def arm_config(cfg: ExperimentConfig, work: str, arm: str, seed: int) -> ExperimentConfig:
    """One arm and seed: its own output, the arm's shared preprocess folder, ``train.seed``;
    ``--set`` overrides the arm's settings."""
    return apply_overrides(cfg, [*ARMS[arm], *USER_SETTINGS, f"output={work}/{arm}/seed{seed}",
                                 f"preprocess.output={work}/regions/{arm}", f"train.seed={seed}"])


def one_or_all(per_category: dict[str, int]) -> int | dict[str, int]:
    """A single value when every category agrees (or there is one), else the mapping."""
    values = set(per_category.values())
    return values.pop() if len(values) == 1 else per_category


def true_k_per_category(manifest: pa.Table) -> dict[str, int]:
    """Number of gt types (normal class included) per category of the evaluation split."""
    types: dict[str, set] = {}
    for category, typ in zip(manifest.column("category").to_pylist(), manifest.column("gt_type").to_pylist()):
        types.setdefault(category, set()).add(typ)
    return {c: len(t) for c, t in types.items()}


def arm_start(cfg: ExperimentConfig, regions: pa.Table) -> tuple[dict[str, int], dict[str, float]]:
    """The arm's model before training: its label-free K per category (``--k auto``'s criterion,
    ``estimate_novel_k``) and the k-means (true K) metrics of its region features."""
    ks, parts = {}, []
    for name, part in category_groups(apply_overrides(cfg, ["train.per_category=true"]), regions):
        feats = frozen_features(cfg, part)
        ks[name] = estimate_novel_k(cfg, part, feats=feats).k
        parts.append((part, feats))
    table = pa.concat_tables([p for p, _ in parts])
    categories, truth, x = image_features(table, np.concatenate([f for _, f in parts]), cfg.infer.area_temperature)
    return ks, cluster_images(categories, truth, x, seed=0)


def run_arm(cfg: ExperimentConfig, manifest: pa.Table, work: str, arm: str, seeds: int, seconds: dict) -> dict:
    """``ncd discover`` of ``arm`` once per seed; mean and spread of the image-level metrics."""
    runs, collapsed, heads_collapsed, unrefined = [], [], [], []
    for seed in range(seeds):
        arm_cfg = arm_config(cfg, work, arm, seed)
        shutil.rmtree(arm_cfg.output, ignore_errors=True)  # train afresh: never resume an earlier run's model
        summary = discover(apply_overrides(arm_cfg, ["infer.on_collapse=warn"]), manifest=manifest,
                           progress=lambda s: print(f"[{arm} seed {seed}] {s}", flush=True))
        runs.append(summary["metrics"]["image"]["mean"])
        if summary.get("image_metrics_before_refine"):
            unrefined.append(summary["image_metrics_before_refine"]["mean"])
        if summary["collapsed"]:
            collapsed.append(seed)
            print(f"[{arm} seed {seed}] FAILED: collapsed ({', '.join(summary['collapsed'])})", flush=True)
        if any(info["head_health"]["collapsed"] for info in summary["refine"].values()):
            heads_collapsed.append(seed)  # the refinement re-spread them: a trained model that failed all the same
            print(f"[{arm} seed {seed}] the trained heads collapsed (before the refinement)", flush=True)
        seconds[f"{arm}_seed{seed}"] = summary["seconds"]
        print(f"[{arm} seed {seed}] NMI {runs[-1]['nmi']:.3f} ARI {runs[-1]['ari']:.3f} F1 {runs[-1]['f1']:.3f}",
              flush=True)
    regions = local_preprocess(arm_config(cfg, work, arm, 0), manifest)
    result = summarise(runs)
    result["regions"] = regions.num_rows
    result["nmi_per_seed"] = [round(r["nmi"], 4) for r in runs]
    result["collapsed_seeds"] = collapsed
    result["heads_collapsed_seeds"] = heads_collapsed
    if unrefined:  # the same models' head predictions before the neighbour-consistency refinement
        result["before_refine"] = {m: v for m, v in summarise(unrefined).items() if m in ("nmi", "ari", "f1", "nmi_std")}
    t0 = time.perf_counter()
    ks, start = arm_start(arm_config(cfg, work, arm, 0), regions)
    result["k_estimate"] = one_or_all(ks)
    result["start_nmi"] = round(start["nmi"], 4)
    result["gain_over_start"] = round(result["nmi"] - start["nmi"], 4)
    seconds[f"{arm}_start"] = round(time.perf_counter() - t0, 1)
    return result


def run_baseline(cfg: ExperimentConfig, manifest: pa.Table, work: str, seeds: int,
                 seconds: dict) -> tuple[dict, dict]:
    """The strongest frozen-feature variant (by mean NMI) and every variant's figures."""
    regions = local_preprocess(arm_config(cfg, work, "ncd", 0), manifest)
    t0 = time.perf_counter()
    feats, feature_seconds = feature_sets(cfg, regions, f"{work}/features", lambda s: print(s, flush=True))
    seconds["baseline_features"] = round(time.perf_counter() - t0, 1)
    seconds["baseline_features_per_pass"] = feature_seconds
    t0 = time.perf_counter()
    variants = evaluate_variants(regions, feats, seeds, cfg.infer.area_temperature)
    add_ensemble(regions, feats, variants, seeds, cfg.infer.area_temperature)
    best = max(variants, key=lambda v: variants[v]["nmi"])
    k = one_or_all(k_estimate(regions, feats[best], cfg))
    seconds["baseline_kmeans"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    categories, truth, x = image_features(regions, feats[best], cfg.infer.area_temperature)
    refined = summarise([refined_images(categories, truth, x, seed, cfg.refine, prediction_temperature(cfg))
                         for seed in range(seeds)])
    seconds["baseline_refined"] = round(time.perf_counter() - t0, 1)
    return {**variants[best], "variant": best, "k_estimate": k, "regions": regions.num_rows,
            "refined": refined}, variants


def _cell(r: dict, metric: str) -> str:
    return f"{r[metric]:.3f} ± {r[metric + '_std']:.3f}"


def print_tables(results: dict, variants: dict) -> None:
    print("\n| arm | NMI | ARI | F1 | K estimate | NMI before training | gain | NMI before refinement | collapsed seeds |"
          "\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for arm, r in results.items():
        title = ARM_TITLES.get(arm) or f"baseline: k-means on frozen features ({r['variant']})"
        unrefined = _cell(r["before_refine"], "nmi") if "before_refine" in r else "-"
        heads = f" (heads: {r['heads_collapsed_seeds']})" if r.get("heads_collapsed_seeds") else ""
        start = (f" | {r['start_nmi']:.3f} | {r['gain_over_start']:+.3f} | {unrefined} | {r['collapsed_seeds'] or '-'}{heads}"
                 if "start_nmi" in r else " | | | | ")
        print(f"| {title} | " + " | ".join(_cell(r, m) for m in METRICS) + f" | {r['k_estimate']}{start} |")
    if BASELINE in results:
        r = results[BASELINE]["refined"]
        print("| ablation: the refinement alone on the strongest frozen variant (no training) | "
              + " | ".join(_cell(r, m) for m in METRICS) + " | | | | | |")
    if variants:
        print("\n| baseline variant | NMI | ARI | F1 |\n| --- | --- | --- | --- |")
        for v, r in variants.items():
            print(f"| {v} | " + " | ".join(_cell(r, m) for m in METRICS) + " |")


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--seeds", type=int, default=3, help="runs per arm (train.seed 0..N-1)")
    parser.add_argument("--arms", default="ncd,proto,frozen,baseline",
                        help="comma-separated: ncd, proto, frozen, baseline")
    args = parser.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in (*ARMS, BASELINE)]
    if unknown or not arms:
        parser.error(f"--arms {args.arms}: unknown arm(s) {', '.join(unknown) or '(none)'}; "
                     f"valid: {', '.join([*ARMS, BASELINE])}")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    work = work_dir(args, "bench_mtd_")
    t_all = time.perf_counter()
    seconds: dict = {}

    t0 = time.perf_counter()
    cfg, manifest = prepare_args(args, work, args.overrides)
    USER_SETTINGS[:] = args.overrides
    seconds["maps_and_split"] = round(time.perf_counter() - t0, 1)
    counts = type_counts(manifest)
    print(f"{cfg.name}: {manifest.num_rows} images ({', '.join(f'{t} {n}' for t, n in counts.items())}), "
          f"backbone {cfg.model.backbone} ({cfg.model.weights}), {cfg.model.image_size} px, "
          f"{cfg.train.epochs} epochs, {args.seeds} seed(s), work folder {work}", flush=True)

    results: dict[str, dict] = {}
    variants: dict = {}
    for arm in arms:
        t0 = time.perf_counter()
        if arm == BASELINE:
            results[arm], variants = run_baseline(cfg, manifest, work, args.seeds, seconds)
        else:
            results[arm] = run_arm(cfg, manifest, work, arm, args.seeds, seconds)
        seconds[arm] = round(time.perf_counter() - t0, 1)
        print(f"[{arm}] done in {seconds[arm]:.0f}s", flush=True)
    seconds["total"] = round(time.perf_counter() - t_all, 1)
    region_counts = {arm: r.pop("regions") for arm, r in results.items()}

    k_true = one_or_all(true_k_per_category(manifest))
    print_tables(results, variants)
    print(json.dumps({
        **results, "baseline_variants": variants, "k_true": k_true, "seconds": seconds,
        "dataset": cfg.name,
        "settings": {"dataset_path": cfg.data.root, "arms": arms, "seeds": args.seeds, "maps": args.maps,
                     "max_per_type": args.max_per_type, "normal_images": args.normal_images,
                     "images": manifest.num_rows, "regions": region_counts, "images_per_type": counts,
                     "backbone": cfg.model.backbone, "weights": cfg.model.weights,
                     "image_size": cfg.model.image_size, "epochs": cfg.train.epochs, "overrides": args.overrides},
    }))


if __name__ == "__main__":
    main()
