"""Anomaly-centred sub-image cropping (METHOD.md section 3).

``merge="parity"`` reproduces upstream box for box: one square box per external
contour, the non-transitive group merge with float square-ification, no clamping,
PIL's rounding of float boxes and black padding outside the image, and at most
``est + 1`` crops. ``merge="union_find"`` merges close boxes transitively instead and
keeps the merged squares inside the image where they fit (clamping where they do not),
so it never pads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
from PIL import Image

from ncd.config import CropConfig

Box = tuple[float, float, float, float]  # (left, top, right, bottom); float after parity merges
MASK_ON = 255
SCORE_SCALE = 255.0  # normalised maps are on a 0-255 scale; scores on 0-1
MAX_RADIUS_RATIO = 0.5  # a crop's half side is at most half the longer image side
MERGE_MODES = ("parity", "union_find")


@dataclass(frozen=True)
class Region:
    """One anomaly-centred crop."""

    crop: np.ndarray  # (h, w, 3) uint8 RGB, black outside the image
    mask: np.ndarray  # (h, w) uint8 0/255, every foreground pixel inside the box
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) after PIL rounding; may leave the image
    area: int  # pixels equal to 255 in ``mask``
    score: float  # max of the normalised map inside the box / 255, clipped to [0, 1]


def mask_to_image_size(mask: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a (h, w) mask to ``shape_hw`` (METHOD 2.6), as upstream's
    ``cv2.resize(..., INTER_NEAREST)``.

    Upstream then round-trips the mask through ``plt.imsave``, which turns an all-255
    mask into an empty one; that quirk is deliberately not reproduced.
    """
    height, width = int(shape_hw[0]), int(shape_hw[1])
    if mask.shape[:2] == (height, width):
        return mask.copy()
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)


