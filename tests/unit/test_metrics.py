"""ncd.evaluate.metrics against scikit-learn, brute-force matching and a slow AUPRO reference."""
from __future__ import annotations

import itertools
import subprocess
import sys
from collections import deque

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, f1_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

from ncd.evaluate import metrics
from ncd.evaluate.metrics import (
    aupro,
    cluster_metrics,
    confusion_matrix_matched,
    hungarian_mapping,
    per_category_metrics,
)

# --------------------------------------------------------------------------- references


def brute_force_f1(y_true, y_pred) -> tuple[float, float]:
    """(best accuracy, sklearn micro-F1 of that mapping) over all one-to-one cluster->label maps."""
    t_labels, t = np.unique(np.asarray(y_true), return_inverse=True)
    p_labels, p = np.unique(np.asarray(y_pred), return_inverse=True)
    kt, kp = len(t_labels), len(p_labels)
    best_acc, best_map = -1.0, None
    if kp <= kt:
        candidates = (dict(zip(range(kp), perm)) for perm in itertools.permutations(range(kt), kp))
    else:  # choose which clusters get the kt labels; the rest stay unmatched (-1)
        candidates = (
            {c: (perm.index(c) if c in perm else -1) for c in range(kp)}
            for perm in itertools.permutations(range(kp), kt)
        )
    for mapping in candidates:
        mapped = np.array([mapping[c] for c in p])
        acc = float(np.mean(mapped == t))
        if acc > best_acc:
            best_acc, best_map = acc, mapped
    return best_acc, float(f1_score(t, best_map, average="micro"))


def random_labelings(rng: np.random.Generator, n_cases: int):
    for case in range(n_cases):
        n = int(rng.integers(1, 40))
        kt = int(rng.integers(1, 6))
        kp = int(rng.integers(1, 6))
        y_true = rng.integers(0, kt, n)
        if case % 3 == 0:  # correlated with the truth
            y_pred = np.where(rng.random(n) < 0.7, y_true % kp, rng.integers(0, kp, n))
        else:
            y_pred = rng.integers(0, kp, n)
        if case % 4 == 0:
            y_true = np.array(["scratch", "good", "crack", "hole", "cut"])[y_true]
        yield y_true, y_pred


DEGENERATE = [
    (["good"], [0]),
    ([3], [7]),
    (["a"] * 5, [0] * 5),
    (["a"] * 5, [0, 1, 2, 3, 4]),
    (["a", "b", "c", "d"], [0, 0, 0, 0]),
    (["a", "b", "c", "d"], [3, 2, 1, 0]),
    (["a", "a", "b"], [1, 0, 0]),
    ([0, 0, 1, 1], [0, 1, 0, 1]),
    (["x", "y"], [5, 5]),
]


# --------------------------------------------------------------------------- clustering


def test_matches_sklearn_and_brute_force_on_random_labelings() -> None:
    rng = np.random.default_rng(0)
    for y_true, y_pred in itertools.chain(random_labelings(rng, 250), DEGENERATE):
        got = cluster_metrics(y_true, y_pred)
        assert set(got) == {"nmi", "ari", "f1"}
        assert got["nmi"] == pytest.approx(normalized_mutual_info_score(y_true, y_pred), abs=1e-12)
        assert got["ari"] == pytest.approx(adjusted_rand_score(y_true, y_pred), abs=1e-12)
        best_acc, sk_f1 = brute_force_f1(y_true, y_pred)
        assert got["f1"] == pytest.approx(best_acc, abs=1e-12)
        assert got["f1"] == pytest.approx(sk_f1, abs=1e-12)


def test_degenerate_values_are_sklearns() -> None:
    assert cluster_metrics(["good"], [0]) == {"nmi": 1.0, "ari": 1.0, "f1": 1.0}
    assert cluster_metrics(["a"] * 4, [2] * 4) == {"nmi": 1.0, "ari": 1.0, "f1": 1.0}
    split = cluster_metrics(["a"] * 4, [0, 1, 2, 3])
    assert split["nmi"] == 0.0 and split["f1"] == 0.25
    assert split["ari"] == adjusted_rand_score(["a"] * 4, [0, 1, 2, 3])


