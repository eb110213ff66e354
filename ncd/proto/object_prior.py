"""Object prior for ProtoAnomalyNCD: which pixels belong to the product (PROTO.md item 1).

The paper segments the product with Grounded SAM. ncd makes the source pluggable
(``proto.object_prior``, ncd's reading):

- ``folder``: ``<proto.object_masks>/<category>/<type>/<stem>.png`` (the images' relative
  layout, i.e. ``<root>/<image_id>.png``), made by any segmenter;
- ``column``: the manifest column ``object_mask_uri`` (local path or ``s3://``);
- ``auto``: :func:`estimate_object_mask`, a label-free classical estimate for plain
  parts on a plain background;
- ``none``: every pixel is object (textures such as MTD).

Masks are uint8 0/255 at the image size. :func:`crop_object_mask` and
:func:`crop_anomaly_map` cut them with a region's box, padding with 0 outside the
image exactly like the region crops (``ncd.preprocess.crops``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from ncd.config import ProtoConfig, S3Config
from ncd.data import io
from ncd.data.io import DataError
from ncd.preprocess.crops import padded_crop

OBJECT_PRIORS = ("none", "folder", "column", "auto")
OBJECT_MASK_COLUMN = "object_mask_uri"
OBJECT_MASK_EXTENSION = ".png"
MASK_ON = 255
LABEL_MASK_MAX = 1  # a mask whose maximum is <= 1 is a 0/1 label image
SOFT_MASK_THRESHOLD = 128  # otherwise pixels >= this (of 255) are object

# estimate_object_mask: our reading of a classical foreground for plain parts
WORK_SIDE = 256  # the estimate runs on a copy whose longer side is at most this
BLUR_SIGMA_RATIO = 0.01  # Gaussian blur sigma, as a fraction of the longer side
BORDER_RATIO = 0.03  # width of the border band that models the background colour
BORDER_NOISE_PERCENTILE = 95.0  # the background's spread: this percentile of border distances
MIN_CONTRAST = 2.0  # object pixels must lie this many border spreads from the background colour
MIN_COLOUR_DISTANCE = 8.0  # ... and at least this far (Lab units) for the estimate to be trusted
MORPH_RATIO = 0.01  # open/close kernel, as a fraction of the longer side
KEEP_COMPONENT_RATIO = 0.1  # keep components of at least this fraction of the largest one
MIN_OBJECT_FRACTION = 0.005  # below this foreground share the estimate falls back to "all object"


def object_mask_uri(image_id: str, root: str) -> str:
    """``<root>/<image_id>.png`` (image_id is ``<category>/<type>/<stem>``)."""
    return io.join(root, image_id + OBJECT_MASK_EXTENSION)


def decode_object_mask(data: bytes, uri: str, shape_hw: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W) uint8 0/255 from PNG (or any OpenCV image) bytes.

    Colour images are converted to gray; a mask with maximum <= 1 is a 0/1 label image,
    otherwise pixels >= 128 are object (soft masks, 0/255 masks).

    Raises:
        DataError: undecodable data, or a size other than ``shape_hw`` (names ``uri``).
    """
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE) if data else None
    if arr is None:
        raise DataError(f"corrupt or unreadable object mask: {uri}")
    if shape_hw is not None and arr.shape[:2] != tuple(shape_hw):
        raise DataError(f"object mask {uri} is {arr.shape[1]}x{arr.shape[0]} but its image is "
                        f"{shape_hw[1]}x{shape_hw[0]}")
    on = arr > 0 if int(arr.max(initial=0)) <= LABEL_MASK_MAX else arr >= SOFT_MASK_THRESHOLD
    return np.where(on, MASK_ON, 0).astype(np.uint8)


