"""Tests for ncd.cluster.kmeans: FAISS k-means with k-means++ seeding and batched assignment."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

import ncd.cluster.kmeans as km_mod
from ncd.cluster.kmeans import BACKEND_CPU, BACKEND_GPU, assign, gpu_available, kmeans, kmeans_plusplus


def _blobs(n: int = 600, k: int = 5, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated isotropic blobs: (n, d) float32 and their (n,) labels."""
    x, y = make_blobs(n_samples=n, centers=k, n_features=d, cluster_std=0.5, center_box=(-20, 20), random_state=seed)
    return x.astype(np.float32), y


def _gaussian(n: int = 2000, d: int = 8, seed: int = 0) -> np.ndarray:
    """Structureless data, where k-means has many local optima."""
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _reference_sq_dists(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(N, k) squared distances in float64, the slow and exact way."""
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    return ((x64[:, None, :] - c64[None, :, :]) ** 2).sum(-1)


def test_well_separated_blobs_are_recovered() -> None:
    x, y = _blobs()
    res = kmeans(x, 5, seed=0)
    assert res.backend == BACKEND_CPU or res.backend == BACKEND_GPU
    assert res.centroids.shape == (5, 16) and res.centroids.dtype == np.float32
    assert res.labels.shape == (600,) and res.labels.dtype == np.int64
    assert adjusted_rand_score(y, res.labels) == 1.0


def test_same_seed_same_result_bitwise() -> None:
    x = _gaussian()
    a = kmeans(x, 7, seed=3, use_gpu=False)
    b = kmeans(x, 7, seed=3, use_gpu=False)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.inertia == b.inertia


def test_different_seeds_can_differ() -> None:
    x = _gaussian()
    a = kmeans(x, 7, seed=0, use_gpu=False)
    b = kmeans(x, 7, seed=1, use_gpu=False)
    assert not np.allclose(np.sort(a.centroids, axis=0), np.sort(b.centroids, axis=0))


def test_inertia_and_labels_match_numpy_reference() -> None:
    x = _gaussian(n=1500, d=6)
    res = kmeans(x, 9, seed=0)
    ref = _reference_sq_dists(x, res.centroids)
    np.testing.assert_array_equal(res.labels, ref.argmin(axis=1))
    expected = float(ref[np.arange(x.shape[0]), res.labels].sum())
    assert res.inertia == pytest.approx(expected, rel=1e-5)


def test_assign_batches_match_one_batch() -> None:
    x = _gaussian(n=1001, d=5)
    c = x[:13].copy()
    labels_1, d_1 = assign(x, c, batch_size=x.shape[0])
    labels_b, d_b = assign(x, c, batch_size=64)
    np.testing.assert_array_equal(labels_1, labels_b)
    np.testing.assert_array_equal(d_1, d_b)
    ref = _reference_sq_dists(x, c)
    np.testing.assert_array_equal(labels_b, ref.argmin(axis=1))
    np.testing.assert_allclose(d_b, ref.min(axis=1), rtol=1e-5, atol=1e-5)


def test_sample_training_and_batched_assignment_match_full_path() -> None:
    x, y = _blobs(n=6000, k=8, d=12, seed=1)
    full = kmeans(x, 8, seed=0, max_train_points=x.shape[0], batch_size=x.shape[0])
    part = kmeans(x, 8, seed=0, max_train_points=400, batch_size=512)
    assert adjusted_rand_score(y, full.labels) == 1.0
    # Same partition; map each sampled centroid to its full-path twin and compare labels.
    rows, cols = linear_sum_assignment(_reference_sq_dists(full.centroids, part.centroids))
    to_full = np.empty(8, dtype=np.int64)
    to_full[cols] = rows
    np.testing.assert_array_equal(to_full[part.labels], full.labels)
    np.testing.assert_allclose(part.centroids[cols], full.centroids[rows], atol=0.35)  # ~5 sigma of a 50-row mean
    # Same partition, so the full path's centroids (its means) cost less; a 50-row
    # sample mean adds about 1/50 of the within-cluster variance.
    assert full.inertia <= part.inertia <= 1.05 * full.inertia


def test_kmeanspp_seeds_one_centre_per_blob() -> None:
    x, y = _blobs(n=2000, k=10, d=8, seed=2)
    c = kmeans_plusplus(x, 10, np.random.default_rng(0))
    assert c.shape == (10, 8)
    # Every seed is a data row, and the seeds cover all 10 blobs.
    rows = np.flatnonzero((x[:, None, :] == c[None, :, :]).all(-1).any(1))
    assert len(rows) == 10
    assert len(set(y[rows].tolist())) == 10


def test_kmeanspp_beats_random_init_on_skewed_blobs() -> None:
    # One huge blob and many small ones: random init puts most seeds in the huge blob.
    rng = np.random.default_rng(0)
    centres = rng.uniform(-50, 50, size=(12, 10))
    sizes = [5000] + [60] * 11
    x = np.concatenate([c + rng.standard_normal((s, 10)) for c, s in zip(centres, sizes)]).astype(np.float32)
    pp = kmeans(x, 12, seed=0, niter=5, init="kmeans++")
    rnd = kmeans(x, 12, seed=0, niter=5, init="random")
    assert pp.inertia < 0.7 * rnd.inertia


def test_nredo_keeps_the_best_run() -> None:
    x = _gaussian(n=1200, d=4)
    one = kmeans(x, 12, seed=5, nredo=1)
    three = kmeans(x, 12, seed=5, nredo=3)
    assert three.inertia <= one.inertia


def test_spherical_centroids_have_unit_norm() -> None:
    x, _ = _blobs(n=900, k=6, d=10, seed=3)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    res = kmeans(x, 6, seed=0, spherical=True)
    np.testing.assert_allclose(np.linalg.norm(res.centroids, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(res.labels, (x @ res.centroids.T).argmax(axis=1))
    ref = _reference_sq_dists(x, res.centroids)[np.arange(x.shape[0]), res.labels].sum()
    assert res.inertia == pytest.approx(float(ref), rel=1e-5)


def test_fewer_distinct_points_than_k_duplicates_centroids() -> None:
    distinct = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0]], dtype=np.float32)
    x = distinct[np.random.default_rng(0).integers(0, 3, size=40)]
    with pytest.warns(RuntimeWarning, match="3 distinct rows, fewer than k=5"):
        res = kmeans(x, 5, seed=0)
    assert res.centroids.shape == (5, 2)
    assert {tuple(r) for r in res.centroids.tolist()} == {tuple(r) for r in distinct.tolist()}
    np.testing.assert_array_equal(res.centroids[res.labels], x)
    assert res.inertia == 0.0


def test_k_larger_than_n() -> None:
    x = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    with pytest.warns(RuntimeWarning, match="2 distinct rows"):
        res = kmeans(x, 4)
    assert res.centroids.shape == (4, 2)
    np.testing.assert_array_equal(res.centroids[res.labels], x)


def test_rare_row_missing_from_sample_still_gets_a_centroid() -> None:
    x = np.zeros((1000, 3), dtype=np.float32)
    x[500:, 0] = 10.0
    x[777] = [0.0, 0.0, 50.0]  # a third distinct row, almost surely not in a 10-row sample
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = kmeans(x, 3, seed=0, max_train_points=10)
    assert res.inertia == 0.0
    assert len({tuple(r) for r in res.centroids.tolist()}) == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, "k must be >= 1"),
        ({"k": 3, "init": "kmeans||"}, "init must be one of"),
        ({"k": 3, "max_train_points": 2}, "max_train_points"),
        ({"k": 3, "niter": 0}, "niter and nredo"),
    ],
)
def test_invalid_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        kmeans(_gaussian(n=50), **kwargs)


def test_empty_and_malformed_input_raise() -> None:
    with pytest.raises(ValueError, match="at least one row"):
        kmeans(np.empty((0, 4), dtype=np.float32), 2)
    with pytest.raises(ValueError, match="2-D"):
        kmeans(np.zeros(5, dtype=np.float32), 2)


def test_memmap_input_gives_the_in_memory_result(tmp_path) -> None:
    x = _gaussian(n=3000, d=6)
    mm = np.memmap(tmp_path / "x.f32", dtype=np.float32, mode="w+", shape=x.shape)
    mm[:] = x
    mm.flush()
    a = kmeans(x, 5, seed=1, max_train_points=1000, batch_size=700, use_gpu=False)
    b = kmeans(np.memmap(tmp_path / "x.f32", dtype=np.float32, mode="r", shape=x.shape), 5, seed=1,
               max_train_points=1000, batch_size=700, use_gpu=False)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.labels, b.labels)


@pytest.fixture
def simulated_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the faiss-gpu backend's torch code on the CPU, with a torch stand-in for faiss.knn_gpu."""
    pytest.importorskip("torch")

    def knn1(x, c, spherical):
        if spherical:
            return (x @ c.T).argmax(1)
        return ((c * c).sum(1)[None, :] - 2.0 * (x @ c.T)).argmin(1)

    monkeypatch.setattr(km_mod, "_GPU_DEVICE", "cpu")
    monkeypatch.setattr(km_mod, "_knn1_gpu", knn1)
    monkeypatch.setattr(km_mod, "gpu_available", lambda: True)


def test_simulated_gpu_backend_matches_cpu_backend(simulated_gpu: None) -> None:
    x, y = _blobs(n=3000, k=8, d=24, seed=5)
    gpu = kmeans(x, 8, seed=0, max_train_points=1000, batch_size=700)
    cpu = kmeans(x, 8, seed=0, max_train_points=1000, batch_size=700, use_gpu=False)
    assert gpu.backend == BACKEND_GPU and cpu.backend == BACKEND_CPU
    assert adjusted_rand_score(y, gpu.labels) == 1.0
    assert gpu.inertia == pytest.approx(cpu.inertia, rel=1e-4)
    ref = _reference_sq_dists(x, gpu.centroids)
    np.testing.assert_array_equal(gpu.labels, ref.argmin(axis=1))
    assert gpu.inertia == pytest.approx(float(ref.min(axis=1).sum()), rel=1e-5)


def test_simulated_gpu_spherical_and_nredo(simulated_gpu: None) -> None:
    x = _gaussian(n=1500, d=6, seed=2)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    res = kmeans(x, 10, seed=1, spherical=True, nredo=2)
    np.testing.assert_allclose(np.linalg.norm(res.centroids, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(res.labels, (x @ res.centroids.T).argmax(axis=1))
    one = kmeans(x, 10, seed=1, spherical=True, nredo=1)
    assert res.inertia <= one.inertia * (1 + 1e-6)


def test_simulated_gpu_degenerate_input_warns(simulated_gpu: None) -> None:
    x = np.repeat(np.eye(3, dtype=np.float32), 10, axis=0)
    with pytest.warns(RuntimeWarning, match="3 distinct rows"):
        res = kmeans(x, 4)
    assert res.backend == BACKEND_GPU and res.inertia == 0.0


def test_torch_kmeanspp_picks_the_numpy_rows() -> None:
    torch = pytest.importorskip("torch")
    x, _ = _blobs(n=1500, k=12, d=8, seed=6)
    idx = km_mod._kmeans_plusplus_torch(torch.from_numpy(x), 12, np.random.default_rng(4))
    np.testing.assert_array_equal(x[idx], kmeans_plusplus(x, 12, np.random.default_rng(4)))


def test_split_empty_clusters_perturbs_a_copy_of_the_largest() -> None:
    torch = pytest.importorskip("torch")
    c = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    km_mod._split_empty_clusters(c, torch.tensor([1, 0, 9]))
    assert not torch.equal(c[1], c[2])
    torch.testing.assert_close((c[1] + c[2]) / 2, torch.full((4,), 5.0))
    torch.testing.assert_close(c[1], torch.full((4,), 5.0), atol=0.01, rtol=0)
    assert c[0].tolist() == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.skipif(gpu_available(), reason="checks the error raised without a GPU")
def test_use_gpu_true_without_gpu_raises() -> None:
    with pytest.raises(RuntimeError, match="use_gpu=True"):
        kmeans(_gaussian(n=50), 2, use_gpu=True)


@pytest.mark.skipif(not gpu_available(), reason="needs a FAISS GPU build and a CUDA device")
def test_gpu_backend_matches_cpu_on_blobs() -> None:
    x, y = _blobs(n=5000, k=8, d=32, seed=4)
    gpu = kmeans(x, 8, seed=0, use_gpu=True, max_train_points=2000, batch_size=1024)
    cpu = kmeans(x, 8, seed=0, use_gpu=False, max_train_points=2000, batch_size=1024)
    assert gpu.backend == BACKEND_GPU and cpu.backend == BACKEND_CPU
    assert adjusted_rand_score(y, gpu.labels) == 1.0
    assert gpu.inertia == pytest.approx(cpu.inertia, rel=1e-3)
    labels, sq = assign(x, gpu.centroids, use_gpu=True)
    np.testing.assert_array_equal(labels, gpu.labels)
    assert float(sq.sum(dtype=np.float64)) == pytest.approx(gpu.inertia, rel=1e-6)
