"""ncd k-means (FAISS) against scikit-learn KMeans on the same data, in one run.

Data: 100 000 x 768 float32, seed 0: 50 anisotropic Gaussian clusters (each a
rank-16 elongated component plus isotropic noise, random scales) with
Dirichlet(2)-distributed sizes (at least 50 rows each), plus 5 % broad Gaussian noise rows. The clusters
overlap (scikit-learn reaches an ARI of about 0.7 against the generating labels),
so k-means has real local optima to get stuck in.

Baseline: ``sklearn.cluster.KMeans(n_clusters=50, n_init=1, random_state=0)`` with
every other setting at its default (init="k-means++", algorithm="lloyd",
max_iter=300, tol=1e-4). ncd: ``ncd.cluster.kmeans.kmeans(x, 50, seed=0)`` with its
defaults. Both use every core the process sees; thread settings and
OPENBLAS_CORETYPE are left as the environment has them. On a GPU machine ncd picks
faiss-gpu; one small warm-up call first pays the CUDA start-up, and its time is printed.

The last line printed is one JSON object: speedup, inertia_ratio, ncd_seconds,
sklearn_seconds, backend.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from ncd.cluster.kmeans import kmeans

N, D, K, SEED = 100_000, 768, 50, 0
NOISE_FRAC = 0.05
RANK = 16  # elongated directions per cluster
ELONGATION = 8.0  # larger = rounder clusters; 8 leaves clusters overlapping


def make_mixture(n: int = N, d: int = D, k: int = K, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) float32 rows and (n,) int64 generating labels (-1 for noise rows)."""
    rng = np.random.default_rng(seed)
    n_clustered = int(round(n * (1 - NOISE_FRAC)))
    min_size = min(50, n_clustered // k)
    sizes = min_size + rng.multinomial(n_clustered - k * min_size, rng.dirichlet(np.full(k, 2.0)))
    centres = rng.standard_normal((k, d), dtype=np.float32)
    stretch = np.float32(np.sqrt(d) / ELONGATION)
    parts, labels = [], []
    for c in range(k):
        m = int(sizes[c])
        basis = rng.standard_normal((RANK, d), dtype=np.float32) * np.float32(1 / np.sqrt(d))
        scales = (rng.uniform(0.5, 2.0) * np.geomspace(3.0, 0.5, RANK)).astype(np.float32)
        z = rng.standard_normal((m, RANK), dtype=np.float32) * scales
        iso = np.float32(rng.uniform(0.3, 0.6))
        noise = rng.standard_normal((m, d), dtype=np.float32)
        parts.append(centres[c] + (z @ basis) * stretch + iso * noise)
        labels.append(np.full(m, c, dtype=np.int64))
    parts.append(np.float32(1.5) * rng.standard_normal((n - n_clustered, d), dtype=np.float32))
    labels.append(np.full(n - n_clustered, -1, dtype=np.int64))
    perm = rng.permutation(n)
    x = np.concatenate(parts)[perm]
    assert x.dtype == np.float32
    return x, np.concatenate(labels)[perm]


def inertia(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray, batch: int = 16384) -> float:
    """Sum of |x_i - c_label(i)|^2, float32 rows and a float64 total, for either method."""
    total = 0.0
    for s in range(0, x.shape[0], batch):
        diff = x[s : s + batch] - centroids.astype(np.float32)[labels[s : s + batch]]
        total += float(np.einsum("ij,ij->i", diff, diff).sum(dtype=np.float64))
    return total


def main() -> None:
    t0 = time.perf_counter()
    x, y = make_mixture()
    print(f"data: {x.shape} {x.dtype}, {K} anisotropic clusters + {NOISE_FRAC:.0%} noise, "
          f"made in {time.perf_counter() - t0:.1f} s")
    print(f"cpus: {os.cpu_count()}, OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}")
    clustered = y >= 0

    t0 = time.perf_counter()
    warm = kmeans(x[:5000], K, seed=SEED)
    print(f"ncd warm-up on 5000 rows ({warm.backend}): {time.perf_counter() - t0:.2f} s")

    t0 = time.perf_counter()
    res = kmeans(x, K, seed=SEED)
    ncd_s = time.perf_counter() - t0
    print(f"ncd kmeans(x, {K}, seed={SEED}) defaults, backend={res.backend}: {ncd_s:.2f} s, "
          f"inertia {res.inertia:.6g}, ARI {adjusted_rand_score(y[clustered], res.labels[clustered]):.3f}")

    sk = KMeans(n_clusters=K, n_init=1, random_state=SEED)
    params = sk.get_params()
    t0 = time.perf_counter()
    sk.fit(x)
    sk_s = time.perf_counter() - t0
    print(f"sklearn KMeans(n_clusters={K}, n_init=1, random_state={SEED}; init={params['init']}, "
          f"algorithm={params['algorithm']}, max_iter={params['max_iter']}, tol={params['tol']}): "
          f"{sk_s:.2f} s, {sk.n_iter_} iterations, inertia {sk.inertia_:.6g}, "
          f"ARI {adjusted_rand_score(y[clustered], sk.labels_[clustered]):.3f}")

    sk_inertia = inertia(x, sk.cluster_centers_, sk.labels_)
    ncd_inertia = inertia(x, res.centroids, res.labels)
    print(f"inertia recomputed the same way for both: ncd {ncd_inertia:.6g} (reported {res.inertia:.6g}), "
          f"sklearn {sk_inertia:.6g} (its inertia_ {sk.inertia_:.6g})")
    print(json.dumps({
        "speedup": round(sk_s / ncd_s, 3),
        "inertia_ratio": round(ncd_inertia / sk_inertia, 5),
        "ncd_seconds": round(ncd_s, 3),
        "sklearn_seconds": round(sk_s, 3),
        "backend": res.backend,
    }))


if __name__ == "__main__":
    main()
