import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from ncd.config import RefineConfig
from ncd.evaluate.k_criteria import l2_normalise
from ncd.train.refine import neighbour_indices, refine_prototypes


def blobs(seed: int = 0, k: int = 4, per: int = 60, dim: int = 16, spread: float = 0.35):
    """k noisy clusters of unit vectors and their labels."""
    rng = np.random.default_rng(seed)
    centres = l2_normalise(rng.normal(size=(k, dim)))
    x = np.concatenate([c + spread * rng.normal(size=(per, dim)) / np.sqrt(dim) for c in centres])
    return l2_normalise(x), np.repeat(np.arange(k), per), centres


def assign(x, protos):
    return (x @ protos.T).argmax(1)


def test_neighbours_exclude_the_row_itself_and_clip_to_the_set():
    import torch

    x = torch.from_numpy(l2_normalise(np.eye(3, 5) + 0.01))
    nb = neighbour_indices(x, 10)
    assert nb.shape == (3, 2)
    assert all(i not in nb[i].tolist() for i in range(3))


def test_refinement_repairs_a_poor_start_and_keeps_the_clusters_spread():
    x, truth, centres = blobs()
    # a poor start: two prototypes between clusters, one duplicated
    start = l2_normalise(np.stack([centres[0] + centres[1], centres[1] + centres[2], centres[3], centres[3] + 0.05]))
    cfg = RefineConfig(init="head", neighbours=5, steps=1000)
    before = normalized_mutual_info_score(truth, assign(x, start))
    result = refine_prototypes(x, start, 0.1, cfg, seed=0)
    after = normalized_mutual_info_score(truth, assign(x, result.prototypes))
    assert after > before + 0.1 and after > 0.9, (before, after)
    assert result.changed_share > 0.1
    assert result.end_largest_share < 0.4  # four clusters of 60 stay four, none swallows the others
    np.testing.assert_allclose(np.linalg.norm(result.prototypes, axis=1), 1.0, rtol=1e-5)


def test_refinement_is_deterministic_per_seed_and_kmeans_start_ignores_the_head():
    x, truth, _ = blobs(seed=3, spread=0.9)
    junk = l2_normalise(np.random.default_rng(5).normal(size=(4, x.shape[1])))
    cfg = RefineConfig(init="kmeans", steps=50)
    a = refine_prototypes(x, junk, 0.1, cfg, seed=2)
    b = refine_prototypes(x, junk[::-1].copy(), 0.1, cfg, seed=2)
    np.testing.assert_array_equal(a.prototypes, b.prototypes)  # the head's prototypes are not the start
    c = refine_prototypes(x, junk, 0.1, cfg, seed=3)
    assert not np.array_equal(a.prototypes, c.prototypes)


@pytest.mark.parametrize("n", [1, 2])
def test_tiny_sets_do_not_fail(n):
    x = l2_normalise(np.random.default_rng(0).normal(size=(n, 8)))
    result = refine_prototypes(x, l2_normalise(np.eye(2, 8)), 0.1, RefineConfig(init="head", steps=5))
    assert result.prototypes.shape == (2, 8) and np.isfinite(result.prototypes).all()


def test_a_collapse_of_the_trained_heads_is_reported_even_when_the_refinement_repairs_it(caplog):
    import logging

    import pyarrow as pa

    from ncd.config import ExperimentConfig, apply_overrides
    from ncd.pipeline import refine_report
    from ncd.train.refine import RefineResult

    cfg = apply_overrides(ExperimentConfig(), ["train.num_novel=3"])
    head_images = pa.table({"cluster": pa.array([0] * 30, pa.int32())})  # every image in one cluster
    refined = RefineResult(np.eye(3, 4, dtype=np.float32), 0.66, 1.0, 0.34)
    shown = []
    with caplog.at_level(logging.WARNING):
        info = refine_report("plate", refined, head_images, cfg, shown.append)
    assert info["head_health"]["collapsed"] and info["changed_share"] == 0.66
    assert "plate: the trained heads collapsed (100% of the images in one cluster" in caplog.text
    assert "66% of regions moved, largest cluster 100% -> 34%" in shown[0]
