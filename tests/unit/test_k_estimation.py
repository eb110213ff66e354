import numpy as np
import pytest
from sklearn.metrics import silhouette_score

from ncd.k_estimation import cosine_silhouette, estimate_k, l2_normalise


def _blobs(k, n_per, dim=32, spread=0.08, seed=0):
    rng = np.random.default_rng(seed)
    centres = l2_normalise(rng.normal(size=(k, dim)))
    sizes = [n_per + 7 * i for i in range(k)]
    x = np.concatenate([c + spread * rng.normal(size=(n, dim)) for c, n in zip(centres, sizes)])
    return x.astype(np.float32), np.repeat(np.arange(k), sizes)


@pytest.mark.parametrize("k", [3, 6])
def test_k_recovered_on_separated_embeddings(k):
    x, _ = _blobs(k, 30, seed=k)
    est = estimate_k(x, 2, 10, seed=0)
    assert est.k == k, est.scores
    assert set(est.scores) == set(range(2, 11))


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
