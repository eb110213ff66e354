"""The built-in detector against ground-truth masks: image AUROC, pixel AUROC, AUPRO
(FPR <= 0.3), ms per image and peak memory, zero-shot (MuSc-style) and few-shot
(memory bank) when the dataset has a normal class.

    python benchmarks/bench_detect.py [DATASET] [--set detect.KEY=VALUE ...] [--per-type N]

DATASET: a masked-defect folder, ``<Type>/Imgs/<stem>.jpg`` with the ``<stem>.png`` mask
beside it (MTD, whose ``MT_Free`` is the normal class; DeepPCB, which has none), or a
generic-layout folder with ``images/`` and ``masks/`` (``ncd demo-data``). Default:
../shared/datasets/mtd.

Test set: every defective image and a seeded ``--normal-test`` of the normal ones (MTD's
usual 191); ``--shots`` of the other normal images form the few-shot memory bank.
Features are computed once for both modes (and kept in ``--work`` for reruns); ms per
image = feature time per image + scoring and map writing per test image (wall clock;
``cpu_ms_per_image`` the same in CPU time of this process, which a shared machine's
load does not inflate). Defaults fit a 2-core CPU in minutes (224 px, a 32-image reference
sample, blocks 5 and 8); the full setting is ``--set detect.image_size=448 --set
detect.reference_images=200 --set detect.blocks=2,5,8`` (a GPU). Maps are evaluated
as float maps at the image size, downscaled so the longer side is at most ``--eval-size``
(masks thresholded at > 127). Published anchors on MTD (AnomalyNCD README): AUPRO of
MuSc maps 0.769, PatchCore maps 0.729. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import resource
import sys
import tempfile
import time

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ncd.data.catalog import catalog_images  # noqa: E402
from ncd.config import DataConfig, DetectConfig, ExperimentConfig, apply_overrides  # noqa: E402
from ncd.detect.features import backbone_config  # noqa: E402
from ncd.detect.run import (CategoryJob, Features, detect_category, extract_local, score_table,  # noqa: E402
                            write_category)
from ncd.detect.maps import npy_uri  # noqa: E402
from ncd.evaluate.metrics import aupro  # noqa: E402
from ncd.proto.openset import auroc  # noqa: E402

BENCH_DEFAULTS = ["detect.image_size=224", "detect.reference_images=32", "detect.blocks=5,8",
                  "detect.radii=1,3,5", "detect.write_npy=true"]


def masked_defect_rows(root: str) -> list[dict]:
    """``<root>/<Type>/Imgs/<stem>.jpg`` (+ ``.png`` mask): one category named after the folder."""
    category = os.path.basename(os.path.abspath(root))
    rows = []
    for typ in sorted(os.listdir(root)):
        folder = os.path.join(root, typ, "Imgs")
        if not os.path.isdir(folder):
            continue
        for name in sorted(f for f in os.listdir(folder) if f.lower().endswith(".jpg")):
            stem = name.rsplit(".", 1)[0]
            mask = os.path.join(folder, stem + ".png")
            rows.append(dict(image_id=f"{category}/{typ}/{stem}", image_uri=os.path.join(folder, name),
                             category=category, gt_type=typ, gt_mask_uri=mask if os.path.isfile(mask) else ""))
    if not rows:
        raise SystemExit(f"bench_detect: no <Type>/Imgs/<stem>.jpg under {root}")
    return rows


def dataset_rows(root: str) -> list[dict]:
    if os.path.isdir(os.path.join(root, "images")):
        return catalog_images(DataConfig(layout="generic", root=root))
    return masked_defect_rows(root)


def split(rows: list[dict], normal_types: tuple[str, ...], normal_test: int, shots: int, per_type: int,
          seed: int) -> tuple[list[dict], list[dict]]:
    """(test rows, few-shot normal pool): per category, defective images (at most ``per_type``
    per type) plus ``normal_test`` normal ones; ``shots`` of the other normals form the bank."""
    rng = np.random.default_rng(seed)
    test, pool = [], []
    for cat in sorted({r["category"] for r in rows}):
        mine = [r for r in rows if r["category"] == cat]
        for typ in sorted({r["gt_type"] for r in mine} - set(normal_types)):
            of_type = [r for r in mine if r["gt_type"] == typ]
            if per_type and len(of_type) > per_type:
                of_type = [of_type[i] for i in sorted(rng.choice(len(of_type), per_type, replace=False))]
            test += of_type
        normals = [r for r in mine if r["gt_type"] in normal_types]
        order = rng.permutation(len(normals))
        n_test = min(normal_test if not per_type else min(normal_test, per_type),
                     len(normals) - min(shots, len(normals) // 2))  # small sets keep half for the bank
        test += [normals[i] for i in sorted(order[:n_test])]
        pool += [normals[i] for i in sorted(order[n_test:n_test + shots])]
    return test, pool


def read_mask(row: dict, shape: tuple[int, int]) -> np.ndarray:
    if not row["gt_mask_uri"]:
        return np.zeros(shape, bool)
    mask = cv2.imread(row["gt_mask_uri"], cv2.IMREAD_GRAYSCALE)
    return mask > 127


def downscale(a: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    h, w = a.shape
    scale = size / max(h, w)
    if scale >= 1:
        return a
    out = (max(1, round(w * scale)), max(1, round(h * scale)))
    if nearest:
        return cv2.resize(a.astype(np.uint8), out, interpolation=cv2.INTER_NEAREST).astype(bool)
    return cv2.resize(a.astype(np.float32), out, interpolation=cv2.INTER_AREA)


def evaluate(table, rows: list[dict], maps_dir: str, eval_size: int, normal_types: tuple[str, ...]) -> dict:
    """Image AUROC (score vs defective), pixel AUROC and AUPRO of the float maps."""
    by_id = {r["image_id"]: r for r in rows}
    maps, masks, labels = [], [], []
    for image_id in table.column("image_id").to_pylist():
        m = np.load(npy_uri(maps_dir, image_id))
        g = read_mask(by_id[image_id], m.shape)
        maps.append(downscale(m, eval_size, nearest=False))
        masks.append(downscale(g, eval_size, nearest=True))
        labels.append(by_id[image_id]["gt_type"] not in normal_types)
    labels_a = np.array(labels)
    scores = np.array(table.column("score").to_pylist())
    flat_m, flat_g = np.concatenate([m.ravel() for m in maps]), np.concatenate([g.ravel() for g in masks])
    out = {"image_auroc": round(auroc(scores[labels_a], scores[~labels_a]), 4) if labels_a.all() != labels_a.any()
           else None,
           "pixel_auroc": round(auroc(flat_m[flat_g], flat_m[~flat_g]), 4),
           "aupro": round(aupro(maps, masks, fpr_limit=0.3), 4)}
    return out


def cached_features(rows: list[dict], cfg: DetectConfig, work: str) -> tuple[Features, float, float]:
    """Features of ``rows`` (computed once, kept in ``work`` for reruns); (features, seconds, CPU seconds)."""
    key = hashlib.sha1(json.dumps([[r["image_id"] for r in rows], repr(backbone_config(cfg)),
                                   list(cfg.blocks)]).encode()).hexdigest()[:12]
    path = os.path.join(work, f"features-{key}.npz")
    z = np.load(path) if os.path.isfile(path) else None
    if z is not None and "cpu" in z.files:
        return Features(list(z["ids"]), z["layers"], z["cls"], z["shapes"]), float(z["seconds"]), float(z["cpu"])
    t0, c0 = time.perf_counter(), time.process_time()
    features = extract_local(rows, cfg, progress=progress("features"))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    np.savez(path, ids=np.array(features.ids), layers=features.layers, cls=features.cls, shapes=features.shapes,
             seconds=seconds, cpu=cpu)
    return features, seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", default="../shared/datasets/mtd")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="detect.KEY=VALUE")
    parser.add_argument("--modes", default="zero_shot,few_shot", help="zero_shot and/or few_shot")
    parser.add_argument("--normal-test", type=int, default=191, help="normal images in the test set")
    parser.add_argument("--shots", type=int, default=64, help="normal images in the few-shot bank")
    parser.add_argument("--per-type", type=int, default=0, help="at most N images per type (0: all)")
    parser.add_argument("--eval-size", type=int, default=256)
    parser.add_argument("--work", default=None, help="folder for features and maps (default: a temporary one)")
    args = parser.parse_args()
    cfg = apply_overrides(ExperimentConfig(), [*BENCH_DEFAULTS, *args.overrides]).detect
    rows = dataset_rows(args.dataset)
    modes = args.modes.split(",")
    test, pool = split(rows, cfg.normal_types, args.normal_test, args.shots, args.per_type, cfg.seed)
    pool = pool if "few_shot" in modes else []
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="bench-detect-"))
    os.makedirs(work, exist_ok=True)
    result: dict = {"dataset": os.path.basename(os.path.abspath(args.dataset)), "test_images": len(test),
                    "defective": sum(r["gt_type"] not in cfg.normal_types for r in test), "bank_images": len(pool),
                    "settings": {k: getattr(cfg, k) for k in ("image_size", "blocks", "radii", "reference_images",
                                                              "knn", "rescore_k", "backbone", "weights")}}
    features, feature_seconds, feature_cpu = cached_features(test + pool, cfg, work)
    result["feature_ms_per_image"] = round(1000 * feature_seconds / len(test + pool), 1)
    result["feature_cpu_ms_per_image"] = round(1000 * feature_cpu / len(test + pool), 1)
    categories = sorted({r["category"] for r in test})
    for mode in modes:
        if mode == "few_shot" and not pool:
            result[mode] = None  # no normal class: nothing to build a bank from
            continue
        maps_dir = os.path.join(work, mode)
        detect = dataclasses.replace(cfg, mode=mode)
        t0, c0 = time.perf_counter(), time.process_time()
        results = []
        for cat in categories:
            job = CategoryJob(cat, tuple(r for r in test if r["category"] == cat),
                              tuple(r for r in pool if r["category"] == cat) if mode == "few_shot" else ())
            res = detect_category(job, features, detect)
            write_category(res, features, maps_dir, detect)
            results.append(res)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        table = score_table(results, maps_dir)
        metrics = evaluate(table, test, maps_dir, args.eval_size, cfg.normal_types)
        result[mode] = {**metrics, "ms_per_image": round(result["feature_ms_per_image"] + 1000 * seconds / len(test), 1),
                        "cpu_ms_per_image": round(result["feature_cpu_ms_per_image"] + 1000 * cpu / len(test), 1),
                        "scoring_seconds": round(seconds, 1)}
        print(f"{mode}: {result[mode]}", flush=True)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["anchors_mtd_aupro"] = {"musc_maps": 0.769, "patchcore_maps": 0.729, "goal": 0.80}
    print(json.dumps(result))


def progress(what: str):
    last = [0.0]

    def show(stage: str, done: int, total: int) -> None:
        if time.monotonic() - last[0] > 10 or done == total:
            last[0] = time.monotonic()
            print(f"[{what}] {done}/{total}", file=sys.stderr, flush=True)

    return show


if __name__ == "__main__":
    main()
