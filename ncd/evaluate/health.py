"""Label-free health of a clustering: is the partition collapsed?

A run whose samples end up mostly in one cluster (or in far fewer clusters than K) has
failed, whatever its loss says; ``discover`` checks every model's image predictions
with :func:`cluster_health` and reports a collapse as a failure (``infer.on_collapse``).
No ground truth is used.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

COLLAPSE_SHARE = 0.6  # default of ``infer.collapse_share``
SAMPLES_PER_CLUSTER = 4  # fewer than this many samples per cluster on average: too few to judge


class CollapseError(RuntimeError):
    """Training collapsed: most samples fell into one cluster (or few clusters were used)."""


def cluster_health(labels: Sequence[int] | np.ndarray, k: int, collapse_share: float = COLLAPSE_SHARE) -> dict[str, Any]:
    """Cluster-size statistics of predicted ``labels`` (ids in [0, k); -1 = unknown, ignored).

    Returns ``largest_share`` (the biggest cluster's fraction of the assigned samples),
    ``clusters_used`` (non-empty clusters), ``effective_clusters`` (exp of the entropy of
    the cluster sizes: k for equal sizes, 1 for a single cluster), ``judged`` (at least
    4k samples: fewer cannot fill k clusters reliably, so their sizes say little) and
    ``collapsed``: judged, and the largest share above ``collapse_share`` or fewer than
    half of the k clusters used.
    """
    lab = np.asarray(labels, dtype=np.int64)
    lab = lab[lab >= 0]
    n = int(lab.size)
    if n == 0 or k < 2:
        return {"samples": n, "largest_share": 1.0 if n else 0.0, "clusters_used": int(n > 0),
                "effective_clusters": float(n > 0), "judged": False, "collapsed": False}
    sizes = np.bincount(lab, minlength=k).astype(np.float64)
    p = sizes[sizes > 0] / n
    largest = float(sizes.max() / n)
    used = int((sizes > 0).sum())
    judged = n >= SAMPLES_PER_CLUSTER * k
    collapsed = judged and (largest > collapse_share or used < math.ceil(k / 2))
    return {"samples": n, "largest_share": round(largest, 4), "clusters_used": used,
            "effective_clusters": round(float(np.exp(-(p * np.log(p)).sum())), 3), "judged": judged,
            "collapsed": bool(collapsed)}


def collapse_message(name: str, health: dict[str, Any], k: int) -> str:
    """One line that says what collapsed and what to try."""
    return (f"{name}: training collapsed: {health['largest_share']:.0%} of {health['samples']} samples in one "
            f"cluster, {health['clusters_used']} of K={k} clusters used; the predictions are not a result. "
            "Try the frozen-feature start (model.feature=cls+patch, train.kmeans_init=true), a lower train.lr, "
            "or another K")
