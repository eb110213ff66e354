"""Evaluation metrics over complete, gathered arrays (METHOD.md section 7).

Clustering: NMI (arithmetic normalisation), ARI and micro-F1 after Hungarian
matching (= clustering accuracy), equal to scikit-learn's values (METHOD.md 7.1).
Segmentation: AUPRO up to a false-positive-rate limit, as MVTec AD's reference
``compute_pro`` + ``trapezoid_area`` (METHOD.md 7.3).
"""
from __future__ import annotations

import math
from typing import Any, Hashable, Iterator, Mapping, Sequence

import numpy as np
from scipy.ndimage import label as _label_components
from scipy.optimize import linear_sum_assignment

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_AUPRO_CHUNK = 1 << 22  # thresholds evaluated at once by the exact AUPRO


# --------------------------------------------------------------------------- clustering


def _encode(
    y_true: Sequence[Any], y_pred: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Both labelings as dense codes: (true_labels (Kt,), pred_labels (Kp,), t (N,), p (N,))."""
    t_arr = np.asarray(y_true)
    p_arr = np.asarray(y_pred)
    if t_arr.ndim != 1 or p_arr.ndim != 1:
        raise ValueError(f"labelings must be 1-D, got shapes {t_arr.shape} and {p_arr.shape}")
    if t_arr.shape[0] != p_arr.shape[0]:
        raise ValueError(f"labelings differ in length: {t_arr.shape[0]} vs {p_arr.shape[0]}")
    true_labels, t = np.unique(t_arr, return_inverse=True)
    pred_labels, p = np.unique(p_arr, return_inverse=True)
    return true_labels, pred_labels, t.ravel(), p.ravel()


def _contingency(t: np.ndarray, p: np.ndarray, n_true: int, n_pred: int) -> np.ndarray:
    """(Kt, Kp) int64 counts of (true code, predicted code) pairs."""
    flat = np.bincount(t * n_pred + p, minlength=n_true * n_pred)
    return flat.reshape(n_true, n_pred).astype(np.int64)


def _entropy(counts: np.ndarray) -> float:
    """Shannon entropy (nats) of a labeling given its cluster sizes (all > 0)."""
    if counts.size <= 1:
        return 0.0
    total = counts.sum()
    c = counts.astype(np.float64)
    return float(-np.sum((c / total) * (np.log(c) - math.log(total))))


def _nmi(cont: np.ndarray) -> float:
    """Arithmetic-mean NMI from a contingency table without empty rows/cols (sklearn's limits)."""
    n_true, n_pred = cont.shape
    if n_true == n_pred == 1 or n_true == n_pred == 0:
        return 1.0  # neither labeling splits the data: a perfect match
    if n_true == 1 or n_pred == 1:
        return 0.0  # one labeling has zero entropy, so MI = 0
    total = int(cont.sum())
    rows = cont.sum(axis=1)
    cols = cont.sum(axis=0)
    i, j = np.nonzero(cont)
    nz = cont[i, j].astype(np.float64)
    p_nz = nz / total
    log_outer = -np.log(rows[i] * cols[j]) + 2.0 * math.log(total)
    terms = p_nz * (np.log(nz) - math.log(total)) + p_nz * log_outer  # sklearn's expression
    terms = np.where(np.abs(terms) < np.finfo(np.float64).eps, 0.0, terms)  # as sklearn does
    mi = float(np.clip(terms.sum(), 0.0, None))
    if mi == 0.0:
        return 0.0
    return float(mi / np.mean([_entropy(rows), _entropy(cols)]))


def _ari(cont: np.ndarray) -> float:
    """Adjusted Rand index from a contingency table, via the pair confusion matrix."""
    n = int(cont.sum())
    sum_squares = int(np.sum(cont * cont))
    rows = cont.sum(axis=1)
    cols = cont.sum(axis=0)
    tp = sum_squares - n
    fp = int(np.sum(cont @ cols)) - sum_squares  # pairs split by truth, joined by the prediction
    fn = int(np.sum(cont.T @ rows)) - sum_squares  # pairs joined by truth, split by the prediction
    tn = n * n - fp - fn - sum_squares
    if fn == 0 and fp == 0:
        return 1.0  # empty data or full agreement
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def _match(cont: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching maximising matched counts: (true codes, pred codes), min(Kt, Kp) pairs."""
    rows, cols = linear_sum_assignment(cont, maximize=True)
    return rows, cols


def cluster_metrics(y_true: Sequence[Any], y_pred: Sequence[int]) -> dict[str, float]:
    """NMI, ARI and F1 of a clustering (METHOD.md 7.1).

    y_true: (N,) true labels, any sortable type (e.g. strings); y_pred: (N,) cluster ids.
    ``f1`` is micro-F1 after one-to-one Hungarian matching of clusters to labels, i.e.
    clustering accuracy; with K_pred != K_true the surplus clusters or labels stay
    unmatched and their samples count as errors. Raises ValueError for empty input.
    """
    true_labels, pred_labels, t, p = _encode(y_true, y_pred)
    if t.size == 0:
        raise ValueError("cluster_metrics needs at least one sample")
    cont = _contingency(t, p, true_labels.size, pred_labels.size)
    rows, cols = _match(cont)
    return {
        "nmi": _nmi(cont),
        "ari": _ari(cont),
        "f1": float(cont[rows, cols].sum() / t.size),
    }


def hungarian_mapping(y_true: Sequence[Any], y_pred: Sequence[int]) -> dict[int, Any]:
    """Predicted cluster id -> matched true label; clusters left unmatched map to None.

    Keys are the distinct ids in y_pred (sorted); labels are Python scalars.
    """
    true_labels, pred_labels, t, p = _encode(y_true, y_pred)
    cont = _contingency(t, p, true_labels.size, pred_labels.size)
    rows, cols = _match(cont)
    mapping: dict[int, Any] = {int(c): None for c in pred_labels.tolist()}
    for r, c in zip(rows.tolist(), cols.tolist()):
        mapping[int(pred_labels[c])] = true_labels[r].item()
    return mapping


def confusion_matrix_matched(
    y_true: Sequence[Any], y_pred: Sequence[int]
) -> tuple[np.ndarray, list[Any], list[int]]:
    """Contingency matrix with predicted clusters reordered to follow their matched labels.

    Returns (matrix (Kt, Kp) int64, true_labels (Kt,), pred_labels (Kp,)): rows are the
    sorted true labels; column order is the cluster matched to each true label in row
    order (labels without a cluster are skipped), then the unmatched clusters by id.
    When every label is matched (K_pred >= K_true) the matched counts lie on the diagonal.
    """
    true_labels, pred_labels, t, p = _encode(y_true, y_pred)
    cont = _contingency(t, p, true_labels.size, pred_labels.size)
    rows, cols = _match(cont)
    matched = cols[np.argsort(rows, kind="stable")].tolist()
    unmatched = sorted(set(range(pred_labels.size)) - set(matched))
    order = np.asarray(matched + unmatched, dtype=np.int64)
    return (
        cont[:, order],
        [x.item() for x in true_labels],
        [int(pred_labels[c]) for c in order],
    )


def per_category_metrics(
    categories: Sequence[Hashable], y_true: Sequence[Any], y_pred: Sequence[int],
    k: int | Mapping[Hashable, int] | None = None,
) -> dict[str, Any]:
    """``cluster_metrics`` per category (each matched on its own), their unweighted mean and
    their sample-weighted mean.

    categories, y_true, y_pred: (N,) per sample. ``k``: the number of classes the model
    was asked for, one for all or per category (default: the category's gt type count,
    at least 2). Returns {"per_category": {category: metrics} in first-appearance order,
    "mean": metrics averaged over categories with equal weight (METHOD.md 7.2),
    "weighted_mean": averaged with each category weighted by its samples, "samples":
    {category: samples}, "few_samples": categories with fewer samples than K (their
    scores say little: one sample always scores NMI 1)}.
    """
    cats = list(categories)
    t_arr = np.asarray(y_true)
    p_arr = np.asarray(y_pred)
    if not (len(cats) == t_arr.shape[0] == p_arr.shape[0]):
        raise ValueError(
            f"lengths differ: {len(cats)} categories, {t_arr.shape[0]} labels, {p_arr.shape[0]} predictions"
        )
    if not cats:
        raise ValueError("per_category_metrics needs at least one sample")
    groups: dict[Hashable, list[int]] = {}
    for i, c in enumerate(cats):
        groups.setdefault(c, []).append(i)
    per_category = {
        c: cluster_metrics(t_arr[np.asarray(idx)], p_arr[np.asarray(idx)]) for c, idx in groups.items()
    }
    samples = {c: len(idx) for c, idx in groups.items()}

    def k_of(c: Hashable) -> int:
        if isinstance(k, Mapping) and c in k:
            return int(k[c])
        if isinstance(k, int):
            return k
        return max(2, len(set(t_arr[np.asarray(groups[c])].tolist())))

    names = ("nmi", "ari", "f1")
    mean = {m: float(np.mean([v[m] for v in per_category.values()])) for m in names}
    total = sum(samples.values())
    weighted = {m: float(sum(v[m] * samples[c] for c, v in per_category.items()) / total) for m in names}
    return {"per_category": per_category, "mean": mean, "weighted_mean": weighted, "samples": samples,
            "few_samples": [c for c in per_category if samples[c] < k_of(c)]}


# --------------------------------------------------------------------------- AUPRO


def _trapezoid_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> tuple[float, bool]:
    """Area under the polyline (x, y) (x non-decreasing) over x <= x_max.

    Returns (area, crossed): crossed is True when the polyline reaches x_max, in which
    case the last segment is cut at x_max with y interpolated linearly (MVTec's rule).
    """
    ins = int(np.searchsorted(x, x_max, side="right"))
    area = float(np.sum(0.5 * (y[1:ins] + y[: ins - 1]) * (x[1:ins] - x[: ins - 1]))) if ins > 1 else 0.0
    if ins == x.size:
        return area, x[-1] == x_max
    if ins > 0 and x[ins - 1] < x_max:
        x0, x1, y0, y1 = x[ins - 1], x[ins], y[ins - 1], y[ins]
        y_cut = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y_cut + y0) * (x_max - x0)
    return area, True


def _region_weights(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """For one gt mask: (normal bool mask (H,W), anomalous pixel weights 1/|region| (n_anom,), regions)."""
    labels, n_regions = _label_components(mask, structure=_EIGHT_CONNECTED)
    normal = labels == 0
    anom_labels = labels[~normal]
    sizes = np.bincount(anom_labels, minlength=n_regions + 1).astype(np.float64)
    return normal, 1.0 / sizes[anom_labels], int(n_regions)


def _check_aupro_inputs(
    anomaly_maps: Sequence[np.ndarray], gt_masks: Sequence[np.ndarray], fpr_limit: float
) -> tuple[list[np.ndarray], list[np.ndarray], np.dtype]:
    maps = [np.asarray(m) for m in anomaly_maps]
    masks = [np.asarray(g).astype(bool, copy=False) for g in gt_masks]
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} anomaly maps but {len(masks)} gt masks")
    if not maps:
        raise ValueError("aupro needs at least one map")
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    for i, (m, g) in enumerate(zip(maps, masks)):
        if m.ndim != 2 or m.shape != g.shape:
            raise ValueError(f"map {i} has shape {m.shape}, its gt mask {g.shape}; need equal 2-D shapes")
        if not np.all(np.isfinite(m)):
            raise ValueError(f"map {i} holds non-finite scores")
    dtype = np.result_type(np.float32, *[m.dtype for m in maps])
    return maps, masks, dtype


def _pro_curve_exact(
    maps: list[np.ndarray], masks: list[np.ndarray], dtype: np.dtype, fpr_limit: float
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Chunks of the exact (FPR, PRO) curve at every distinct score, thresholds descending.

    Only scores >= the score at which FPR first reaches fpr_limit are kept, so the curve
    ends at or just past the limit. Memory: one copy of the normal scores plus the kept part.
    """
    infos = [_region_weights(g) for g in masks]
    n_regions = sum(r for _, _, r in infos)
    n_normal = sum(int(nm.sum()) for nm, _, _ in infos)
    if n_regions == 0:
        raise ValueError("aupro needs at least one ground-truth region")
    if n_normal == 0:
        raise ValueError("aupro needs at least one normal (non-gt) pixel")

    normal_scores = np.empty(n_normal, dtype=dtype)
    anom_scores = np.empty(sum(w.size for _, w, _ in infos), dtype=dtype)
    anom_weights = np.empty(anom_scores.size, dtype=np.float64)
    i_n = i_a = 0
    for m, (nm, w, _) in zip(maps, infos):
        k_n = int(nm.sum())
        normal_scores[i_n : i_n + k_n] = m[nm]
        anom_scores[i_a : i_a + w.size] = m[~nm]
        anom_weights[i_a : i_a + w.size] = w
        i_n += k_n
        i_a += w.size
    del infos

    # Lowest threshold needed: the k-th largest normal score, k/n_normal > fpr_limit.
    k = min(n_normal, int(math.floor(fpr_limit * n_normal)) + 1)
    normal_scores.partition(n_normal - k)
    t_low = normal_scores[n_normal - k]
    below = normal_scores[: n_normal - k]
    kept_normal = np.concatenate([normal_scores[n_normal - k :], below[below == t_low]])
    del normal_scores, below
    kept_normal.sort()

    keep = anom_scores >= t_low
    kept_anom = anom_scores[keep]
    kept_w = anom_weights[keep]
    del anom_scores, anom_weights, keep
    order = np.argsort(kept_anom, kind="stable")
    kept_anom = kept_anom[order]
    # tail[i] = sum of weights of kept_anom[i:] (pixels scoring >= kept_anom[i])
    tail = np.concatenate([np.cumsum(kept_w[order][::-1])[::-1], [0.0]])
    del kept_w, order

    thresholds = np.unique(np.concatenate([kept_normal, kept_anom]))[::-1]
    for start in range(0, thresholds.size, _AUPRO_CHUNK):
        t = thresholds[start : start + _AUPRO_CHUNK]
        fp = kept_normal.size - np.searchsorted(kept_normal, t, side="left")
        pro = tail[np.searchsorted(kept_anom, t, side="left")]
        yield (
            np.minimum(fp / n_normal, 1.0),
            np.minimum(pro / n_regions, 1.0),
        )


def _pro_curve_binned(
    maps: list[np.ndarray], masks: list[np.ndarray], num_thresholds: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(FPR, PRO) at num_thresholds evenly spaced thresholds from the max to the min score.

    Streams over the images with per-threshold histograms; memory O(num_thresholds).
    """
    if num_thresholds < 2:
        raise ValueError(f"num_thresholds must be >= 2, got {num_thresholds}")
    lo = min(float(m.min()) for m in maps)
    hi = max(float(m.max()) for m in maps)
    thresholds = np.linspace(lo, hi, num_thresholds)
    fp_hist = np.zeros(num_thresholds, dtype=np.float64)
    pro_hist = np.zeros(num_thresholds, dtype=np.float64)
    n_regions = n_normal = 0
    for m, g in zip(maps, masks):
        normal, w, r = _region_weights(g)
        # bin j holds scores in [t_j, t_{j+1}): such a pixel is positive at thresholds t_0..t_j
        bins = np.searchsorted(thresholds, m, side="right") - 1
        fp_hist += np.bincount(bins[normal], minlength=num_thresholds)
        pro_hist += np.bincount(bins[~normal], weights=w, minlength=num_thresholds)
        n_regions += r
        n_normal += int(normal.sum())
    if n_regions == 0:
        raise ValueError("aupro needs at least one ground-truth region")
    if n_normal == 0:
        raise ValueError("aupro needs at least one normal (non-gt) pixel")
    fp = np.cumsum(fp_hist[::-1])  # positives at t_{n-1}, t_{n-2}, ..., t_0
    pro = np.cumsum(pro_hist[::-1])
    yield np.minimum(fp / n_normal, 1.0), np.minimum(pro / n_regions, 1.0)


def aupro(
    anomaly_maps: Sequence[np.ndarray],
    gt_masks: Sequence[np.ndarray],
    fpr_limit: float = 0.3,
    num_thresholds: int | None = None,
) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (METHOD.md 7.3).

    anomaly_maps: (H_i, W_i) float scores per image; gt_masks: (H_i, W_i) per image,
    nonzero = defect. Regions are 8-connected gt components; PRO(t) is the mean over all
    regions of all images of |{score >= t} ∩ region| / |region|; FPR(t) is over all
    normal pixels, so images without a region count only there. The curve runs from
    (0, 0) through one point per threshold (descending) to (1, 1); its trapezoid area up
    to fpr_limit (last segment cut by linear interpolation) is divided by fpr_limit, as
    MVTec AD's ``compute_pro`` and ``trapezoid_area``.
    num_thresholds: None (default) is exact, one point per distinct score; an int uses
    that many evenly spaced thresholds between the min and the max score, streaming.
    """
    maps, masks, dtype = _check_aupro_inputs(anomaly_maps, gt_masks, fpr_limit)
    chunks = (
        _pro_curve_exact(maps, masks, dtype, fpr_limit)
        if num_thresholds is None
        else _pro_curve_binned(maps, masks, num_thresholds)
    )
    area = 0.0
    last_x, last_y = np.zeros(1), np.zeros(1)
    for x, y in chunks:
        xs = np.concatenate([last_x, x])
        ys = np.concatenate([last_y, y])
        part, crossed = _trapezoid_up_to(xs, ys, fpr_limit)
        area += part
        if crossed:
            return float(area / fpr_limit)
        last_x, last_y = x[-1:], y[-1:]
    part, _ = _trapezoid_up_to(np.concatenate([last_x, [1.0]]), np.concatenate([last_y, [1.0]]), fpr_limit)
    return float((area + part) / fpr_limit)
