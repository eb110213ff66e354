"""Prototype-score K estimation (ProtoGCD Sec. 4; PROTO.md item 6).

ProtoGCD scores each candidate K by a *prototype score* = *accuracy score* (clustering
accuracy of the labelled rows under the K-partition) + *centroid score*. Its authors'
``test_k`` snippet (ProtoGCD issue #3) computes class centroids of the labelled rows
and pseudo-label centroids of all L + K predicted classes; the lines that turn them
into the centroid score were not readable here. ncd's reading, documented as such:

- partition: each row goes to its most similar prototype (cosine);
- centroid score: the mean *simplified silhouette* on the sphere. With cosine distance
  ``d(x, c) = 1 - cos(x, c)``, the row's own prototype ``a`` and its nearest other one
  ``b``: ``s_i = (d_ib - d_ia) / max(d_ia, d_ib)`` in [-1, 1], averaged over rows. It is
  high when every row is much closer to its own prototype than to any other: too small
  a K merges groups (``d_ia`` grows), too large a K splits one (``d_ib`` shrinks).
  Prototypes that no row chooses are ignored (a trained model may leave some unused);
  K = 1 scores 0;
- accuracy score: Hungarian-matched accuracy of the labelled rows
  (:func:`ncd.evaluate.metrics.cluster_metrics` ``f1``), in [0, 1];
- prototype score = accuracy + centroid score; without labelled rows, the centroid
  score alone (AnomalyNCD runs often have no labelled base set).

:func:`best_k_by_prototype_score` scores spherical FAISS k-means per K instead of one
training per K, with labelled rows when given (the Tune grid trains one model per K and
scores its prototypes with :func:`prototype_score`). ``train.num_novel=auto`` uses the
label-free criterion ``infer.k_criterion=prototype`` (``ncd.evaluate.k_criteria``: the
centroid score on the partitions every criterion shares), not this function.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ncd.cluster.kmeans import kmeans
from ncd.evaluate.metrics import cluster_metrics

UNLABELLED = -1
_NORM_EPS = 1e-12


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _NORM_EPS)


def assign_to_prototypes(features: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """(N,) int64 index of the most cosine-similar prototype of each row of ``features`` (N, D)."""
    return np.argmax(_unit(features) @ _unit(prototypes).T, axis=1).astype(np.int64)


def centroid_score(features: np.ndarray, prototypes: np.ndarray) -> float:
    """Mean simplified silhouette of the rows w.r.t. the prototypes they choose (cosine distance).

    Args:
        features: (N, D); normalised here.
        prototypes: (K, D); normalised here; unused prototypes are ignored.

    Returns:
        A float in [-1, 1]; 0 when fewer than two prototypes are used.
    """
    x, p = _unit(features), _unit(prototypes)
    if x.shape[0] == 0:
        raise ValueError("centroid_score needs at least one row")
    own = np.argmax(x @ p.T, axis=1)
    used = np.unique(own)
    if used.size < 2:
        return 0.0
    dist = 1.0 - (x @ p[used].T).astype(np.float64)  # (N, K_used)
    own_col = np.searchsorted(used, own)
    rows = np.arange(x.shape[0])
    d_own = dist[rows, own_col]
    dist[rows, own_col] = np.inf
    d_other = dist.min(axis=1)
    denom = np.maximum(np.maximum(d_own, d_other), _NORM_EPS)
    return float(np.mean((d_other - d_own) / denom))


def accuracy_score(labels: np.ndarray, assignments: np.ndarray) -> float:
    """Hungarian-matched clustering accuracy of labelled rows: labels (n,) vs cluster ids (n,)."""
    return cluster_metrics(labels, assignments)["f1"]


def prototype_score(
    features: np.ndarray,
    prototypes: np.ndarray,
    labelled_labels: np.ndarray | None = None,
) -> dict[str, float]:
    """ProtoGCD's prototype score of one K-partition (ncd's reading, see the module docstring).

    Args:
        features: (N, D) features of labelled and unlabelled rows.
        prototypes: (K, D) prototypes (trained, or k-means centroids).
        labelled_labels: (N,) class labels, ``-1`` for unlabelled rows; None: no labels.

    Returns:
        ``score`` (accuracy + centroid, or centroid alone without labelled rows),
        ``centroid`` and ``accuracy`` (NaN without labelled rows).
    """
    centroid = centroid_score(features, prototypes)
    accuracy = float("nan")
    if labelled_labels is not None:
        labels = np.asarray(labelled_labels)
        if labels.shape != (np.asarray(features).shape[0],):
            raise ValueError(f"labelled_labels must be (N,) = ({np.asarray(features).shape[0]},), got {labels.shape}")
        lab = labels != UNLABELLED
        if lab.any():
            accuracy = accuracy_score(labels[lab], assign_to_prototypes(np.asarray(features)[lab], prototypes))
    score = centroid if np.isnan(accuracy) else accuracy + centroid
    return {"score": float(score), "centroid": float(centroid), "accuracy": float(accuracy)}


def best_k_by_prototype_score(
    features: np.ndarray,
    k_values: Sequence[int],
    seed: int,
    labelled_labels: np.ndarray | None = None,
    *,
    nredo: int = 3,
    niter: int = 25,
) -> tuple[int, dict[int, float]]:
    """K with the best prototype score over ``k_values``, from spherical FAISS k-means per K.

    Args:
        features: (N, D) features (e.g. CLS features of all crops); normalised here.
        k_values: candidate K (total clusters of these rows), each in [1, N].
        seed: k-means seed (the same for every K).
        labelled_labels: (N,) labels, ``-1`` for unlabelled rows; None: label-free.
        nredo, niter: k-means restarts and Lloyd iterations.

    Returns:
        (best K, {K: score}); ties go to the smaller K.
    """
    x = _unit(features)
    ks = sorted({int(k) for k in k_values})
    if not ks:
        raise ValueError("best_k_by_prototype_score needs at least one candidate K")
    if ks[0] < 1 or ks[-1] > x.shape[0]:
        raise ValueError(f"candidate K must be in [1, {x.shape[0]}] (the number of rows), got {ks}")
    scores: dict[int, float] = {}
    for k in ks:
        res = kmeans(x, k, seed=seed, spherical=True, nredo=nredo, niter=niter)
        scores[k] = prototype_score(x, res.centroids, labelled_labels)["score"]
    best = max(ks, key=lambda k: (scores[k], -k))
    return best, scores