def test_large_input_does_not_overflow() -> None:
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 8, 300_000)
    y_pred = np.where(rng.random(y_true.size) < 0.6, (y_true + 3) % 10, rng.integers(0, 10, y_true.size))
    got = cluster_metrics(y_true, y_pred)
    assert got["ari"] == pytest.approx(adjusted_rand_score(y_true, y_pred), abs=1e-10)
    assert got["nmi"] == pytest.approx(normalized_mutual_info_score(y_true, y_pred), abs=1e-10)


def test_permuting_predicted_ids_changes_nothing() -> None:
    rng = np.random.default_rng(2)
    for y_true, y_pred in random_labelings(rng, 40):
        relabel = rng.permutation(10) * 7 + 3  # also non-contiguous ids
        want = cluster_metrics(y_true, y_pred)
        assert cluster_metrics(y_true, relabel[y_pred]) == pytest.approx(want, abs=1e-12)


def test_perfect_partition_scores_one() -> None:
    y_true = ["good", "crack", "crack", "hole", "good", "hole", "cut"]
    y_pred = [4, 0, 0, 9, 4, 9, 2]
    assert cluster_metrics(y_true, y_pred) == pytest.approx({"nmi": 1.0, "ari": 1.0, "f1": 1.0})


def test_f1_equals_hungarian_accuracy() -> None:
    rng = np.random.default_rng(3)
    for y_true, y_pred in random_labelings(rng, 60):
        mapping = hungarian_mapping(y_true, y_pred)
        mapped = [mapping[int(c)] for c in y_pred]
        acc = np.mean([m is not None and m == t for m, t in zip(mapped, np.asarray(y_true).tolist())])
        assert cluster_metrics(y_true, y_pred)["f1"] == pytest.approx(acc, abs=1e-12)


def test_hungarian_mapping_rectangular() -> None:
    y_true = ["a", "a", "b", "b", "b"]
    y_pred = [0, 2, 1, 1, 5]
    mapping = hungarian_mapping(y_true, y_pred)
    assert mapping == {0: "a", 1: "b", 2: None, 5: None} or mapping == {0: None, 1: "b", 2: "a", 5: None}
    assert all(isinstance(k, int) for k in mapping)
    assert isinstance(mapping[1], str)
    # more labels than clusters: every cluster matched, injectively
    mapping = hungarian_mapping(["a", "b", "c", "c"], [1, 1, 0, 0])
    assert mapping == {0: "c", 1: "a"} or mapping == {0: "c", 1: "b"}


def test_errors() -> None:
    with pytest.raises(ValueError):
        cluster_metrics([], [])
    with pytest.raises(ValueError):
        cluster_metrics(["a", "b"], [0])


def test_confusion_matrix_matched() -> None:
    rng = np.random.default_rng(4)
    for y_true, y_pred in random_labelings(rng, 60):
        mat, t_labels, p_labels = confusion_matrix_matched(y_true, y_pred)
        assert t_labels == np.unique(y_true).tolist()
        assert sorted(p_labels) == np.unique(y_pred).tolist()
        ref = contingency_matrix(y_true, y_pred)  # rows sorted labels, cols sorted ids
        col = {c: i for i, c in enumerate(np.unique(y_pred).tolist())}
        np.testing.assert_array_equal(mat, ref[:, [col[c] for c in p_labels]])
        mapping = hungarian_mapping(y_true, y_pred)
        matched = sum(
            mat[t_labels.index(mapping[c]), j] for j, c in enumerate(p_labels) if mapping[c] is not None
        )
        assert matched / len(y_pred) == pytest.approx(cluster_metrics(y_true, y_pred)["f1"])
        if len(p_labels) >= len(t_labels):  # every label has its cluster on the diagonal
            assert [mapping[c] for c in p_labels[: len(t_labels)]] == t_labels


