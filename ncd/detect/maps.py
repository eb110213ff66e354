"""Writing the detector's maps where ``discover`` reads them.

A map goes to ``<maps>/<image_id>.png`` (``image_id`` = ``<category>/<type>/<stem>``),
which is the generic and mvtec layouts' map folder and one the mtd layout reads
(``<maps>/MTD/MT_<Type>/<stem>.png``). Maps are 8-bit, min-max normalised over the whole
category (not per image, as MuSc's maps for AnomalyNCD: MEBin's threshold depends on
that scale), at the image's own size. Float maps (``detect.write_npy``) go to
``<maps>_npy/<image_id>.npy``, outside the maps folder, so the catalog never sees two
maps for one image.
"""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from ncd.config import S3Config
from ncd.data import io


def map_uri(maps_root: str, image_id: str) -> str:
    return io.join(maps_root, f"{image_id}.png")


def npy_uri(maps_root: str, image_id: str) -> str:
    return io.join(maps_root.rstrip("/") + "_npy", f"{image_id}.npy")


def image_map(patch_map: np.ndarray, shape: tuple[int, int], blur_sigma: float, image_size: int) -> np.ndarray:
    """A (h, w) patch-grid map -> float32 (H, W): bilinear upsampling, then (few-shot) a Gaussian
    blur of ``blur_sigma`` pixels at the ``image_size`` input scale."""
    height, width = int(shape[0]), int(shape[1])
    out = cv2.resize(patch_map.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    if blur_sigma > 0:
        sigma = blur_sigma * max(height, width) / image_size
        out = cv2.GaussianBlur(out, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    return out


def to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Min-max to 0..255 with the category's range (all equal: all 0)."""
    span = hi - lo
    scaled = (values - lo) / span if span > 0 else np.zeros_like(values)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def write_maps(image_ids: Sequence[str], patch_maps: np.ndarray, shapes: np.ndarray, lo: float, hi: float,
               maps_root: str, blur_sigma: float, image_size: int, write_npy: bool = False,
               s3: S3Config | None = None) -> list[str]:
    """Write one category's (part's) maps with the category range (lo, hi); returns their URIs.

    (lo, hi) are the extremes of the category's patch-grid maps: bilinear upsampling and
    the blur average grid values, so every pixel lies within them.
    """
    uris = []
    for image_id, grid, shape in zip(image_ids, patch_maps, shapes):
        full = image_map(grid, tuple(shape), blur_sigma, image_size)
        uri = map_uri(maps_root, image_id)
        io.write_bytes(uri, io.encode_png(to_uint8(full, lo, hi)), s3)
        if write_npy:
            io.write_bytes(npy_uri(maps_root, image_id), io.npy_bytes(full), s3)
        uris.append(uri)
    return uris
