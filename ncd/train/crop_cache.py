"""Host side of ``train.augment_on=device``: crops decoded once, cut into uint8 views.

:class:`CropCache` decodes every crop of a region set once (threads: OpenCV and torch
release the GIL) and keeps it resized to ``ViewSpec.resize`` as uint8, image and
masks (about (3 + c) x resize^2 bytes a crop: 260 KB at 224 px with one mask).
:class:`CachedTwoViewDataset` then only draws each view's parameters from the
sampler's per-draw seed (``ncd.train.augment.draw_view_params``, the CPU path's draws) and
slices the view's window out of the cached crop; ``ncd.train.batch_augment.augment_batch``
does the rest on the device.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.data import Dataset

from ncd.train.augment import ViewSpec, draw_view_params, resize_for_views
from ncd.train.batch_augment import pack_params
from ncd.train.region_set import RegionSet

VIEWS = 2


class CropCache:
    """Every crop of ``regions`` decoded once and resized for the views, as uint8 tensors."""

    def __init__(self, regions: RegionSet, spec: ViewSpec, threads: int = 1) -> None:
        def decode(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            image, mask = resize_for_views(*regions.load(i), spec)
            return image.contiguous(), (mask.clamp(0, 1) * 255).round().to(torch.uint8)

        with ThreadPoolExecutor(max(1, threads)) as pool:
            pairs = list(pool.map(decode, range(len(regions))))
        self.images = [p[0] for p in pairs]
        self.masks = [p[1] for p in pairs]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in self.images) + sum(t.numel() for t in self.masks)


class CachedTwoViewDataset(Dataset):
    """Two views per ``(index, draw_seed)`` key as uint8 windows of the cached crop plus
    their parameters; the same seeds give the same choices as ``TwoViewDataset``."""

    def __init__(self, regions: RegionSet, cache: CropCache, spec: ViewSpec) -> None:
        self.regions, self.cache, self.spec = regions, cache, spec

    def __len__(self) -> int:
        return len(self.regions)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, object]:
        i, draw_seed = key
        g = torch.Generator().manual_seed(draw_seed)
        image, mask = self.cache.images[i], self.cache.masks[i]
        s = self.spec.size
        params = [draw_view_params(g, *image.shape[-2:], self.spec) for _ in range(VIEWS)]
        images = torch.stack([image[:, p.top:p.top + s, p.left:p.left + s] for p in params])
        masks = torch.stack([mask[:, p.top:p.top + s, p.left:p.left + s] for p in params])
        return dict(images=images, masks=masks, params=pack_params(params),
                    label=torch.tensor(int(self.regions.labels[i])), score=torch.tensor(float(self.regions.scores[i])),
                    index=torch.tensor(i))
