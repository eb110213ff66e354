"""Embedded demo dataset: seeded procedural industrial images with typed defects.

Each sample is a clean product (a textured surface or a simple part on a background)
with at most one defect pasted inside an exact ground-truth mask, plus an anomaly map
that looks like a detector's output (blurred mask, smooth background noise, false
positive blobs, peak scaled with the defect's severity).

The clean product is drawn first from the generator and the defect only replaces
pixels inside its mask, so ``render_product`` with the same generator state gives the
image outside the mask exactly. Datasets are written in the generic layout
``<root>/{images,maps,masks}/<category>/<type>/<family>_<index:03d>.png`` with normal
images under the type ``good`` (``NORMAL_TYPE``).
"""
from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

NORMAL_TYPE = "good"
TARGET_FAMILIES: tuple[str, ...] = ("scratch", "hole", "crack", "stain", "missing")
BASE_FAMILIES: tuple[str, ...] = ("dent", "contamination", "burn", "fold")
ALL_FAMILIES: tuple[str, ...] = TARGET_FAMILIES + BASE_FAMILIES
TEXTURE_CATEGORIES: tuple[str, ...] = ("metal", "fabric", "wood", "stone")
PART_CATEGORIES: tuple[str, ...] = ("plate", "washer", "pill")
CATEGORIES: tuple[str, ...] = PART_CATEGORIES + TEXTURE_CATEGORIES

MIN_SIZE = 32  # smallest supported image side
REF_SIZE = 128.0  # stroke widths and radii are tuned at this side and scale with it
SUPERSAMPLE = 4  # polygon fills are rasterised at this factor then area-averaged
MIN_DEFECT_AREA = 0.002  # smallest defect mask, as a fraction of the image area
DEFECT_TRIES = 8  # redraws of a defect whose mask came out smaller than that
ALPHA_MIN = 0.05  # defect alpha below this leaves the clean pixel untouched (outside the mask)
LIGHT = np.array([0.7071, 0.7071], np.float32)  # slope direction lit from top-left


@dataclass(frozen=True)
class SyntheticSpec:
    """What ``write_dataset`` generates.

    Attributes:
        categories: product categories (``CATEGORIES``), one model each downstream.
        families: defect families per category; ``TARGET_FAMILIES`` by default.
        images_per_family: defective images per (category, family).
        normal_images: defect-free images per category, written under ``good``.
        image_size: image side in pixels (square images).
        map_scale: anomaly-map side as a fraction of the image side (e.g. 0.5).
        seed: root seed; each image's generator derives from it and the image's name.
    """

    categories: tuple[str, ...] = ("plate", "fabric")
    families: tuple[str, ...] = TARGET_FAMILIES
    images_per_family: int = 8
    normal_images: int = 6
    image_size: int = 128
    map_scale: float = 1.0
    seed: int = 0


BASE_SPEC = SyntheticSpec(
    categories=CATEGORIES, families=BASE_FAMILIES, images_per_family=24, normal_images=0, seed=1
)


@dataclass(frozen=True)
class Product:
    """A clean product render.

    Attributes:
        image: (H, W, 3) float32 in [0, 1].
        object_mask: (H, W) bool, where the product is (all True for textures).
        background: (H, W, 3) float32, what a missing piece reveals.
    """

    image: np.ndarray
    object_mask: np.ndarray
    background: np.ndarray


@dataclass(frozen=True)
class Sample:
    """One generated image.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        gt_mask: (H, W) uint8, 255 on the defect, 0 elsewhere (all 0 for normals).
        anomaly_map: (h, w) float32 in [0, 1], h = w = round(H * map_scale).
        category: product category.
        family: defect family, or ``NORMAL_TYPE`` for a normal image.
        severity: defect strength in [0, 1] (0 for normals); scales contrast and score.
    """

    image: np.ndarray
    gt_mask: np.ndarray
    anomaly_map: np.ndarray
    category: str
    family: str
    severity: float


@dataclass(frozen=True)
class Record:
    """A sample with its place in the generic layout (``<category>/<type>/<name>``)."""

    category: str
    type: str
    name: str
    sample: Sample


# --------------------------------------------------------------------------- helpers


def _scale(size: int) -> float:
    return size / REF_SIZE


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) pixel-centre coordinates, each (S, S) float32."""
    r = np.arange(size, dtype=np.float32)
    return np.meshgrid(r, r, indexing="ij")


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Band-limited noise, roughly unit variance, features about ``cell`` pixels wide."""
    h, w = shape
    gh, gw = max(2, int(np.ceil(h / cell)) + 1), max(2, int(np.ceil(w / cell)) + 1)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _fractal_noise(
    rng: np.random.Generator, shape: tuple[int, int], cell: float, octaves: int = 4
) -> np.ndarray:
    out = np.zeros(shape, np.float32)
    amp, total = 1.0, 0.0
    for _ in range(octaves):
        out += amp * _smooth_noise(rng, shape, max(cell, 1.0))
        total += amp
        amp *= 0.5
        cell /= 2.0
    return out / total


def _fill_poly(size: int, polys: list[np.ndarray]) -> np.ndarray:
    """Anti-aliased coverage (S, S) float32 of filled polygons given in pixel units."""
    big = np.zeros((size * SUPERSAMPLE, size * SUPERSAMPLE), np.uint8)
    pts = [np.round((p + 0.5) * SUPERSAMPLE - 0.5).astype(np.int32) for p in polys]
    cv2.fillPoly(big, pts, 255)
    small = cv2.resize(big, (size, size), interpolation=cv2.INTER_AREA)
    return small.astype(np.float32) / 255.0


