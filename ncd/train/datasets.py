"""Training and evaluation data from region tables (METHOD.md 5.1).

The training set is the labelled base crops (optional) followed by the unlabelled
novel crops. The sampler draws with replacement so that about half of each batch is
labelled; without a base set every sample is unlabelled and the labelled terms drop.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ncd.train.augment import ViewSpec, eval_view, train_view
from ncd.train.region_set import RegionSet

UNLABELLED = -1
DRAW_SEED_STREAM = 0x5EED  # separates the augmentation seeds from other streams of the same (seed, epoch)


def base_classes(base: pa.Table | None) -> list[str]:
    """Sorted base class names (labels 0..L-1)."""
    return [] if base is None else sorted(set(base.column("gt_type").to_pylist()))


def _guides(table: pa.Table, columns: tuple[str, ...]) -> list[list[bytes]]:
    return [table.column(c).to_pylist() if c in table.column_names else [b""] * table.num_rows for c in columns]


def build_training_set(novel: pa.Table, base: pa.Table | None = None,
                       guide_columns: tuple[str, ...] = ()) -> RegionSet:
    """Labelled base rows (labels 0..L-1) followed by unlabelled novel rows.

    ``guide_columns`` (e.g. ``("anomaly_png", "object_png")``) become extra mask channels.
    """
    classes = base_classes(base)
    parts = [(base, True), (novel, False)] if base is not None else [(novel, False)]
    crops, masks, labels, scores, ids = [], [], [], [], []
    guides: list[list[bytes]] = [[] for _ in guide_columns]
    for table, is_base in parts:
        crops += table.column("crop_png").to_pylist()
        masks += table.column("mask_png").to_pylist()
        ids += table.column("region_id").to_pylist()
        for g, column in zip(guides, _guides(table, guide_columns)):
            g += column
        if is_base:
            labels += [classes.index(t) for t in table.column("gt_type").to_pylist()]
            scores += [1.0] * table.num_rows
        else:
            labels += [UNLABELLED] * table.num_rows
            scores += table.column("score").to_pylist()
    return RegionSet(crops, masks, np.asarray(labels, np.int64), np.asarray(scores, np.float32), ids, guides)


def eval_set(table: pa.Table, guide_columns: tuple[str, ...] = ()) -> RegionSet:
    """Rows for inference and feature extraction (needs ``region_id``, ``crop_png``, ``mask_png``)."""
    n = table.num_rows
    return RegionSet(table.column("crop_png").to_pylist(), table.column("mask_png").to_pylist(),
                     np.full(n, UNLABELLED, np.int64), np.zeros(n, np.float32), table.column("region_id").to_pylist(),
                     _guides(table, guide_columns))


class TwoViewDataset(Dataset):
    """Two independently augmented views per sample.

    Keys are ``(index, draw_seed)`` pairs from :class:`HalfHalfSampler`: the randomness
    travels with the index into whichever loader worker fetches it, so every draw (a
    repeated index, a new epoch) gets fresh views, reproducible for any worker count.
    """

    def __init__(self, regions: RegionSet, spec: ViewSpec) -> None:
        self.regions, self.spec = regions, spec

    def __len__(self) -> int:
        return len(self.regions)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        i, draw_seed = key
        g = torch.Generator().manual_seed(draw_seed)
        img, mask = self.regions.load(i)
        views = [train_view(img, mask, self.spec, g) for _ in range(2)]
        return dict(images=torch.stack([v[0] for v in views]), masks=torch.stack([v[1] for v in views]),
                    label=torch.tensor(int(self.regions.labels[i])), score=torch.tensor(float(self.regions.scores[i])),
                    index=torch.tensor(i))


class EvalDataset(Dataset):
    """The deterministic test view of every sample."""

    def __init__(self, regions: RegionSet, spec: ViewSpec) -> None:
        self.regions, self.spec = regions, spec

    def __len__(self) -> int:
        return len(self.regions)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        img, mask = self.regions.load(i)
        image, mask = eval_view(img, mask, self.spec)
        return dict(images=image, masks=mask, index=torch.tensor(i))


def sampling_weights(labelled: np.ndarray) -> np.ndarray:
    """1 for labelled rows and L_n/U_n for unlabelled ones (expected half/half batches)."""
    n_lab, n_unl = int(labelled.sum()), int((~labelled).sum())
    if n_lab == 0 or n_unl == 0:
        return np.ones(len(labelled), np.float64)
    return np.where(labelled, 1.0, n_lab / n_unl)


class HalfHalfSampler(Sampler[tuple[int, int]]):
    """Weighted sampling with replacement, split over ranks (``WeightedRandomSampler`` per rank).

    Each rank draws ``ceil(N / world_size)`` indices per epoch from its own seeded
    generator. Without labelled rows (or without unlabelled ones) it is a seeded
    shuffle split over ranks instead. Every draw comes with its own augmentation seed,
    derived from (seed, epoch, rank, position): ``(index, draw_seed)`` pairs.
    """

    def __init__(self, labelled: np.ndarray, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.weights = torch.as_tensor(sampling_weights(labelled))
        self.mixed = bool(labelled.any() and (~labelled).any())
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        self.num_samples = math.ceil(len(labelled) / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def indices(self) -> list[int]:
        """This rank's sample indices for the current epoch."""
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch * 104729 + self.rank)
        if self.mixed:
            return torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g).tolist()
        shared = torch.Generator().manual_seed(self.seed * 7919 + self.epoch * 104729)
        perm = torch.randperm(len(self.weights), generator=shared)
        padded = torch.cat([perm, perm[: self.num_samples * self.world_size - len(perm)]])
        return padded[self.rank::self.world_size].tolist()

    def draw_seeds(self) -> list[int]:
        """One augmentation seed per position of this rank's epoch."""
        stream = np.random.SeedSequence([self.seed, self.epoch, self.rank, DRAW_SEED_STREAM])
        return [int(s) for s in stream.generate_state(self.num_samples, np.uint64)]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        yield from zip(self.indices(), self.draw_seeds())


AUGMENT_ON = ("loader", "device")  # train.augment_on


def training_loader(regions: RegionSet, spec: ViewSpec, *, seed: int, batch_size: int, workers: int,
                    rank: int = 0, world_size: int = 1, pin_memory: bool = False,
                    augment_on: str = "loader") -> DataLoader:
    """Two-view batches of ``batch_size // world_size`` rows; call ``loader.sampler.set_epoch``
    before each epoch (the sampler lives in this process, so persistent workers follow it).

    ``augment_on="loader"``: augmented float views (``TwoViewDataset``); ``"device"``: uint8
    windows of crops decoded once (``ncd.train.crop_cache``) with their views' parameters, for
    ``ncd.train.batch_augment.augment_batch`` on the training device."""
    sampler = HalfHalfSampler(regions.labelled, seed=seed, rank=rank, world_size=world_size)
    if augment_on == "device":
        from ncd.train.crop_cache import CachedTwoViewDataset, CropCache

        dataset: Dataset = CachedTwoViewDataset(regions, CropCache(regions, spec, threads=max(1, workers)), spec)
    else:
        dataset = TwoViewDataset(regions, spec)
    return DataLoader(dataset, batch_size=max(1, batch_size // world_size), sampler=sampler,
                      num_workers=workers, drop_last=False, persistent_workers=workers > 0, pin_memory=pin_memory)