def test_per_category_mean_is_unweighted_and_matched_per_category() -> None:
    cats = ["bottle"] * 4 + ["pill"] * 12
    y_true = ["good", "good", "crack", "crack"] + ["a", "b", "c"] * 4
    # bottle perfect with ids 1/0; pill reuses ids 0/1/2 with other meanings and errors
    y_pred = [1, 1, 0, 0] + [0, 1, 2] * 3 + [1, 1, 1]
    result = per_category_metrics(cats, y_true, y_pred)
    assert list(result["per_category"]) == ["bottle", "pill"]
    assert result["per_category"]["bottle"] == pytest.approx({"nmi": 1.0, "ari": 1.0, "f1": 1.0})
    pill = cluster_metrics(y_true[4:], y_pred[4:])
    assert result["per_category"]["pill"] == pytest.approx(pill)
    for k in ("nmi", "ari", "f1"):
        assert result["mean"][k] == pytest.approx((1.0 + pill[k]) / 2)
    weighted_f1 = (4 * 1.0 + 12 * pill["f1"]) / 16
    assert result["mean"]["f1"] != pytest.approx(weighted_f1)
    with pytest.raises(ValueError):
        per_category_metrics(cats[:-1], y_true, y_pred)


def test_one_sample_category_is_counted_weighted_and_marked() -> None:
    """A one-image category scores NMI 1.0 and lifts the plain mean: the result gives the
    sample counts, a sample-weighted mean beside it, and marks categories with fewer samples than K."""
    cats = ["lone"] + ["pill"] * 12
    y_true = ["a"] + ["a", "b", "c"] * 4
    y_pred = [0] + [0, 1, 2] * 3 + [1, 1, 1]
    result = per_category_metrics(cats, y_true, y_pred, k=3)
    pill = cluster_metrics(y_true[1:], y_pred[1:])
    assert result["per_category"]["lone"]["nmi"] == 1.0
    assert result["samples"] == {"lone": 1, "pill": 12}
    for m in ("nmi", "ari", "f1"):
        assert result["weighted_mean"][m] == pytest.approx((result["per_category"]["lone"][m] + 12 * pill[m]) / 13)
    assert result["few_samples"] == ["lone"]
    assert per_category_metrics(cats, y_true, y_pred, k={"lone": 1, "pill": 3})["few_samples"] == []
    assert per_category_metrics(cats, y_true, y_pred)["few_samples"] == ["lone"]  # default K: gt types, >= 2


def test_evaluate_says_how_many_rows_it_scored_and_dropped() -> None:
    import pyarrow as pa

    from ncd.evaluate.predictions import evaluate_predictions, metrics_markdown

    table = pa.table({"category": ["c"] * 6, "gt_type": ["a", "a", "b", "b", "", None], "cluster": [0, 0, 1, 1, 0, 1]})
    result = evaluate_predictions(table)
    assert result["num_samples"] == 4 and result["num_dropped"] == 2
    md = metrics_markdown(result)
    assert "Scored 4 rows; 2 without ground truth not scored" in md and "weighted mean" in md


# --------------------------------------------------------------------------- AUPRO


def label_8_connected(mask: np.ndarray) -> list[np.ndarray]:
    """Regions of a bool mask by breadth-first flood fill over the 8 neighbours."""
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    h, w = mask.shape
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        region = np.zeros_like(seen)
        queue = deque([(r0, c0)])
        seen[r0, c0] = True
        while queue:
            r, c = queue.popleft()
            region[r, c] = True
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        queue.append((rr, cc))
        regions.append(region)
    return regions


