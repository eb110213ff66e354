import cv2
import numpy as np
import torch

from ncd.train.augment import ViewSpec, eval_view, train_view
from ncd.train.datasets import HalfHalfSampler, RegionSet, TwoViewDataset, sampling_weights, training_loader


def test_sampler_expected_half_labelled():
    labelled = np.array([True] * 300 + [False] * 60)
    fractions = []
    for epoch in range(20):
        s = HalfHalfSampler(labelled, seed=3)
        s.set_epoch(epoch)
        idx = [i for i, _ in s]
        assert len(idx) == len(labelled)
        fractions.append(labelled[idx].mean())
    assert abs(np.mean(fractions) - 0.5) < 0.03
    w = sampling_weights(labelled)
    assert w[0] == 1.0 and np.isclose(w[-1], 300 / 60)


def test_sampler_splits_over_ranks_without_base():
    labelled = np.zeros(11, bool)
    parts = []
    for rank in range(2):
        s = HalfHalfSampler(labelled, seed=0, rank=rank, world_size=2)
        s.set_epoch(4)
        parts.append([i for i, _ in s])
    assert len(parts[0]) == len(parts[1]) == 6
    assert set(parts[0]) | set(parts[1]) == set(range(11))  # every sample, padded by one repeat


def test_views_are_mask_consistent():
    """A white square and its mask must move together under the geometric augmentations."""
    img = torch.zeros(3, 80, 80, dtype=torch.uint8)
    img[:, 10:30, 50:70] = 255
    mask = torch.zeros(1, 80, 80)
    mask[:, 10:30, 50:70] = 1.0
    spec = ViewSpec(size=64, crop_pct=0.875, mean=(0, 0, 0), std=(1, 1, 1))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        v, m = train_view(img, mask, spec, g)
        assert v.shape == (3, 64, 64) and m.shape == (1, 64, 64)
        gray = v.mean(0)
        bright = gray > (gray.max() + gray.min()) / 2
        inside = m[0] > 0.5
        # the square stays where the mask is (photometric noise blurs edges only)
        assert (bright & inside).sum() > 0.6 * inside.sum()
        assert (bright & ~inside).sum() < 0.25 * inside.sum() + 30
    tv, tm = eval_view(img, mask, spec)
    assert torch.equal(tv, eval_view(img, mask, spec)[0])
    assert tm.shape == (1, 64, 64)


SPEC = ViewSpec(size=32, crop_pct=0.875)


def _regions(n: int = 6, labelled: int = 3) -> RegionSet:
    rng = np.random.default_rng(0)
    png = [cv2.imencode(".png", rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))[1].tobytes() for _ in range(n)]
    mask = cv2.imencode(".png", np.full((40, 48), 255, np.uint8))[1].tobytes()
    labels = np.array([0] * labelled + [-1] * (n - labelled), np.int64)
    return RegionSet(png, [mask] * n, labels, np.ones(n, np.float32), [f"r{i}" for i in range(n)])


def test_repeated_draws_of_an_index_get_fresh_reproducible_views():
    regions = _regions()
    sampler = HalfHalfSampler(regions.labelled, seed=5)
    draws = list(sampler)
    assert draws == list(sampler), "the same seed and epoch must give the same draws"
    firsts: dict[int, int] = {}
    repeated = None
    for i, s in draws:
        if i in firsts:
            repeated = (i, firsts[i], s)
            break
        firsts[i] = s
    assert repeated is not None, "6 draws with replacement from 6 rows repeat an index"
    i, s1, s2 = repeated
    data = TwoViewDataset(regions, SPEC)
    assert not torch.equal(data[(i, s1)]["images"], data[(i, s2)]["images"]), "a repeated draw needs fresh views"
    assert torch.equal(data[(i, s1)]["images"], data[(i, s1)]["images"])
    sampler.set_epoch(1)
    assert [s for _, s in sampler] != [s for _, s in draws], "each epoch draws new augmentation seeds"


def _epochs(workers: int, epochs: int = 2) -> list[list[tuple[int, torch.Tensor]]]:
    loader = training_loader(_regions(), SPEC, seed=3, batch_size=4, workers=workers)
    runs = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        runs.append([(int(i), v) for b in loader for i, v in zip(b["index"], b["images"])])
    return runs


def test_loader_views_are_fresh_per_epoch_and_identical_for_any_worker_count():
    """With persistent workers, the epoch must still reach the augmentation (the seed travels
    with each index from the sampler); 0, 1 and 2 workers give the very same batches."""
    runs = {w: _epochs(w) for w in (0, 1, 2)}
    for w in (1, 2):
        for a, b in zip(runs[0], runs[w]):
            assert [i for i, _ in a] == [i for i, _ in b]
            assert all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b)), f"{w} workers differ from 0"
    for epochs in runs.values():
        first = {i: v for i, v in epochs[0]}
        common = [(first[i], v) for i, v in epochs[1] if i in first]
        assert common and all(not torch.equal(a, b) for a, b in common), "epoch 1 repeats epoch 0's views"
