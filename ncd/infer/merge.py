"""From region (crop) logits to image-level novel-class probabilities (METHOD.md 6.1-6.2).

Per crop: P = softmax(z / 0.1) over the novel columns only. Per image: the crops'
P weighted by alpha = softmax_j(sqrt(a_j) / T) over the image's crops, a_j the crop's
mask area in pixels. Predictions are novel indices 0..K-1 (argmax of P).
Numpy only; torch tensors are accepted and converted.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def _as_numpy(x: Any) -> np.ndarray:
    """A numpy view/copy of an ndarray, array-like or torch tensor (any device)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def novel_probs(logits: Any, num_base: int, temperature: float = 0.1) -> np.ndarray:
    """Novel-class probabilities of each region: (R, L+K) logits -> (R, K) float64.

    softmax(z / T) with the L base columns zeroed and the rest renormalised, which is
    softmax over the K novel logits alone (METHOD.md 6.1, 6.2 step 2). Accepts numpy
    arrays or torch tensors.
    """
    z = _as_numpy(logits).astype(np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits must be (R, L+K), got shape {z.shape}")
    if not 0 <= num_base < z.shape[1]:
        raise ValueError(f"num_base must be in [0, {z.shape[1]}), got {num_base}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = z[:, num_base:] / temperature
    s -= s.max(axis=1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=1, keepdims=True)


def region_weights(areas: np.ndarray, temperature: float) -> np.ndarray:
    """Weights of one image's regions: (n,) areas in pixels -> (n,) softmax(sqrt(area) / T).

    With T=100, areas 10,000 and 100 px weigh 0.71 and 0.29 (METHOD.md 6.2 step 3).
    """
    a = np.asarray(areas, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"areas must be 1-D, got shape {a.shape}")
    if np.any(a < 0):
        raise ValueError("areas must be >= 0")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = np.sqrt(a) / temperature
    if s.size == 0:
        return s
    e = np.exp(s - s.max())
    return e / e.sum()


def merge_regions(
    image_ids: Sequence[str],
    region_probs: np.ndarray,
    areas: np.ndarray,
    temperature: float,
) -> tuple[list[str], np.ndarray]:
    """Area-weighted image probabilities (METHOD.md 6.2 step 3).

    image_ids: (R,) parent image of each region; region_probs: (R, C); areas: (R,) pixels.
    Returns (image ids (I,) in first-appearance order, (I, C) float64 probabilities).
    An image with one region takes that region's row; equal areas give the plain mean.
    """
    ids = list(image_ids)
    p = _as_numpy(region_probs).astype(np.float64)
    a = np.asarray(areas, dtype=np.float64)
    if p.ndim != 2 or a.ndim != 1 or not (len(ids) == p.shape[0] == a.shape[0]):
        raise ValueError(
            f"need (R,) ids, (R, C) probs, (R,) areas; got {len(ids)}, {p.shape}, {a.shape}"
        )
    if np.any(a < 0):
        raise ValueError("areas must be >= 0")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    index: dict[str, int] = {}
    group = np.fromiter((index.setdefault(i, len(index)) for i in ids), dtype=np.int64, count=len(ids))
    n_images = len(index)

    # per-image softmax of sqrt(area) / T, stabilised by each image's max
    s = np.sqrt(a) / temperature
    s_max = np.full(n_images, -np.inf)
    np.maximum.at(s_max, group, s)
    e = np.exp(s - s_max[group])
    alpha = e / np.bincount(group, weights=e, minlength=n_images)[group]

    merged = np.zeros((n_images, p.shape[1]), dtype=np.float64)
    np.add.at(merged, group, alpha[:, None] * p)
    return list(index), merged