def _draw_polyline(size: int, pts: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased coverage (S, S) float32 of a polyline of ``width`` pixels."""
    big = np.zeros((size * SUPERSAMPLE, size * SUPERSAMPLE), np.uint8)
    p = np.round((pts + 0.5) * SUPERSAMPLE - 0.5).astype(np.int32)
    thick = max(1, int(round(width * SUPERSAMPLE)))
    cv2.polylines(big, [p], False, 255, thickness=thick, lineType=cv2.LINE_8)
    small = cv2.resize(big, (size, size), interpolation=cv2.INTER_AREA)
    return small.astype(np.float32) / 255.0


def _blob_polygon(
    rng: np.random.Generator, centre: np.ndarray, radius: float, jag: float, n: int
) -> np.ndarray:
    """An irregular star-shaped polygon (n, 2) in (x, y) pixel units."""
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = radius * (1.0 + jag * rng.uniform(-1, 1, n))
    return np.stack([centre[0] + rad * np.cos(ang), centre[1] + rad * np.sin(ang)], 1)


def _slope_shade(height: np.ndarray) -> np.ndarray:
    """Lambert-like shading term of a height field lit from the top-left."""
    gy, gx = np.gradient(height)
    return gx * LIGHT[0] + gy * LIGHT[1]


def _distance_inside(mask: np.ndarray) -> np.ndarray:
    """Distance in pixels to the nearest pixel outside ``mask`` or the image border."""
    padded = np.pad(mask.astype(np.uint8), 1)
    return cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]


def _pick_point(
    rng: np.random.Generator, mask: np.ndarray, margin: float, boundary: bool = False
) -> np.ndarray:
    """A random (x, y) point of ``mask`` at least ``margin`` px inside it (or on its edge)."""
    if boundary:  # a point on the outer outline: holes through the part are filled first
        filled = np.zeros(mask.shape, np.uint8)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(filled, contours, -1, 1, thickness=-1)
        dist = _distance_inside(filled.astype(bool))
        cand = (dist > 0) & (dist <= 1.5) & mask
        if not cand.any():
            cand = mask
    else:
        dist = _distance_inside(mask)
        cand = dist >= margin
        if not cand.any():
            cand = dist >= dist.max()
    ys, xs = np.nonzero(cand)
    i = rng.integers(len(ys))
    return np.array([xs[i], ys[i]], np.float32) + rng.uniform(-0.5, 0.5, 2).astype(np.float32)


def _jitter_colour(rng: np.random.Generator, colour: tuple[float, float, float], amount: float) -> np.ndarray:
    c = np.asarray(colour, np.float32) * (1.0 + rng.uniform(-amount, amount))
    return np.clip(c + rng.uniform(-amount / 2, amount / 2, 3).astype(np.float32), 0, 1)


def _bevel(coverage: np.ndarray, size: int, strength: float) -> np.ndarray:
    """Edge shading of a part: its coverage as a height field, blurred, then lit."""
    height = cv2.GaussianBlur(coverage, (0, 0), 1.6 * _scale(size))
    return _slope_shade(height) * strength * _scale(size)


# --------------------------------------------------------------------------- products


def _background(rng: np.random.Generator, size: int, tone: float) -> np.ndarray:
    """A dark conveyor / bench surface."""
    shape = (size, size)
    lum = tone + 0.03 * _fractal_noise(rng, shape, size / 3) + 0.015 * rng.standard_normal(shape).astype(np.float32)
    tint = _jitter_colour(rng, (1.0, 1.02, 1.06), 0.03)
    return np.clip(lum[..., None] * tint, 0, 1)


def _brushed(rng: np.random.Generator, size: int, vertical: bool) -> np.ndarray:
    noise = rng.standard_normal((size, size)).astype(np.float32)
    s = _scale(size)
    streak = cv2.GaussianBlur(noise, (0, 0), sigmaX=12.0 * s, sigmaY=0.35 * s)
    streak /= streak.std() + 1e-6
    fine = cv2.GaussianBlur(noise, (0, 0), sigmaX=3.0 * s, sigmaY=0.2)
    fine /= fine.std() + 1e-6
    out = 0.05 * streak + 0.025 * fine
    return out.T.copy() if vertical else out


def _texture_metal(rng: np.random.Generator, size: int) -> Product:
    y, x = _grid(size)
    base = _jitter_colour(rng, (0.62, 0.64, 0.67), 0.08)
    lum = 1.0 + _brushed(rng, size, bool(rng.random() < 0.5))
    ang = rng.uniform(0, 2 * np.pi)
    lum += 0.12 * ((x * np.cos(ang) + y * np.sin(ang)) / size - 0.5)
    lum += 0.04 * _smooth_noise(rng, (size, size), size / 2)
    img = base * lum[..., None]
    return Product(np.clip(img, 0, 1), np.ones((size, size), bool), _background(rng, size, 0.06))


def _texture_fabric(rng: np.random.Generator, size: int) -> Product:
    y, x = _grid(size)
    palette = [(0.20, 0.25, 0.42), (0.72, 0.66, 0.54), (0.24, 0.36, 0.26), (0.45, 0.45, 0.47), (0.55, 0.22, 0.18)]
    base = _jitter_colour(rng, palette[rng.integers(len(palette))], 0.08)
    period = rng.uniform(5.0, 7.5) * _scale(size)
    warp = 0.6 * period / 5.0
    u = (x + warp * _smooth_noise(rng, (size, size), size / 4)) / period
    v = (y + warp * _smooth_noise(rng, (size, size), size / 4)) / period
    fu, fv = u - np.floor(u), v - np.floor(v)
    over = ((np.floor(u) + np.floor(v)) % 2) == 0
    across_h = np.sin(np.pi * fv) ** 0.6  # horizontal thread profile
    across_v = np.sin(np.pi * fu) ** 0.6
    along_h = 0.85 + 0.15 * np.sin(np.pi * fu)
    along_v = 0.85 + 0.15 * np.sin(np.pi * fv)
    weave = np.where(over, across_h * along_h, across_v * along_v)
    fibre = 0.06 * rng.standard_normal((size, size)).astype(np.float32)
    lum = 0.55 + 0.5 * weave + fibre + 0.05 * _smooth_noise(rng, (size, size), size / 2)
    img = base * lum[..., None].astype(np.float32)
    return Product(np.clip(img, 0, 1), np.ones((size, size), bool), _background(rng, size, 0.05))


def _texture_wood(rng: np.random.Generator, size: int) -> Product:
    y, x = _grid(size)
    light = _jitter_colour(rng, (0.78, 0.58, 0.36), 0.08)
    dark = light * rng.uniform(0.55, 0.7)
    ang = rng.uniform(-0.25, 0.25) + (np.pi / 2 if rng.random() < 0.5 else 0.0)
    across = -x * np.sin(ang) + y * np.cos(ang)
    along = x * np.cos(ang) + y * np.sin(ang)
    warp = 6.0 * _scale(size) * _smooth_noise(rng, (size, size), size / 2.5)
    freq = rng.uniform(0.06, 0.1) / _scale(size)
    rings = (across + warp + 3.0 * np.sin(along / size * 2 * np.pi * rng.uniform(0.5, 1.5))) * freq
    t = (rings - np.floor(rings)) ** 3.0
    grain = rng.standard_normal((size, size)).astype(np.float32)
    long, short = 6.0 * _scale(size), 0.3
    horizontal = abs(np.cos(ang)) > 0.7
    grain = cv2.GaussianBlur(grain, (0, 0), sigmaX=long if horizontal else short, sigmaY=short if horizontal else long)
    t = np.clip(t + 0.075 * grain / (grain.std() + 1e-6), 0, 1)
    img = light * (1 - t[..., None]) + dark * t[..., None]
    return Product(np.clip(img, 0, 1), np.ones((size, size), bool), _background(rng, size, 0.05))


def _texture_stone(rng: np.random.Generator, size: int) -> Product:
    shape = (size, size)
    s = _scale(size)
    base = _jitter_colour(rng, (0.6, 0.59, 0.56), 0.1)
    lum = 1.0 + 0.07 * _fractal_noise(rng, shape, size / 3, 5)
    lum += 0.05 * rng.standard_normal(shape).astype(np.float32)
    # aggregate: grains of a few sizes, lighter and darker than the cement
    for cell, amp, frac in ((1.2, 0.25, 0.05), (2.5, 0.18, 0.06), (4.5, 0.12, 0.05)):
        g = _smooth_noise(rng, shape, cell * s)
        thr = np.quantile(g, 1 - frac)
        lum += amp * np.sign(rng.standard_normal()) * np.clip((g - thr) / (g.std() * 0.3), 0, 1)
    pores = _smooth_noise(rng, shape, 1.5 * s)
    lum -= 0.35 * np.clip((pores - np.quantile(pores, 0.985)) / (pores.std() * 0.3), 0, 1)
    img = base * lum[..., None]
    return Product(np.clip(img, 0, 1), np.ones(shape, bool), _background(rng, size, 0.05))


def _part_surface(rng: np.random.Generator, size: int, metal: bool) -> tuple[np.ndarray, np.ndarray]:
    """(colour (3,), luminance (S, S)) of a steel or painted part surface."""
    shape = (size, size)
    if metal:
        colour = _jitter_colour(rng, [(0.66, 0.67, 0.7), (0.74, 0.62, 0.38)][int(rng.random() < 0.3)], 0.06)
        lum = 1.0 + _brushed(rng, size, bool(rng.random() < 0.5))
    else:
        palette = [(0.24, 0.38, 0.3), (0.32, 0.4, 0.52), (0.78, 0.74, 0.64), (0.8, 0.55, 0.2)]
        colour = _jitter_colour(rng, palette[rng.integers(len(palette))], 0.06)
        lum = 1.0 + 0.025 * rng.standard_normal(shape).astype(np.float32)
    lum = lum + 0.05 * _smooth_noise(rng, shape, size / 2)
    return colour, lum


def _part_plate(rng: np.random.Generator, size: int) -> Product:
    bg = _background(rng, size, rng.uniform(0.1, 0.18))
    c = size / 2 + rng.uniform(-0.03, 0.03, 2) * size
    hw, hh = rng.uniform(0.36, 0.44) * size, rng.uniform(0.3, 0.42) * size
    ang = rng.uniform(-0.12, 0.12)
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]], np.float32)
    corner = 0.06 * size
    t = np.linspace(0, np.pi / 2, 8)
    arcs = []
    for sx, sy, a0 in ((1, 1, 0.0), (-1, 1, np.pi / 2), (-1, -1, np.pi), (1, -1, 1.5 * np.pi)):
        cx, cy = sx * (hw - corner), sy * (hh - corner)
        arcs.append(np.stack([cx + corner * np.cos(t + a0), cy + corner * np.sin(t + a0)], 1))
    outline = np.concatenate(arcs) @ rot.T + c
    cover = _fill_poly(size, [outline])
    holes = []
    hr = rng.uniform(0.045, 0.065) * size
    n_holes = int(rng.choice([2, 4]))
    spots = [(1, 1), (-1, -1), (-1, 1), (1, -1)][:n_holes]
    for sx, sy in spots:
        hc = np.array([sx * (hw - 2.2 * hr), sy * (hh - 2.2 * hr)], np.float32) @ rot.T + c
        holes.append(_blob_polygon(rng, hc, hr, 0.0, 32))
    cover = np.clip(cover - _fill_poly(size, holes), 0, 1)
    colour, lum = _part_surface(rng, size, bool(rng.random() < 0.6))
    shade = _bevel(cover, size, 5.0)
    part = colour * (lum + shade)[..., None]
    img = bg * (1 - cover[..., None]) + part * cover[..., None]
    return Product(np.clip(img, 0, 1).astype(np.float32), cover >= 0.5, bg)


def _part_washer(rng: np.random.Generator, size: int) -> Product:
    y, x = _grid(size)
    bg = _background(rng, size, rng.uniform(0.1, 0.22))
    c = size / 2 + rng.uniform(-0.03, 0.03, 2) * size
    r_out = rng.uniform(0.36, 0.44) * size
    r_in = r_out * rng.uniform(0.35, 0.5)
    d = np.hypot(x - c[0], y - c[1])
    cover = np.clip(r_out - d + 0.5, 0, 1) * np.clip(d - r_in + 0.5, 0, 1)
    metal = bool(rng.random() < 0.8)
    colour, _ = _part_surface(rng, size, metal)
    # concentric turning marks and a conical bevel lit from the top-left
    radial = np.interp(d, np.arange(int(size)), rng.standard_normal(int(size)).astype(np.float32))
    radial = cv2.GaussianBlur(radial.astype(np.float32), (0, 0), 0.4)
    theta = np.arctan2(y - c[1], x - c[0])
    mid = (r_out + r_in) / 2
    cone = np.clip((d - mid) / (r_out - mid), -1, 1)
    lum = 0.95 + 0.05 * radial * metal + 0.18 * cone * np.cos(theta - 1.25 * np.pi) * metal
    lum += 0.03 * rng.standard_normal((size, size)).astype(np.float32)
    lum += _bevel(cover, size, 5.0)
    part = colour * lum[..., None]
    img = bg * (1 - cover[..., None]) + part * cover[..., None]
    return Product(np.clip(img, 0, 1).astype(np.float32), cover >= 0.5, bg)


def _part_pill(rng: np.random.Generator, size: int) -> Product:
    y, x = _grid(size)
    bg = _background(rng, size, rng.uniform(0.16, 0.26)) * _jitter_colour(rng, (0.9, 1.0, 1.15), 0.05)
    c = size / 2 + rng.uniform(-0.03, 0.03, 2) * size
    ang = rng.uniform(-0.5, 0.5)
    u = np.array([np.cos(ang), np.sin(ang)], np.float32)
    n = np.array([-u[1], u[0]], np.float32)
    rad = rng.uniform(0.17, 0.22) * size
    half = rng.uniform(0.2, 0.26) * size
    px, py = x - c[0], y - c[1]
    t = px * u[0] + py * u[1]
    s = px * n[0] + py * n[1]
    tc = np.clip(t, -half, half)
    d = np.hypot(t - tc, s)
    cover = np.clip(rad - d + 0.5, 0, 1)
    palette = [(0.93, 0.92, 0.89), (0.95, 0.85, 0.45), (0.85, 0.3, 0.25), (0.35, 0.5, 0.8), (0.95, 0.6, 0.3)]
    c1 = _jitter_colour(rng, palette[0], 0.03)
    c2 = _jitter_colour(rng, palette[rng.integers(len(palette))], 0.04)
    colour = np.where((t < 0)[..., None], c1, c2)
    # capsule as a cylinder with rounded caps: shade from the surface normal
    nz = np.sqrt(np.clip(1 - (d / rad) ** 2, 0, 1))
    nx = np.where(d > 0, (px - tc * u[0]) / np.maximum(d, 1e-6), 0) * (d / rad)
    ny = np.where(d > 0, (py - tc * u[1]) / np.maximum(d, 1e-6), 0) * (d / rad)
    lam = 0.55 + 0.45 * (0.75 * nz - 0.45 * (nx + ny) / np.sqrt(2))
    spec = 0.35 * np.clip(0.75 * nz - 0.45 * (nx + ny) / np.sqrt(2), 0, 1) ** 24
    lum = lam + 0.02 * rng.standard_normal((size, size)).astype(np.float32)
    part = colour * lum[..., None] + spec[..., None]
    img = bg * (1 - cover[..., None]) + part * cover[..., None]
    return Product(np.clip(img, 0, 1).astype(np.float32), cover >= 0.5, bg)


_PRODUCTS: dict[str, Callable[[np.random.Generator, int], Product]] = {
    "plate": _part_plate,
    "washer": _part_washer,
    "pill": _part_pill,
    "metal": _texture_metal,
    "fabric": _texture_fabric,
    "wood": _texture_wood,
    "stone": _texture_stone,
}


def render_product(rng: np.random.Generator, category: str, size: int) -> Product:
    """Render a clean product of ``category`` at ``size`` x ``size``; the first thing
    ``generate_sample`` draws from ``rng``."""
    _check_size(size)
    if category not in _PRODUCTS:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    prod = _PRODUCTS[category](rng, size)
    return Product(
        prod.image.astype(np.float32, copy=False), prod.object_mask, prod.background.astype(np.float32, copy=False)
    )


# --------------------------------------------------------------------------- defects
# Each returns (alpha (S, S) float32 in [0, 1], effect image (S, S, 3) float32); the
# composite is clean where alpha is 0 and alpha-blended towards the effect elsewhere.


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, n: int) -> np.ndarray:
    t = np.linspace(0, 1, n, dtype=np.float32)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _defect_scratch(rng: np.random.Generator, prod: Product, sev: float) -> tuple[np.ndarray, np.ndarray]:
    size = prod.image.shape[0]
    s = _scale(size)
    centre = _pick_point(rng, prod.object_mask, 0.12 * size)
    extent = min(_distance_inside(prod.object_mask).max() * 1.6, 0.85 * size)
    length = rng.uniform(0.5, 1.0) * extent
    ang = rng.uniform(0, np.pi)
    d = np.array([np.cos(ang), np.sin(ang)], np.float32)
    nrm = np.array([-d[1], d[0]], np.float32)
    alpha = np.zeros((size, size), np.float32)
    n_lines = int(rng.choice([1, 1, 2, 3]))
    for k in range(n_lines):
        off = nrm * (k - (n_lines - 1) / 2) * rng.uniform(3, 6) * s
        ln = length * rng.uniform(0.6, 1.0) if k else length
        p0 = centre + off - d * ln / 2
        p2 = centre + off + d * ln / 2
        p1 = (p0 + p2) / 2 + nrm * rng.uniform(-0.08, 0.08) * ln
        alpha = np.maximum(alpha, _draw_polyline(size, _bezier(p0, p1, p2, 48), rng.uniform(0.8, 1.4) * s))
    bright = bool(rng.random() < 0.75)
    lum = prod.image.mean(2, keepdims=True)
    target = np.clip(lum + 0.35 + 0.35 * sev, 0, 1) if bright else lum * (0.35 - 0.2 * sev)
    effect = np.repeat(target, 3, 2) * np.array([1.0, 1.0, 1.02], np.float32)
    return alpha, np.clip(effect, 0, 1).astype(np.float32)


def _defect_hole(rng: np.random.Generator, prod: Product, sev: float) -> tuple[np.ndarray, np.ndarray]:
    size = prod.image.shape[0]
    y, x = _grid(size)
    r = rng.uniform(0.035, 0.065) * size * (0.8 + 0.4 * sev)
    c = _pick_point(rng, prod.object_mask, 2.5 * r)
    ex = rng.uniform(0.85, 1.15)
    d = np.hypot((x - c[0]) * ex, (y - c[1]) / ex) / r
    pit = -np.clip(1 - d**2, 0, 1) ** 0.7
    rim = 0.35 * np.exp(-(((d - 1.15) / 0.18) ** 2))
    height = (pit + rim) * r
    shade = _slope_shade(height)
    inside = np.clip((1.0 - d) * r + 0.5, 0, 1)
    dark = 0.12 + 0.12 * (1 - sev) + 0.25 * np.clip(shade, 0, 1) * inside
    lum = np.where(inside > 0, dark, 1.0) * (1 + 0.9 * shade * (1 - inside))
    effect = prod.image * lum[..., None]
    effect = effect * (1 - inside[..., None]) + (prod.image.mean(2, keepdims=True) * dark[..., None]) * inside[..., None]
    alpha = np.clip((1.45 - d) / 0.1, 0, 1)
    return alpha.astype(np.float32), np.clip(effect, 0, 1).astype(np.float32)


def _crack_path(rng: np.random.Generator, start: np.ndarray, ang: float, steps: int, step: float) -> np.ndarray:
    """A jagged random walk: the heading wanders around ``ang`` with sharp kinks."""
    pts, dev = [start], 0.0
    for _ in range(steps):
        dev = 0.6 * dev + rng.normal(0, 0.6)
        a = ang + dev
        pts.append(pts[-1] + step * rng.uniform(0.6, 1.4) * np.array([np.cos(a), np.sin(a)], np.float32))
    return np.array(pts, np.float32)


def _defect_crack(rng: np.random.Generator, prod: Product, sev: float) -> tuple[np.ndarray, np.ndarray]:
    size = prod.image.shape[0]
    s = _scale(size)
    centre = _pick_point(rng, prod.object_mask, 0.15 * size)
    extent = min(_distance_inside(prod.object_mask).max() * 1.5, 0.7 * size)
    step = 2.0 * s
    ang = rng.uniform(0, 2 * np.pi)
    n = max(6, int(rng.uniform(0.6, 1.0) * extent / step))
    half_a = _crack_path(rng, centre, ang, n // 2, step)
    half_b = _crack_path(rng, centre, ang + np.pi, n - n // 2, step)
    main = np.concatenate([half_b[::-1], half_a[1:]])
    width = (0.7 + 0.6 * sev) * s
    alpha = _draw_polyline(size, main, width)
    for _ in range(int(rng.integers(2, 5))):
        i = int(rng.integers(2, len(main) - 2))
        heading = np.arctan2(*(main[i + 1] - main[i - 1])[::-1])
        b_ang = heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1)
        branch = _crack_path(rng, main[i], b_ang, int(rng.integers(3, max(4, n // 3))), step * 0.9)
        alpha = np.maximum(alpha, _draw_polyline(size, branch, max(0.6 * s, width * 0.65)))
    alpha = np.clip(alpha * 1.3, 0, 1)
    effect = prod.image * (0.12 - 0.08 * sev)
    return alpha, np.clip(effect, 0, 1).astype(np.float32)


def _soft_blob(rng: np.random.Generator, size: int, c: np.ndarray, radius: float, wobble: float) -> np.ndarray:
    """Irregular soft blob, 1 at the centre fading to 0 around ``radius`` px."""
    y, x = _grid(size)
    ex = rng.uniform(0.7, 1.4)
    ang = rng.uniform(0, np.pi)
    dx, dy = x - c[0], y - c[1]
    u = (dx * np.cos(ang) + dy * np.sin(ang)) * ex
    v = (-dx * np.sin(ang) + dy * np.cos(ang)) / ex
    d = np.hypot(u, v) / radius
    d = d * (1 + wobble * _smooth_noise(rng, (size, size), radius * 0.8))
    blob = np.clip(1 - d, 0, 1).astype(np.float32)
    return blob * _component_at(blob > 0, c)


def _component_at(mask: np.ndarray, point: np.ndarray) -> np.ndarray:
    """The 8-connected component of ``mask`` nearest to ``point`` (x, y), as float32."""
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if n <= 2:
        return mask.astype(np.float32)
    ys, xs = np.nonzero(mask)
    i = np.argmin((xs - point[0]) ** 2 + (ys - point[1]) ** 2)
    return (labels == labels[ys[i], xs[i]]).astype(np.float32)


def _defect_stain(rng: np.random.Generator, prod: Product, sev: float) -> tuple[np.ndarray, np.ndarray]:
    size = prod.image.shape[0]
    radius = rng.uniform(0.1, 0.17) * size
    c = _pick_point(rng, prod.object_mask, 0.6 * radius)
    blob = _soft_blob(rng, size, c, radius, 0.25)
    tints = [(1.0, 0.55, 0.2), (0.95, 0.75, 0.3), (0.55, 0.8, 0.35), (0.5, 0.55, 1.0), (1.0, 0.4, 0.5)]
    tint = np.asarray(tints[rng.integers(len(tints))], np.float32)
    ring = 0.35 * np.exp(-(((blob - 0.08) / 0.06) ** 2))  # a darker tide line at the rim
    opacity = 0.55 + 0.4 * sev
    alpha = np.clip(blob * 3.0, 0, 1) * opacity
    lum = prod.image.mean(2, keepdims=True)
    effect = (0.35 + 0.75 * lum) * tint * (1 - ring[..., None])
    alpha = np.where(alpha > 0.08, alpha, 0).astype(np.float32)
    return alpha, np.clip(effect, 0, 1).astype(np.float32)


def _defect_missing(rng: np.random.Generator, prod: Product, sev: float) -> tuple[np.ndarray, np.ndarray]:
    size = prod.image.shape[0]
    s = _scale(size)
    radius = rng.uniform(0.09, 0.15) * size * (0.8 + 0.4 * sev)
    part = not prod.object_mask.all()
    if part:
        c = _pick_point(rng, prod.object_mask, 0, boundary=True)
    else:
        c = _pick_point(rng, prod.object_mask, 1.1 * radius)
    poly = _blob_polygon(rng, c, radius, 0.35, int(rng.integers(7, 12)))
    cover = _fill_poly(size, [poly])
    # the revealed background, with a shadow cast by the broken edge (light at top-left)
    inner = cv2.GaussianBlur(cover, (0, 0), 1.5 * s)
    shift = int(round(2 * s)) + 1
    cast = np.roll(np.roll(inner, shift, 0), shift, 1)
    shadow = 1 - 0.6 * np.clip(inner - cast + (1 - inner), 0, 1) * (not part)
    effect = prod.background * shadow[..., None]
    if not part:  # torn sheet: a thin bright broken rim on the lit side
        rim = np.clip(_slope_shade(inner) * 3.0, 0, 1)
        effect = effect + 0.35 * rim[..., None]
    alpha = np.where(cover > 0.5, 1.0, 0.0).astype(np.float32)
    return alpha, np.clip(effect, 0, 1).astype(np.float32)


def _defect_dent(rng: np.random.Generator, prod: Product, sev: float) -> tuple[np.ndarray, np.ndarray]:
    size = prod.image.shape[0]
    radius = rng.uniform(0.09, 0.15) * size
    c = _pick_point(rng, prod.object_mask, 0.8 * radius)
    y, x = _grid(size)
    ex, ang = rng.uniform(0.7, 1.4), rng.uniform(0, np.pi)
    dx, dy = x - c[0], y - c[1]
    u = (dx * np.cos(ang) + dy * np.sin(ang)) * ex
    v = (-dx * np.sin(ang) + dy * np.cos(ang)) / ex
    q = (u**2 + v**2) / radius**2
    sign = -1.0 if rng.random() < 0.7 else 1.0  # dent, sometimes a bump
    height = sign * np.exp(-3.0 * q) * radius * (0.2 + 0.3 * sev)
    shade = _slope_shade(height)
    effect = prod.image * (1 + 1.2 * shade[..., None]) + 0.15 * np.clip(shade, 0, 1)[..., None]
    alpha = (q < 1.0).astype(np.float32)
    return alpha, np.clip(effect, 0, 1).astype(np.float32)


def _defect_contamination(rng: np.random.Generator, prod: Product, sev: float) -> tuple[np.ndarray, np.ndarray]:
    size = prod.image.shape[0]
    s = _scale(size)
    spread = rng.uniform(0.05, 0.1) * size
    c = _pick_point(rng, prod.object_mask, spread)
    n = int(rng.integers(12, 40))
    pos = c + rng.normal(0, spread, (n, 2)).astype(np.float32)
    big = np.zeros((size * SUPERSAMPLE, size * SUPERSAMPLE), np.uint8)
    for p, r in zip(pos, rng.uniform(0.6, 1.8, n) * s):
        cc = tuple(int(v) for v in np.round((p + 0.5) * SUPERSAMPLE - 0.5))
        cv2.circle(big, cc, max(1, int(round(r * SUPERSAMPLE))), 255, -1)
    alpha = cv2.resize(big, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    dark = bool(rng.random() < 0.7)
    colour = np.array([0.05, 0.04, 0.03] if dark else [0.95, 0.94, 0.9], np.float32)
    effect = np.broadcast_to(colour, prod.image.shape) * (0.8 + 0.2 * sev)
    return np.clip(alpha * 1.5, 0, 1), np.ascontiguousarray(effect, dtype=np.float32)


def _defect_burn(rng: np.random.Generator, prod: Product, sev: float) -> tuple[np.ndarray, np.ndarray]:
    size = prod.image.shape[0]
    radius = rng.uniform(0.1, 0.16) * size
    c = _pick_point(rng, prod.object_mask, 0.6 * radius)
    blob = _soft_blob(rng, size, c, radius, 0.2)
    char = 0.5 + 0.5 * _fractal_noise(rng, (size, size), 4 * _scale(size), 3)
    t = np.clip(blob * 1.6 + 0.2 * (char - 0.5), 0, 1)[..., None]  # 0 halo .. 1 core
    halo = np.array([0.55, 0.32, 0.12], np.float32)
    core = np.array([0.04, 0.03, 0.025], np.float32)
    lum = prod.image.mean(2, keepdims=True)
    effect = (halo * (0.6 + 0.6 * lum)) * (1 - t) + core * (0.5 + char[..., None]) * t
    alpha = np.clip(blob * 4.0, 0, 1) * (0.7 + 0.3 * sev)
    alpha = np.where(alpha > 0.08, alpha, 0).astype(np.float32)
    return alpha, np.clip(effect, 0, 1).astype(np.float32)


def _defect_fold(rng: np.random.Generator, prod: Product, sev: float) -> tuple[np.ndarray, np.ndarray]:
    size = prod.image.shape[0]
    s = _scale(size)
    y, x = _grid(size)
    c = _pick_point(rng, prod.object_mask, 0.1 * size)
    ang = rng.uniform(0, np.pi)
    d = np.array([np.cos(ang), np.sin(ang)], np.float32)
    along = (x - c[0]) * d[0] + (y - c[1]) * d[1]
    across = -(x - c[0]) * d[1] + (y - c[1]) * d[0]
    width = rng.uniform(2.0, 3.5) * s
    half_len = rng.uniform(0.3, 0.5) * size
    taper = np.clip((half_len - np.abs(along)) / (0.15 * half_len), 0, 1)
    height = np.exp(-((across / width) ** 2)) * width * (0.35 + 0.45 * sev) * taper
    shade = _slope_shade(height)
    effect = prod.image * (1 + 0.9 * shade[..., None]) * (1 - (0.15 + 0.1 * sev) * taper * np.exp(-((across / width) ** 2)))[..., None]
    alpha = ((np.abs(across) < 1.5 * width) & (taper > 0.1)).astype(np.float32)
    return alpha, np.clip(effect, 0, 1).astype(np.float32)


_DEFECTS: dict[str, Callable[[np.random.Generator, Product, float], tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _defect_scratch,
    "hole": _defect_hole,
    "crack": _defect_crack,
    "stain": _defect_stain,
    "missing": _defect_missing,
    "dent": _defect_dent,
    "contamination": _defect_contamination,
    "burn": _defect_burn,
    "fold": _defect_fold,
}


def _apply_defect(
    rng: np.random.Generator, prod: Product, family: str, sev: float
) -> tuple[np.ndarray, np.ndarray]:
    """(image float (S, S, 3), mask bool (S, S)); the image differs from the clean one
    only inside the mask, and the mask lies on the product."""
    size = prod.image.shape[0]
    min_area = MIN_DEFECT_AREA * size * size
    for _ in range(DEFECT_TRIES):
        alpha, effect = _DEFECTS[family](rng, prod, sev)
        mask = (alpha >= ALPHA_MIN) & prod.object_mask
        if mask.sum() >= min_area:
            break
    a = np.where(mask, alpha, 0)[..., None]
    return prod.image * (1 - a) + effect * a, mask


# --------------------------------------------------------------------------- anomaly maps


def _anomaly_map(
    rng: np.random.Generator,
    clean: np.ndarray,
    object_mask: np.ndarray,
    gt: np.ndarray,
    severity: float,
    map_size: int,
) -> np.ndarray:
    """A detector-like map (map_size, map_size) float32 in [0, 1].

    Smooth background noise, a faint response to product edges, random false-positive
    blobs (more often on normal images) and, for a defect, the blurred mask scaled by a
    peak that grows with severity.
    """
    m = map_size
    ms = m / REF_SIZE
    shape = (m, m)
    out = rng.uniform(0.06, 0.14) + 0.05 * np.abs(_fractal_noise(rng, shape, m / 5, 3))
    gray = cv2.resize(clean.mean(2).astype(np.float32), shape, interpolation=cv2.INTER_AREA)
    gx, gy = cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1)
    edges = cv2.GaussianBlur(np.hypot(gx, gy), (0, 0), 1.5 * ms + 0.5)
    out += rng.uniform(0.02, 0.08) * edges / (edges.max() + 1e-6)
    y, x = _grid(m)
    defective = bool(gt.any())
    n_fp = int(rng.poisson(0.5 if defective else 0.9))
    obj = cv2.resize(object_mask.astype(np.uint8), shape, interpolation=cv2.INTER_NEAREST).astype(bool)
    ys, xs = np.nonzero(obj) if obj.any() else np.nonzero(np.ones(shape, bool))
    for _ in range(n_fp):
        i = rng.integers(len(ys))
        sigma = rng.uniform(0.02, 0.06) * m
        amp = rng.uniform(0.45, 0.85) if rng.random() < 0.15 else rng.uniform(0.08, 0.4)
        out += amp * np.exp(-((x - xs[i]) ** 2 + (y - ys[i]) ** 2) / (2 * sigma**2))
    if defective:
        g = cv2.resize(gt.astype(np.float32), shape, interpolation=cv2.INTER_AREA)
        g = cv2.GaussianBlur(g, (0, 0), max(0.8, 0.018 * m))
        g = g / (g.max() + 1e-6)
        g = g**0.7 * (0.85 + 0.15 * _smooth_noise(rng, shape, m / 8).clip(-1, 1))
        peak = 0.3 + 0.6 * severity + rng.normal(0, 0.05)
        out += max(peak, 0.15) * g
    out = cv2.GaussianBlur(out.astype(np.float32), (0, 0), 0.6 * ms + 0.3)
    return np.clip(out, 0, 1).astype(np.float32)


# --------------------------------------------------------------------------- samples


def _check_size(size: int) -> None:
    if size < MIN_SIZE:
        raise ValueError(f"image size must be at least {MIN_SIZE}, got {size}")


def _map_side(size: int, map_scale: float) -> int:
    if not 0 < map_scale <= 1:
        raise ValueError(f"map_scale must be in (0, 1], got {map_scale}")
    return max(8, int(round(size * map_scale)))


def generate_sample(
    rng: np.random.Generator,
    category: str,
    family: str | None,
    size: int = 128,
    map_scale: float = 1.0,
) -> Sample:
    """One image of ``category`` with a ``family`` defect (``None``: a normal image).

    Draws, in order: the clean product (``render_product``), the defect, the map.
    """
    if family is not None and family not in _DEFECTS:
        raise ValueError(f"unknown defect family {family!r}; expected one of {ALL_FAMILIES}")
    prod = render_product(rng, category, size)
    m = _map_side(size, map_scale)
    if family is None:
        image, mask, severity = prod.image, np.zeros((size, size), bool), 0.0
    else:
        severity = float(rng.uniform(0.2, 1.0))
        image, mask = _apply_defect(rng, prod, family, severity)
    amap = _anomaly_map(rng, prod.image, prod.object_mask, mask, severity, m)
    return Sample(
        image=np.round(np.clip(image, 0, 1) * 255).astype(np.uint8),
        gt_mask=mask.astype(np.uint8) * 255,
        anomaly_map=amap,
        category=category,
        family=NORMAL_TYPE if family is None else family,
        severity=severity,
    )


def sample_rng(seed: int, category: str, type_: str, index: int) -> np.random.Generator:
    """The generator of one image, keyed by its name so that order and parallelism,
    and the other categories or families in a spec, never change it."""
    key = (seed, zlib.crc32(category.encode()), zlib.crc32(type_.encode()), index)
    return np.random.default_rng(np.random.SeedSequence(key))


def _jobs(spec: SyntheticSpec) -> Iterator[tuple[str, str, int]]:
    for cat in spec.categories:
        for fam in spec.families:
            for i in range(spec.images_per_family):
                yield cat, fam, i
        for i in range(spec.normal_images):
            yield cat, NORMAL_TYPE, i


def _validate(spec: SyntheticSpec) -> None:
    for cat in spec.categories:
        if cat not in _PRODUCTS:
            raise ValueError(f"unknown category {cat!r}; expected one of {CATEGORIES}")
    for fam in spec.families:
        if fam not in _DEFECTS:
            raise ValueError(f"unknown defect family {fam!r}; expected one of {ALL_FAMILIES}")
    if len(set(spec.families)) != len(spec.families) or len(set(spec.categories)) != len(spec.categories):
        raise ValueError("categories and families must not repeat")
    if spec.images_per_family < 0 or spec.normal_images < 0:
        raise ValueError("image counts must be non-negative")
    _check_size(spec.image_size)
    _map_side(spec.image_size, spec.map_scale)


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def generate_dataset(spec: SyntheticSpec, workers: int | None = None) -> list[Record]:
    """All samples of ``spec`` in memory, in layout order (categories, families, good).

    Args:
        workers: threads (OpenCV and NumPy release the GIL); None: one per core, max 8.
    """
    _validate(spec)
    jobs = list(_jobs(spec))

    def make(job: tuple[str, str, int]) -> Record:
        cat, typ, i = job
        fam = None if typ == NORMAL_TYPE else typ
        s = generate_sample(sample_rng(spec.seed, cat, typ, i), cat, fam, spec.image_size, spec.map_scale)
        return Record(cat, typ, f"{typ}_{i:03d}", s)

    n = workers or _default_workers()
    if n == 1 or len(jobs) < 2:
        return [make(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(make, jobs))


def normalise_maps(maps: list[np.ndarray]) -> list[np.ndarray]:
    """Joint min-max to uint8 0..255 over a group of maps (one category), as the
    AnomalyNCD README helper does; a constant group maps to 0."""
    if not maps:
        return []
    lo = min(float(m.min()) for m in maps)
    hi = max(float(m.max()) for m in maps)
    span = hi - lo
    return [
        np.round((m - lo) / span * 255).astype(np.uint8) if span > 0 else np.zeros(m.shape, np.uint8)
        for m in maps
    ]


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = array[..., ::-1] if array.ndim == 3 else array  # RGB -> OpenCV's BGR
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(data))
    if not ok:
        raise OSError(f"could not encode {path}")
    path.write_bytes(buf.tobytes())


def _write_records(root: Path, records: list[Record], workers: int | None) -> None:
    by_cat: dict[str, list[Record]] = {}
    for r in records:
        by_cat.setdefault(r.category, []).append(r)
    tasks: list[tuple[Path, np.ndarray]] = []
    for cat, recs in by_cat.items():
        maps8 = normalise_maps([r.sample.anomaly_map for r in recs])
        for r, m8 in zip(recs, maps8):
            rel = Path(cat) / r.type / f"{r.name}.png"
            tasks += [
                (root / "images" / rel, r.sample.image),
                (root / "maps" / rel, m8),
                (root / "masks" / rel, r.sample.gt_mask),
            ]
    n = workers or _default_workers()
    with ThreadPoolExecutor(max_workers=n) as pool:
        list(pool.map(lambda t: _write_png(*t), tasks))


def write_dataset(root: str | Path, spec: SyntheticSpec = SyntheticSpec(), workers: int | None = None) -> Path:
    """Write ``spec`` in the generic layout under ``root`` and return ``root``.

    ``<root>/images/<category>/<type>/<type>_<index:03d>.png`` (RGB),
    ``<root>/maps/...`` (8-bit maps, min-max normalised jointly per category) and
    ``<root>/masks/...`` (gt, 0/255); normal images under ``good``. Same spec, same bytes.
    """
    root = Path(root)
    _write_records(root, generate_dataset(spec, workers), workers)
    return root


def write_base_set(
    root: str | Path,
    spec: SyntheticSpec = BASE_SPEC,
    category: str = "base",
    workers: int | None = None,
) -> Path:
    """Write a labelled base set under ``root`` in the generic layout, one category.

    Products cycle over ``spec.categories`` and families are ``spec.families``
    (``BASE_FAMILIES`` by default), so the base classes are product-independent defect
    types: ``<root>/{images,maps,masks}/<category>/<family>/<family>_<index:03d>.png``.
    Raises ValueError if a family is also a target family.
    """
    overlap = set(spec.families) & set(TARGET_FAMILIES)
    if overlap:
        raise ValueError(f"base families must be disjoint from the target ones: {sorted(overlap)}")
    _validate(spec)
    jobs = [
        (spec.categories[i % len(spec.categories)], fam, i)
        for fam in spec.families
        for i in range(spec.images_per_family)
    ]
    jobs += [(spec.categories[i % len(spec.categories)], NORMAL_TYPE, i) for i in range(spec.normal_images)]

    def make(job: tuple[str, str, int]) -> Record:
        prod_cat, typ, i = job
        fam = None if typ == NORMAL_TYPE else typ
        s = generate_sample(sample_rng(spec.seed, category, typ, i), prod_cat, fam, spec.image_size, spec.map_scale)
        return Record(category, typ, f"{typ}_{i:03d}", s)

    n = workers or _default_workers()
    with ThreadPoolExecutor(max_workers=n) as pool:
        records = list(pool.map(make, jobs))
    root = Path(root)
    _write_records(root, records, workers)
    return root
