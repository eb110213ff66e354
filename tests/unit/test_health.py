"""Label-free collapse detection (ncd.evaluate.health)."""
from __future__ import annotations

import numpy as np

from ncd.evaluate.health import cluster_health, collapse_message


def test_balanced_partition_is_healthy():
    h = cluster_health(np.repeat(np.arange(6), 50), 6)
    assert not h["collapsed"]
    assert h["clusters_used"] == 6 and abs(h["largest_share"] - 1 / 6) < 1e-3
    assert abs(h["effective_clusters"] - 6.0) < 1e-6


def test_one_dominant_cluster_is_a_collapse():
    labels = np.r_[np.zeros(358, int), [1, 2]]  # the steel-set failure: 358 of 360 in one cluster
    h = cluster_health(labels, 6)
    assert h["collapsed"] and h["largest_share"] > 0.99 and h["effective_clusters"] < 1.1
    assert "99% of 360 samples" in collapse_message("steel", h, 6)


def test_too_few_clusters_used_is_a_collapse_even_when_balanced():
    h = cluster_health(np.repeat([0, 1], 100), 6)  # 2 of 6 clusters, 50% each
    assert h["collapsed"] and h["clusters_used"] == 2


def test_natural_imbalance_is_not_a_collapse():
    # MTD-like sizes: 191 normal, 115, 103, 85, 57, 32
    labels = np.repeat(np.arange(6), [191, 115, 103, 85, 57, 32])
    assert not cluster_health(labels, 6)["collapsed"]


def test_unknown_labels_are_ignored_and_empty_input_is_not_a_collapse():
    assert cluster_health([-1, -1], 3)["samples"] == 0
    assert not cluster_health([], 3)["collapsed"]
    h = cluster_health([-1] * 50 + list(range(3)) * 10, 3)
    assert h["samples"] == 30 and not h["collapsed"]


def test_too_few_samples_are_not_judged():
    h = cluster_health([0] * 11 + [1, 2, 3, 4, 5], 6)  # 16 samples for K=6: 69% in one cluster, but too few
    assert not h["judged"] and not h["collapsed"]
    assert cluster_health([0] * 23 + [1], 6)["collapsed"]  # 24 = 4K samples: judged
