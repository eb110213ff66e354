"""Patch scores: MuSc mutual scoring and the PatchCore memory bank (DETECT.md).

One primitive serves both: for each query patch, the distance to its nearest patch in
each reference image (its "image minimum"), and the mean of the ``k`` smallest image
minima, the query's own image left out. Mutual scoring uses ``k = ceil(fraction x
(M - 1))`` for M reference images; the memory bank uses ``k = 1`` (the nearest bank
patch of another image).

Two exact ways to compute it:
- ``exact``: blocked matrix products and a per-image maximum of the similarities;
- ``faiss``: a flat inner-product k-NN list per patch. The first hit of a reference
  image in the list is that image's nearest patch, so once ``k`` distinct images (not
  the query's own) have appeared, their minima are the k smallest: exact. Rows whose
  list holds fewer images fall back to the blocked products.
Vectors are L2-normalised, so distance = sqrt(2 - 2 cos).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ncd.config import DetectConfig
from ncd.detect.features import aggregate

BLOCK_ELEMENTS = 1 << 25  # similarities held at once by the blocked exact path (128 MiB of float32)


def smallest_count(reference_images: int, fraction: float) -> int:
    """k of the smallest-``fraction`` rule over the other images of an M-image reference
    (MuSc's floor, rounded up so that sets under 5 images still average one image)."""
    if reference_images < 2:
        raise ValueError(f"mutual scoring needs at least 2 images, got {reference_images}")
    return max(1, math.ceil(fraction * (reference_images - 1)))


def _to_distance(sims: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(torch.clamp(2.0 - 2.0 * sims, min=0.0))


def _exact_rows(query: torch.Tensor, ref: torch.Tensor, ref_image: torch.Tensor, n_images: int,
                self_image: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the k smallest image minima for every query row, by blocked products (on the
    GPU when there is one)."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = torch.empty(query.shape[0], dtype=torch.float32)
    rows = max(1, BLOCK_ELEMENTS // max(1, ref.shape[0]))
    per_image = ref.shape[0] // n_images
    whole_images = per_image * n_images == ref.shape[0] and torch.equal(
        ref_image, torch.arange(n_images).repeat_interleave(per_image))
    ref, ref_image, self_image = ref.to(dev), ref_image.to(dev), self_image.to(dev)
    for start in range(0, query.shape[0], rows):
        sims = query[start:start + rows].to(dev) @ ref.T  # (b, R)
        if whole_images:  # references stored image by image: a reshape instead of a scatter
            best = sims.view(sims.shape[0], n_images, per_image).amax(-1)
        else:
            best = torch.full((sims.shape[0], n_images), -math.inf, dtype=sims.dtype, device=dev)
            best.scatter_reduce_(1, ref_image.expand(sims.shape[0], -1), sims, reduce="amax")
        own = self_image[start:start + rows]
        has_own = own >= 0
        if has_own.any():
            best[has_own.nonzero()[:, 0], own[has_own]] = -math.inf
        top = best.topk(k, dim=1).values
        out[start:start + rows] = _to_distance(top).mean(1).cpu()
    return out


def _first_hits(images: np.ndarray) -> np.ndarray:
    """Mask of the first occurrence of each value in each row (values < 0 never count)."""
    order = np.argsort(images, axis=1, kind="stable")
    ranked = np.take_along_axis(images, order, axis=1)
    first_sorted = np.ones_like(ranked, dtype=bool)
    first_sorted[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
    first = np.zeros_like(first_sorted)
    np.put_along_axis(first, order, first_sorted, axis=1)
    return first & (images >= 0)


def _faiss_rows(query: torch.Tensor, ref: torch.Tensor, ref_image: torch.Tensor, n_images: int,
                self_image: torch.Tensor, k: int, candidates: int) -> tuple[torch.Tensor, int]:
    """The FAISS path; returns (scores, rows that fell back to the exact path)."""
    import faiss

    q = np.ascontiguousarray(query.numpy(), dtype=np.float32)
    index = faiss.IndexFlatIP(ref.shape[1])
    index.add(np.ascontiguousarray(ref.numpy(), dtype=np.float32))
    n_hits = min(ref.shape[0], candidates or max(4 * k, 16))
    sims, ids = index.search(q, n_hits)
    images = ref_image.numpy()[ids]
    own = self_image.numpy()[:, None]
    images = np.where((images == own) & (own >= 0), -1, images)
    first = _first_hits(images)
    counted = np.cumsum(first, axis=1)
    take = first & (counted <= k)
    exact = counted[:, -1] >= k
    dist = np.sqrt(np.clip(2.0 - 2.0 * sims, 0.0, None))
    out = torch.from_numpy((np.where(take, dist, 0.0).sum(1) / k).astype(np.float32))
    rest = np.flatnonzero(~exact)
    if rest.size:
        idx = torch.from_numpy(rest)
        out[idx] = _exact_rows(query[idx], ref, ref_image, n_images, self_image[idx], k)
    return out, int(rest.size)


def image_minima_mean(query: torch.Tensor, ref: torch.Tensor, ref_image: torch.Tensor, self_image: torch.Tensor,
                      k: int, method: str = "exact", candidates: int = 0) -> torch.Tensor:
    """For each query row, the mean of its ``k`` smallest per-reference-image nearest distances.

    query (n, C) and ref (R, C): L2-normalised float32; ref_image (R,): image id of each
    reference row (0..n_images-1); self_image (n,): the query row's own image id among the
    references, or -1. ``method``: ``exact`` or ``faiss`` (same result, see module doc; with
    a GPU the blocked products run there for both).
    """
    query, ref = query.float().contiguous(), ref.float().contiguous()
    ref_image, self_image = ref_image.long(), self_image.long()
    n_images = int(ref_image.max()) + 1
    available = n_images - int((self_image >= 0).any())
    if k > available:
        raise ValueError(f"need {k} reference images besides the query's own, have {available}")
    if method == "faiss" and not torch.cuda.is_available():
        return _faiss_rows(query, ref, ref_image, n_images, self_image, k, candidates)[0]
    return _exact_rows(query, ref, ref_image, n_images, self_image, k)


def _pairs(cfg: DetectConfig, n_layers: int) -> list[tuple[int, int]]:
    return [(layer, r) for layer in range(n_layers) for r in cfg.radii]


def _flat(tokens: np.ndarray, layer: int, radius: int) -> torch.Tensor:
    """(N, L, h, w, C) stored tokens -> (N * h * w, C) aggregated vectors of one (layer, radius)."""
    agg = aggregate(torch.from_numpy(np.ascontiguousarray(tokens[:, layer])), radius)
    return agg.reshape(-1, agg.shape[-1])


def mutual_scores(query: np.ndarray, reference: np.ndarray, self_index: np.ndarray, cfg: DetectConfig) -> np.ndarray:
    """MuSc patch scores (n, h, w): every (layer, radius) pair scored on its own, then averaged.

    query (n, L, h, w, C) and reference (M, L, h, w, C) stored tokens; self_index (n,):
    the query image's position in ``reference``, or -1.
    """
    n, n_layers, h, w, _ = query.shape
    m = reference.shape[0]
    k = smallest_count(m, cfg.fraction)
    patches = h * w
    ref_image = torch.arange(m).repeat_interleave(patches)
    self_rows = torch.from_numpy(np.repeat(np.asarray(self_index, np.int64), patches))
    total = torch.zeros(n * patches)
    pairs = _pairs(cfg, n_layers)
    for layer, r in pairs:
        total += image_minima_mean(_flat(query, layer, r), _flat(reference, layer, r), ref_image, self_rows, k,
                                   cfg.knn, cfg.knn_candidates)
    return (total / len(pairs)).reshape(n, h, w).numpy()


def greedy_coreset(x: torch.Tensor, size: int, seed: int, dim: int = 128) -> torch.Tensor:
    """Indices of ``size`` rows chosen by greedy k-centre on a random projection (PatchCore);
    O(rows x size), on the GPU when there is one."""
    g = torch.Generator().manual_seed(seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    proj = (x @ (torch.randn(x.shape[1], dim, generator=g) / math.sqrt(dim))).to(dev)
    chosen = torch.empty(size, dtype=torch.long, device=dev)
    chosen[0] = int(torch.randint(x.shape[0], (1,), generator=g))
    nearest = torch.cdist(proj, proj[chosen[:1]]).squeeze(1)
    for i in range(1, size):
        chosen[i] = nearest.argmax()
        nearest = torch.minimum(nearest, torch.cdist(proj, proj[chosen[i:i + 1]]).squeeze(1))
    return chosen.cpu()


def bank_scores(query: np.ndarray, bank: np.ndarray, self_index: np.ndarray, cfg: DetectConfig) -> np.ndarray:
    """PatchCore-style patch scores (n, h, w): distance to the nearest memory-bank patch of
    another image, per (layer, radius) pair, averaged. bank (B, L, h, w, C): normal images'
    tokens; self_index: the query's position in ``bank`` or -1 (a bank image is scored
    against the others). A bank above ``detect.bank_max_patches`` keeps a greedy coreset
    of that many patch positions, chosen once on the deepest block's unaggregated tokens
    and used for every pair."""
    n, n_layers, h, w, _ = query.shape
    patches = h * w
    bank_image = torch.arange(bank.shape[0]).repeat_interleave(patches)
    self_rows = torch.from_numpy(np.repeat(np.asarray(self_index, np.int64), patches))
    keep = None
    if bank_image.numel() > cfg.bank_max_patches:
        keep = greedy_coreset(_flat(bank, n_layers - 1, 1), cfg.bank_max_patches, cfg.seed)
        bank_image = bank_image[keep]
    total = torch.zeros(n * patches)
    pairs = _pairs(cfg, n_layers)
    for layer, r in pairs:
        ref = _flat(bank, layer, r)
        ref = ref if keep is None else ref[keep]
        total += image_minima_mean(_flat(query, layer, r), ref, bank_image, self_rows, 1, cfg.knn,
                                   cfg.knn_candidates)
    return (total / len(pairs)).reshape(n, h, w).numpy()


def rescore(scores: np.ndarray, cls: np.ndarray, windows: tuple[int, ...]) -> np.ndarray:
    """RsCIN: image scores min-max normalised, then averaged over each image's nearest
    neighbours by CLS similarity (itself included), weighted by similarity, for each
    window size in ``windows``, and the windows averaged. Empty ``windows``: unchanged."""
    scores = np.asarray(scores, np.float64)
    if not windows or scores.size < 2:
        return scores
    span = scores.max() - scores.min()
    s = torch.from_numpy((scores - scores.min()) / span if span > 0 else np.zeros_like(scores))
    feats = torch.nn.functional.normalize(torch.from_numpy(np.asarray(cls, np.float64)), dim=1)
    widest = min(max(windows), s.numel())
    out = torch.zeros_like(s)
    rows = max(1, BLOCK_ELEMENTS // s.numel())
    for start in range(0, s.numel(), rows):
        sims = feats[start:start + rows] @ feats.T
        sims[torch.arange(sims.shape[0]), torch.arange(start, start + sims.shape[0])] = math.inf  # self first
        top, idx = sims.topk(widest, dim=1)
        top[:, 0] = 1.0
        top = top.clamp(min=0.0)
        acc = torch.zeros(sims.shape[0], dtype=torch.float64)
        for k in windows:
            kk = min(k, widest)
            weights = top[:, :kk]
            acc += (weights * s[idx[:, :kk]]).sum(1) / weights.sum(1)
        out[start:start + rows] = acc / len(windows)
    return out.numpy()