def load_object_mask(uri: str, shape_hw: tuple[int, int] | None = None, s3: S3Config | None = None) -> np.ndarray:
    """Read one object mask (local or ``s3://``): (H, W) uint8 0/255.

    Raises:
        DataError: the file is missing, unreadable or mis-sized (names ``uri``).
    """
    if not uri:
        raise DataError("empty object mask URI")
    try:
        data = io.read_bytes(uri, s3)
    except FileNotFoundError:
        raise DataError(f"object mask not found: {uri}") from None
    return decode_object_mask(data, uri, shape_hw)


def full_object_mask(shape_hw: tuple[int, int]) -> np.ndarray:
    """The ``none`` prior: (H, W) uint8 all 255."""
    return np.full(tuple(shape_hw), MASK_ON, np.uint8)


def _uri_of(row: Mapping[str, Any], cfg: ProtoConfig) -> str:
    if cfg.object_prior == "folder":
        if not cfg.object_masks:
            raise DataError("proto.object_prior=folder needs proto.object_masks (the masks' root)")
        return object_mask_uri(str(row["image_id"]), cfg.object_masks)
    uri = row.get(OBJECT_MASK_COLUMN) or ""
    if not uri:
        raise DataError(f"proto.object_prior=column but image {row.get('image_id', '?')} has no "
                        f"{OBJECT_MASK_COLUMN}")
    return str(uri)


def object_mask(row: Mapping[str, Any], image: np.ndarray, cfg: ProtoConfig,
                s3: S3Config | None = None) -> np.ndarray:
    """The object mask of one manifest row under ``cfg.object_prior``: (H, W) uint8 0/255.

    Args:
        row: manifest row (``image_id``; ``object_mask_uri`` for ``column``).
        image: (H, W, 3) RGB uint8, the row's image (its size; ``auto`` segments it).
        cfg: ``object_prior`` and ``object_masks``.
    """
    shape = image.shape[:2]
    if cfg.object_prior == "none":
        return full_object_mask(shape)
    if cfg.object_prior == "auto":
        return estimate_object_mask(image)
    if cfg.object_prior in ("folder", "column"):
        return load_object_mask(_uri_of(row, cfg), shape, s3)
    raise ValueError(f"proto.object_prior must be one of {OBJECT_PRIORS}, got {cfg.object_prior!r}")


def load_object_masks(rows: Sequence[Mapping[str, Any]], cfg: ProtoConfig,
                      shapes: Sequence[tuple[int, int]] | None = None,
                      s3: S3Config | None = None) -> list[np.ndarray]:
    """Object masks of manifest rows from a folder or the ``object_mask_uri`` column.

    Args:
        rows: manifest rows.
        cfg: ``object_prior`` in (``folder``, ``column``, ``none``); ``auto`` needs the
            images (use :func:`object_mask` per image).
        shapes: (H, W) of each row's image: masks of another size are errors; None
            skips the check (required for ``none``).

    Raises:
        DataError: a mask is missing, unreadable or mis-sized (names the file).
    """
    if shapes is not None and len(shapes) != len(rows):
        raise ValueError(f"{len(shapes)} shapes for {len(rows)} rows")
    if cfg.object_prior == "none":
        if shapes is None:
            raise ValueError("proto.object_prior=none: pass the image shapes")
        return [full_object_mask(s) for s in shapes]
    if cfg.object_prior not in ("folder", "column"):
        raise ValueError(f"load_object_masks reads folder or column masks, not {cfg.object_prior!r}")
    return [load_object_mask(_uri_of(r, cfg), shapes[i] if shapes is not None else None, s3)
            for i, r in enumerate(rows)]


