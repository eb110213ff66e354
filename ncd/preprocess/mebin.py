"""MEBin, Main Element Binarization (METHOD.md section 2), fast and in exact parity.

Upstream sweeps 64 normalised thresholds and, at each one, thresholds the float map,
erodes it with a 6x6 kernel and counts 8-connected components. This module gives the
same masks, thresholds and counts with far less work:

* The normalised map is a monotone non-decreasing function of the raw uint8 value
  (pixels below ``min_th`` map to 0, the rest rise with the value), so ``norm > s``
  equals ``raw > c(s)`` for an integer cut-off ``c(s)`` read off a 256-entry table that
  holds upstream's exact float64 expression.
* Erosion with a flat kernel commutes with thresholding (``erode(raw > c) ==
  erode(raw) > c``, OpenCV's +inf border included), so one grey-level erosion replaces
  the 64 binary ones; the final mask ``erode(raw > T)`` is ``eroded > T`` as well.
* Components are counted only once per distinct foreground (cut-offs that select the
  same pixel set share a count) and only inside the bounding box of that foreground.

The threshold back-mapping is done in float: upstream's uint8 arithmetic overflows
under NumPy 2 (min 76, max 255, t 239 gives 76 instead of 243).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import cv2
import numpy as np

from ncd.config import MebinConfig

NORM_MAX = 255  # top of the normalised scale and of the uint8 map scale
NO_RUN_THRESHOLD = 255  # raw threshold upstream returns when no stable run exists
_LEVELS = np.arange(256)


@dataclass(frozen=True)
class MebinResult:
    """MEBin output for one anomaly map."""

    mask: np.ndarray  # uint8 0/255, map shape
    threshold: int  # raw map scale
    count: int  # est_anomaly_num


def search_range(peaks: Sequence[int], cfg: MebinConfig) -> tuple[int, int]:
    """(min_th, max_th) of one category (METHOD 2.1).

    ``peaks`` holds every map's maximum. ``min_th`` is the lowest peak, or
    ``cfg.lower_bound`` when set; ``max_th`` is the highest peak.
    """
    if len(peaks) == 0:
        raise ValueError("search_range needs at least one peak")
    max_th = int(max(peaks))
    min_th = int(min(peaks)) if cfg.lower_bound is None else int(cfg.lower_bound)
    if not 0 <= min_th <= NORM_MAX:
        raise ValueError(f"search floor (lower_bound or lowest peak) must be in [0, {NORM_MAX}]: {min_th}")
    return min_th, max_th


OUTLIER_Z = 3.5  # modified z-score beyond which a peak is an outlier (Iglewicz and Hoaglin)


def peak_outliers(peaks: Sequence[float], z: float = OUTLIER_Z) -> list[int]:
    """Indices of the peaks that are outliers among a category's peaks.

    The statistic is the modified z-score ``0.6745 (p - median) / MAD`` (median absolute
    deviation); when more than half the peaks are equal (MAD 0) the mean absolute
    deviation stands in (``(p - median) / (1.2533 * meanAD)``). Equal peaks have no
    outlier. A saturated map (peak far above the others) or an all-zero one (far below)
    is one: its peak alone would set the category's search range.
    """
    values = np.asarray(peaks, np.float64)
    if values.size < 3:
        return []
    deviation = np.abs(values - np.median(values))
    mad = float(np.median(deviation))
    if mad > 0:
        score = 0.6745 * deviation / mad
    else:
        mean_ad = float(deviation.mean())
        if mean_ad == 0:
            return []
        score = deviation / (1.2533 * mean_ad)
    return np.flatnonzero(score > z).tolist()


def _norm_table(min_th: int, max_th: int) -> np.ndarray:
    """Normalised value of every uint8 level, float64 (256,); upstream's expression."""
    scaled = (_LEVELS - min_th) / (max_th - min_th) * NORM_MAX
    return np.where(_LEVELS < min_th, 0.0, scaled)


