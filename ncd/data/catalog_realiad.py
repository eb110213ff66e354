"""Real-IAD (Wang et al., CVPR 2024) as published: catalog rows for ``ncd.data.catalog``.

Layout (``root`` is the ``Real-IAD`` folder)::

    realiad_<res>/<object>/OK/S####/<object>_####_OK_C<v>_<ts>.jpg
    realiad_<res>/<object>/NG/<code>/S####/<object>_####_NG_C<v>_<ts>.jpg  (+ ..._mask.png)
    realiad_jsons/<object>.json       (or realiad_jsons_sv, realiad_jsons_fuiad_*; a nested
                                       realiad_jsons/realiad_jsons/ as the ZIP unpacks is found too)

Each JSON holds ``train``/``test`` lists of ``{image_path, mask_path, anomaly_class}``
relative to ``realiad_<res>/<meta.prefix>/`` (the object folder; ``meta.normal_class``
is "OK").

Labels are per image, never per folder: an image is anomalous when its
``anomaly_class`` is not the normal class **and** it has a mask (the rule of the
official example code). An NG view whose defect is not visible from that camera has no
mask and becomes a normal image (type ``good``, as in the other layouts). Without JSONs
(``jsons=""``) the same rule is applied to the folders: an image under ``NG/<code>/``
is anomalous when ``<stem>_mask.png`` lies beside it. Masks are not opened, so a mask
file that is present but empty still counts as anomalous.

Defect codes become names (``AK`` -> ``pit``, ...; ``defect_names=False`` keeps the
codes). Maps: ``<maps>/<object>/<image path inside the object folder, extension
replaced>``, e.g. ``<maps>/audiojack/NG/AK/S0001/audiojack_0001_NG_AK_C1_<ts>.png``.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from typing import Any, Callable

from ncd.config import S3Config
from ncd.data import io
from ncd.data.io import DataError

log = logging.getLogger(__name__)

REALIAD_DEFECTS: dict[str, str] = {
    "AK": "pit",
    "BX": "deformation",
    "CH": "abrasion",
    "HS": "scratch",
    "PS": "damage",
    "QS": "missing_parts",
    "YW": "foreign_objects",
    "ZW": "contamination",
}
NORMAL_CLASS = "OK"  # anomaly_class of normal images in the JSONs
NORMAL_TYPE = "good"  # gt_type of normal images, as in the other layouts
RESOLUTIONS = ("256", "512", "1024", "raw")
SPLITS = ("train", "test")
MASK_SUFFIX = "_mask"
_VIEW_RE = re.compile(r"_(C[0-9])(?:_|$)")
# Groups the 5 views of one physical sample (official README / ADEval).
SAMPLE_KEY_RE = re.compile(r"([a-zA-Z][a-zA-Z0-9_]*_[0-9]{4}_[A-Z][A-Z_]*[A-Z])_C[0-9]_")


def _stem(path: str) -> str:
    """``path`` without its last extension (the directories are kept)."""
    head, _, name = path.rpartition("/")
    base = name.rsplit(".", 1)[0] if "." in name else name
    return f"{head}/{base}" if head else base


def view_of(name: str) -> str:
    """The camera view (``C1`` .. ``C5``) in a Real-IAD file name, or ``""``."""
    m = _VIEW_RE.search(name.rsplit("/", 1)[-1])
    return m.group(1) if m else ""


def sample_key(name: str) -> str:
    """The key shared by the views of one sample (e.g. ``audiojack_0001_NG_AK``), or ``""``."""
    m = SAMPLE_KEY_RE.search(name.rsplit("/", 1)[-1])
    return m.group(1) if m else ""


def _normalise_views(views: tuple[str, ...]) -> frozenset[str]:
    out = set()
    for v in views:
        text = str(v).strip().upper()
        text = text if text.startswith("C") else f"C{text}"
        if not re.fullmatch(r"C[0-9]", text):
            raise DataError(f"invalid Real-IAD view {v!r}; views are C1..C5 (or 1..5)")
        out.add(text)
    return frozenset(out)


def _type_name(code: str, defect_names: bool) -> str:
    return REALIAD_DEFECTS.get(code, code) if defect_names else code


def _is_absolute(uri: str) -> bool:
    return io.is_s3(uri) or uri.startswith("/")


def _json_files(jsons_root: str, s3: S3Config | None) -> dict[str, str]:
    """object -> JSON URI; ``<jsons>/<object>.json``, else the nested ``<jsons>/<name>/<object>.json``."""
    nested = jsons_root.rstrip("/").rsplit("/", 1)[-1]
    found: dict[str, str] = {}
    for rel in io.list_files(jsons_root, s3, (".json",)):
        parts = rel.split("/")
        if len(parts) == 1 or (len(parts) == 2 and parts[0] == nested and parts[1][:-5] not in found):
            found[parts[-1][:-5]] = io.join(jsons_root, rel)
    if not found:
        raise DataError(f"no Real-IAD JSON files (<object>.json) under {jsons_root}")
    return found


def _load_json(uri: str, s3: S3Config | None) -> dict[str, Any]:
    try:
        data = json.loads(io.read_bytes(uri, s3))
    except json.JSONDecodeError as err:
        raise DataError(f"not valid JSON: {uri} ({err})") from None
    if not isinstance(data, dict) or not any(k in data for k in SPLITS):
        raise DataError(f"{uri}: expected an object with 'train' and/or 'test' lists")
    return data


def _select_objects(available: list[str], categories: tuple[str, ...], where: str) -> list[str]:
    if not categories:
        return sorted(available)
    missing = [c for c in categories if c not in available]
    if missing:
        raise DataError(f"Real-IAD object(s) {', '.join(missing)} not found in {where}; "
                        f"found: {', '.join(sorted(available)) or 'none'}")
    return sorted(set(categories))


def _json_paths(data: dict[str, Any], obj: str, uri: str) -> Callable[[str], str]:
    """Maps a JSON ``image_path``/``mask_path`` to its path inside ``realiad_<res>/<obj>/``.

    JSON paths are relative to ``realiad_<res>/<meta.prefix>``; without a prefix they are
    taken as relative to the object folder, unless they all start with ``<obj>/``.
    """
    prefix = (data.get("meta") or {}).get("prefix")
    if prefix is None:
        paths = [str(e.get("image_path", "")).lstrip("/") for s in SPLITS for e in data.get(s, [])
                 if isinstance(e, dict)]
        prefix = "" if paths and all(p.startswith(f"{obj}/") for p in paths) else obj
    prefix = str(prefix).strip("/")

    def inner(path: str) -> str:
        full = f"{prefix}/{path.lstrip('/')}" if prefix else path.lstrip("/")
        if not full.startswith(f"{obj}/"):
            raise DataError(f"{uri}: {path!r} (prefix {prefix!r}) is not inside the object folder {obj!r}")
        return full[len(obj) + 1:]

    return inner


def _entries_from_json(data: dict[str, Any], uri: str, splits: tuple[str, ...],
                       inner: Callable[[str], str]) -> list[tuple[str, str, str]]:
    """(image path, mask path or "", anomaly_class) inside the object folder, selected splits, JSON order."""
    normal = str((data.get("meta") or {}).get("normal_class", NORMAL_CLASS))
    out = []
    for split in splits:
        if split not in data:
            raise DataError(f"{uri} has no {split!r} split (has: {', '.join(k for k in SPLITS if k in data)})")
        for i, e in enumerate(data[split]):
            if not isinstance(e, dict) or not e.get("image_path") or "anomaly_class" not in e:
                raise DataError(f"{uri} {split}[{i}]: needs image_path and anomaly_class, got {e!r}")
            cls = str(e["anomaly_class"])
            mask = str(e.get("mask_path") or "")
            out.append((inner(str(e["image_path"])), inner(mask) if mask else "",
                        NORMAL_CLASS if cls == normal else cls))
    return out


def _all_json_images(data: dict[str, Any], inner: Callable[[str], str]) -> set[str]:
    return {_stem(inner(str(e["image_path"]))) for s in SPLITS for e in data.get(s, [])
            if isinstance(e, dict) and e.get("image_path")}


def _entries_from_folders(files: list[str]) -> list[tuple[str, str, str]]:
    """(image_path, mask_path or "", class) from ``OK/**`` and ``NG/<code>/**`` of one object."""
    present = set(files)
    out = []
    for rel in files:
        parts = rel.split("/")
        if _stem(rel).endswith(MASK_SUFFIX) or parts[0] not in ("OK", "NG"):
            continue
        if parts[0] == "OK":
            out.append((rel, "", NORMAL_CLASS))
        elif len(parts) >= 3:
            mask = f"{_stem(rel)}{MASK_SUFFIX}.png"
            out.append((rel, mask if mask in present else "", parts[1]))
    return out


def _index_maps(maps_root: str, obj: str, s3: S3Config | None) -> dict[str, str]:
    """relative stem -> map URI for one object."""
    obj_maps = io.join(maps_root, obj)
    if not io.is_dir(obj_maps, s3):
        raise DataError(f"no anomaly maps for Real-IAD object {obj!r}: {obj_maps} is not a directory")
    out: dict[str, str] = {}
    for rel in io.list_files(obj_maps, s3, io.MAP_EXTENSIONS):
        key = _stem(rel)
        if key in out:
            raise DataError(f"two anomaly maps for one image: {out[key]} and {io.join(obj_maps, rel)}")
        out[key] = io.join(obj_maps, rel)
    return out


def catalog_realiad(
    root: str,
    maps_root: str,
    s3: S3Config | None = None,
    *,
    resolution: str = "1024",
    jsons: str = "realiad_jsons",
    splits: tuple[str, ...] = ("test",),
    views: tuple[str, ...] = (),
    categories: tuple[str, ...] = (),
    defect_names: bool = True,
) -> list[dict[str, str]]:
    """Manifest rows (``image_id, image_uri, map_uri, category, gt_type, gt_mask_uri``) of Real-IAD.

    ``root``: the Real-IAD folder (local or ``s3://``); images in ``realiad_<resolution>``.
    ``jsons``: the split folder under ``root`` (``realiad_jsons``, ``realiad_jsons_sv``,
    ``realiad_jsons_fuiad_0.1``, ...; an absolute path or URI also works), or ``""`` to
    walk the ``OK``/``NG`` folders instead (every image, no split). ``splits``: which JSON
    lists to take (``test`` holds the defects). ``views``: keep these cameras only
    (``C1``..``C5``; empty keeps all). ``categories``: objects to read (empty: all).
    ``image_id`` is ``<object>/<gt_type>/<file stem>``. Every selected image needs a map
    at ``<maps_root>/<object>/<its path inside the object folder>.<ext>``; a map that
    matches no image of its object is an error (maps of images left out by
    ``splits``/``views`` are ignored).
    """
    if not maps_root:
        raise DataError("data.maps is required for the realiad layout (anomaly maps root)")
    res = str(resolution).removeprefix("realiad_")
    if res not in RESOLUTIONS:
        raise DataError(f"unknown Real-IAD resolution {resolution!r}; valid: {', '.join(RESOLUTIONS)}")
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise DataError(f"invalid Real-IAD split(s) {bad or list(splits)}; valid: {', '.join(SPLITS)}")
    keep_views = _normalise_views(tuple(views))
    images_root = io.join(root, f"realiad_{res}")
    if not io.is_dir(images_root, s3):
        raise DataError(f"Real-IAD images not found: {images_root} is not a directory "
                        f"(resolutions: {', '.join(RESOLUTIONS)})")

    if jsons:
        jsons_root = jsons if _is_absolute(jsons) else io.join(root, jsons)
        json_uris = _json_files(jsons_root, s3)
        objects = _select_objects(list(json_uris), categories, jsons_root)
    else:
        tops = {rel.split("/", 1)[0] for rel in io.list_files(images_root, s3, io.IMAGE_EXTENSIONS) if "/" in rel}
        objects = _select_objects(list(tops), categories, images_root)

    rows: list[dict[str, str]] = []
    seen: dict[str, str] = {}
    relabelled = 0
    for obj in objects:
        obj_root = io.join(images_root, obj)
        if jsons:
            data = _load_json(json_uris[obj], s3)
            inner = _json_paths(data, obj, json_uris[obj])
            present = set(io.list_files(obj_root, s3)) if io.is_dir(obj_root, s3) else set()
            entries = _entries_from_json(data, json_uris[obj], splits, inner)
            known = _all_json_images(data, inner)
        else:
            files = io.list_files(obj_root, s3, io.IMAGE_EXTENSIONS)
            present = set(files)
            entries = _entries_from_folders(files)
            known = {_stem(e[0]) for e in entries}
        maps = _index_maps(maps_root, obj, s3)
        extra = sorted(set(maps) - known)
        if extra:
            raise DataError(f"no Real-IAD image for anomaly map {maps[extra[0]]}; {len(extra)} map(s) of "
                            f"{obj!r} match no image")
        missing_maps: list[str] = []
        for image_path, mask_path, cls in entries:
            if keep_views and view_of(image_path) not in keep_views:
                continue
            if image_path not in present:
                raise DataError(f"Real-IAD image listed but missing: {io.join(obj_root, image_path)}")
            anomalous = cls != NORMAL_CLASS and bool(mask_path)
            if cls != NORMAL_CLASS and not mask_path:
                relabelled += 1
            if anomalous and mask_path not in present:
                raise DataError(f"Real-IAD mask listed but missing: {io.join(obj_root, mask_path)}")
            key = _stem(image_path)
            if key not in maps:
                missing_maps.append(image_path)
                continue
            gt_type = _type_name(cls, defect_names) if anomalous else NORMAL_TYPE
            image_id = f"{obj}/{gt_type}/{key.rsplit('/', 1)[-1]}"
            image_uri = io.join(obj_root, image_path)
            if image_id in seen:
                if seen[image_id] == image_uri:
                    continue  # listed twice (e.g. in two splits): one row
                raise DataError(f"two Real-IAD images share the id {image_id!r}: {seen[image_id]} and {image_uri}")
            seen[image_id] = image_uri
            rows.append(dict(image_id=image_id, image_uri=image_uri, map_uri=maps[key], category=obj,
                             gt_type=gt_type, gt_mask_uri=io.join(obj_root, mask_path) if anomalous else ""))
        if missing_maps:
            k = missing_maps[0]
            raise DataError(f"no anomaly map for image {io.join(obj_root, k)} (expected "
                            f"{io.join(maps_root, obj, _stem(k))}.<png|npy|tiff>); "
                            f"{len(missing_maps)} image(s) of {obj!r} lack a map")
    if not rows:
        raise DataError(f"no Real-IAD images selected under {images_root} "
                        f"(splits {list(splits)}, views {sorted(keep_views) or 'all'})")
    counts = Counter(r["gt_type"] for r in rows)
    log.info("realiad: %d images of %d object(s); types %s; %d NG view(s) without a mask counted as %s",
             len(rows), len(objects), dict(sorted(counts.items())), relabelled, NORMAL_TYPE)
    rows.sort(key=lambda r: r["image_id"])
    return rows
