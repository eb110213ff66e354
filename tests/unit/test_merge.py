"""ncd.infer.merge: novel-column softmax and area-weighted region merging (METHOD.md 6.2, invariant 26)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ncd.infer.merge import merge_regions, novel_probs, region_weights


def test_novel_probs_is_softmax_over_novel_logits() -> None:
    rng = np.random.default_rng(0)
    z = rng.uniform(-1, 1, (7, 5))  # L=2 base, K=3 novel, logits in [-1, 1]
    got = novel_probs(z, num_base=2, temperature=0.1)
    assert got.shape == (7, 3) and got.dtype == np.float64
    # the method's way: softmax over all columns, zero base columns, renormalise
    full = np.exp(z / 0.1) / np.exp(z / 0.1).sum(axis=1, keepdims=True)
    full[:, :2] = 0.0
    np.testing.assert_allclose(got, (full / full.sum(axis=1, keepdims=True))[:, 2:], rtol=1e-12)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-12)


def test_novel_probs_ignores_base_columns_and_is_stable() -> None:
    z = np.array([[50.0, 40.0, 1.0, 2.0], [-3.0, 900.0, 800.0, 799.0]])
    got = novel_probs(z, num_base=2, temperature=0.1)
    assert np.all(np.isfinite(got))
    assert np.argmax(got, axis=1).tolist() == [1, 0]  # novel indices, base logits dominate yet are ignored
    np.testing.assert_allclose(got[1], [1 / (1 + np.exp(-10.0)), np.exp(-10.0) / (1 + np.exp(-10.0))])


def test_novel_probs_accepts_torch() -> None:
    z = torch.randn(5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    np.testing.assert_allclose(novel_probs(z, 1), novel_probs(z.numpy().astype(np.float64), 1), rtol=1e-12)
    with pytest.raises(ValueError):
        novel_probs(z, num_base=6)


def test_region_weights_example_from_method() -> None:
    w = region_weights(np.array([10_000, 100]), temperature=100.0)
    np.testing.assert_allclose(w, [0.71, 0.29], atol=5e-3)
    np.testing.assert_allclose(w, np.exp([1.0, 0.1]) / np.exp([1.0, 0.1]).sum(), rtol=1e-12)
    huge = region_weights(np.array([1e14, 1e12, 0.0]), temperature=50.0)
    assert np.all(np.isfinite(huge)) and huge.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(region_weights(np.full(4, 321.0), 50.0), 0.25)
    with pytest.raises(ValueError):
        region_weights(np.array([-1.0]), 50.0)


def test_one_region_image_takes_its_probabilities_exactly() -> None:
    probs = np.array([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
    ids, merged = merge_regions(["a.png", "b.png"], probs, np.array([12345.0, 3.0]), temperature=100.0)
    assert ids == ["a.png", "b.png"]
    np.testing.assert_array_equal(merged, probs)


def test_equal_areas_give_plain_mean() -> None:
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4), size=3)
    _, merged = merge_regions(["x"] * 3, probs, np.full(3, 900.0), temperature=50.0)
    np.testing.assert_allclose(merged[0], probs.mean(axis=0), rtol=1e-12)


def test_merge_matches_per_image_loop() -> None:
    rng = np.random.default_rng(2)
    ids = ["c", "a", "c", "b", "a", "c", "d"]
    probs = rng.dirichlet(np.ones(3), size=len(ids))
    areas = rng.integers(0, 40_000, len(ids)).astype(float)
    got_ids, merged = merge_regions(ids, probs, areas, temperature=100.0)
    assert got_ids == ["c", "a", "b", "d"]  # first appearance
    for row, image in zip(merged, got_ids):
        idx = [i for i, x in enumerate(ids) if x == image]
        want = sum(w * probs[i] for w, i in zip(region_weights(areas[idx], 100.0), idx))
        np.testing.assert_allclose(row, want, rtol=1e-12)
    np.testing.assert_allclose(merged.sum(axis=1), 1.0, rtol=1e-12)
    # the larger region dominates only mildly
    _, two = merge_regions(["i", "i"], np.eye(2), np.array([10_000.0, 100.0]), temperature=100.0)
    np.testing.assert_allclose(two[0], [0.71, 0.29], atol=5e-3)


def test_prediction_is_a_novel_index() -> None:
    rng = np.random.default_rng(3)
    num_base, k = 3, 4
    logits = rng.uniform(-1, 1, (20, num_base + k))
    logits[:, :num_base] += 5.0  # base columns would win an argmax over all columns
    ids = [f"img{i % 6}" for i in range(20)]
    _, merged = merge_regions(ids, novel_probs(logits, num_base), rng.integers(1, 5000, 20), temperature=50.0)
    pred = merged.argmax(axis=1)
    assert merged.shape == (6, k)
    assert pred.min() >= 0 and pred.max() < k


def test_merge_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        merge_regions(["a", "b"], np.ones((3, 2)), np.ones(3), 50.0)
    with pytest.raises(ValueError):
        merge_regions(["a"], np.ones((1, 2)), np.ones(1), 0.0)
