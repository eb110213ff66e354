"""train.augment_on=device: crops decoded once, views augmented as batched tensor ops."""
import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from ncd.train.augment import ViewSpec
from ncd.train.batch_augment import augment_batch
from ncd.train.crop_cache import CachedTwoViewDataset, CropCache
from ncd.train.datasets import HalfHalfSampler, RegionSet, TwoViewDataset, training_loader

SPEC = ViewSpec(size=32, crop_pct=0.875)


def _regions(n: int = 12, labelled: int = 0) -> RegionSet:
    """Smooth random crops of several shapes (non-square ones included) with box masks."""
    rng = np.random.default_rng(0)
    crops, masks = [], []
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(36, 80, 2))
        coarse = rng.integers(0, 256, (h // 6 + 2, w // 6 + 2, 3), dtype=np.uint8)
        crops.append(cv2.imencode(".png", cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC))[1].tobytes())
        m = np.zeros((h, w), np.uint8)
        m[h // 5: h // 2, w // 3: w - 2] = 255
        masks.append(cv2.imencode(".png", m)[1].tobytes())
    labels = np.array([0] * labelled + [-1] * (n - labelled), np.int64)
    return RegionSet(crops, masks, labels, np.ones(n, np.float32), [f"r{i}" for i in range(n)])


def _both_paths(regions: RegionSet, keys: list[tuple[int, int]], spec: ViewSpec = SPEC):
    cpu = default_collate([TwoViewDataset(regions, spec)[k] for k in keys])
    cached = CachedTwoViewDataset(regions, CropCache(regions, spec), spec)
    dev = augment_batch(default_collate([cached[k] for k in keys]), spec, torch.device("cpu"))
    return cpu, dev


def _levels(images: torch.Tensor, spec: ViewSpec = SPEC) -> torch.Tensor:
    """Normalised views back on the 0..255 scale."""
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    return (images * std + mean) * 255


@pytest.mark.parametrize("size", [32, 64])
def test_device_views_equal_the_cpu_views_of_the_same_draw_seeds(size):
    """Same (index, draw_seed) keys -> the same views, shapes and dtypes (up to float
    rounding at a few pixels), so the sampler's seeds still determine the views."""
    spec = ViewSpec(size=size)
    regions = _regions()
    keys = [(i % len(regions), 7000 + 13 * i) for i in range(48)]
    cpu, dev = _both_paths(regions, keys, spec)
    for name in ("images", "masks"):
        assert dev[name].shape == cpu[name].shape and dev[name].dtype == cpu[name].dtype == torch.float32
    for name in ("label", "score", "index"):
        assert torch.equal(dev[name], cpu[name])
    diff = (_levels(dev["images"], spec) - _levels(cpu["images"], spec)).abs()
    assert diff.mean() < 0.05, f"mean difference {diff.mean():.3f} grey levels"
    assert (diff > 1.5).float().mean() < 0.005
    assert (dev["masks"] - cpu["masks"]).abs().max() <= 1 / 255 + 1e-6  # masks are cached as uint8


def test_device_views_have_the_cpu_views_distribution_over_independent_draws():
    """Independent seeds for the two paths: per-view brightness, contrast and mask share
    have the same quantiles over many draws."""
    regions = _regions(16)
    n = 384
    cpu, _ = _both_paths(regions, [(i % 16, 10_000 + i) for i in range(n)])
    _, dev = _both_paths(regions, [(i % 16, 90_000 + i) for i in range(n)])

    def stats(batch):
        x = _levels(batch["images"].flatten(0, 1))
        m = batch["masks"].flatten(0, 1)
        return {"mean": x.mean(dim=(1, 2, 3)), "std": x.std(dim=(1, 2, 3)),
                "gray_spread": x.mean(1).amax(dim=(1, 2)) - x.mean(1).amin(dim=(1, 2)),
                "mask": m.mean(dim=(1, 2, 3)), "mask_top_row": m[:, 0, :4].mean(dim=(1, 2))}

    a, b = stats(cpu), stats(dev)
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    for key in a:
        qa, qb = torch.quantile(a[key], q), torch.quantile(b[key], q)
        scale = (a[key].std() + 1e-6)
        assert ((qa - qb).abs() / scale).max() < 0.25, f"{key}: {qa.tolist()} vs {qb.tolist()}"


def test_device_views_are_reproducible_and_fresh_per_draw():
    regions = _regions()
    cached = CachedTwoViewDataset(regions, CropCache(regions, SPEC), SPEC)

    def views(seed: int) -> torch.Tensor:
        return augment_batch(default_collate([cached[(3, seed)]]), SPEC, torch.device("cpu"))["images"]

    assert torch.equal(views(11), views(11))
    assert not torch.equal(views(11), views(12))
    pair = views(11)[0]
    assert not torch.equal(pair[0], pair[1]), "the two views of a draw differ"


def test_crops_are_decoded_once_into_uint8_at_the_resize_size():
    regions = _regions()
    calls = []
    load = regions.load

    class Counting(RegionSet):
        def load(self, i):
            calls.append(i)
            return load(i)

    counting = Counting(regions.crop_png, regions.mask_png, regions.labels, regions.scores, regions.region_ids)
    cache = CropCache(counting, SPEC, threads=2)
    assert sorted(calls) == list(range(len(regions)))
    for image, mask in zip(cache.images, cache.masks):
        assert image.dtype == mask.dtype == torch.uint8
        assert min(image.shape[-2:]) == SPEC.resize and image.shape[-2:] == mask.shape[-2:]
    data = CachedTwoViewDataset(counting, cache, SPEC)
    item = data[(0, 5)]
    assert item["images"].dtype == torch.uint8 and item["images"].shape == (2, 3, SPEC.size, SPEC.size)
    assert len(calls) == len(regions), "drawing views decodes nothing"


@pytest.mark.parametrize("workers", [0, 2])
def test_device_loader_batches_follow_the_sampler_seeds(workers):
    """The loader's uint8 batches, augmented, equal the views of the sampler's (index, seed)
    keys, for 0 and 2 workers; each epoch brings new views."""
    regions = _regions(6, labelled=3)
    loader = training_loader(regions, SPEC, seed=3, batch_size=4, workers=workers, augment_on="device")
    reference = CachedTwoViewDataset(regions, CropCache(regions, SPEC), SPEC)
    sampler = HalfHalfSampler(regions.labelled, seed=3)
    epochs = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        sampler.set_epoch(epoch)
        got = [augment_batch(b, SPEC, torch.device("cpu")) for b in loader]
        keys = list(sampler)
        want = augment_batch(default_collate([reference[k] for k in keys]), SPEC, torch.device("cpu"))
        images = torch.cat([b["images"] for b in got])
        assert torch.equal(images, want["images"])
        assert torch.equal(torch.cat([b["index"] for b in got]), want["index"])
        epochs.append(images)
    assert not torch.equal(epochs[0], epochs[1])
