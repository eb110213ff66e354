"""Label-free criteria for the number of clusters K of unit-normalised features.

Every criterion reads spherical k-means partitions of the same rows, one per candidate
K (:class:`Partitions`, shared), except the eigengap (a spectrum). :data:`CRITERIA` maps each
name to a function ``(x, partitions, seed) -> (best K, {K: score})``; higher scores are
better except where the docstring says otherwise. ``ncd.evaluate.k_estimation`` uses one of them
for ``train.num_novel=auto``; ``benchmarks/bench_k.py`` compares them all.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.linalg import eigh

from ncd.cluster.kmeans import kmeans
from ncd.evaluate.metrics import cluster_metrics

MAX_SAMPLE = 4000  # rows a quadratic criterion (silhouette, eigengap) reads, drawn with the seed
EIGEN_NEIGHBOURS = 7  # the local scale of the self-tuning affinity (Zelnik-Manor & Perona 2004)
SPECTRAL_EPS = 1e-9  # eigenvalue gaps below this are ties (identical rows give only such gaps)
GAP_REFERENCES = 8  # reference data sets of the gap statistic
STABILITY_PAIRS = 10  # subsample pairs per K of the stability criterion
STABILITY_FRACTION = 0.8


@dataclass(frozen=True)
class Partition:
    """Spherical k-means of the rows with K clusters: labels (N,), unit centroids (K, D)."""

    labels: np.ndarray
    centroids: np.ndarray


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


class Partitions:
    """Spherical k-means (``nredo`` restarts, one seed) of unit rows ``x`` for each candidate
    K, computed on first use and shared by the criteria; ``ks`` in increasing order."""

    def __init__(self, x: np.ndarray, ks: Sequence[int], seed: int, nredo: int = 3) -> None:
        self.x, self.ks, self.seed, self.nredo = x, sorted(ks), seed, nredo
        self._cache: dict[int, Partition] = {}

    def __getitem__(self, k: int) -> Partition:
        if k not in self._cache:
            res = kmeans(self.x, k, seed=self.seed, spherical=True, nredo=self.nredo)
            self._cache[k] = Partition(res.labels, l2_normalise(res.centroids))
        return self._cache[k]

    def items(self):
        return ((k, self[k]) for k in self.ks)

    def __iter__(self):
        return iter(self.ks)


def best_k(scores: dict[int, float], higher: bool = True) -> int:
    """The best-scoring K; ties go to the smaller K."""
    sign = 1.0 if higher else -1.0
    return max(scores, key=lambda k: (sign * scores[k], -k))


def sample_rows(n: int, seed: int, limit: int = MAX_SAMPLE) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False)) if n > limit else np.arange(n)


def cosine_silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette with cosine distance of unit rows ``x`` (N,D) under ``labels`` (N,);
    -1 for a single cluster."""
    ids = np.unique(labels)
    if len(ids) < 2:
        return -1.0
    dist = 1.0 - x.astype(np.float64) @ x.T.astype(np.float64)
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


def silhouette(x: np.ndarray, parts: Partitions, seed: int) -> tuple[int, dict[int, float]]:
    """Mean cosine silhouette of each partition (on at most MAX_SAMPLE rows)."""
    rows = sample_rows(len(x), seed)
    scores = {k: cosine_silhouette(x[rows], p.labels[rows]) for k, p in parts.items()}
    return best_k(scores), scores


def prototype(x: np.ndarray, parts: Partitions, seed: int) -> tuple[int, dict[int, float]]:
    """ProtoGCD's centroid score (label-free prototype score) of each partition's centroids."""
    from ncd.proto.k_estimation import centroid_score

    scores = {k: centroid_score(x, p.centroids) for k, p in parts.items()}
    return best_k(scores), scores


def _within_between(x: np.ndarray, labels: np.ndarray) -> tuple[float, float, int]:
    """Within- and between-cluster sums of squares (Euclidean, unit rows) and the cluster count."""
    ids, inv = np.unique(labels, return_inverse=True)
    means = np.zeros((len(ids), x.shape[1]))
    np.add.at(means, inv, x)
    sizes = np.bincount(inv).astype(np.float64)
    means /= sizes[:, None]
    within = float(((x - means[inv]) ** 2).sum())
    between = float((sizes * ((means - x.mean(0)) ** 2).sum(1)).sum())
    return within, between, len(ids)


def calinski_harabasz(x: np.ndarray, parts: Partitions, seed: int) -> tuple[int, dict[int, float]]:
    """Calinski-Harabasz ratio on unit rows (chordal distance, monotone in the cosine)."""
    n, scores = len(x), {}
    for k, p in parts.items():
        within, between, used = _within_between(x.astype(np.float64), p.labels)
        scores[k] = 0.0 if used < 2 or within <= 0 else (between / (used - 1)) / (within / (n - used))
    return best_k(scores), scores