def _largest_components(fg: np.ndarray) -> np.ndarray:
    """Components of ``fg`` (bool) at least KEEP_COMPONENT_RATIO of the largest one's area."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(fg)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.flatnonzero(areas >= KEEP_COMPONENT_RATIO * areas.max()) + 1
    return np.isin(labels, keep)


def _fill_holes(fg: np.ndarray) -> np.ndarray:
    """``fg`` (bool) with every background region that does not touch the border filled."""
    n, labels = cv2.connectedComponents((~fg).astype(np.uint8), connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = np.isin(labels, border[border > 0]) & ~fg
    return ~outside


def estimate_object_mask(image: np.ndarray) -> np.ndarray:
    """Label-free foreground of a plain part on a plain background: (H, W) uint8 0/255.

    ncd's reading of "a classical OpenCV foreground" (PROTO.md), not the paper's method:

    1. work on a copy with the longer side <= 256, Gaussian-blurred, in CIE Lab;
    2. background colour = the median of a border band (3 % of the side); each pixel's
       distance to it; the background's spread = the 95th percentile of the border
       band's distances;
    3. Otsu's threshold on the distances, raised to at least 2 spreads;
    4. open + close, keep the components of at least 10 % of the largest one, fill
       holes (background not connected to the border);
    5. back to the image size (nearest).

    Falls back to "all object" (a crop is then guided by the anomaly map alone) when the
    estimate is not trustworthy: a uniform image, object pixels closer than 8 Lab units
    to the background colour (textures, busy backgrounds), or less than 0.5 % of the image.

    Args:
        image: (H, W, 3) RGB uint8.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"estimate_object_mask expects an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    scale = min(1.0, WORK_SIDE / max(h, w))
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    small = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA) if scale < 1.0 else image
    side = max(sh, sw)
    small = cv2.GaussianBlur(small, (0, 0), sigmaX=max(1.0, BLUR_SIGMA_RATIO * side))
    lab = cv2.cvtColor(small, cv2.COLOR_RGB2LAB).astype(np.float32)
    band = max(1, round(BORDER_RATIO * side))
    border = np.zeros((sh, sw), bool)
    border[:band], border[-band:], border[:, :band], border[:, -band:] = True, True, True, True
    background = np.median(lab[border], axis=0)
    dist = np.linalg.norm(lab - background, axis=-1)
    if float(dist.max()) < MIN_COLOUR_DISTANCE:
        return full_object_mask((h, w))
    spread = float(np.percentile(dist[border], BORDER_NOISE_PERCENTILE))
    d8 = np.clip(dist / dist.max() * 255.0, 0, 255).astype(np.uint8)
    otsu, _ = cv2.threshold(d8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = max(otsu / 255.0 * float(dist.max()), MIN_CONTRAST * spread)
    fg = dist > threshold
    k = max(1, round(MORPH_RATIO * side)) * 2 + 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    fg8 = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_OPEN, kernel)
    fg8 = cv2.morphologyEx(fg8, cv2.MORPH_CLOSE, kernel)
    fg = _fill_holes(_largest_components(fg8 > 0))
    if fg.mean() < MIN_OBJECT_FRACTION or float(np.median(dist[fg])) < MIN_COLOUR_DISTANCE:
        return full_object_mask((h, w))
    mask = np.where(fg, MASK_ON, 0).astype(np.uint8)
    return cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST) if mask.shape != (h, w) else mask


def crop_box(array: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """``array[y0:y1, x0:x1]`` for box (x0, y0, x1, y1), zeros where the box leaves the array."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return padded_crop(array, (x0, y0, x1, y1))


def crop_object_mask(mask: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """The object mask (H, W) uint8 cut with a region's integer box (x0, y0, x1, y1), 0 outside.

    The same geometry as the region's crop (``Region.box`` / the region table's ``box``).
    """
    if mask.ndim != 2:
        raise ValueError(f"object mask must be (H, W), got {mask.shape}")
    return crop_box(mask, box)


def crop_anomaly_map(score_map: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """The normalised anomaly map (H, W, 0-255 scale, float) cut with a region's box: uint8.

    Values are rounded and clipped to 0..255 (the bicubic resize can overshoot); 0 outside
    the image. Divided by 255 it is the ``a`` of the Region Guidance Factor.
    """
    if score_map.ndim != 2:
        raise ValueError(f"anomaly map must be (H, W), got {score_map.shape}")
    u8 = np.clip(np.rint(score_map.astype(np.float32)), 0, 255).astype(np.uint8)
    return crop_box(u8, box)
