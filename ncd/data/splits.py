"""Seeded evaluation splits of a manifest: every defect image (or a per-type sample) and a
sample of the normal class, if the dataset has one.

The normal class is the type whose name, without an ``MT_`` prefix and in any case, is
one of ``NORMAL_TYPE_NAMES`` (MTD's ``MT_Free``, MVTec's and the demo's ``good``). MTD's
protocol (METHOD.md 7.2) is every defect image plus 191 normal ones drawn with seed 0.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from ncd.data.io import DataError

NORMAL_TYPE_NAMES = ("free", "good", "normal", "ok")
MTD_NORMAL_IMAGES = 191  # the size of MTD's usual test split of MT_Free


def is_normal_type(name: str) -> bool:
    """Whether a type folder name means defect-free (``MT_Free``, ``good``, ``Normal``...)."""
    bare = name[3:] if name.startswith("MT_") else name
    return bare.lower() in NORMAL_TYPE_NAMES


def evaluation_split(manifest: pa.Table, *, normal_images: int = MTD_NORMAL_IMAGES, max_per_type: int = 0,
                     seed: int = 0) -> pa.Table:
    """The rows to evaluate on, in manifest order.

    Per category: ``normal_images`` of the normal type's images (all when fewer; 0 drops
    the normal type), and of every defect type all images, or a sample of
    ``max_per_type`` when it is positive. Each sample is drawn with ``seed``.
    """
    if normal_images < 0 or max_per_type < 0:
        raise ValueError(f"normal_images and max_per_type must be >= 0, got {normal_images} and {max_per_type}")
    groups: dict[tuple[str, str], list[int]] = {}
    for i, key in enumerate(zip(manifest.column("category").to_pylist(), manifest.column("gt_type").to_pylist())):
        groups.setdefault(key, []).append(i)
    keep: list[int] = []
    for (_, typ), rows in groups.items():
        n = normal_images if is_normal_type(typ) else (max_per_type or len(rows))
        keep += rows if n >= len(rows) else np.random.default_rng(seed).choice(rows, n, replace=False).tolist()
    if not keep:
        raise DataError("the evaluation split is empty: no defect images and no normal images kept")
    return manifest.take(sorted(keep))


def type_counts(manifest: pa.Table) -> dict[str, int]:
    """Images per ``gt_type`` (over all categories), sorted by type."""
    return dict(sorted(Counter(manifest.column("gt_type").to_pylist()).items()))
