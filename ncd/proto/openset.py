"""Open-set rejection on the prototype classifier (ProtoGCD Sec. 5; PROTO.md item 7).

Post-hoc scores where high means "known": the maximum vMF posterior (ProtoGCD's MSP on
``softmax(kappa cos)``) or the best prototype similarity. A region whose score is below a
threshold is rejected as an unseen outlier. Pure numpy over gathered arrays.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

_NORM_EPS = 1e-12


def max_softmax(logits: np.ndarray, kappa: float) -> np.ndarray:
    """``max_c softmax(kappa z)_c`` per row: the vMF posterior of the best class.

    Args: ``logits`` (N, C) cosine logits (one head). Returns (N,) float64 in [1/C, 1].
    """
    z = kappa * np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return 1.0 / e.sum(axis=1)  # the maximum's exp is 1 after the shift


def max_cosine(feat: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """``max_c cos(f, mu_c)`` per row. ``feat`` (N, D), ``prototypes`` (C, D) -> (N,) float64."""
    f = np.asarray(feat, dtype=np.float64)
    p = np.asarray(prototypes, dtype=np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), _NORM_EPS)
    p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), _NORM_EPS)
    return (f @ p.T).max(axis=1)


def reject(scores: np.ndarray, threshold: float) -> np.ndarray:
    """(N,) bool: True where ``score < threshold`` (rejected as unknown)."""
    return np.asarray(scores) < threshold


def auroc(scores_known: np.ndarray, scores_unknown: np.ndarray) -> float:
    """AUROC of separating known (positive) from unknown rows by score, ties counted 1/2.

    The Mann-Whitney statistic with average ranks:
    ``(sum of known ranks - n_k (n_k + 1) / 2) / (n_k n_u)`` = P(s_known > s_unknown)
    + P(tie) / 2 (scikit-learn's ``roc_auc_score`` with known = 1).

    Raises:
        ValueError: either group is empty or a score is NaN.
    """
    known = np.asarray(scores_known, dtype=np.float64).ravel()
    unknown = np.asarray(scores_unknown, dtype=np.float64).ravel()
    if known.size == 0 or unknown.size == 0:
        raise ValueError(f"auroc needs known and unknown scores, got {known.size} and {unknown.size}")
    both = np.concatenate([known, unknown])
    if np.isnan(both).any():
        raise ValueError("auroc: scores contain NaN")
    ranks = rankdata(both, method="average")
    u = ranks[: known.size].sum() - known.size * (known.size + 1) / 2.0
    return float(u / (known.size * unknown.size))
