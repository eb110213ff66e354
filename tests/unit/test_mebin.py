"""MEBin (METHOD.md section 2 and invariants 1-8 of section 11) against a slow reference."""
from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest

from ncd.config import MebinConfig
from ncd.preprocess.mebin import (
    MebinResult,
    binarize,
    binarize_set,
    count_sequence,
    erode,
    normalize,
    raw_threshold,
    search_range,
    select_stable_run,
    thresholds,
)

DEFAULT = MebinConfig(erode_fallback=False)  # upstream's MEBin, for the parity tests


# ---------------------------------------------------------------- slow reference


def reference_select(counts: list[int], min_len: int) -> tuple[int, int] | None:
    """The stable-run rule as METHOD 2.4 states it, with a dict of runs per count."""
    runs: dict[int, list[tuple[int, int]]] = {}
    i = 0
    while i < len(counts):
        j = i
        while j + 1 < len(counts) and counts[j + 1] == counts[i]:
            j += 1
        if counts[i] != 0 and j - i + 1 >= min_len:
            runs.setdefault(counts[i], []).append((i, j))
        i = j + 1
    if not runs:
        return None
    longest = {c: max(e - s for s, e in rs) for c, rs in runs.items()}
    best = max(longest.values())
    count = next(c for c in runs if longest[c] == best)
    end = [e for s, e in runs[count] if e - s == longest[count]][-1]
    return count, end


def reference_set(maps: list[np.ndarray], cfg: MebinConfig) -> list[tuple[np.ndarray, int, int, list[int]]]:
    """Per map (mask, threshold, count, counts): 64 x (threshold, erode, count components)."""
    peaks = [int(m.max()) for m in maps]
    hi = max(peaks)
    lo = min(peaks) if cfg.lower_bound is None else cfg.lower_bound
    kernel = np.ones((cfg.erode_kernel, cfg.erode_kernel), np.uint8)
    out = []
    for raw in maps:
        with np.errstate(divide="ignore", invalid="ignore"):
            norm = np.where(raw < lo, 0.0, (raw.astype(np.float64) - lo) / (hi - lo) * 255)
        counts = []
        for s in range(255, 0, -cfg.sample_rate):
            binary = np.where(norm > s, 255, 0).astype(np.uint8)
            if cfg.erode:
                binary = cv2.erode(binary, kernel)
            n_labels, *_ = cv2.connectedComponentsWithStats(binary, connectivity=8)
            counts.append(n_labels - 1)
        run = reference_select(counts, cfg.min_interval_len)
        if run is None:
            threshold, count = 255, 0
        else:
            count, end = run
            t = 255 - end * cfg.sample_rate
            threshold = int(float(t) * float(hi - lo) / 255.0 + float(lo))
        mask = np.where(raw > threshold, 255, 0).astype(np.uint8)
        if cfg.erode:
            mask = cv2.erode(mask, kernel)
        out.append((mask, threshold, count, counts))
    return out


def assert_same(results: list[MebinResult], reference: list[tuple]) -> None:
    assert len(results) == len(reference)
    for got, (mask, threshold, count, _) in zip(results, reference):
        assert got.threshold == threshold
        assert got.count == count
        assert got.mask.dtype == np.uint8 and got.mask.shape == mask.shape
        np.testing.assert_array_equal(got.mask, mask)


# ---------------------------------------------------------------- synthetic maps


def gaussian(shape: tuple[int, int], cy: float, cx: float, sigma: float, amp: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))


