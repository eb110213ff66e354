"""Label-free estimation of the number of novel classes K.

For each candidate K, spherical FAISS k-means partitions the L2-normalised region
embeddings; the partition is scored with the mean cosine silhouette. The K with the
highest score wins (ties: the smaller K). This is ncd's criterion for the AnomalyNCD
mode; the ProtoAnomalyNCD mode scores prototypes instead (``ncd.proto``).
:func:`trained_k_score` scores a trained model's K the same way (Tune's ``k_score``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ncd.cluster.kmeans import kmeans

MAX_SILHOUETTE_POINTS = 4000


@dataclass(frozen=True)
class KEstimate:
    k: int
    scores: dict[int, float] = field(default_factory=dict)
    criterion: str = "silhouette"


def l2_normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def cosine_silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette with cosine distance of unit rows ``x`` (N,D) under ``labels`` (N,)."""
    ids = np.unique(labels)
    if len(ids) < 2:
        return -1.0
    dist = 1.0 - x @ x.T
    onehot = (labels[:, None] == ids[None, :]).astype(np.float64)
    sizes = onehot.sum(0)
    mean_to = dist @ onehot  # (N, C) summed distance to each cluster
    own = np.searchsorted(ids, labels)
    own_size = sizes[own]
    a = mean_to[np.arange(len(x)), own] / np.maximum(own_size - 1, 1)
    mean_to = mean_to / sizes[None, :]
    mean_to[np.arange(len(x)), own] = np.inf
    b = mean_to.min(1)
    s = np.where(own_size > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-12), 0.0)
    return float(s.mean())


def estimate_k(features: np.ndarray, k_min: int, k_max: int, seed: int = 0) -> KEstimate:
    """The K in [k_min, k_max] whose spherical k-means partition has the best silhouette."""
    x = l2_normalise(np.asarray(features, np.float32))
    n = len(x)
    if n < 3:
        raise ValueError(f"K estimation needs at least 3 regions, got {n}")
    k_max = min(k_max, n - 1)
    if k_min < 2 or k_max < k_min:
        raise ValueError(f"invalid K range [{k_min}, {k_max}] for {n} regions (k_min must be >= 2)")
    rng = np.random.default_rng(seed)
    sample = rng.choice(n, MAX_SILHOUETTE_POINTS, replace=False) if n > MAX_SILHOUETTE_POINTS else np.arange(n)
    scores = {}
    for k in range(k_min, k_max + 1):
        labels = kmeans(x, k, seed=seed, spherical=True, nredo=3).labels
        scores[k] = cosine_silhouette(x[sample], labels[sample])
    best = max(scores, key=lambda k: (scores[k], -k))
    return KEstimate(best, scores)


def trained_k_score(method: str, feat: np.ndarray, probs: np.ndarray, novel_prototypes: np.ndarray) -> float:
    """Label-free score of a trained model's K, comparable across K (higher is better).

    ProtoAnomalyNCD mode: the prototype score of its K novel prototypes (PROTO.md,
    centroid score alone: no labelled rows); AnomalyNCD mode: the cosine silhouette of
    the region embeddings ``feat`` (R, D) under the model's partition ``probs.argmax(1)``.
    """
    if method == "protoanomalyncd":
        from ncd.proto.k_estimation import prototype_score

        return prototype_score(feat, novel_prototypes)["score"]
    return cosine_silhouette(l2_normalise(feat), probs.argmax(1))