def davies_bouldin(x: np.ndarray, parts: Partitions, seed: int) -> tuple[int, dict[int, float]]:
    """Davies-Bouldin index with cosine distances to unit centroids; LOWER is better."""
    scores = {}
    for k, p in parts.items():
        used = np.unique(p.labels)
        c = p.centroids[used]
        spread = np.array([float(np.mean(1.0 - x[p.labels == j] @ p.centroids[j])) for j in used])
        sep = 1.0 - c @ c.T
        np.fill_diagonal(sep, np.inf)
        scores[k] = float(np.mean(np.max((spread[:, None] + spread[None, :]) / np.maximum(sep, 1e-12), 1))) \
            if len(used) > 1 else np.inf
    return best_k(scores, higher=False), scores


def eigengap(x: np.ndarray, parts: Partitions, seed: int) -> tuple[int, dict[int, float]]:
    """Gap after the K-th smallest eigenvalue of the normalised Laplacian of a self-tuning
    cosine affinity (local scale: distance to the EIGEN_NEIGHBOURS-th neighbour)."""
    rows = sample_rows(len(x), seed)
    z = x[rows].astype(np.float64)
    dist = np.maximum(1.0 - z @ z.T, 0.0)
    scale = np.sort(dist, 1)[:, min(EIGEN_NEIGHBOURS, len(z) - 1)]
    scale = np.maximum(scale, 1e-12)
    w = np.exp(-(dist**2) / (scale[:, None] * scale[None, :]))
    np.fill_diagonal(w, 0.0)
    d = 1.0 / np.sqrt(np.maximum(w.sum(1), 1e-12))
    top = min(max(parts.ks) + 1, len(z) - 1)
    lam = np.sort(eigh(np.eye(len(z)) - d[:, None] * w * d[None, :], eigvals_only=True, subset_by_index=[0, top]))
    scores = {k: float(lam[k] - lam[k - 1]) for k in parts if k < len(lam)}
    scores = {k: v if v > SPECTRAL_EPS else 0.0 for k, v in scores.items()}  # rounding noise: a tie
    return best_k(scores), scores


def _log_within(x: np.ndarray, labels: np.ndarray) -> float:
    return float(np.log(max(_within_between(x.astype(np.float64), labels)[0], 1e-12)))


def gap_statistic(x: np.ndarray, parts: Partitions, seed: int) -> tuple[int, dict[int, float]]:
    """Tibshirani's gap statistic: reference sets uniform in the box of the principal axes,
    projected to the sphere; K is the smallest with gap(K) >= gap(K+1) - s(K+1) (else the best)."""
    rng = np.random.default_rng(seed)
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    proj = (x - mean) @ vt.T
    lo, hi = proj.min(0), proj.max(0)
    ks = parts.ks
    ref = np.zeros((GAP_REFERENCES, len(ks)))
    for b in range(GAP_REFERENCES):
        z = l2_normalise(rng.uniform(lo, hi, size=proj.shape) @ vt + mean)
        for i, k in enumerate(ks):
            ref[b, i] = _log_within(z, kmeans(z, k, seed=seed + b, spherical=True, nredo=1).labels)
    gap = ref.mean(0) - np.array([_log_within(x, parts[k].labels) for k in ks])
    s = ref.std(0) * np.sqrt(1.0 + 1.0 / GAP_REFERENCES)
    scores = {k: float(g) for k, g in zip(ks, gap)}
    for i in range(len(ks) - 1):
        if gap[i] >= gap[i + 1] - s[i + 1]:
            return ks[i], scores
    return best_k(scores), scores


def stability(x: np.ndarray, parts: Partitions, seed: int) -> tuple[int, dict[int, float]]:
    """Mean ARI, on the rows they share, of k-means on pairs of random 80 % subsamples."""
    rng = np.random.default_rng(seed)
    n, m = len(x), max(int(STABILITY_FRACTION * len(x)), 2)
    scores = {}
    for k in parts:
        aris = []
        for r in range(STABILITY_PAIRS):
            a, b = rng.choice(n, m, replace=False), rng.choice(n, m, replace=False)
            la = np.full(n, -1)
            lb = np.full(n, -1)
            la[a] = kmeans(x[a], k, seed=seed + 2 * r, spherical=True, nredo=1).labels
            lb[b] = kmeans(x[b], k, seed=seed + 2 * r + 1, spherical=True, nredo=1).labels
            both = (la >= 0) & (lb >= 0)
            aris.append(cluster_metrics(la[both], lb[both])["ari"])
        scores[k] = float(np.mean(aris))
    return best_k(scores), scores


Criterion = Callable[[np.ndarray, Partitions, int], tuple[int, dict[int, float]]]
CRITERIA: dict[str, Criterion] = {
    "silhouette": silhouette,
    "prototype": prototype,
    "calinski_harabasz": calinski_harabasz,
    "davies_bouldin": davies_bouldin,
    "eigengap": eigengap,
    "gap": gap_statistic,
    "stability": stability,
}
