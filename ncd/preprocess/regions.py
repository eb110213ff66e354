"""Preprocessing: MEBin + anomaly-centred crops for every image of a manifest.

Two explicit passes, the same in one process and on Ray Data:
1. ``map_statistics`` per image, reduced by ``category_ranges`` to one
   ``CategoryRange`` per category (the MEBin search range needs every peak first);
2. ``process_image`` per image, given its category's range, returns region rows.

On storage (``ncd.data.region_table``) the region table is one folder per category with a
completion record, so a re-run recomputes only the categories whose images or settings
changed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import cv2
import numpy as np
import pyarrow as pa

from ncd.config import CropConfig, DataConfig, MebinConfig, ProtoConfig, S3Config
from ncd.data import io
from ncd.data.io import DataError
from ncd.preprocess.crops import crop_regions, mask_to_image_size, score_map_to_image_size
from ncd.preprocess.mebin import binarize, normalize, peak_outliers, search_range
from ncd.proto.object_prior import crop_anomaly_map, crop_object_mask, object_mask

log = logging.getLogger(__name__)

UINT8_MAX = 255
REGION_SCHEMA = pa.schema([
    ("region_id", pa.string()),
    ("image_id", pa.string()),
    ("region_index", pa.int32()),
    ("category", pa.string()),
    ("gt_type", pa.string()),
    ("crop_png", pa.binary()),
    ("mask_png", pa.binary()),
    ("anomaly_png", pa.binary()),  # normalised anomaly map in the box, 8-bit (ProtoAnomalyNCD guidance)
    ("object_png", pa.binary()),  # object prior in the box (empty without one)
    ("box", pa.list_(pa.int32(), 4)),
    ("area", pa.int64()),
    ("score", pa.float64()),
    ("est_count", pa.int32()),
    ("threshold", pa.int32()),
    ("image_uri", pa.string()),
    ("map_uri", pa.string()),
])
STATS_SCHEMA = pa.schema([
    ("category", pa.string()),
    ("image_id", pa.string()),
    ("lo", pa.float64()),
    ("hi", pa.float64()),
    ("peak", pa.float64()),
    ("is_uint8", pa.bool_()),
])

@dataclass(frozen=True)
class CategoryRange:
    """Per-category statistics that pass 2 needs.

    ``scale_lo``/``scale_hi`` map non-8-bit maps jointly onto 0..255 (as AnomalyNCD's
    README helper does for a whole run); ``min_th``/``max_th`` are MEBin's search range
    on that 8-bit scale. ``outliers`` lists the maps whose peak is an outlier among the
    category's peaks (``mebin.peak_outliers``) as ``(image_id, peak)``, in the map's own
    scale; with ``mebin.exclude_outliers`` (``excluded``) they do not set the range.
    """

    is_uint8: bool
    scale_lo: float
    scale_hi: float
    min_th: int
    max_th: int
    median_peak: float = float("nan")
    outliers: tuple[tuple[str, float], ...] = ()
    excluded: bool = False

def to_uint8(values: np.ndarray | float, lo: float, hi: float) -> np.ndarray:
    """Map ``[lo, hi]`` onto 0..255 (rounded, clipped); a zero span gives 0."""
    arr = np.asarray(values, dtype=np.float64)
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.clip(np.floor((arr - lo) / (hi - lo) * UINT8_MAX + 0.5), 0, UINT8_MAX).astype(np.uint8)

def map_statistics(anomaly_map: np.ndarray) -> dict[str, Any]:
    """Pass-1 statistics of one map: its value range, peak and whether it is 8-bit."""
    return dict(lo=float(anomaly_map.min()), hi=float(anomaly_map.max()),
                peak=float(anomaly_map.max()), is_uint8=anomaly_map.dtype == np.uint8)

def reduce_range(is_uint8: bool, lo: float, peaks: Mapping[str, float], cfg: MebinConfig) -> CategoryRange:
    """One category's range from its maps' lowest value ``lo`` and their peaks by image id
    (a map's peak is its highest value); outlier peaks are flagged and, with
    ``cfg.exclude_outliers``, left out of the range (and of a non-8-bit map's scale)."""
    ids = sorted(peaks)
    values = [float(peaks[i]) for i in ids]
    outliers = tuple((ids[j], values[j]) for j in peak_outliers(values))
    flagged = {i for i, _ in outliers}
    kept = [v for i, v in zip(ids, values) if not (cfg.exclude_outliers and i in flagged)]
    min_peak, max_peak = min(kept), max(kept)
    if is_uint8:
        scale_lo, scale_hi = 0.0, float(UINT8_MAX)
        ends = [int(min_peak), int(max_peak)]
    else:
        scale_lo, scale_hi = lo, max_peak
        ends = [int(to_uint8(min_peak, lo, max_peak)), int(to_uint8(max_peak, lo, max_peak))]
    min_th, max_th = search_range(ends, cfg)
    return CategoryRange(is_uint8, scale_lo, scale_hi, int(min_th), int(max_th), float(np.median(values)),
                         outliers, bool(cfg.exclude_outliers and outliers))

def category_ranges(stats: Iterable[Mapping[str, Any]], cfg: MebinConfig) -> dict[str, CategoryRange]:
    """Reduce per-image statistics (rows with category, image_id, lo, peak, is_uint8) per category."""
    acc: dict[str, list] = {}
    for s in stats:
        a = acc.setdefault(s["category"], [True, np.inf, {}])
        a[0] = a[0] and bool(s["is_uint8"])
        a[1] = min(a[1], s["lo"])
        a[2][s["image_id"]] = s["peak"]
    return {c: reduce_range(*a, cfg) for c, a in acc.items()}

def map_as_uint8(anomaly_map: np.ndarray, rng: CategoryRange) -> np.ndarray:
    if anomaly_map.dtype == np.uint8 and rng.is_uint8:
        return anomaly_map
    return to_uint8(anomaly_map, rng.scale_lo, rng.scale_hi)

def _check_sizes(image: np.ndarray, amap: np.ndarray, row: Mapping[str, Any], data: DataConfig) -> None:
    (h, w), (mh, mw) = image.shape[:2], amap.shape
    if (h, w) == (mh, mw):
        return
    if data.map_size_policy == "error":
        raise DataError(f"anomaly map {row['map_uri']} is {mw}x{mh} but image {row['image_uri']} is {w}x{h} "
                        f"(data.map_size_policy=error)")
    if abs((w / h) / (mw / mh) - 1.0) > data.max_aspect_mismatch:
        raise DataError(f"anomaly map {row['map_uri']} ({mw}x{mh}) and image {row['image_uri']} ({w}x{h}) "
                        f"differ in aspect ratio; they cannot be the same view")

def process_image(row: Mapping[str, Any], rng: CategoryRange, mebin: MebinConfig, crop: CropConfig,
                  data: DataConfig, s3: S3Config | None = None,
                  proto: ProtoConfig | None = None) -> list[dict[str, Any]]:
    """Pass 2 for one manifest row: MEBin on its map, then its region rows.

    The map is binarised at its own resolution; mask and normalised map are resized to
    the image (nearest / bicubic, METHOD.md 2.6 and 3.4) before cropping. Each region
    also keeps the normalised map in its box and, when ``proto`` names an object prior,
    the object mask in its box.
    """
    image = io.read_image(row["image_uri"], s3)
    amap = map_as_uint8(io.read_map(row["map_uri"], s3), rng)
    _check_sizes(image, amap, row, data)
    result = binarize(amap, rng.min_th, rng.max_th, mebin)
    shape = image.shape[:2]
    mask = mask_to_image_size(result.mask, shape)
    score_map = score_map_to_image_size(normalize(amap, rng.min_th, rng.max_th), shape)
    # an empty mask (a constant map, a map below the range) gives one whole-image crop with
    # an empty region: there is no defect to label, so it is dropped (discover counts them)
    regions = [r for r in crop_regions(image, mask, score_map, result.count, crop) if r.area > 0]
    objects = None
    if proto is not None and proto.object_prior != "none":
        objects = object_mask(row, image, proto, s3)
    rows = []
    for i, r in enumerate(regions):
        rows.append(dict(
            region_id=f"{row['image_id']}_crop{i}", image_id=row["image_id"], region_index=i,
            category=row["category"], gt_type=row.get("gt_type") or "",
            crop_png=io.encode_png(r.crop), mask_png=io.encode_png(r.mask),
            anomaly_png=io.encode_png(crop_anomaly_map(score_map, r.box)),
            object_png=io.encode_png(crop_object_mask(objects, r.box)) if objects is not None else b"",
            box=list(map(int, r.box)),
            area=int(r.area), score=float(r.score), est_count=int(result.count), threshold=int(result.threshold),
            image_uri=row["image_uri"], map_uri=row["map_uri"],
        ))
    return rows

def image_statistics(row: Mapping[str, Any], s3: S3Config | None = None) -> dict[str, Any]:
    """Pass 1 for one manifest row."""
    return dict(category=row["category"], image_id=row["image_id"], **map_statistics(io.read_map(row["map_uri"], s3)))

def regions_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Region rows as a table, sorted by region id (the canonical order)."""
    ordered = sorted(rows, key=lambda r: (r["image_id"], r["region_index"]))
    return pa.Table.from_pylist(list(ordered), schema=REGION_SCHEMA)

def check_categories(manifest: pa.Table) -> None:
    if manifest.num_rows == 0:
        raise DataError("the manifest holds no images")

def preprocess_manifest(manifest: pa.Table, mebin: MebinConfig, crop: CropConfig, data: DataConfig,
                        s3: S3Config | None = None,
                        progress: Callable[[str, int, int], None] | None = None,
                        proto: ProtoConfig | None = None) -> pa.Table:
    """Both passes in this process; returns the region table."""
    check_categories(manifest)
    rows = manifest.to_pylist()
    stats = []
    for i, r in enumerate(rows):
        stats.append(image_statistics(r, s3))
        if progress:
            progress("peaks", i + 1, len(rows))
    ranges = category_ranges(stats, mebin)
    out: list[dict[str, Any]] = []
    for i, r in enumerate(rows):
        out.extend(process_image(r, ranges[r["category"]], mebin, crop, data, s3, proto))
        if progress:
            progress("regions", i + 1, len(rows))
    return regions_table(out)

def decode_region(row: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(crop RGB uint8, mask uint8 0/255) of one region row."""
    crop = io.decode_image(row["crop_png"], row["region_id"])
    mask = cv2.imdecode(np.frombuffer(row["mask_png"], np.uint8), cv2.IMREAD_GRAYSCALE)
    return crop, mask