def normalize(anomaly_map: np.ndarray, min_th: int, max_th: int) -> np.ndarray:
    """Normalised map (METHOD 2.2), float64 of the map's shape.

    0 where ``A < min_th``, else ``(A - min_th) / (max_th - min_th) * 255`` (upstream's
    operation order, not rounded, not clipped). A degenerate range
    (``max_th <= min_th``) gives all zeros instead of upstream's NaN.
    """
    min_th, max_th = int(min_th), int(max_th)
    if max_th <= min_th:
        return np.zeros(anomaly_map.shape, np.float64)
    if anomaly_map.dtype == np.uint8:
        return _norm_table(min_th, max_th)[anomaly_map]
    values = np.asarray(anomaly_map, np.float64)
    return np.where(values < min_th, 0.0, (values - min_th) / (max_th - min_th) * NORM_MAX)


def thresholds(sample_rate: int) -> range:
    """The normalised sweep 255, 255 - rate, ..., > 0 (64 values for rate 4)."""
    if sample_rate < 1:
        raise ValueError(f"sample_rate must be >= 1, got {sample_rate}")
    return range(NORM_MAX, 0, -sample_rate)


def raw_threshold(t: int, min_th: int, max_th: int) -> int:
    """Map normalised threshold ``t`` back to the raw scale, in float, truncated."""
    return int(int(t) * (int(max_th) - int(min_th)) / NORM_MAX + int(min_th))


def erode(image: np.ndarray, kernel_size: int) -> np.ndarray:
    """``cv2.erode`` with a ``k x k`` all-ones kernel, default anchor and border.

    The even kernel is anchored at (k//2, k//2); the image border does not erode.
    Works on binary and grey-level uint8 images alike (a grey-level erosion is a
    minimum filter).
    """
    if kernel_size < 1:
        raise ValueError(f"erode_kernel must be >= 1, got {kernel_size}")
    kernel = np.ones((kernel_size, kernel_size), np.uint8)
    return cv2.erode(image, kernel, iterations=1)


def select_stable_run(counts: Sequence[int], min_interval_len: int) -> tuple[int, int] | None:
    """Stable-interval choice (METHOD 2.4): ``(count, end_index)`` or None.

    Maximal runs of equal non-zero counts at least ``min_interval_len`` long are
    candidates. The count whose longest run is longest wins; ties go to the count
    whose first candidate run comes first. Within that count the longest run wins,
    ties going to the last one. The run's end (lowest threshold) is returned.
    """
    longest: dict[int, int] = {}  # count -> longest run length, in first-seen order
    best_end: dict[int, int] = {}  # count -> end index of its last longest run
    n = len(counts)
    start = 0
    while start < n:
        end = start
        while end + 1 < n and counts[end + 1] == counts[start]:
            end += 1
        value, length = int(counts[start]), end - start + 1
        if value != 0 and length >= min_interval_len:
            if length >= longest.get(value, 0):
                longest[value] = length
                best_end[value] = end
        start = end + 1
    if not longest:
        return None
    count = max(longest, key=longest.__getitem__)
    return count, best_end[count]


def _cutoffs(min_th: int, max_th: int, sample_rate: int) -> list[int]:
    """Per sweep threshold s, the largest raw level whose normalised value is <= s."""
    table = _norm_table(min_th, max_th)
    sweep = np.asarray(thresholds(sample_rate), np.float64)
    return (np.searchsorted(table, sweep, side="right") - 1).tolist()


def _bounding_window(
    image: np.ndarray, row_max: np.ndarray, col_max: np.ndarray, c: int
) -> np.ndarray | None:
    """The view of ``image`` bounding its pixels above ``c``, or None when there are none."""
    rows = np.flatnonzero(row_max > c)
    if rows.size == 0:
        return None
    cols = np.flatnonzero(col_max > c)
    return image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _component_counts(eroded: np.ndarray, cutoffs: Sequence[int]) -> list[int]:
    """8-connected component count of ``eroded > c`` for every cut-off ``c``."""
    if not cutoffs:
        return []
    region = _bounding_window(eroded, eroded.max(axis=1), eroded.max(axis=0), min(cutoffs))
    if region is None:
        return [0] * len(cutoffs)
    hist = np.bincount(region.ravel(), minlength=NORM_MAX + 1)
    above = region.size - np.cumsum(hist)  # above[c] = pixels with value > c
    row_max = region.max(axis=1)
    col_max = region.max(axis=0)
    by_foreground: dict[int, int] = {0: 0}  # nested sets: equal size means equal set
    counts = []
    for c in cutoffs:
        size = int(above[c])
        if size not in by_foreground:
            window = _bounding_window(region, row_max, col_max, c)
            binary = np.greater(window, c).view(np.uint8)
            n_labels, _ = cv2.connectedComponents(binary, connectivity=8, ltype=cv2.CV_32S)
            by_foreground[size] = n_labels - 1
        counts.append(by_foreground[size])
    return counts


