import logging

import numpy as np
import pytest
from sklearn.metrics import silhouette_score

from ncd.evaluate.k_criteria import CRITERIA
from ncd.evaluate.k_estimation import DEFAULT_CRITERION, cosine_silhouette, estimate_k, l2_normalise


def _blobs(k, n_per, dim=32, spread=0.08, seed=0):
    """Gaussian clusters around k random unit centres (unequal sizes), labels."""
    rng = np.random.default_rng(seed)
    centres = l2_normalise(rng.normal(size=(k, dim)))
    sizes = [n_per + 7 * i for i in range(k)]
    x = np.concatenate([c + spread * rng.normal(size=(n, dim)) for c, n in zip(centres, sizes)])
    return x.astype(np.float32), np.repeat(np.arange(k), sizes)


def _nested(seed, groups=2, per_group=3, n=25, dim=32, near=0.25, spread=0.04):
    """groups x per_group tight clusters on the sphere, the clusters of a group close together:
    the coarsest split (2) dominates, as normal vs defect or one product vs another do."""
    rng = np.random.default_rng(seed)
    tops = l2_normalise(rng.normal(size=(groups, dim)))
    centres = np.concatenate([l2_normalise(t + near * l2_normalise(rng.normal(size=(per_group, dim)))) for t in tops])
    return np.concatenate([c + spread * rng.normal(size=(n, dim)) for c in centres]).astype(np.float32)


@pytest.mark.parametrize("criterion", list(CRITERIA))
@pytest.mark.parametrize("k", [3, 6])
def test_every_criterion_recovers_k_of_separated_clusters(k, criterion):
    x, _ = _blobs(k, 30, seed=k)
    est = estimate_k(x, 2, 10, seed=0, criterion=criterion)
    assert est.k == k, est.scores
    assert set(est.scores) == set(range(2, 11)) and criterion.replace("_", "-").split("-")[0] in est.criterion.lower()


@pytest.mark.parametrize("seed", [0, 1])
def test_default_eigengap_counts_clusters_that_a_coarse_split_hides(seed):
    """The default criterion finds the 6 clusters where the silhouette (the old default) sees
    only the 2 groups: what MTD (normal vs defect) and DeepPCB do to it."""
    x = _nested(seed)
    assert DEFAULT_CRITERION == "eigengap"
    assert estimate_k(x, 2, 10, seed=0).k == 6
    assert estimate_k(x, 2, 10, seed=0, criterion="silhouette").k == 2


def test_degenerate_input(caplog):
    same = np.ones((20, 8), np.float32)
    with caplog.at_level(logging.WARNING):
        est = estimate_k(same, 3, 10)
    assert est.k == 3 and "identical" in caplog.text  # nothing to separate: the smallest K, said so
    with pytest.raises(ValueError, match="at least 3 regions"):
        estimate_k(same[:2], 2, 5)
    with pytest.raises(ValueError, match="unknown K criterion 'elbow'"):
        estimate_k(same, 2, 5, criterion="elbow")
    x, _ = _blobs(2, 5)
    assert max(estimate_k(x, 2, 50).scores) == len(x) - 1  # k_max capped at N - 1


def test_cosine_silhouette_matches_sklearn():
    x, y = _blobs(4, 20, spread=0.5, seed=1)
    xn = l2_normalise(x)
    rng = np.random.default_rng(0)
    for labels in (y, rng.integers(0, 3, len(y))):
        assert np.isclose(cosine_silhouette(xn, labels), silhouette_score(xn, labels, metric="cosine"), atol=1e-5)


def test_invalid_range():
    x, _ = _blobs(2, 5)
    with pytest.raises(ValueError, match="K range"):
        estimate_k(x, 1, 5)
