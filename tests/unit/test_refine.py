import os

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


def test_neighbours_are_the_same_in_small_chunks():
    import torch

    x = torch.from_numpy(l2_normalise(np.random.default_rng(1).normal(size=(50, 8))))
    sim = x @ x.T
    sim.fill_diagonal_(-float("inf"))
    whole = sim.topk(5, dim=1).indices
    for cells in (1 << 23, 50, 150):  # one chunk; one row per chunk; three rows, the last chunk two
        assert torch.equal(neighbour_indices(x, 5, max_chunk_cells=cells), whole)


PEAK_CODE = """
import resource, sys, numpy as np, torch
from ncd.evaluate.k_criteria import l2_normalise
from ncd.infer.rejection import nearest_other_image_similarity
from ncd.train.refine import neighbour_indices
n, what = int(sys.argv[1]), sys.argv[2]
x = l2_normalise(np.random.default_rng(0).normal(size=(n, 16)))
ids = [str(i // 2) for i in range(n)]
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if what == "neighbours":
    neighbour_indices(torch.from_numpy(x), 5)
else:
    nearest_other_image_similarity(x, ids, x.astype(np.float16), ids)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024)
"""


@pytest.mark.parametrize("what", ["neighbours", "familiarity"])
def test_similarity_memory_does_not_grow_with_n_squared(what):
    """A driver refines and scores every region of a run: 8000 rows would be a 244 MiB
    similarity matrix at once; in chunks the peak (of a fresh process) grows a few tens of MiB."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", PEAK_CODE, "8000", what], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert float(out.stdout) < 100, out.stdout  # whole matrices: about 165


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


def _report(name: str, refined, head_clusters: list[int], caplog) -> tuple[dict, list[str]]:
    """``ncd.pipeline.refine_report`` of ``refined`` for K = 3 and the heads' image clusters:
    its summary and the progress lines it showed (warnings land in ``caplog``)."""
    import logging

    import pyarrow as pa

    from ncd.config import ExperimentConfig, apply_overrides
    from ncd.pipeline import refine_report

    cfg = apply_overrides(ExperimentConfig(), ["train.num_novel=3"])
    shown: list[str] = []
    with caplog.at_level(logging.WARNING):
        info = refine_report(name, refined, pa.table({"cluster": pa.array(head_clusters, pa.int32())}), cfg,
                             shown.append)
    return info, shown


def test_a_collapse_of_the_trained_heads_is_reported_even_when_the_refinement_repairs_it(caplog):
    from ncd.train.refine import RefineResult

    refined = RefineResult(np.eye(3, 4, dtype=np.float32), 0.66, 1.0, 0.34)
    info, shown = _report("plate", refined, [0] * 30, caplog)  # every image in one cluster
    assert info["head_health"]["collapsed"] and info["changed_share"] == 0.66
    assert "plate: the trained heads collapsed (100% of the images in one cluster" in caplog.text
    assert "66% of regions moved, largest cluster 100% -> 34%" in shown[0]


def test_a_refinement_that_would_collapse_a_spread_start_keeps_the_start():
    x, truth, _ = blobs()
    # no entropy term and every region a neighbour: consistency alone pulls everything into one cluster
    greedy = RefineConfig(init="kmeans", neighbours=len(x), steps=300, lr=0.05, entropy_weight=0.0)
    result = refine_prototypes(x, np.zeros((4, x.shape[1]), np.float32), 0.1, greedy, seed=0)
    assert result.kept_start and result.changed_share == 0.0
    assert result.end_largest_share == result.start_largest_share < 0.6
    start = refine_prototypes(x, np.zeros((4, x.shape[1]), np.float32), 0.1, RefineConfig(steps=0), seed=0)
    np.testing.assert_allclose(result.prototypes, start.prototypes, atol=1e-6)  # the k-means start itself
    # a start that is itself collapsed (every region nearest the first prototype) is not protected
    x, _, centres = blobs()
    one = l2_normalise(np.stack([centres.mean(0), -centres[0], -centres[1], -centres[2]]))
    head = RefineConfig(init="head", neighbours=len(x), steps=300, lr=0.05, entropy_weight=0.0)
    unguarded = refine_prototypes(x, one, 0.1, head, seed=0)
    assert not unguarded.kept_start and unguarded.end_largest_share > 0.6
    assert not refine_prototypes(x, np.zeros((4, x.shape[1]), np.float32), 0.1, RefineConfig(), seed=0).kept_start


def test_a_kept_start_is_reported_as_a_warning(caplog):
    from ncd.train.refine import RefineResult

    kept = RefineResult(np.eye(3, 4, dtype=np.float32), 0.0, 0.38, 0.38, kept_start=True)
    info, shown = _report("pcb", kept, [0, 1, 2] * 10, caplog)
    assert info["kept_start"] and not info["head_health"]["collapsed"] and not shown
    assert "pcb: the refinement would have collapsed the clusters it started from, so its start was kept" in caplog.text