def _check_map(anomaly_map: np.ndarray) -> np.ndarray:
    if anomaly_map.ndim != 2 or anomaly_map.dtype != np.uint8:
        raise ValueError(
            f"anomaly map must be 2-D uint8, got shape {anomaly_map.shape} dtype {anomaly_map.dtype}"
        )
    return np.ascontiguousarray(anomaly_map)


def _eroded(anomaly_map: np.ndarray, cfg: MebinConfig) -> np.ndarray:
    return erode(anomaly_map, cfg.erode_kernel) if cfg.erode else anomaly_map


def count_sequence(anomaly_map: np.ndarray, min_th: int, max_th: int, cfg: MebinConfig) -> list[int]:
    """Component count at every sweep threshold (METHOD 2.3), index i <-> 255 - i*rate.

    ``anomaly_map`` is 2-D uint8. A degenerate range (``max_th <= min_th``) gives zeros.
    """
    anomaly_map = _check_map(anomaly_map)
    min_th, max_th = int(min_th), int(max_th)
    if max_th <= min_th:
        return [0] * len(thresholds(cfg.sample_rate))
    cutoffs = _cutoffs(min_th, max_th, cfg.sample_rate)
    return _component_counts(_eroded(anomaly_map, cfg), cutoffs)


def binarize(anomaly_map: np.ndarray, min_th: int, max_th: int, cfg: MebinConfig) -> MebinResult:
    """MEBin for one 2-D uint8 map given its category's search range (METHOD 2.2-2.5).

    Identical to the per-map result of :func:`binarize_set` over the category. When
    ``max_th <= min_th`` (all peaks equal, or ``lower_bound`` at or above the highest
    peak) nothing can be normalised: the map gets count 0, threshold 255 and an empty
    mask, which is what upstream's NaN map leads to, without the NaN. With
    ``erode_fallback`` (the default; upstream has none) a map whose eroded sweep leaves
    an empty mask is binarised again without erosion.
    """
    anomaly_map = _check_map(anomaly_map)
    min_th, max_th = int(min_th), int(max_th)
    sweep = thresholds(cfg.sample_rate)
    if max_th <= min_th:
        return MebinResult(np.zeros(anomaly_map.shape, np.uint8), NO_RUN_THRESHOLD, 0)
    eroded = _eroded(anomaly_map, cfg)
    counts = _component_counts(eroded, _cutoffs(min_th, max_th, cfg.sample_rate))
    run = select_stable_run(counts, cfg.min_interval_len)
    if run is None:
        count, threshold = 0, NO_RUN_THRESHOLD
    else:
        count, end = run
        threshold = raw_threshold(sweep[end], min_th, max_th)
    mask = np.zeros(anomaly_map.shape, np.uint8)
    mask[eroded > threshold] = NORM_MAX
    if cfg.erode and cfg.erode_fallback and not mask.any():
        # thin defects (traces, scratches) vanish under the 6x6 erosion at low map
        # resolution; the un-eroded sweep still finds them
        return binarize(anomaly_map, min_th, max_th, replace(cfg, erode=False))
    return MebinResult(mask=mask, threshold=threshold, count=count)


def binarize_set(maps: list[np.ndarray], cfg: MebinConfig) -> list[MebinResult]:
    """MEBin over one category: search range from the maps' peaks, then each map."""
    if not maps:
        return []
    min_th, max_th = search_range([int(_check_map(m).max()) for m in maps], cfg)
    return [binarize(m, min_th, max_th, cfg) for m in maps]