def slow_aupro(maps, masks, fpr_limit=0.3) -> float:
    """One full pass per distinct threshold; explicit per-region overlaps; clipped trapezoids."""
    masks = [np.asarray(g, dtype=bool) for g in masks]
    regions = [(i, r) for i, g in enumerate(masks) for r in label_8_connected(g)]
    n_normal = sum(int((~g).sum()) for g in masks)
    xs, ys = [0.0], [0.0]
    for t in sorted({float(v) for m in maps for v in np.ravel(m)}, reverse=True):
        fp = sum(int(((m >= t) & ~g).sum()) for m, g in zip(maps, masks))
        overlaps = [float(np.mean(maps[i][r] >= t)) for i, r in regions]
        xs.append(fp / n_normal)
        ys.append(sum(overlaps) / len(overlaps))
    xs.append(1.0)
    ys.append(1.0)
    area = 0.0
    for x0, x1, y0, y1 in zip(xs[:-1], xs[1:], ys[:-1], ys[1:]):
        if x1 <= fpr_limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        elif x0 < fpr_limit:
            y_cut = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_cut) * (fpr_limit - x0)
            break
        else:
            break
    return area / fpr_limit


def random_case(rng: np.random.Generator, n_images: int = 4, size: int = 12, levels: int | None = None):
    maps, masks = [], []
    for i in range(n_images):
        h, w = size + int(rng.integers(0, 4)), size + int(rng.integers(0, 4))  # sizes may differ
        g = np.zeros((h, w), dtype=bool)
        if i % 3 != 2:  # every third image has no region
            for _ in range(int(rng.integers(1, 4))):
                r, c = rng.integers(0, h - 2), rng.integers(0, w - 2)
                g[r : r + int(rng.integers(1, 4)), c : c + int(rng.integers(1, 4))] = True
        m = rng.random((h, w)) + 0.6 * g * rng.random((h, w))
        if levels is not None:  # many ties
            m = np.floor(m * levels / 1.6).astype(np.float32)
        maps.append(m.astype(np.float32))
        masks.append(g)
    return maps, masks


@pytest.mark.parametrize("levels", [None, 6, 40])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_slow_reference(levels, fpr_limit) -> None:
    rng = np.random.default_rng(10 + (levels or 0))
    for _ in range(4):
        maps, masks = random_case(rng, levels=levels)
        ref = slow_aupro(maps, masks, fpr_limit)
        assert aupro(maps, masks, fpr_limit=fpr_limit) == pytest.approx(ref, abs=1e-9)


def test_aupro_exact_across_threshold_chunks(monkeypatch) -> None:
    rng = np.random.default_rng(20)
    maps, masks = random_case(rng)
    ref = slow_aupro(maps, masks)
    for chunk in (1, 2, 7):
        monkeypatch.setattr(metrics, "_AUPRO_CHUNK", chunk)
        assert aupro(maps, masks) == pytest.approx(ref, abs=1e-9)


def test_aupro_perfect_constant_and_inverted_maps() -> None:
    rng = np.random.default_rng(30)
    _, masks = random_case(rng)
    perfect = [g.astype(np.float32) + 0.5 * rng.random(g.shape, dtype=np.float32) for g in masks]
    constant = [np.full(g.shape, 0.4, dtype=np.float32) for g in masks]
    inverted = [1.0 - p for p in perfect]
    for nt in (None, 50):
        assert aupro(perfect, masks, num_thresholds=nt) == pytest.approx(1.0)
        # one threshold: (0,0) -> (1,1), area 0.3^2/2 over 0.3
        assert aupro(constant, masks, num_thresholds=nt) == pytest.approx(0.15)
        assert aupro(inverted, masks, num_thresholds=nt) == pytest.approx(0.0, abs=1e-12)


