"""Anomaly maps made from ground-truth masks, for benchmarks without a detector.

A detector's map is a blurred, noisy version of the defect with false positives; this
module makes one from the gt mask (seeded, documented, so runs are comparable):
- the binary mask (gt > 127) blurred with a Gaussian of sigma = 2% of the longer side,
  scaled by a per-image strength U(0.6, 1.0);
- low-frequency background noise (white noise blurred with sigma = 8% of the longer
  side, amplitude 0.12) plus pixel noise (sigma 0.02);
- with probability 0.35, one false-positive blob (sigma 3-6% of the longer side,
  amplitude U(0.2, 0.55)) at a random position, on normal and defective images alike.
Maps are written as float32 ``.npy`` at half the image resolution; ncd normalises them
jointly per category (as for any float map).
"""
from __future__ import annotations

import zlib
from pathlib import Path

import cv2
import numpy as np

from ncd.data import io

BLUR_FRACTION = 0.02
NOISE_SIGMA_FRACTION = 0.08
NOISE_AMPLITUDE = 0.12
PIXEL_NOISE = 0.02
FALSE_POSITIVE_RATE = 0.35
MAP_SCALE = 0.5


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(x, (0, 0), sigmaX=max(sigma, 0.5))


def map_from_mask(gt_mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A detector-like float32 anomaly map (half resolution) from a uint8 gt mask (H,W)."""
    h, w = gt_mask.shape
    side = max(h, w)
    defect = (gt_mask > 127).astype(np.float32)
    m = _blur(defect, BLUR_FRACTION * side)
    if m.max() > 0:
        m = m / m.max() * rng.uniform(0.6, 1.0)
    noise = _blur(rng.normal(size=(h, w)).astype(np.float32), NOISE_SIGMA_FRACTION * side)
    noise = noise / (np.abs(noise).max() + 1e-6) * NOISE_AMPLITUDE
    m = m + np.clip(noise, 0, None) + rng.normal(0, PIXEL_NOISE, (h, w)).astype(np.float32)
    if rng.random() < FALSE_POSITIVE_RATE:
        blob = np.zeros((h, w), np.float32)
        blob[rng.integers(h), rng.integers(w)] = 1.0
        blob = _blur(blob, rng.uniform(0.03, 0.06) * side)
        m = m + blob / (blob.max() + 1e-12) * rng.uniform(0.2, 0.55)
    small = cv2.resize(m, (max(1, int(w * MAP_SCALE)), max(1, int(h * MAP_SCALE))), interpolation=cv2.INTER_AREA)
    return np.clip(small, 0, None).astype(np.float32)


def write_gt_maps(manifest_rows: list[dict], maps_root: str | Path, seed: int = 0) -> None:
    """Write ``<maps_root>/<type>/<stem>.npy`` for every row with a gt mask (others: noise only)."""
    root = Path(maps_root)
    for row in manifest_rows:
        rng = np.random.default_rng([seed, zlib.crc32(row["image_id"].encode())])
        if row.get("gt_mask_uri"):
            mask = cv2.imdecode(np.frombuffer(io.read_bytes(row["gt_mask_uri"]), np.uint8), cv2.IMREAD_GRAYSCALE)
        else:
            h, w = io.read_image(row["image_uri"]).shape[:2]
            mask = np.zeros((h, w), np.uint8)
        out = root / row["gt_type"] / f"{Path(row['image_uri']).stem}.npy"
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, map_from_mask(mask, rng))