def to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def random_map(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Smooth background + 0-3 anomaly blobs + 0-4 small false positives + pixel noise."""
    h, w = shape
    side = max(h, w)
    values = cv2.GaussianBlur(rng.normal(0, 1, shape).astype(np.float32), (0, 0), 3) * 10
    values += rng.uniform(10, 60)
    for n, (s_lo, s_hi), (a_lo, a_hi) in [(4, (0.03, 0.12), (40, 200)), (5, (0.01, 0.03), (20, 90))]:
        for _ in range(rng.integers(0, n)):
            sigma, amp = rng.uniform(s_lo, s_hi) * side, rng.uniform(a_lo, a_hi)
            values += gaussian(shape, rng.uniform(0, h), rng.uniform(0, w), sigma, amp)
    values += rng.normal(0, rng.uniform(0, 6), shape)
    return to_uint8(values)


def low_map(shape: tuple[int, int], peak: int) -> np.ndarray:
    return to_uint8(gaussian(shape, shape[0] / 2, shape[1] / 2, shape[0] / 6, peak) + 2)


def squares(shape: tuple[int, int], spec: list[tuple[int, int, int, int]]) -> np.ndarray:
    """A uint8 map with squares (y, x, side, value) on zero."""
    out = np.zeros(shape, np.uint8)
    for y, x, side, value in spec:
        out[y : y + side, x : x + side] = value
    return out


def n_components(mask: np.ndarray) -> int:
    return cv2.connectedComponents(mask, connectivity=8)[0] - 1


# ---------------------------------------------------------------- invariant 1, 2


def test_two_blobs_and_low_peak_map():
    shape = (256, 256)
    two = to_uint8(gaussian(shape, 80, 80, 13, 240) + gaussian(shape, 170, 180, 14, 200) + 8)
    low = low_map(shape, 60)
    results = binarize_set([two, low], DEFAULT)
    assert results[0].count == 2
    assert n_components(results[0].mask) == 2
    assert results[1].count == 0
    assert not results[1].mask.any()
    seq = count_sequence(two, int(low.max()), int(two.max()), DEFAULT)
    assert set(seq) == {0, 1, 2} and seq[-1] == 2  # 0s, then the higher blob alone, then both
    assert_same(results, reference_set([two, low], DEFAULT))


@pytest.mark.parametrize("seed", range(4))
def test_lowest_peak_map_is_always_empty(seed):
    rng = np.random.default_rng(seed)
    maps = [random_map(rng, (96, 128)) for _ in range(5)]
    lowest = int(np.argmin([m.max() for m in maps]))
    results = binarize_set(maps, DEFAULT)
    assert results[lowest].count == 0
    assert not results[lowest].mask.any()


# ---------------------------------------------------------------- invariant 3


@pytest.mark.parametrize("rate", [4, 3, 7, 1])
def test_count_sequence_length_and_first_entry(rate):
    rng = np.random.default_rng(rate)
    cfg = MebinConfig(sample_rate=rate)
    maps = [random_map(rng, (80, 80)) for _ in range(3)]
    lo, hi = search_range([int(m.max()) for m in maps], cfg)
    for m, (_, _, _, ref_counts) in zip(maps, reference_set(maps, cfg)):
        seq = count_sequence(m, lo, hi, cfg)
        assert len(seq) == len(range(255, 0, -rate)) == len(thresholds(rate))
        assert seq[0] == 0
        assert seq == ref_counts
    assert len(thresholds(4)) == 64


# ---------------------------------------------------------------- invariant 4


@pytest.mark.parametrize(
    "counts, expected",
    [
        ([0, 2, 2, 2, 2, 0, 1, 1, 1, 1, 0], (2, 4)),  # tie between counts: higher threshold wins
        ([1, 1, 1, 1, 0, 1, 1, 1, 1, 0], (1, 8)),  # tie within a count: the later run
        ([0, 1, 1, 1, 0, 2, 2, 0], None),  # no run of length 4
        ([0, 0, 0, 0, 0, 0, 0, 3, 3, 3, 3], (3, 10)),  # the zero run is longer but never chosen
        ([0] * 12, None),
        ([2, 2, 2, 2, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2], (2, 14)),  # longest run decides the count
        ([5, 5, 5, 5, 5, 3, 3, 3, 3, 3, 4], (5, 4)),
        ([], None),
    ],
)
def test_select_stable_run_examples(counts, expected):
    assert select_stable_run(counts, 4) == expected


def test_select_stable_run_matches_reference_on_random_sequences():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        n = int(rng.integers(0, 40))
        counts = np.repeat(rng.integers(0, 4, n), rng.integers(1, 7, n)).tolist()[:64]
        min_len = int(rng.integers(1, 7))
        assert select_stable_run(counts, min_len) == reference_select(counts, min_len)


# ---------------------------------------------------------------- invariant 5


def test_raw_threshold_is_float_backmapping():
    assert raw_threshold(239, 76, 255) == 243
    assert raw_threshold(239, np.uint8(76), np.uint8(255)) == 243  # peaks straight from np.max
    assert raw_threshold(3, 70, 240) == 72
    assert raw_threshold(255, 10, 200) == 200


def staircase_maps() -> tuple[np.ndarray, np.ndarray, list[int]]:
    """A map whose only stable run is count 1 at sweep indices 1-4 (t = 239), min 76, max 255.

    A 255-square appears at index 1; then one square appears every 3 indices from index 5
    on, so no later run reaches length 4.
    """
    lo, hi = 76, 255
    norm = (np.arange(256) - lo) / (hi - lo) * 255
    spec = [(4, 4, 16, 255)]
    appear = list(range(5, 64, 3))
    for k, i in enumerate(appear):
        value = int(np.argmax(norm > 255 - 4 * i))
        spec.append((4 + 24 * ((k + 1) // 6), 4 + 24 * ((k + 1) % 6), 16, value))
    main = squares((100, 148), spec)
    low = squares((100, 148), [(40, 40, 16, lo)])
    expected = [0] * 64
    for i in range(1, 64):
        expected[i] = 1 + sum(1 for a in appear if a <= i)
    return main, low, expected


def test_threshold_is_the_run_end_mapped_back_in_float():
    main, low, expected = staircase_maps()
    assert search_range([int(main.max()), int(low.max())], DEFAULT) == (76, 255)
    assert count_sequence(main, 76, 255, DEFAULT) == expected
    result = binarize_set([main, low], DEFAULT)[0]
    assert result.count == 1
    assert result.threshold == 243  # t = 255 - 4*4 = 239; uint8 arithmetic would give 76
    assert n_components(result.mask) == 1
    np.testing.assert_array_equal(result.mask, erode((main > 243).astype(np.uint8) * 255, 6))
    assert_same(binarize_set([main, low], DEFAULT), reference_set([main, low], DEFAULT))


# ---------------------------------------------------------------- invariant 6


def test_erode_small_squares():
    five = squares((20, 20), [(7, 7, 5, 255)])
    six = squares((20, 20), [(7, 7, 6, 255)])
    assert not erode(five, 6).any()
    assert np.count_nonzero(erode(six, 6)) == 1


def test_erode_anchor_of_even_kernel():
    out = erode(squares((20, 20), [(5, 5, 10, 255)]), 6)
    ys, xs = np.nonzero(out)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (8, 12, 8, 12)
    assert np.count_nonzero(out) == 25


def test_erode_keeps_the_image_border():
    out = erode(squares((20, 20), [(0, 0, 10, 255)]), 6)
    ys, xs = np.nonzero(out)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (0, 7, 0, 7)
    corner = erode(squares((20, 20), [(14, 14, 6, 255)]), 6)  # bottom-right corner
    ys, xs = np.nonzero(corner)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (17, 19, 17, 19)


def test_bridge_of_three_pixels_counts_two():
    m = squares((40, 60), [(10, 5, 20, 255), (10, 35, 20, 255)])
    m[18:21, 25:35] = 255  # 3-px bridge
    assert n_components(m) == 1
    assert n_components(erode(m, 6)) == 2
    low = squares((40, 60), [(5, 5, 10, 40)])
    seq = count_sequence(m, 40, 255, DEFAULT)
    assert set(seq[1:]) == {2}
    assert binarize_set([m, low], DEFAULT)[0].count == 2


def test_components_are_eight_connected_after_erosion():
    m = squares((30, 30), [(10, 10, 6, 255), (11, 11, 6, 255)])  # erodes to two diagonal pixels
    eroded = erode(m, 6)
    assert list(zip(*np.nonzero(eroded))) == [(13, 13), (14, 14)]
    low = squares((30, 30), [(0, 0, 8, 30)])
    assert set(count_sequence(m, 30, 255, DEFAULT)[1:]) == {1}
    assert binarize_set([m, low], DEFAULT)[0].count == 1


@pytest.mark.parametrize("kernel", [6, 3, 1])
def test_grey_erosion_commutes_with_thresholding(kernel):
    rng = np.random.default_rng(kernel)
    raw = random_map(rng, (57, 83))
    raw[0, :] = 250  # the border row must not erode
    eroded = erode(raw, kernel)
    for c in range(0, 256, 5):
        binary = np.where(raw > c, 255, 0).astype(np.uint8)
        np.testing.assert_array_equal(erode(binary, kernel) > 0, eroded > c)


# ---------------------------------------------------------------- invariant 7


def test_final_mask_is_eroded_raw_threshold():
    rng = np.random.default_rng(7)
    maps = [random_map(rng, (120, 90)) for _ in range(6)]
    for raw, result in zip(maps, binarize_set(maps, DEFAULT)):
        assert result.mask.shape == raw.shape and result.mask.dtype == np.uint8
        assert set(np.unique(result.mask)) <= {0, 255}
        binary = np.where(raw > result.threshold, 255, 0).astype(np.uint8)
        expected = cv2.erode(binary, np.ones((6, 6), np.uint8))
        np.testing.assert_array_equal(result.mask, expected)
    assert any(r.count > 0 for r in binarize_set(maps, DEFAULT))


# ---------------------------------------------------------------- invariant 8 and the two-pass API


def test_order_invariance():
    rng = np.random.default_rng(8)
    maps = [random_map(rng, (90, 90)) for _ in range(6)]
    forward = binarize_set(maps, DEFAULT)
    order = rng.permutation(len(maps))
    permuted = binarize_set([maps[i] for i in order], DEFAULT)
    for k, i in enumerate(order):
        assert permuted[k].threshold == forward[i].threshold
        assert permuted[k].count == forward[i].count
        np.testing.assert_array_equal(permuted[k].mask, forward[i].mask)


def test_a_higher_peak_changes_other_thresholds():
    rng = np.random.default_rng(9)
    maps = [to_uint8(random_map(rng, (90, 90)) * 0.6) for _ in range(5)]
    before = binarize_set(maps, DEFAULT)
    hot = squares((90, 90), [(30, 30, 20, 255)])
    after = binarize_set(maps + [hot], DEFAULT)
    assert any(a.threshold != b.threshold for a, b in zip(after, before))


def test_binarize_with_range_equals_binarize_set():
    rng = np.random.default_rng(10)
    maps = [random_map(rng, (70, 110)) for _ in range(5)]
    lo, hi = search_range([int(m.max()) for m in maps], DEFAULT)
    assert (lo, hi) == (min(int(m.max()) for m in maps), max(int(m.max()) for m in maps))
    for m, expected in zip(maps, binarize_set(maps, DEFAULT)):
        got = binarize(m, lo, hi, DEFAULT)
        assert (got.threshold, got.count) == (expected.threshold, expected.count)
        np.testing.assert_array_equal(got.mask, expected.mask)


# ---------------------------------------------------------------- degenerate ranges, lower bound


def test_all_equal_peaks_give_empty_results_without_warnings():
    rng = np.random.default_rng(11)
    maps = []
    for _ in range(4):
        m = to_uint8(random_map(rng, (64, 64)) * 0.5)
        m[10:30, 10:30] = 200
        maps.append(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = binarize_set(maps, DEFAULT)
        norm = normalize(maps[0], 200, 200)
        seq = count_sequence(maps[0], 200, 200, DEFAULT)
    assert all(r.count == 0 and r.threshold == 255 and not r.mask.any() for r in results)
    assert not np.isnan(norm).any() and not norm.any()
    assert seq == [0] * 64


def test_lower_bound_below_equal_peaks_gives_a_valid_range():
    maps = [squares((64, 64), [(10, 10, 20, 200)]), squares((64, 64), [(30, 30, 15, 200)])]
    cfg = MebinConfig(lower_bound=0)
    assert search_range([200, 200], cfg) == (0, 200)
    results = binarize_set(maps, cfg)
    assert [r.count for r in results] == [1, 1]
    assert all(n_components(r.mask) == 1 for r in results)
    assert_same(results, reference_set(maps, cfg))


def test_lower_bound_recovers_the_lowest_peak_map():
    rng = np.random.default_rng(12)
    maps = [random_map(rng, (100, 100)) for _ in range(4)]
    lowest = int(np.argmin([m.max() for m in maps]))
    maps[lowest][40:60, 40:60] = maps[lowest].max()  # a clear plateau at the lowest peak
    cfg = MebinConfig(lower_bound=0)
    assert search_range([int(m.max()) for m in maps], cfg)[0] == 0
    results = binarize_set(maps, cfg)
    assert results[lowest].count >= 1 and results[lowest].mask.any()
    assert binarize_set(maps, DEFAULT)[lowest].count == 0
    assert_same(results, reference_set(maps, cfg))


def test_lower_bound_above_all_peaks_is_degenerate():
    maps = [squares((32, 32), [(5, 5, 10, 90)])]
    results = binarize_set(maps, MebinConfig(lower_bound=120))
    assert results[0].count == 0 and not results[0].mask.any()


def test_search_range_rejects_bad_input():
    with pytest.raises(ValueError):
        search_range([], DEFAULT)
    with pytest.raises(ValueError):
        search_range([10, 20], MebinConfig(lower_bound=300))
    with pytest.raises(ValueError):
        binarize(np.zeros((8, 8), np.float32), 0, 10, DEFAULT)
    with pytest.raises(ValueError):
        binarize(np.zeros((8, 8, 3), np.uint8), 0, 10, DEFAULT)
    assert binarize_set([], DEFAULT) == []


# ---------------------------------------------------------------- normalisation


def test_normalize_matches_formula_and_zeroes_below_floor():
    rng = np.random.default_rng(13)
    raw = random_map(rng, (50, 70))
    lo, hi = 40, int(raw.max())
    norm = normalize(raw, lo, hi)
    expected = np.where(raw < lo, 0.0, (raw.astype(np.float64) - lo) / (hi - lo) * 255)
    np.testing.assert_array_equal(norm, expected)
    np.testing.assert_array_equal(normalize(raw.astype(np.float32), lo, hi), expected)
    assert norm.dtype == np.float64 and norm.max() == 255.0 and norm.min() >= 0.0


def test_cutoffs_reproduce_float_comparison_at_every_level():
    """raw > c(s) must equal norm > s for every uint8 level, sweep threshold and range."""
    rng = np.random.default_rng(14)
    pairs = [(0, h) for h in range(1, 256)] + [(76, 255), (1, 2), (254, 255)]
    pairs += [tuple(sorted(rng.choice(256, 2, replace=False).tolist())) for _ in range(300)]
    for lo, hi in pairs:
        # one single-pixel component per level above the cut, eroding disabled
        img = np.zeros((3, 2 * 256), np.uint8)
        img[1, ::2] = np.arange(256, dtype=np.uint8)
        seq = count_sequence(img, lo, hi, MebinConfig(erode=False))
        values = np.arange(256, dtype=np.float64)
        norm = np.where(values < lo, 0.0, (values - lo) / (hi - lo) * 255)
        expected = [int(np.count_nonzero(norm[1:] > s)) for s in thresholds(4)]  # level 0 is background
        assert seq == expected, (lo, hi)


# ---------------------------------------------------------------- random parity property


def test_random_maps_parity_with_reference():
    rng = np.random.default_rng(2024)
    n_maps = 0
    for _ in range(6):
        shape = (int(rng.integers(64, 301)), int(rng.integers(64, 301)))
        maps = [random_map(rng, shape) for _ in range(5)]
        assert_same(binarize_set(maps, DEFAULT), reference_set(maps, DEFAULT))
        n_maps += len(maps)
    assert n_maps == 30


@pytest.mark.parametrize(
    "cfg",
    [
        MebinConfig(sample_rate=3, min_interval_len=2, erode_fallback=False),
        MebinConfig(erode=False),
        MebinConfig(erode_kernel=3, min_interval_len=6, erode_fallback=False),
        MebinConfig(lower_bound=20, erode_fallback=False),
    ],
)
def test_random_maps_parity_other_settings(cfg):
    rng = np.random.default_rng(cfg.sample_rate * 100 + cfg.erode_kernel)
    maps = [random_map(rng, (96, 120)) for _ in range(4)]
    assert_same(binarize_set(maps, cfg), reference_set(maps, cfg))


def _blob_map(rng: np.random.Generator, peak: int, shape=(64, 64)) -> np.ndarray:
    """Two smooth blobs of different height over low noise, peaking at ``peak``."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = rng.uniform(0, 20, shape)
    for height in (1.0, 0.6):
        cy, cx = rng.integers(12, shape[0] - 12), rng.integers(12, shape[1] - 12)
        out += height * (peak - 20) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 6.0 ** 2))
    return np.clip(out, 0, peak).astype(np.uint8)