def test_aupro_uses_8_connected_regions() -> None:
    # two diagonal-touching pixels form ONE region; a separate pixel another
    g = np.zeros((6, 6), dtype=bool)
    g[1, 1] = g[2, 2] = g[4, 5] = True
    m = np.zeros((6, 6), dtype=np.float32)
    m[1, 1] = 1.0  # detects half of the diagonal region only
    m[0, 0] = 0.5  # then a false positive
    # curve: (0,0) -> (0, 1/4) -> (1/33, 1/4) -> (1,1); 4-connectivity would give PRO 1/3
    got = aupro([m], [g])
    assert got == pytest.approx(slow_aupro([m], [g]), abs=1e-12)
    y_cut = 0.25 + 0.75 * (0.3 - 1 / 33) / (1 - 1 / 33)
    want = (0.25 * (1 / 33) + 0.5 * (0.25 + y_cut) * (0.3 - 1 / 33)) / 0.3
    assert got == pytest.approx(want, abs=1e-12)


def test_aupro_ties_at_the_fpr_limit() -> None:
    # 100 normal pixels: 10 score 2, 80 score 1, 10 score 0; one 4-px region scoring 3,1,1,0
    m = np.zeros((13, 8), dtype=np.float32)
    g = np.zeros_like(m, dtype=bool)
    g[0, :4] = True
    m[0, :4] = [3, 1, 1, 0]
    normal = np.flatnonzero(~g.ravel())
    m.ravel()[normal[:10]] = 2
    m.ravel()[normal[10:90]] = 1
    # curve (0,0) (0,.25) (.1,.25) (.9,.75) (1,1): the tied 1s jump FPR from .1 to .9
    y_cut = 0.25 + 0.5 * (0.3 - 0.1) / 0.8
    want = (0.25 * 0.1 + 0.5 * (0.25 + y_cut) * 0.2) / 0.3
    assert slow_aupro([m], [g]) == pytest.approx(want, abs=1e-12)
    for perm_seed in range(3):  # where the tied pixels sit must not matter
        order = np.random.default_rng(perm_seed).permutation(m.size)
        mp, gp = m.ravel()[order].reshape(m.shape), g.ravel()[order].reshape(m.shape)
        assert aupro([mp], [gp], num_thresholds=None) == pytest.approx(
            slow_aupro([mp], [gp]), abs=1e-12
        )
    assert aupro([m], [g]) == pytest.approx(want, abs=1e-12)


def test_aupro_binned() -> None:
    rng = np.random.default_rng(40)
    maps, masks = random_case(rng, levels=9)  # integer scores 0..8 (or 9)
    lo, hi = min(m.min() for m in maps), max(m.max() for m in maps)
    # thresholds on the integer grid: binned is exact
    assert aupro(maps, masks, num_thresholds=int(hi - lo) + 1) == pytest.approx(aupro(maps, masks), abs=1e-12)
    maps, masks = random_case(rng, size=24)
    exact = aupro(maps, masks)
    assert aupro(maps, masks, num_thresholds=2000) == pytest.approx(exact, abs=2e-3)
    assert aupro(maps, masks, num_thresholds=3) != pytest.approx(exact, abs=2e-3)


def test_aupro_accepts_uint8_masks_and_maps() -> None:
    rng = np.random.default_rng(50)
    maps, masks = random_case(rng, levels=20)
    want = aupro(maps, masks)
    got = aupro([m.astype(np.uint8) for m in maps], [g.astype(np.uint8) * 255 for g in masks])
    assert got == pytest.approx(want)


def test_aupro_errors() -> None:
    g = np.zeros((4, 4), dtype=bool)
    m = np.zeros((4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="region"):
        aupro([m], [g])
    with pytest.raises(ValueError, match="normal"):
        aupro([m], [~g])
    g[1, 1] = True
    with pytest.raises(ValueError):
        aupro([m[:3]], [g])
    with pytest.raises(ValueError):
        aupro([m], [g], fpr_limit=0.0)
    with pytest.raises(ValueError):
        aupro([np.full((4, 4), np.nan)], [g])


def test_library_imports_neither_sklearn_nor_torch() -> None:
    code = "import sys, ncd.evaluate.metrics, ncd.infer.merge; print(sorted({'sklearn', 'torch', 'ray'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
