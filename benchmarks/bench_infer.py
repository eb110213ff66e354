"""End-to-end inference time per image, ncd against an upstream-like path, in one process.

Run with no arguments (CPU: a few minutes):

    python benchmarks/bench_infer.py

From anomaly maps to image labels for a seeded synthetic category (256 px images):

- ncd: ``ncd.preprocess.regions.preprocess_manifest`` (MEBin with ``ncd.preprocess.mebin``, crops, the
  region table), ``ncd.infer.forward.forward_regions`` (batched model calls), then
  ``ncd.infer.predict.region_probabilities`` and the area-softmax merge (``image_predictions``);
- upstream-like: per image, MEBin one threshold at a time (``bench_mebin.reference_set``,
  the upstream procedure), the same crops, one model call per crop (batch 1, the
  test view), then the same merge.

Same random-init model for both (CPU: ``vit_small_patch16_224`` at 224 px, fp32; CUDA:
the paper's ``vit_base_patch8_224``, bf16). One thread on the CPU. ``speedup`` = the
upstream-like ms per image over ncd's (goal >= 10; upstream reports 153 ms per image on
a GPU). Last line: one JSON object.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_mebin import reference_set  # noqa: E402
from ncd.data import io  # noqa: E402
from ncd.train.augment import eval_view  # noqa: E402
from ncd.data.catalog import build_manifest  # noqa: E402
from ncd.config import load_config  # noqa: E402
from ncd.preprocess.crops import crop_regions, mask_to_image_size, score_map_to_image_size  # noqa: E402
from ncd.train.datasets import eval_set  # noqa: E402
from ncd.train.engine import view_spec  # noqa: E402
from ncd.infer.forward import forward_regions  # noqa: E402
from ncd.model.precision import autocast  # noqa: E402
from ncd.preprocess.mebin import normalize  # noqa: E402
from ncd.infer.merge import merge_regions  # noqa: E402
from ncd.methods import build_model  # noqa: E402
from ncd.infer.predict import TrainedModel, image_predictions, region_probabilities  # noqa: E402
from ncd.preprocess.regions import category_ranges, image_statistics, map_as_uint8, preprocess_manifest  # noqa: E402
from ncd.data.synthetic import SyntheticSpec, write_dataset  # noqa: E402

SPEC = SyntheticSpec(categories=("plate",), images_per_family=6, normal_images=4, image_size=256, seed=21)
NUM_BASE, NUM_NOVEL = 0, 6


def ncd_path(trained: TrainedModel, manifest, device: torch.device) -> tuple[int, int]:
    """Regions and images labelled by ncd's path."""
    cfg = trained.cfg
    table = preprocess_manifest(manifest, cfg.mebin, cfg.crop, cfg.data)
    out = forward_regions(trained.model, eval_set(table), view_spec(cfg), 64, device, cfg.train.amp)
    probs = region_probabilities(trained, out.logits)
    images, _ = image_predictions(table, probs, cfg.infer.area_temperature)
    return table.num_rows, images.num_rows


@torch.no_grad()
def upstream_path(trained: TrainedModel, manifest, device: torch.device) -> tuple[int, int]:
    """Per-threshold MEBin, the same crops, one model call per crop, the same merge."""
    cfg = trained.cfg
    spec = view_spec(cfg)
    rows = manifest.to_pylist()
    rng = category_ranges([image_statistics(r) for r in rows], cfg.mebin)[rows[0]["category"]]
    maps = [map_as_uint8(io.read_map(r["map_uri"]), rng) for r in rows]
    binarised = reference_set(maps, cfg.mebin)
    image_ids, areas, logits = [], [], []
    for row, amap, (mask, _, count) in zip(rows, maps, binarised):
        image = io.read_image(row["image_uri"])
        shape = image.shape[:2]
        score_map = score_map_to_image_size(normalize(amap, rng.min_th, rng.max_th), shape)
        for region in crop_regions(image, mask_to_image_size(mask, shape), score_map, count, cfg.crop):
            if region.area <= 0:
                continue
            img = torch.from_numpy(np.ascontiguousarray(region.crop)).permute(2, 0, 1)
            m = torch.from_numpy(region.mask).float()[None] / 255.0
            view, vmask = eval_view(img, m, spec)
            with autocast(device, cfg.train.amp):
                out = trained.model(view[None].to(device), vmask[None].to(device))
            logits.append([z.float().cpu().numpy() for z in out["logits"]])
            image_ids.append(row["image_id"])
            areas.append(region.area)
    heads = [np.concatenate([z[h] for z in logits]) for h in range(len(logits[0]))]
    probs = region_probabilities(trained, heads)
    ids, _ = merge_regions(image_ids, probs, np.asarray(areas, np.float64), cfg.infer.area_temperature)
    return len(image_ids), len(ids)


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    backbone = "vit_base_patch8_224" if cuda else "vit_small_patch16_224"
    with tempfile.TemporaryDirectory(prefix="ncd_bench_infer_") as tmp:
        root = write_dataset(Path(tmp) / "data", SPEC, workers=1)
        cfg = load_config(None, [f"data.root={root}", f"model.backbone={backbone}", "model.weights=random",
                                 "model.image_size=224", "model.n_head=4", f"train.amp={str(cuda).lower()}"])
        manifest = build_manifest(cfg.data)
        torch.manual_seed(0)
        model = build_model(cfg, NUM_BASE, NUM_NOVEL).to(device).eval()
        trained = TrainedModel(model, cfg, {"num_base": NUM_BASE, "num_novel": NUM_NOVEL}, 0)
        ncd_path(trained, manifest.slice(0, 2), device)  # warm-up (kernels, caches)
        times, counts = {}, {}
        for name, fn in (("ncd", ncd_path), ("upstream_like", upstream_path)):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            counts[name] = fn(trained, manifest, device)
            if cuda:
                torch.cuda.synchronize()
            times[name] = time.perf_counter() - t0
    n = manifest.num_rows
    ms = {k: 1000 * v / n for k, v in times.items()}
    for k in times:
        print(f"{k:14s} {ms[k]:8.1f} ms/image ({counts[k][0]} regions, {counts[k][1]} images labelled)")
    print(json.dumps({
        "speedup": round(ms["upstream_like"] / ms["ncd"], 2),
        "ms_per_image": round(ms["ncd"], 2), "upstream_like_ms_per_image": round(ms["upstream_like"], 2),
        "images": n, "regions": counts["ncd"][0], "upstream_like_regions": counts["upstream_like"][0],
        "backbone": backbone, "device": torch.cuda.get_device_name() if cuda else "cpu (1 thread)",
        "image_size": SPEC.image_size,
    }))


if __name__ == "__main__":
    main()