def score_map_to_image_size(norm_map: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of a normalised (h, w) map to ``shape_hw``, float32 (METHOD 3.4).

    Uses PIL's float ("F") image resize, upstream's default resample; it can overshoot.
    """
    height, width = int(shape_hw[0]), int(shape_hw[1])
    image = Image.fromarray(np.ascontiguousarray(norm_map, dtype=np.float32))
    return np.asarray(image.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)


def box_gap(a: Box, b: Box) -> float:
    """Gap between two boxes (METHOD 3.2): Euclidean between corners, the axis gap when
    they overlap along the other axis, -1 when they overlap."""
    aw, ah, bw, bh = a[2] - a[0], a[3] - a[1], b[2] - b[0], b[3] - b[1]
    dx = abs((a[0] + aw / 2) - (b[0] + bw / 2)) - (aw + bw) / 2
    dy = abs((a[1] + ah / 2) - (b[1] + bh / 2)) - (ah + bh) / 2
    if dx < 0 and dy >= 0:
        return dy
    if dx >= 0 and dy < 0:
        return dx
    if dx >= 0 and dy >= 0:
        return math.sqrt(dx * dx + dy * dy)
    return -1.0


def region_boxes(mask: np.ndarray, cfg: CropConfig) -> list[Box]:
    """One square box per external contour of a (H, W) mask (METHOD 3.1).

    Rects are visited by (area, x, y, w, h); an empty mask gives the whole image.
    """
    height, width = mask.shape[:2]
    longer = max(height, width)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return [(0, 0, width, height)]
    rects = sorted((w * h, (x, y, w, h)) for x, y, w, h in map(cv2.boundingRect, contours))
    min_radius = int(longer * cfg.min_crop_size)
    max_radius = int(longer * MAX_RADIUS_RATIO)
    boxes: list[Box] = []
    for _, (x, y, w, h) in rects:
        cy, cx = int((y + y + h) * 0.5), int((x + x + w) * 0.5)
        radius = max(int(max(h, w) * (1 + cfg.padding) * 0.5), min_radius)
        radius = min(radius, max_radius)
        left, top, right, bottom = cx - radius, cy - radius, cx + radius, cy + radius
        if left < 0:
            left, right = 0, 2 * radius
        elif right > width:
            left, right = width - 2 * radius, width
        if top < 0:
            top, bottom = 0, 2 * radius
        elif bottom > height:
            top, bottom = height - 2 * radius, height
        boxes.append((left, top, right, bottom))
    return boxes


def _squared_union(boxes: Sequence[Box]) -> Box:
    """Union of ``boxes`` in order, made square after each addition by growing the
    shorter side symmetrically (floats allowed)."""
    merged = boxes[0]
    for other in boxes[1:]:
        merged = (
            min(merged[0], other[0]),
            min(merged[1], other[1]),
            max(merged[2], other[2]),
            max(merged[3], other[3]),
        )
        width, height = merged[2] - merged[0], merged[3] - merged[1]
        if width > height:
            grow = (width - height) / 2
            merged = (merged[0], merged[1] - grow, merged[2], merged[3] + grow)
        elif width < height:
            grow = (height - width) / 2
            merged = (merged[0] - grow, merged[1], merged[2] + grow, merged[3])
    return merged


def _area(box: Box) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def merge_parity(boxes: Sequence[Box], shape_hw: tuple[int, int], cfg: CropConfig) -> list[Box]:
    """Upstream's non-transitive merge (METHOD 3.2), sorted by area descending.

    Each distinct box's group is every box (duplicates included) closer than
    ``int(max_merge_dist * max(H, W))``; duplicate groups and strict subsets of other
    groups are dropped; each remaining group, in first-seen order, removes its members
    from the list once each (by equality, as ``list.remove`` does) and appends its
    squared union. A chain A-B-C-D therefore yields {A,B,C} and {B,C,D}.
    """
    limit = int(max(shape_hw) * cfg.max_merge_dist)
    boxes = list(boxes)
    groups: list[list[Box]] = []
    for box in dict.fromkeys(boxes):
        group = sorted(other for other in boxes if box_gap(box, other) < limit)
        if group not in groups:
            groups.append(group)
    groups = [
        g for g in groups if not any(g != h and set(g) <= set(h) for h in groups)
    ]
    for group in groups:
        for member in group:
            if member in boxes:
                boxes.remove(member)
        boxes.append(_squared_union(group))
    return sorted(boxes, key=_area, reverse=True)


def _fit_into(low: float, high: float, size: int) -> tuple[float, float]:
    """Shift [low, high) inside [0, size) when it fits, else clamp it to [0, size)."""
    if high - low > size:
        return 0, size
    if low < 0:
        return 0, high - low
    if high > size:
        return size - (high - low), size
    return low, high


def merge_union_find(boxes: Sequence[Box], shape_hw: tuple[int, int], cfg: CropConfig) -> list[Box]:
    """Transitive merge: connected groups of close boxes become one squared union box,
    shifted inside the image (clamped where it is larger), sorted by area descending."""
    height, width = int(shape_hw[0]), int(shape_hw[1])
    limit = int(max(height, width) * cfg.max_merge_dist)
    parent = list(range(len(boxes)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            if box_gap(boxes[i], boxes[j]) < limit:
                parent[root(j)] = root(i)
    groups: dict[int, list[Box]] = {}
    for i, box in enumerate(boxes):
        groups.setdefault(root(i), []).append(box)
    merged = []
    for members in groups.values():
        x0 = min(b[0] for b in members)
        y0 = min(b[1] for b in members)
        x1 = max(b[2] for b in members)
        y1 = max(b[3] for b in members)
        side = max(x1 - x0, y1 - y0)
        x0 -= (side - (x1 - x0)) // 2
        y0 -= (side - (y1 - y0)) // 2
        x0, x1 = _fit_into(x0, x0 + side, width)
        y0, y1 = _fit_into(y0, y0 + side, height)
        merged.append((x0, y0, x1, y1))
    return sorted(merged, key=lambda b: (-_area(b), b[1], b[0]))


def crop_boxes(mask: np.ndarray, est: int, cfg: CropConfig) -> list[Box]:
    """The crop boxes of a (H, W) image-size mask, largest first, at most ``est + 1``
    (METHOD 3.3, upstream's off-by-one kept)."""
    if cfg.merge not in MERGE_MODES:
        raise ValueError(f"crop.merge must be one of {MERGE_MODES}, got {cfg.merge!r}")
    boxes = region_boxes(mask, cfg)
    merge = merge_parity if cfg.merge == "parity" else merge_union_find
    return merge(boxes, mask.shape[:2], cfg)[: max(int(est), 0) + 1]


def pil_round(box: Box) -> tuple[int, int, int, int]:
    """Integer box as ``PIL.Image.crop`` makes it (Python's round-half-to-even)."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    return x0, y0, x1, y1


def padded_crop(array: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """``array[y0:y1, x0:x1]`` with zeros where the box leaves the array."""
    x0, y0, x1, y1 = box
    height, width = array.shape[:2]
    out = np.zeros((max(y1 - y0, 0), max(x1 - x0, 0), *array.shape[2:]), array.dtype)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = array[sy0:sy1, sx0:sx1]
    return out


def crop_regions(
    image: np.ndarray, mask: np.ndarray, score_map: np.ndarray, est: int, cfg: CropConfig
) -> list[Region]:
    """Crops of one image (METHOD 3), ordered by box area descending.

    ``image`` (H, W, 3) uint8 RGB; ``mask`` (H, W) uint8 at image size, non-zero is
    foreground; ``score_map`` (H, W) float, the normalised map at image size; ``est``
    the MEBin count. An empty mask gives exactly one whole-image region.
    """
    height, width = image.shape[:2]
    if mask.shape[:2] != (height, width) or score_map.shape[:2] != (height, width):
        raise ValueError(
            f"mask {mask.shape} and score map {score_map.shape} must match image {image.shape[:2]}"
        )
    binary = np.where(mask > 0, MASK_ON, 0).astype(np.uint8)
    regions = []
    for box in crop_boxes(binary, est, cfg):
        ibox = pil_round(box)
        crop_mask = padded_crop(binary, ibox)
        score = float(padded_crop(score_map, ibox).max(initial=0.0)) / SCORE_SCALE
        regions.append(
            Region(
                crop=padded_crop(image, ibox),
                mask=crop_mask,
                box=ibox,
                area=int(np.count_nonzero(crop_mask)),
                score=min(max(score, 0.0), 1.0),
            )
        )
    return regions
