"""k-means with FAISS: greedy k-means++ seeding, Lloyd on a sample, batched assignment.

Backends, picked at run time:

- ``faiss-cpu``: k-means++ in numpy, then ``faiss.Clustering`` with a flat index.
- ``faiss-gpu`` (a FAISS build with GPU support, a visible GPU and CUDA PyTorch):
  the training sample lives on the GPU as a torch tensor; k-means++ and the centroid
  means run in torch, every nearest-centroid search runs in FAISS's GPU brute-force
  kNN (``faiss.knn_gpu``). Copying host data to the GPU once per Lloyd iteration,
  as ``faiss.Clustering`` does, would cost more than the iterations themselves.

Large inputs train on a seeded random sample of ``max_train_points`` rows, then
every row is assigned in batches of ``batch_size``, so ``x`` may be a ``np.memmap``
larger than memory. The inertia is recomputed from the final labels as
``sum_i |x_i - c_label(i)|^2`` (float32 rows, float64 total) on every backend.
"""
from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

logger = logging.getLogger(__name__)

BACKEND_CPU = "faiss-cpu"
BACKEND_GPU = "faiss-gpu"
INIT_METHODS = ("kmeans++", "random")
DEFAULT_POINTS_PER_CENTROID = 256  # FAISS's own max_points_per_centroid
MIN_DEFAULT_TRAIN_POINTS = 20_000  # keeps small-k samples representative
SPLIT_EPS = 1.0 / 1024.0  # FAISS's relative perturbation when splitting a cluster
_SEED_MODULUS = 2**31 - 1  # FAISS takes an int32 seed
_NEAR_DUP_REL = 1e-4  # distances below this fraction of |x|^2 + |c|^2 are recomputed exactly
_EXACT_CHUNK = 8192  # rows per chunk of the exact distance recomputation (cache-sized)
_GPU_DEVICE = "cuda"  # where the faiss-gpu backend keeps its torch tensors (tests patch it)


@dataclass(frozen=True)
class KMeansResult:
    """Output of :func:`kmeans`.

    centroids: (k, D) float32; labels: (N,) int64 in [0, k); inertia: sum over all N
    rows of the squared L2 distance to the assigned centroid; backend: "faiss-gpu" or
    "faiss-cpu".
    """

    centroids: np.ndarray
    labels: np.ndarray
    inertia: float
    backend: str


