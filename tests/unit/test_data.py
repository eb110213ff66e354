import numpy as np
import torch

from ncd.augment import ViewSpec, eval_view, train_view
from ncd.data import HalfHalfSampler, sampling_weights


def test_sampler_expected_half_labelled():
    labelled = np.array([True] * 300 + [False] * 60)
    fractions = []
    for epoch in range(20):
        s = HalfHalfSampler(labelled, seed=3)
        s.set_epoch(epoch)
        idx = list(s)
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
        parts.append(list(s))
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
