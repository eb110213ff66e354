"""Label-free estimation of the number of novel classes K (``train.num_novel=auto``).

The criterion is ``infer.k_criterion``, one of ``ncd.evaluate.k_criteria.CRITERIA``; the default,
``eigengap``, reads the spectrum of the normalised Laplacian of a self-tuning cosine
affinity of the frozen region features: K is where the gap after the K-th smallest
eigenvalue is largest. It counts local components, where the k-means criteria see only
the coarsest split (normal vs defect, one product vs another): on MTD, DeepPCB and the
demo (truth 6; ``benchmarks/bench_k.py``) it gave 6, 12, 5 and 9 (per product), the
silhouette 3, 2, 3, 3; no criterion was within 1 on all, so a known K is better given.
A trained model's K is scored by its method (``ncd.methods``, ``Method.trained_k_score``:
the silhouette of its partition, or in ProtoAnomalyNCD mode ProtoGCD's prototype score).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ncd.evaluate.k_criteria import CRITERIA, MAX_SAMPLE, Partitions, cosine_silhouette, l2_normalise

log = logging.getLogger(__name__)
DEFAULT_CRITERION = "eigengap"
MAX_SILHOUETTE_POINTS = MAX_SAMPLE
CRITERION_NAMES = {
    "eigengap": "eigengap (normalised Laplacian of a self-tuning cosine affinity)",
    "silhouette": "silhouette (cosine, spherical k-means)",
    "prototype": "prototype score (centroid score of spherical k-means prototypes; no labelled rows)",
    "calinski_harabasz": "Calinski-Harabasz (spherical k-means)",
    "davies_bouldin": "Davies-Bouldin (cosine, spherical k-means)",
    "gap": "gap statistic (spherical k-means)",
    "stability": "stability (ARI of k-means on subsample pairs)",
}

__all__ = ["KEstimate", "estimate_k", "cosine_silhouette", "l2_normalise"]


@dataclass(frozen=True)
class KEstimate:
    k: int
    scores: dict[int, float] = field(default_factory=dict)
    criterion: str = CRITERION_NAMES[DEFAULT_CRITERION]


def estimate_k(features: np.ndarray, k_min: int, k_max: int, seed: int = 0,
               criterion: str = DEFAULT_CRITERION) -> KEstimate:
    """The K in [k_min, k_max] that ``criterion`` (a ``CRITERIA`` name) picks for ``features``
    (N, D; L2-normalised here); k_max is capped at N - 1. Ties go to the smaller K."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown K criterion {criterion!r}: use one of {', '.join(CRITERIA)}")
    x = l2_normalise(np.asarray(features, np.float32))
    n = len(x)
    if n < 3:
        raise ValueError(f"K estimation needs at least 3 regions, got {n}")
    k_max = min(k_max, n - 1)
    if k_min < 2 or k_max < k_min:
        raise ValueError(f"invalid K range [{k_min}, {k_max}] for {n} regions (k_min must be >= 2)")
    if float(np.ptp(x, axis=0).max()) == 0.0:
        log.warning("K estimation: all %d feature rows are identical, nothing to separate: K = k_min = %d", n, k_min)
    k, scores = CRITERIA[criterion](x, Partitions(x, range(k_min, k_max + 1), seed), seed)
    return KEstimate(k, scores, CRITERION_NAMES[criterion])