def gpu_available() -> bool:
    """True when FAISS has GPU support and sees a GPU, and torch sees CUDA."""
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def default_max_train_points(k: int) -> int:
    """Default training-sample size for ``k`` centroids: max(256 k, 20 000)."""
    return max(DEFAULT_POINTS_PER_CENTROID * k, MIN_DEFAULT_TRAIN_POINTS)


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    niter: int = 25,
    nredo: int = 1,
    spherical: bool = False,
    init: str = "kmeans++",
    max_train_points: int | None = None,
    batch_size: int = 65536,
    use_gpu: bool | None = None,
) -> KMeansResult:
    """Cluster the rows of ``x`` (N, D) into ``k`` groups.

    Trains on a seeded sample of ``max_train_points`` rows (default
    :func:`default_max_train_points`): greedy k-means++ seeding (``2 + ln k``
    candidates per step, as scikit-learn) or ``init="random"`` rows, then ``niter``
    Lloyd iterations. ``nredo`` restarts use seeds derived from ``seed`` and keep the
    centroids with the lowest training objective. ``spherical`` normalises the
    centroids to unit norm after every iteration and assigns by inner product (pass
    L2-normalised ``x``). Finally assigns all N rows, ``batch_size`` at a time.

    Fewer than ``k`` distinct rows in ``x``: the result still has ``k`` centroids,
    the distinct rows first and then copies of them, with a ``RuntimeWarning``;
    every row is then at distance 0 from its centroid.

    The same seed, input and thread count give bit-identical results on the CPU.
    ``use_gpu``: None picks the GPU when :func:`gpu_available`, True requires it,
    False forbids it. Raises ``ValueError`` on empty input, ``k < 1`` or bad options.
    """
    n, d = _check_input(x)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if init not in INIT_METHODS:
        raise ValueError(f"init must be one of {INIT_METHODS}, got {init!r}")
    if niter < 1 or nredo < 1:
        raise ValueError(f"niter and nredo must be >= 1, got {niter} and {nredo}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_train = default_max_train_points(k) if max_train_points is None else max_train_points
    if n_train < k:
        raise ValueError(f"max_train_points ({n_train}) must be >= k ({k})")
    gpu = _use_gpu(use_gpu)

    rng = np.random.default_rng(seed)
    if n_train < n:
        x_train = np.ascontiguousarray(x[np.sort(rng.choice(n, size=n_train, replace=False))], dtype=np.float32)
    else:
        x_train = np.ascontiguousarray(x, dtype=np.float32)
    trainer: _Trainer = _GpuTrainer(x_train, spherical) if gpu else _CpuTrainer(x_train, spherical)

    best: np.ndarray | None = None
    best_obj = math.inf
    for redo in range(nredo):
        redo_rng = np.random.default_rng([seed, redo])
        init_c = trainer.seed(k, init, redo_rng)
        if init_c.shape[0] < k and trainer.n < n:
            # The sample is degenerate; x may hold more distinct rows: add up to k of them.
            trainer = trainer.with_rows(_distinct_rows(x, k, batch_size))
            init_c = trainer.seed(k, init, redo_rng)
        if init_c.shape[0] < k:
            # The distinct rows are already an optimal clustering; Lloyd would only split copies.
            warnings.warn(
                f"kmeans: x has {init_c.shape[0]} distinct rows, fewer than k={k}; "
                "the surplus centroids duplicate existing ones",
                RuntimeWarning,
                stacklevel=2,
            )
            best = _pad_with_duplicates(init_c, k)
            break
        centroids = trainer.lloyd(init_c, niter, int(redo_rng.integers(_SEED_MODULUS)))
        if nredo == 1:
            best = centroids
            break
        obj = trainer.objective(centroids)
        logger.debug("kmeans redo %d: training objective %.6g", redo, obj)
        if obj < best_obj:
            best, best_obj = centroids, obj
    assert best is not None
    labels, sq_dists = assign(x, best, spherical=spherical, batch_size=batch_size, use_gpu=gpu)
    return KMeansResult(
        centroids=best,
        labels=labels,
        inertia=float(sq_dists.sum(dtype=np.float64)),
        backend=BACKEND_GPU if gpu else BACKEND_CPU,
    )


def assign(
    x: np.ndarray,
    centroids: np.ndarray,
    *,
    spherical: bool = False,
    batch_size: int = 65536,
    use_gpu: bool | None = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row of ``x`` (N, D), ``batch_size`` rows at a time.

    Returns labels (N,) int64 and the squared L2 distances (N,) float32 from each
    row to its centroid, recomputed as ``|x_i - c_label|^2`` rather than taken from
    the search. ``spherical`` assigns by largest inner product (the nearest centroid
    when centroids have unit norm). ``use_gpu`` as in :func:`kmeans`, CPU by default.
    """
    n, d = _check_input(x)
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    if c.ndim != 2 or c.shape[1] != d or c.shape[0] < 1:
        raise ValueError(f"centroids must have shape (k, {d}) with k >= 1, got {c.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    labels = np.empty(n, dtype=np.int64)
    sq_dists = np.empty(n, dtype=np.float32)
    if _use_gpu(use_gpu):
        c_t = _to_gpu(c)
        for start in range(0, n, batch_size):
            xb = _to_gpu(np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32))
            lb = _knn1_gpu(xb, c_t, spherical)
            labels[start : start + xb.shape[0]] = lb.cpu().numpy()
            sq_dists[start : start + xb.shape[0]] = ((xb - c_t[lb]) ** 2).sum(1).cpu().numpy()
        return labels, sq_dists
    index = faiss.IndexFlatIP(d) if spherical else faiss.IndexFlatL2(d)
    index.add(c)
    for start in range(0, n, batch_size):
        xb = np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32)
        _, ib = index.search(xb, 1)
        stop = start + xb.shape[0]
        labels[start:stop] = ib[:, 0]
        sq_dists[start:stop] = _exact_sq_dists(xb, c, ib[:, 0])
    return labels, sq_dists


def kmeans_plusplus(x: np.ndarray, k: int, rng: np.random.Generator, n_local_trials: int | None = None) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007; scikit-learn's variant).

    x: (S, D) float32. Each step draws ``n_local_trials`` (default ``2 + ln k``)
    candidates with probability proportional to the squared distance to the nearest
    chosen centre and keeps the one that lowers the potential most. Returns (m, D)
    float32 centres: m = k, or m < k when x has only m distinct rows.
    """
    s = x.shape[0]
    trials = n_local_trials if n_local_trials is not None else 2 + int(math.log(k))
    x_sq = np.einsum("ij,ij->i", x, x)
    chosen = [int(rng.integers(s))]
    closest = _sq_dists_to(x, x_sq, x[chosen])[0]
    pot = float(closest.sum(dtype=np.float64))
    for _ in range(1, k):
        if pot <= 0.0:
            break
        cumsum = np.cumsum(closest, dtype=np.float64)
        cand = np.minimum(np.searchsorted(cumsum, rng.random(trials) * cumsum[-1], side="right"), s - 1)
        dist = np.minimum(closest, _sq_dists_to(x, x_sq, x[cand]))
        pots = dist.sum(axis=1, dtype=np.float64)
        best = int(np.argmin(pots))
        chosen.append(int(cand[best]))
        closest, pot = dist[best], float(pots[best])
    return x[chosen].copy()


def _sq_dists_to(x: np.ndarray, x_sq: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Squared L2 distances (m, S) from centres c (m, D) to the rows of x (S, D).

    The expansion |c|^2 + |x|^2 - 2 c.x leaves rounding noise where a row equals a
    centre; such near-zero entries are recomputed exactly, so copies of a chosen
    centre get weight 0 and are never drawn again.
    """
    c_sq = np.einsum("ij,ij->i", c, c)
    dist = c_sq[:, None] + x_sq[None, :] - 2.0 * (c @ x.T)
    np.maximum(dist, 0.0, out=dist)
    near_j, near_i = np.nonzero(dist < _NEAR_DUP_REL * (c_sq[:, None] + x_sq[None, :]))
    if near_j.size:
        diff = x[near_i] - c[near_j]
        dist[near_j, near_i] = np.einsum("ij,ij->i", diff, diff)
    return dist


def _exact_sq_dists(x: np.ndarray, c: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """|x_i - c_labels[i]|^2 (N,) float32, in cache-sized chunks."""
    out = np.empty(x.shape[0], dtype=np.float32)
    for s in range(0, x.shape[0], _EXACT_CHUNK):
        diff = x[s : s + _EXACT_CHUNK] - c[labels[s : s + _EXACT_CHUNK]]
        out[s : s + _EXACT_CHUNK] = np.einsum("ij,ij->i", diff, diff)
    return out


def _random_rows(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k rows of x (S, D) at distinct random indices, or all distinct rows (m < k) if fewer exist."""
    c = x[np.sort(rng.choice(x.shape[0], size=min(k, x.shape[0]), replace=False))]
    if c.shape[0] == k and np.unique(c, axis=0).shape[0] == k:
        return c.copy()
    uniq = np.unique(x, axis=0)
    return uniq if uniq.shape[0] < k else c.copy()


def _distinct_rows(x: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """Up to ``k`` distinct rows of x (m, D) float32, scanning ``batch_size`` rows at a time."""
    found = np.empty((0, x.shape[1]), dtype=np.float32)
    for start in range(0, x.shape[0], batch_size):
        xb = np.asarray(x[start : start + batch_size], dtype=np.float32)
        found = np.unique(np.concatenate([found, xb]), axis=0)
        if found.shape[0] >= k:
            return found[:k]
    return found


def _pad_with_duplicates(c: np.ndarray, k: int) -> np.ndarray:
    """(m, D) -> (k, D): the m rows, then copies of them in order."""
    return np.ascontiguousarray(c[np.arange(k) % c.shape[0]], dtype=np.float32)


class _Trainer:
    """Seeding and Lloyd iterations on a fixed training sample (S, D)."""

    n: int

    def seed(self, k: int, init: str, rng: np.random.Generator) -> np.ndarray:
        """Initial centroids (m, D) float32; m < k only if the sample has m < k distinct rows."""
        raise NotImplementedError

    def lloyd(self, init_c: np.ndarray, niter: int, seed: int) -> np.ndarray:
        """Centroids (k, D) float32 after ``niter`` Lloyd iterations from init_c."""
        raise NotImplementedError

    def objective(self, centroids: np.ndarray) -> float:
        """Sum of squared distances of the sample to its nearest centroids."""
        raise NotImplementedError

    def with_rows(self, extra: np.ndarray) -> _Trainer:
        """A trainer on the sample plus ``extra`` rows (m, D)."""
        raise NotImplementedError


class _CpuTrainer(_Trainer):
    """numpy k-means++ and ``faiss.Clustering`` on the CPU."""

    def __init__(self, x_train: np.ndarray, spherical: bool) -> None:
        self.x, self.spherical, self.n = x_train, spherical, x_train.shape[0]

    def seed(self, k: int, init: str, rng: np.random.Generator) -> np.ndarray:
        return kmeans_plusplus(self.x, k, rng) if init == "kmeans++" else _random_rows(self.x, k, rng)

    def lloyd(self, init_c: np.ndarray, niter: int, seed: int) -> np.ndarray:
        k, d = init_c.shape
        cp = faiss.ClusteringParameters()
        cp.niter = niter
        cp.nredo = 1
        cp.spherical = self.spherical
        cp.seed = seed
        cp.verbose = False
        cp.min_points_per_centroid = 1  # small inputs are the caller's choice, not a warning
        cp.max_points_per_centroid = self.n // k + 1  # the sample is already drawn
        clus = faiss.Clustering(d, k, cp)
        faiss.copy_array_to_vector(np.ascontiguousarray(init_c, dtype=np.float32).ravel(), clus.centroids)
        clus.train(self.x, faiss.IndexFlatIP(d) if self.spherical else faiss.IndexFlatL2(d))
        return faiss.vector_float_to_array(clus.centroids).reshape(k, d).astype(np.float32, copy=False)

    def objective(self, centroids: np.ndarray) -> float:
        _, sq = assign(self.x, centroids, spherical=self.spherical, use_gpu=False)
        return float(sq.sum(dtype=np.float64))

    def with_rows(self, extra: np.ndarray) -> _Trainer:
        return _CpuTrainer(np.concatenate([self.x, extra]), self.spherical)


class _GpuTrainer(_Trainer):
    """torch k-means++ and Lloyd on a GPU-resident sample; searches in ``faiss.knn_gpu``."""

    def __init__(self, x_train: np.ndarray, spherical: bool) -> None:
        self.x_np, self.spherical, self.n = x_train, spherical, x_train.shape[0]
        self.x = _to_gpu(x_train)

    def seed(self, k: int, init: str, rng: np.random.Generator) -> np.ndarray:
        if init == "random":
            return _random_rows(self.x_np, k, rng)
        return self.x_np[_kmeans_plusplus_torch(self.x, k, rng)].copy()

    def lloyd(self, init_c: np.ndarray, niter: int, seed: int) -> np.ndarray:
        del seed  # empty clusters are split deterministically (largest first)
        torch = _torch()
        x = self.x
        c = _to_gpu(np.ascontiguousarray(init_c, dtype=np.float32))
        k = c.shape[0]
        for _ in range(niter):
            labels = _knn1_gpu(x, c, self.spherical)
            counts = torch.bincount(labels, minlength=k)
            sums = torch.zeros_like(c).index_add_(0, labels, x)
            c = torch.where((counts > 0)[:, None], sums / counts.clamp_min(1)[:, None].to(c.dtype), c)
            _split_empty_clusters(c, counts)
            if self.spherical:
                c = c / c.norm(dim=1, keepdim=True).clamp_min(1e-30)
        return c.cpu().numpy()

    def objective(self, centroids: np.ndarray) -> float:
        c = _to_gpu(centroids)
        labels = _knn1_gpu(self.x, c, self.spherical)
        return float(((self.x - c[labels]) ** 2).sum(dtype=_torch().float64))

    def with_rows(self, extra: np.ndarray) -> _Trainer:
        return _GpuTrainer(np.concatenate([self.x_np, extra]), self.spherical)


def _kmeans_plusplus_torch(x: Any, k: int, rng: np.random.Generator) -> list[int]:
    """Row indices chosen by :func:`kmeans_plusplus` on a torch tensor x (S, D); same draws from rng."""
    torch = _torch()
    s = x.shape[0]
    trials = 2 + int(math.log(k))
    x_sq = (x * x).sum(1)

    def sq_dists(c: Any) -> Any:
        c_sq = (c * c).sum(1)
        dist = (c_sq[:, None] + x_sq[None, :] - 2.0 * (c @ x.T)).clamp_min_(0.0)
        near = dist < _NEAR_DUP_REL * (c_sq[:, None] + x_sq[None, :])
        if bool(near.any()):
            j, i = near.nonzero(as_tuple=True)
            dist[j, i] = ((x[i] - c[j]) ** 2).sum(1)
        return dist

    chosen = [int(rng.integers(s))]
    closest = sq_dists(x[chosen])[0]
    for _ in range(1, k):
        cumsum = torch.cumsum(closest, 0, dtype=torch.float64)
        if float(cumsum[-1]) <= 0.0:
            break
        r = torch.from_numpy(rng.random(trials) * float(cumsum[-1])).to(x.device)
        cand = torch.searchsorted(cumsum, r, right=True).clamp_max_(s - 1)
        dist = torch.minimum(closest[None, :], sq_dists(x[cand]))
        best = int(torch.argmin(dist.sum(1, dtype=torch.float64)))
        chosen.append(int(cand[best]))
        closest = dist[best]
    return chosen


def _split_empty_clusters(c: Any, counts: Any) -> None:
    """In place: each empty centroid becomes a perturbed copy of the largest cluster's (as FAISS does)."""
    empty = (counts == 0).nonzero().flatten().tolist()
    if not empty:
        return
    torch = _torch()
    counts = counts.clone()
    sign = torch.ones(c.shape[1], device=c.device, dtype=c.dtype)
    sign[1::2] = -1.0
    for j in empty:
        big = int(torch.argmax(counts))
        c[j] = c[big] * (1 + SPLIT_EPS * sign)
        c[big] = c[big] * (1 - SPLIT_EPS * sign)
        counts[j] = counts[big] // 2
        counts[big] -= counts[j]


def _knn1_gpu(x: Any, c: Any, spherical: bool) -> Any:
    """Index (N,) int64 of the nearest (or, spherical, most similar) row of c for each row of x, on the GPU."""
    metric = faiss.METRIC_INNER_PRODUCT if spherical else faiss.METRIC_L2
    res = _gpu_resources()  # first, so that faiss.knn_gpu below is the torch-aware one
    _, idx = faiss.knn_gpu(res, x, c, 1, metric=metric)
    return idx[:, 0]


@functools.cache
def _gpu_resources() -> Any:
    """One ``faiss.StandardGpuResources`` per process: its scratch memory is reused across calls."""
    import faiss.contrib.torch_utils  # noqa: F401  (lets faiss.knn_gpu take torch CUDA tensors)

    return faiss.StandardGpuResources()


def _to_gpu(a: np.ndarray) -> Any:
    """A torch copy of a on the GPU."""
    return _torch().from_numpy(a).to(_GPU_DEVICE)


def _torch() -> Any:
    import torch

    return torch


def _use_gpu(use_gpu: bool | None) -> bool:
    """Resolve the ``use_gpu`` option; RuntimeError if the GPU is required but unavailable."""
    if use_gpu is False:
        return False
    available = gpu_available()
    if use_gpu and not available:
        raise RuntimeError("use_gpu=True but FAISS has no GPU support, sees no GPU, or torch has no CUDA")
    return available


def _check_input(x: np.ndarray) -> tuple[int, int]:
    """(N, D) of a non-empty 2-D floating array; ValueError otherwise."""
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (N, D), got shape {x.shape}")
    n, d = x.shape
    if n == 0 or d == 0:
        raise ValueError(f"x must have at least one row and one column, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"x must be a floating array, got {x.dtype}")
    return int(n), int(d)
