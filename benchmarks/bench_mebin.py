"""MEBin throughput: ``ncd.preprocess.mebin.binarize_set`` against a straightforward reference loop.

Run with no arguments (one core, a few minutes at most):

    python benchmarks/bench_mebin.py

Each size is one synthetic category of realistic anomaly maps (smooth background,
anomaly blobs, small false positives, pixel noise, some normal images), jointly
min-max scaled to uint8 as the upstream README's helper does. The reference is the
upstream procedure (64 x threshold + 6x6 erosion + connectedComponentsWithStats) with
the float back-mapping fix. The last line printed is one JSON object.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ncd.config import MebinConfig  # noqa: E402
from ncd.preprocess.mebin import binarize_set  # noqa: E402

SIZES = (512, 1024)
MAPS_PER_SIZE = 24
FAST_REPEATS = 3  # best-of for the fast path; the reference runs once
SEED = 3407


def _gaussian(size: int, cy: float, cx: float, sy: float, sx: float, amp: float) -> np.ndarray:
    axis = np.arange(size, dtype=np.float32)
    gy = np.exp(-((axis - cy) ** 2) / (2 * sy * sy))
    gx = np.exp(-((axis - cx) ** 2) / (2 * sx * sx))
    return amp * np.outer(gy, gx)


def synthetic_category(rng: np.random.Generator, size: int, n_maps: int) -> list[np.ndarray]:
    """``n_maps`` (size, size) uint8 maps, jointly scaled to [0, 255]."""
    raw = []
    for k in range(n_maps):
        values = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), size / 64) * 60
        values += rng.uniform(20, 60)
        if k % 4:  # one image in four is normal
            for _ in range(rng.integers(1, 4)):
                sy, sx = rng.uniform(0.02, 0.08, 2) * size
                values += _gaussian(size, *rng.uniform(0.1, 0.9, 2) * size, sy, sx, rng.uniform(60, 180))
        for _ in range(rng.integers(0, 6)):
            sy, sx = rng.uniform(0.005, 0.02, 2) * size
            values += _gaussian(size, *rng.uniform(0, 1, 2) * size, sy, sx, rng.uniform(15, 70))
        values += rng.normal(0, rng.uniform(1, 5), (size, size)).astype(np.float32)
        raw.append(values)
    lo = min(float(v.min()) for v in raw)
    hi = max(float(v.max()) for v in raw)
    return [np.clip((v - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8) for v in raw]


def reference_set(maps: list[np.ndarray], cfg: MebinConfig) -> list[tuple[np.ndarray, int, int]]:
    """Upstream MEBin, one threshold at a time, float back-mapping: (mask, threshold, count)."""
    peaks = [int(m.max()) for m in maps]
    hi, lo = max(peaks), min(peaks)
    kernel = np.ones((cfg.erode_kernel, cfg.erode_kernel), np.uint8)
    out = []
    for raw in maps:
        norm = np.where(raw < lo, 0, (raw - lo) / (hi - lo) * 255)
        counts = []
        for s in range(255, 0, -cfg.sample_rate):
            binary = cv2.erode(np.where(norm > s, 255, 0).astype(np.uint8), kernel)
            n_labels, *_ = cv2.connectedComponentsWithStats(binary, connectivity=8)
            counts.append(n_labels - 1)
        runs: dict[int, list[tuple[int, int]]] = {}
        i = 0
        while i < len(counts):
            j = i
            while j + 1 < len(counts) and counts[j + 1] == counts[i]:
                j += 1
            if counts[i] != 0 and j - i + 1 >= cfg.min_interval_len:
                runs.setdefault(counts[i], []).append((i, j))
            i = j + 1
        if runs:
            longest = {c: max(e - s for s, e in r) for c, r in runs.items()}
            count = max(longest, key=longest.get)
            end = sorted(runs[count], key=lambda r: r[1] - r[0])[-1][1]
            threshold = int((255 - end * cfg.sample_rate) * (hi - lo) / 255 + lo)
        else:
            threshold, count = 255, 0
        mask = cv2.erode(np.where(raw > threshold, 255, 0).astype(np.uint8), kernel)
        out.append((mask, threshold, count))
    return out


def main() -> None:
    cv2.setNumThreads(1)
    cfg = MebinConfig(erode_fallback=False)  # the upstream sweep the reference reimplements
    rng = np.random.default_rng(SEED)
    summary: dict[str, float] = {}
    total_fast = total_ref = 0.0
    total_maps = identical = 0
    for size in SIZES:
        maps = synthetic_category(rng, size, MAPS_PER_SIZE)
        fast_s = float("inf")
        for _ in range(FAST_REPEATS):
            start = time.perf_counter()
            results = binarize_set(maps, cfg)
            fast_s = min(fast_s, time.perf_counter() - start)
        start = time.perf_counter()
        reference = reference_set(maps, cfg)
        ref_s = time.perf_counter() - start
        same = sum(
            r.threshold == t and r.count == c and np.array_equal(r.mask, m)
            for r, (m, t, c) in zip(results, reference)
        )
        counts = [r.count for r in results]
        print(
            f"{size}x{size}: {len(maps)} maps, est counts {counts}\n"
            f"  ncd.preprocess.mebin  {len(maps) / fast_s:9.1f} maps/s ({1000 * fast_s / len(maps):7.2f} ms/map)\n"
            f"  reference  {len(maps) / ref_s:9.1f} maps/s ({1000 * ref_s / len(maps):7.2f} ms/map)\n"
            f"  speedup {ref_s / fast_s:.1f}x, parity {same}/{len(maps)}"
        )
        summary[f"speedup_{size}"] = round(ref_s / fast_s, 2)
        total_fast += fast_s
        total_ref += ref_s
        total_maps += len(maps)
        identical += same
    line = {
        "speedup": round(total_ref / total_fast, 2),
        "parity": identical / total_maps,
        **summary,
        "maps_per_s": round(total_maps / total_fast, 2),
        "reference_maps_per_s": round(total_maps / total_ref, 2),
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
