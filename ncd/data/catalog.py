"""Catalog: turn a dataset layout into the manifest table.

Manifest columns: ``image_id`` (``<category>/<type>/<stem>``, unique), ``image_uri``,
``map_uri``, ``category``, ``gt_type`` (may be empty), ``gt_mask_uri`` (may be empty).

Images and maps are paired by category, type and file stem, never by sorted
position; an image without a map, or a map without an image, is an error naming it.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Callable

import pyarrow as pa

from ncd.config import DataConfig, S3Config
from ncd.data import io
from ncd.data.catalog_realiad import catalog_realiad
from ncd.data.io import DataError

log = logging.getLogger(__name__)

LAYOUTS = ("generic", "mvtec", "mtd", "realiad", "manifest")
MANIFEST_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("image_uri", pa.string()),
    ("map_uri", pa.string()),
    ("category", pa.string()),
    ("gt_type", pa.string()),
    ("gt_mask_uri", pa.string()),
])
MVTEC_SKIPPED_TYPES = ("combined",)
MTD_CATEGORY = "MTD"


def _stem(name: str) -> str:
    """File name without its extension (only the last one)."""
    base = name.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def _index_by_key(root: str, rels: list[str], key_of: Callable[[str], tuple[str, str, str] | None],
                  what: str) -> dict[tuple[str, str, str], str]:
    out: dict[tuple[str, str, str], str] = {}
    for rel in rels:
        key = key_of(rel)
        if key is None:
            continue
        if key in out:
            raise DataError(f"two {what} files share the stem {key[2]!r}: {io.join(root, out[key])} and "
                            f"{io.join(root, rel)}")
        out[key] = rel
    return out


def _generic_key(rel: str) -> tuple[str, str, str] | None:
    parts = rel.split("/")
    if len(parts) < 3:
        return None
    return parts[0], parts[1], "/".join(parts[2:-1] + [_stem(parts[-1])])


def _pair(images: dict, maps: dict, images_root: str, maps_root: str,
          categories: tuple[str, ...] = ()) -> list[tuple[tuple[str, str, str], str, str]]:
    if categories:  # unselected categories need no maps
        images = {k: v for k, v in images.items() if k[0] in categories}
        maps = {k: v for k, v in maps.items() if k[0] in categories}
    missing_maps = sorted(set(images) - set(maps))
    if missing_maps:
        k = missing_maps[0]
        raise DataError(f"no anomaly map for image {io.join(images_root, images[k])} "
                        f"(expected {io.join(maps_root, *k[:2], k[2])}.<png|npy|tiff>); "
                        f"{len(missing_maps)} image(s) lack a map")
    extra_maps = sorted(set(maps) - set(images))
    if extra_maps:
        k = extra_maps[0]
        raise DataError(f"no image for anomaly map {io.join(maps_root, maps[k])}; "
                        f"{len(extra_maps)} map(s) lack an image")
    return [(k, images[k], maps[k]) for k in sorted(images)]


def _rows_to_table(rows: list[dict]) -> pa.Table:
    if not rows:
        raise DataError("the dataset holds no images")
    rows.sort(key=lambda r: r["image_id"])
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def _select(rows: list[dict], categories: tuple[str, ...]) -> list[dict]:
    if not categories:
        return rows
    found = {r["category"] for r in rows}
    for c in categories:
        if c not in found:
            raise DataError(f"category {c!r} has no images; found: {', '.join(sorted(found)) or 'none'}")
    return [r for r in rows if r["category"] in categories]


def catalog_generic(root: str, maps_root: str = "", s3: S3Config | None = None,
                    categories: tuple[str, ...] = ()) -> list[dict]:
    """``<root>/images/<category>/<type>/<name>`` + ``<root>/maps/...`` (+ optional ``masks/``)."""
    images_root = io.join(root, "images")
    maps_root = maps_root or io.join(root, "maps")
    masks_root = io.join(root, "masks")
    images = _index_by_key(images_root, io.list_files(images_root, s3, io.IMAGE_EXTENSIONS), _generic_key, "image")
    maps = _index_by_key(maps_root, io.list_files(maps_root, s3, io.MAP_EXTENSIONS), _generic_key, "map")
    masks: dict = {}
    if io.is_dir(masks_root, s3):
        masks = _index_by_key(masks_root, io.list_files(masks_root, s3, io.IMAGE_EXTENSIONS), _generic_key, "mask")
    rows = []
    for (cat, typ, stem), img_rel, map_rel in _pair(images, maps, images_root, maps_root, categories):
        mask_rel = masks.get((cat, typ, stem))
        rows.append(dict(image_id=f"{cat}/{typ}/{stem}", image_uri=io.join(images_root, img_rel),
                         map_uri=io.join(maps_root, map_rel), category=cat, gt_type=typ,
                         gt_mask_uri=io.join(masks_root, mask_rel) if mask_rel else ""))
    return rows


def catalog_mvtec(root: str, maps_root: str, s3: S3Config | None = None) -> list[dict]:
    """MVTec AD: ``<root>/<category>/test/<type>/<name>.png``, gt in ``ground_truth/<type>/<name>_mask.png``.

    Maps: ``<maps>/<category>/<type>/<name>.<ext>`` (the upstream layout).
    """
    if not maps_root:
        raise DataError("data.maps is required for the mvtec layout (anomaly maps root)")

    def image_key(rel: str) -> tuple[str, str, str] | None:
        parts = rel.split("/")
        if len(parts) != 4 or parts[1] != "test" or parts[2] in MVTEC_SKIPPED_TYPES:
            return None
        return parts[0], parts[2], _stem(parts[3])

    def map_key(rel: str) -> tuple[str, str, str] | None:
        parts = rel.split("/")
        if len(parts) != 3 or parts[1] in MVTEC_SKIPPED_TYPES:
            return None
        return parts[0], parts[1], _stem(parts[2])

    all_files = io.list_files(root, s3, io.IMAGE_EXTENSIONS)
    images = _index_by_key(root, all_files, image_key, "image")
    map_rels = io.list_files(maps_root, s3, io.MAP_EXTENSIONS)
    categories = {k[0] for k in images}
    maps = {k: v for k, v in _index_by_key(maps_root, map_rels, map_key, "map").items() if k[0] in categories}
    gt = set(all_files)
    rows = []
    for (cat, typ, stem), img_rel, map_rel in _pair(images, maps, root, maps_root):
        mask_rel = f"{cat}/ground_truth/{typ}/{stem}_mask.png"
        rows.append(dict(image_id=f"{cat}/{typ}/{stem}", image_uri=io.join(root, img_rel),
                         map_uri=io.join(maps_root, map_rel), category=cat, gt_type=typ,
                         gt_mask_uri=io.join(root, mask_rel) if mask_rel in gt else ""))
    return rows


def _mtd_image_key(rel: str) -> tuple[str, str, str] | None:
    parts = rel.split("/")
    if len(parts) != 3 or parts[1] != "Imgs" or not rel.lower().endswith(".jpg"):
        return None
    return MTD_CATEGORY, parts[0], _stem(parts[2])


def catalog_mtd_images(root: str, s3: S3Config | None = None) -> list[dict]:
    """Images of an MTD-style folder, ``<root>/<Type>/Imgs/<name>.jpg`` with the gt mask
    ``<name>.png`` beside it (MTD as published names its types ``MT_<Type>``; any type name
    works, e.g. DeepPCB's), without maps: rows with ``image_id``, ``image_uri``, ``category``
    (always ``MTD``, the layout's), ``gt_type`` (the folder name), ``gt_mask_uri``."""
    files = io.list_files(root, s3, (".jpg", ".png"))
    present = set(files)
    images = _index_by_key(root, files, _mtd_image_key, "image")
    if not images:
        raise DataError(f"no <Type>/Imgs/<name>.jpg images under {root} (data.layout=mtd)")
    rows = []
    for (cat, typ, stem), rel in sorted(images.items()):
        mask_rel = f"{typ}/Imgs/{stem}.png"
        rows.append(dict(image_id=f"{cat}/{typ}/{stem}", image_uri=io.join(root, rel), category=cat, gt_type=typ,
                         gt_mask_uri=io.join(root, mask_rel) if mask_rel in present else ""))
    return rows


def catalog_mtd(root: str, maps_root: str, s3: S3Config | None = None) -> list[dict]:
    """An MTD-style folder (:func:`catalog_mtd_images`), one category ``MTD``; maps in
    ``<maps>/<Type>/<name>.<ext>`` or ``<maps>/MTD/<Type>/<name>.<ext>``."""
    if not maps_root:
        raise DataError("data.maps is required for the mtd layout (anomaly maps root)")
    rows = {(r["category"], r["gt_type"], r["image_id"].rsplit("/", 1)[1]): r for r in catalog_mtd_images(root, s3)}
    if io.is_dir(io.join(maps_root, MTD_CATEGORY), s3):
        maps_root = io.join(maps_root, MTD_CATEGORY)

    def map_key(rel: str) -> tuple[str, str, str] | None:
        parts = rel.split("/")
        return (MTD_CATEGORY, parts[0], _stem(parts[1])) if len(parts) == 2 else None

    maps = _index_by_key(maps_root, io.list_files(maps_root, s3, io.MAP_EXTENSIONS), map_key, "map")
    images = {k: r["image_uri"][len(root.rstrip("/")) + 1:] for k, r in rows.items()}
    return [dict(rows[k], map_uri=io.join(maps_root, map_rel)) for k, _, map_rel in _pair(images, maps, root, maps_root)]


def catalog_manifest(uri: str, s3: S3Config | None = None) -> list[dict]:
    """A user manifest (CSV or Parquet) with ``image_uri``, ``map_uri``, ``category`` and
    optional ``gt_type``, ``gt_mask_uri``, ``image_id``. Relative URIs are resolved against
    the manifest's folder."""
    table = io.read_table(uri, s3)
    required = ("image_uri", "map_uri", "category")
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise DataError(f"manifest {uri} lacks column(s) {', '.join(missing)}; "
                        f"required: {', '.join(required)}; optional: gt_type, gt_mask_uri, image_id")
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."

    def resolve(u: str) -> str:
        if not u:
            return ""
        return u if io.is_s3(u) or u.startswith("/") else io.join(base, u)

    rows = []
    seen: dict[str, int] = {}
    for i, r in enumerate(table.to_pylist()):
        for c in required:
            if not r.get(c):
                raise DataError(f"manifest {uri} row {i}: empty {c}")
        typ = str(r.get("gt_type") or "")
        image_uri = resolve(str(r["image_uri"]))
        image_id = str(r.get("image_id") or f"{r['category']}/{typ or 'unknown'}/{_stem(image_uri)}")
        if image_id in seen:
            raise DataError(f"manifest {uri} rows {seen[image_id]} and {i} share image id {image_id!r}")
        seen[image_id] = i
        rows.append(dict(image_id=image_id, image_uri=image_uri, map_uri=resolve(str(r["map_uri"])),
                         category=str(r["category"]), gt_type=typ, gt_mask_uri=resolve(str(r.get("gt_mask_uri") or ""))))
    return rows


def build_manifest(cfg: DataConfig, s3: S3Config | None = None) -> pa.Table:
    """The manifest table of the dataset ``cfg`` describes."""
    if cfg.layout not in LAYOUTS:
        raise DataError(f"unknown layout {cfg.layout!r} (data.layout); valid: {', '.join(LAYOUTS)}")
    if cfg.layout == "manifest":
        if not cfg.manifest:
            raise DataError("data.manifest is required for the manifest layout")
        rows = catalog_manifest(cfg.manifest, s3)
    else:
        if not cfg.root:
            raise DataError(f"data.root is required for the {cfg.layout} layout")
        if cfg.layout == "generic":
            rows = catalog_generic(cfg.root, cfg.maps, s3, cfg.categories)
        elif cfg.layout == "mvtec":
            rows = catalog_mvtec(cfg.root, cfg.maps, s3)
        elif cfg.layout == "realiad":
            rows = catalog_realiad(cfg.root, cfg.maps, s3, resolution=cfg.realiad_resolution, jsons=cfg.realiad_jsons,
                                   splits=cfg.splits, views=cfg.views, categories=cfg.categories)
        else:
            rows = catalog_mtd(cfg.root, cfg.maps, s3)
    rows = _select(rows, cfg.categories)
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[r["category"]] += 1
    log.info("catalog: %d images in %d categories (%s)", len(rows), len(counts),
             ", ".join(f"{c}: {n}" for c, n in sorted(counts.items())))
    return _rows_to_table(rows)


def catalog_images(cfg: DataConfig, s3: S3Config | None = None) -> list[dict]:
    """The images of a dataset without their maps (for ``ncd detect``): rows with
    ``image_id``, ``image_uri``, ``category``, ``gt_type``, ``gt_mask_uri``.
    Layouts generic, mvtec and mtd; ``data.categories`` selects."""
    if not cfg.root:
        raise DataError(f"data.root is required for the {cfg.layout} layout")
    if cfg.layout == "mtd":
        rows = catalog_mtd_images(cfg.root, s3)
    elif cfg.layout == "generic":
        images_root, masks_root = io.join(cfg.root, "images"), io.join(cfg.root, "masks")
        images = _index_by_key(images_root, io.list_files(images_root, s3, io.IMAGE_EXTENSIONS), _generic_key, "image")
        masks: dict = {}
        if io.is_dir(masks_root, s3):
            masks = _index_by_key(masks_root, io.list_files(masks_root, s3, io.IMAGE_EXTENSIONS), _generic_key, "mask")
        rows = [dict(image_id=f"{c}/{t}/{s}", image_uri=io.join(images_root, rel), category=c, gt_type=t,
                     gt_mask_uri=io.join(masks_root, masks[(c, t, s)]) if (c, t, s) in masks else "")
                for (c, t, s), rel in sorted(images.items())]
    elif cfg.layout == "mvtec":
        files = io.list_files(cfg.root, s3, io.IMAGE_EXTENSIONS)
        present = set(files)
        rows = []
        for rel in files:
            parts = rel.split("/")
            if len(parts) != 4 or parts[1] != "test" or parts[2] in MVTEC_SKIPPED_TYPES:
                continue
            cat, typ, stem = parts[0], parts[2], _stem(parts[3])
            mask_rel = f"{cat}/ground_truth/{typ}/{stem}_mask.png"
            rows.append(dict(image_id=f"{cat}/{typ}/{stem}", image_uri=io.join(cfg.root, rel), category=cat,
                             gt_type=typ, gt_mask_uri=io.join(cfg.root, mask_rel) if mask_rel in present else ""))
    else:
        raise DataError(f"ncd detect reads the generic, mvtec and mtd layouts, not {cfg.layout!r} (data.layout); "
                        "bring maps for this one")
    if not rows:
        raise DataError(f"no images found under {cfg.root} ({cfg.layout} layout)")
    return _select(rows, cfg.categories)


def layout_has_maps(cfg: DataConfig, s3: S3Config | None = None) -> bool:
    """Whether the catalog finds anomaly maps: ``data.maps`` is set, the generic layout has
    ``<root>/maps``, or the layout is realiad / manifest (their maps are required inputs)."""
    if cfg.maps or cfg.layout in ("realiad", "manifest"):
        return True
    return cfg.layout == "generic" and io.is_dir(io.join(cfg.root, "maps"), s3)