def test_peak_outliers_flags_a_saturated_and_an_empty_map():
    from ncd.preprocess.mebin import peak_outliers

    peaks = [118, 120, 121, 125, 119, 130, 255, 0]
    assert peak_outliers(peaks) == [6, 7]
    assert peak_outliers([120] * 5) == [] and peak_outliers([120, 255]) == []
    assert peak_outliers([255] * 6 + [120]) == [6]  # most peaks equal: the mean deviation stands in


def test_excluding_a_saturated_map_keeps_the_other_maps_segmentation():
    """One saturated map widens its category's MEBin range and so changes every other
    map's mask; it is flagged, and ``exclude_outliers`` restores the others' masks."""
    from ncd.preprocess.regions import category_ranges

    rng = np.random.default_rng(3)
    maps = {f"m{i}": _blob_map(rng, int(rng.integers(110, 131))) for i in range(7)}
    saturated = np.full((64, 64), 255, np.uint8)

    def masks(all_maps: dict, cfg: MebinConfig) -> tuple[dict, object]:
        stats = [dict(category="c", image_id=i, lo=float(m.min()), peak=float(m.max()), is_uint8=True)
                 for i, m in all_maps.items()]
        r = category_ranges(stats, cfg)["c"]
        return {i: binarize(m, r.min_th, r.max_th, cfg).mask for i, m in maps.items()}, r

    clean, _ = masks(maps, MebinConfig())
    shared, flagged = masks({**maps, "sat": saturated}, MebinConfig())
    assert flagged.outliers == (("sat", 255.0),) and not flagged.excluded
    assert any(not np.array_equal(clean[i], shared[i]) for i in maps)  # the issue: others change
    kept, excluded = masks({**maps, "sat": saturated}, MebinConfig(exclude_outliers=True))
    assert excluded.excluded and excluded.outliers == flagged.outliers
    assert all(np.array_equal(clean[i], kept[i]) for i in maps)


