"""Shared set-up of the MTD benchmarks: gt-derived maps, the six-class test split, the
image-level pooling of region features, and the frozen-feature baselines."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ncd.catalog import build_manifest, catalog_mtd_images  # noqa: E402
from ncd.cluster.kmeans import kmeans  # noqa: E402
from ncd.config import ExperimentConfig, apply_overrides, load_config  # noqa: E402
from ncd.data import EvalDataset, eval_set  # noqa: E402
from ncd.engine import view_spec  # noqa: E402
from ncd.gt_maps import write_gt_maps  # noqa: E402
from ncd.k_estimation import l2_normalise  # noqa: E402
from ncd.merge import region_weights  # noqa: E402
from ncd.metrics import cluster_metrics  # noqa: E402
from ncd.model.backbone import load_backbone  # noqa: E402

FREE_TYPE = "MT_Free"
FREE_TEST_IMAGES = 191
SPLIT_SEED = 0
BENCH_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ncd", "configs",
                            "mtd_bench.yaml")
METRICS = ("nmi", "ari", "f1")


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """The MTD benchmarks' command line: ``[dataset] [--set KEY=VALUE ...] [--work DIR]``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", default="../shared/datasets/mtd")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    return parser


def work_dir(args: argparse.Namespace, prefix: str) -> str:
    """``--work`` or a fresh temporary folder, absolute."""
    return os.path.abspath(args.work or tempfile.mkdtemp(prefix=prefix))


def test_split(manifest: pa.Table) -> pa.Table:
    """Every defective image and a seeded 191 of the normal ones (the usual test-split size)."""
    types = manifest.column("gt_type").to_pylist()
    free = [i for i, t in enumerate(types) if t == FREE_TYPE]
    rng = np.random.default_rng(SPLIT_SEED)
    keep = sorted([i for i, t in enumerate(types) if t != FREE_TYPE]
                  + rng.choice(free, min(FREE_TEST_IMAGES, len(free)), replace=False).tolist())
    return manifest.take(keep)


def prepare(dataset: str, work: str, overrides: list[str]) -> tuple[ExperimentConfig, pa.Table]:
    """Config and six-class manifest, with anomaly maps made from the gt masks under ``work``."""
    cfg = load_config(BENCH_CONFIG, [f"data.root={os.path.abspath(dataset)}", f"data.maps={work}/maps",
                                     f"output={work}/ncd", f"preprocess.output={work}/ncd", *overrides])
    if not os.path.isdir(f"{work}/maps"):
        write_gt_maps(catalog_mtd_images(cfg.data.root), f"{work}/maps", seed=SPLIT_SEED)
    return cfg, test_split(build_manifest(cfg.data))


def arm(cfg: ExperimentConfig, work: str, name: str, extra: list[str]) -> ExperimentConfig:
    return apply_overrides(cfg, [f"output={work}/{name}", f"preprocess.output={work}/{name}", *extra])


def run_arm(cfg: ExperimentConfig, manifest: pa.Table, work: str, name: str, extra: list[str],
            seconds: dict) -> tuple[dict, np.ndarray]:
    """``ncd discover`` of one arm in ``work/name``; image-level metrics and region features."""
    from ncd.pipeline import discover

    cfg = arm(cfg, work, name, extra)
    summary = discover(cfg, manifest=manifest, progress=lambda s: print(f"[{name}] {s}", flush=True))
    seconds.update({f"{name}_{k}": v for k, v in summary["seconds"].items()})
    m = summary["metrics"]["image"]["mean"]
    return {k: round(m[k], 4) for k in METRICS}, np.load(f"{work}/{name}/region_features.npy")


def image_level(regions: pa.Table, feats: np.ndarray, temperature: float) -> tuple[list[str], np.ndarray]:
    """Area-softmax weighted mean of each image's region features (as the region merge)."""
    ids = regions.column("image_id").to_pylist()
    types = regions.column("gt_type").to_pylist()
    areas = np.asarray(regions.column("area").to_pylist(), np.float64)
    order: dict[str, list[int]] = {}
    for i, image_id in enumerate(ids):
        order.setdefault(image_id, []).append(i)
    pooled = np.stack([(region_weights(areas[r], temperature)[:, None] * feats[r]).sum(0) for r in order.values()])
    return [types[r[0]] for r in order.values()], pooled


@torch.no_grad()
def frozen_features(cfg: ExperimentConfig, regions: pa.Table) -> dict[str, np.ndarray]:
    """CLS, mean patch token and both, of the frozen backbone on the crops' test views."""
    from torch.utils.data import DataLoader

    backbone = load_backbone(cfg.model, cfg.s3).eval()
    prefix = getattr(backbone, "num_prefix_tokens", 1)
    out: dict[str, list] = {"cls": [], "mean_patch": []}
    for batch in DataLoader(EvalDataset(eval_set(regions), view_spec(cfg)), batch_size=64):
        tokens = backbone.forward_features(batch["images"])
        out["cls"].append(tokens[:, 0])
        out["mean_patch"].append(tokens[:, prefix:].mean(1))
    feats = {k: torch.cat(v).numpy() for k, v in out.items()}
    feats["cls+mean_patch"] = np.concatenate([l2_normalise(feats["cls"]), l2_normalise(feats["mean_patch"])], 1)
    return feats


def strongest_baseline(cfg: ExperimentConfig, regions: pa.Table, sizes: tuple[int, ...]) -> tuple[dict, dict]:
    """Spherical k-means (10 restarts, true K) on frozen features for every input size and
    pooling; returns the best variant's metrics (by NMI) and every variant's."""
    variants = {}
    for size in sizes:
        feats = frozen_features(apply_overrides(cfg, [f"model.image_size={size}"]), regions)
        for pooling, f in feats.items():
            truth, pooled = image_level(regions, f, cfg.infer.area_temperature)
            labels = kmeans(l2_normalise(pooled), len(set(truth)), seed=0, spherical=True, nredo=10).labels
            m = cluster_metrics(truth, labels)
            variants[f"{size}px/{pooling}"] = {k: round(m[k], 4) for k in METRICS}
    best = max(variants, key=lambda v: variants[v]["nmi"])
    return {**variants[best], "variant": best}, variants