# ---------------------------------------------------------------- the erosion fallback


def _thin_defect_map(rng: np.random.Generator) -> np.ndarray:
    """A 3-px-wide bright trace over low noise: the 6x6 erosion removes it entirely."""
    out = rng.uniform(0, 30, (64, 64))
    out[20:23, 10:50] = 200
    return out.astype(np.uint8)


def test_erosion_fallback_keeps_thin_defects():
    rng = np.random.default_rng(3)
    thin, dim = _thin_defect_map(rng), rng.uniform(0, 40, (64, 64)).astype(np.uint8)
    upstream = binarize_set([thin, dim], DEFAULT)[0]
    assert upstream.count == 0 and not upstream.mask.any()
    fallback = binarize_set([thin, dim], MebinConfig())[0]
    un_eroded = binarize_set([thin, dim], MebinConfig(erode=False))[0]
    assert fallback.count == 1 and fallback.mask[21, 30] == 255 and fallback.mask[40, 30] == 0
    np.testing.assert_array_equal(fallback.mask, un_eroded.mask)
    assert fallback.threshold == un_eroded.threshold


def test_erosion_fallback_leaves_maps_with_eroded_regions_alone():
    rng = np.random.default_rng(4)
    maps = [_blob_map(rng, peak) for peak in (250, 200, 150)]
    for with_fallback, upstream in zip(binarize_set(maps, MebinConfig()), binarize_set(maps, DEFAULT)):
        np.testing.assert_array_equal(with_fallback.mask, upstream.mask)
        assert with_fallback.count == upstream.count and with_fallback.threshold == upstream.threshold
    assert any(r.mask.any() for r in binarize_set(maps, DEFAULT))
