"""The region table on storage: per-category parts with completion records.

``<output>/regions/`` holds one folder per category (``category_dir``) with its Parquet
parts and a completion record (``_complete.json``: a fingerprint of the category's
manifest rows, the inputs' sizes and mtimes and the configuration its rows depend
on, and the part files that make up the category). A run recomputes only the
categories whose record is missing or differs; each is staged under
``regions/_staging-*/`` and published whole, then recorded:

- local: the staged folder is renamed into place (the old one goes aside under a
  ``_old-*`` name first), so the category is never half there;
- S3 (no rename): the parts are copied into a new version folder
  ``<category>/_v-<id>/`` while the old record still names the old version, then the
  record, a small pointer object, is written last; readers (``table_files``) read
  exactly the files a record names, so they see the old version or the new one whole.
  The version before is kept until the next publish (a reader that read the old record
  just before the switch can still read its files); older ones are deleted.

Names that start with ``_`` are skipped by Parquet readers, so staging, records and
versions being swapped out are never part of a plain folder read. A run removes
other runs' staging and ``_old-*`` folders only when nothing was written in them for
``STALE_AFTER_S`` (a crashed run), never a running one's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from ncd.config import CropConfig, DataConfig, MebinConfig, ProtoConfig, S3Config
from ncd.data import io
from ncd.data.io import DataError
from ncd.preprocess.regions import (REGION_SCHEMA, CategoryRange, category_ranges, check_categories, image_statistics,
                            process_image, regions_table)

log = logging.getLogger(__name__)


REGIONS_DIR = "regions"
COMPLETION_FILE = "_complete.json"
STAGING_PREFIX = "_staging-"
TRASH_PREFIX = "_old-"
VERSION_PREFIX = "_v-"  # an S3 category's published version folder
STALE_AFTER_S = 3600.0  # another run's staging folder idle this long is a crashed run's: removed
PART_PREFIX = "part-"
PREPROCESS_VERSION = 2  # bump when process_image's rows change for the same inputs and settings
DATA_KEYS = ("map_size_policy", "max_aspect_mismatch")  # the DataConfig fields process_image reads
STAMP_CHUNK = 64  # paths per metadata request batch
STAMP_THREADS = 16  # concurrent metadata requests for s3:// inputs
PART_DIGEST_CHARS = 16
LOCAL_PART_IMAGES = 256  # images per Parquet part when preprocessing in one process
ORDER_COLUMNS = ("image_id", "region_index")  # the canonical row order of a region table


@dataclass(frozen=True)
class PreprocessPlan:
    """What a run must do to bring the region table ``uri`` up to date with a manifest."""

    uri: str
    pending: dict[str, str]  # category -> fingerprint, for the categories to (re)compute
    complete: tuple[str, ...]  # categories whose completion record matches: skipped
    stale: tuple[str, ...]  # top-level entries of the table folder that go (other categories, old layouts)


@dataclass(frozen=True)
class PreprocessStats:
    """What a preprocessing run did."""

    uri: str  # the region table
    processed: tuple[str, ...]  # categories computed by this run
    skipped: tuple[str, ...]  # categories left as they were (their record matched)
    removed: tuple[str, ...]  # entries removed from the table folder
    images: int  # images processed by this run
    regions: int  # region rows written by this run


def category_dir(category: str) -> str:
    """The folder of one category inside the region table: ``io.safe_name`` (one path
    segment, never a hive partition, never hidden or relative)."""
    if not category:
        raise DataError("a manifest row has an empty category")
    return io.safe_name(category)


def input_stamps(uris: Sequence[str], s3: S3Config | None = None) -> list[str]:
    """``<size>:<mtime ns>`` of each file (``missing`` if absent), from metadata only.

    A map rewritten in place (a new detector run) changes its stamp, so its category is
    recomputed. ``s3://`` objects are queried concurrently.
    """
    out = ["missing"] * len(uris)
    groups: dict[bool, list[int]] = {}
    for i, uri in enumerate(uris):
        groups.setdefault(io.is_s3(uri), []).append(i)
    for remote, index in groups.items():
        fs = io.filesystem(uris[index[0]], s3)[0]
        chunks = [index[k:k + STAMP_CHUNK] for k in range(0, len(index), STAMP_CHUNK)]

        def stat(chunk: list[int]) -> list[pafs.FileInfo]:
            return fs.get_file_info([io.filesystem(uris[i], s3)[1] for i in chunk])

        try:
            with ThreadPoolExecutor(STAMP_THREADS if remote else 1) as pool:
                for chunk, infos in zip(chunks, pool.map(stat, chunks)):
                    for i, info in zip(chunk, infos):
                        if info.type == pafs.FileType.File:
                            out[i] = f"{info.size}:{info.mtime_ns}"
        except (OSError, pa.ArrowException) as err:
            raise io.StorageError(f"cannot read the metadata of {uris[index[0]]} and others: {err}") from None
    return out


def preprocess_settings(mebin: MebinConfig, crop: CropConfig, data: DataConfig,
                        proto: ProtoConfig | None = None) -> dict[str, Any]:
    """The configuration region rows depend on. Where the dataset lives and which
    categories it holds decide which rows exist, not what they hold, so they are not here."""
    prior = proto.object_prior if proto is not None else "none"
    return {"version": PREPROCESS_VERSION, "schema": REGION_SCHEMA.to_string(),
            "mebin": dataclasses.asdict(mebin), "crop": dataclasses.asdict(crop),
            "data": {k: getattr(data, k) for k in DATA_KEYS},
            "object_prior": prior, "object_masks": proto.object_masks if prior == "folder" else ""}


def category_fingerprint(rows: Sequence[Mapping[str, Any]], stamps: Sequence[str],
                         settings: Mapping[str, Any]) -> str:
    """SHA-256 of the settings and a category's manifest rows with their input stamps
    (independent of row order)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for row, stamp in sorted(zip(rows, stamps), key=lambda p: str(p[0]["image_id"])):
        digest.update(json.dumps([row, stamp], sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _table_listing(uri: str, s3: S3Config | None,
                   newest: dict[str, float] | None = None) -> dict[str, set[str]]:
    """Top-level entries of the table folder -> the relative paths of the files inside
    them (a top-level file maps to an empty set); empty when the folder does not exist.
    ``newest`` (if given) receives each entry's newest file modification time (epoch s)."""
    fs, path = io.filesystem(uri, s3)
    try:
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return {}
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except (OSError, pa.ArrowException) as err:
        raise io.StorageError(f"cannot list {uri}: {err}") from None
    base, out = path.rstrip("/") + "/", {}
    for info in infos:
        rel = info.path[len(base):] if info.path.startswith(base) else info.path
        top, _, rest = rel.partition("/")
        files = out.setdefault(top, set())
        if info.type == pafs.FileType.File:
            if rest:
                files.add(rest)
            if newest is not None and info.mtime_ns is not None:
                newest[top] = max(newest.get(top, 0.0), info.mtime_ns / 1e9)
    return out


def _in_use(name: str, newest: Mapping[str, float], now: float) -> bool:
    """Whether a top-level entry is another run's staging (or swapped-out) folder that
    is still being written: such a folder is never removed."""
    return name.startswith((STAGING_PREFIX, TRASH_PREFIX)) and now - newest.get(name, 0.0) < STALE_AFTER_S


def read_completion(uri: str, category: str, s3: S3Config | None = None) -> dict[str, Any] | None:
    """A category's completion record in the region table ``uri``; None if absent or unreadable."""
    return _read_record(io.join(uri, category_dir(category)), s3)


def plan_preprocess(manifest: pa.Table, uri: str, mebin: MebinConfig, crop: CropConfig, data: DataConfig,
                    s3: S3Config | None = None, proto: ProtoConfig | None = None) -> PreprocessPlan:
    """Compare the manifest with the region table ``uri``: a category is complete when
    its record's fingerprint matches and every part the record names is there."""
    rows = manifest.to_pylist()
    stamps = input_stamps([u for r in rows for u in (r["image_uri"], r["map_uri"])], s3)
    by_category: dict[str, tuple[list, list]] = {}
    for i, r in enumerate(rows):
        group = by_category.setdefault(r["category"], ([], []))
        group[0].append(r)
        group[1].append(f"{stamps[2 * i]}|{stamps[2 * i + 1]}")
    settings = preprocess_settings(mebin, crop, data, proto)
    newest: dict[str, float] = {}
    listing = _table_listing(uri, s3, newest)
    pending, complete = {}, []
    for category, (cat_rows, cat_stamps) in sorted(by_category.items()):
        fingerprint = category_fingerprint(cat_rows, cat_stamps, settings)
        files = listing.get(category_dir(category), set())
        record = read_completion(uri, category, s3) if COMPLETION_FILE in files else None
        if record and record.get("fingerprint") == fingerprint and set(record.get("files", [])) <= files:
            complete.append(category)
        else:
            pending[category] = fingerprint
    keep = {category_dir(c) for c in by_category}
    now = time.time()
    stale = sorted(name for name in set(listing) - keep if not _in_use(name, newest, now))
    return PreprocessPlan(uri, pending, tuple(complete), tuple(stale))


def remove_entries(uri: str, names: Iterable[str], s3: S3Config | None = None) -> None:
    """Delete top-level entries (folders or files) of the table folder ``uri``."""
    fs, path = io.filesystem(uri, s3)
    for name in names:
        target = f"{path.rstrip('/')}/{name}"
        try:
            if fs.get_file_info(target).type == pafs.FileType.Directory:
                fs.delete_dir(target)
            else:
                fs.delete_file(target)
        except FileNotFoundError:
            continue
        except (OSError, pa.ArrowException) as err:
            raise io.StorageError(f"cannot remove {io.join(uri, name)}: {err}") from None


def process_part(rows: Sequence[Mapping[str, Any]], rng: CategoryRange, staging: str, mebin: MebinConfig,
                 crop: CropConfig, data: DataConfig, s3: S3Config | None = None,
                 proto: ProtoConfig | None = None) -> dict[str, Any]:
    """Pass 2 for some images of one category, written as one Parquet part (canonical
    order, possibly empty) under ``<staging>/<category dir>/``.

    The part's name is a digest of its image ids, so a task that runs again (a retry,
    a lost result recomputed) rewrites the same file instead of adding a duplicate.
    Returns ``{category, file, images, regions}``.
    """
    categories = {r["category"] for r in rows}
    if len(categories) != 1:
        raise ValueError(f"a part holds one category's images, got {sorted(categories)}")
    category = categories.pop()
    out = [region for r in rows for region in process_image(r, rng, mebin, crop, data, s3, proto)]
    ids = "\n".join(sorted(str(r["image_id"]) for r in rows))
    name = f"{PART_PREFIX}{hashlib.sha256(ids.encode()).hexdigest()[:PART_DIGEST_CHARS]}.parquet"
    io.write_table(regions_table(out), io.join(staging, category_dir(category), name), s3)
    return {"category": category, "file": name, "images": len(rows), "regions": len(out)}


def completion_record(category: str, fingerprint: str, parts: Sequence[Mapping[str, Any]],
                      rng: CategoryRange) -> dict[str, Any]:
    """The record that marks a category complete (what ``plan_preprocess`` checks)."""
    return {"category": category, "fingerprint": fingerprint, "version": PREPROCESS_VERSION,
            "files": sorted(p["file"] for p in parts), "images": sum(int(p["images"]) for p in parts),
            "regions": sum(int(p["regions"]) for p in parts), "range": dataclasses.asdict(rng)}


def publish_category(staging: str, uri: str, record: Mapping[str, Any], s3: S3Config | None = None) -> None:
    """Publish one category's staged folder in the table, replacing its old version,
    and write its completion record last (the module docstring says how, per storage).

    A failure before the record is written leaves the category as it was (S3) or
    unrecorded (local): the next run recomputes it.
    """
    name = category_dir(record["category"])
    src, dest = io.join(staging, name), io.join(uri, name)
    if io.is_s3(uri):
        _publish_version(src, dest, record, s3)
        return
    src_path, dest_path = io.filesystem(src)[1], io.filesystem(dest)[1]
    trash = io.filesystem(io.join(uri, f"{TRASH_PREFIX}{uuid.uuid4().hex[:8]}"))[1]
    had_old = os.path.isdir(dest_path)
    if had_old:
        os.replace(dest_path, trash)
    os.replace(src_path, dest_path)
    if had_old:
        shutil.rmtree(trash, ignore_errors=True)
    io.write_bytes(io.join(dest, COMPLETION_FILE), json.dumps(dict(record), indent=1, sort_keys=True).encode(), s3)


def _publish_version(src: str, dest: str, record: Mapping[str, Any], s3: S3Config | None) -> None:
    """S3: copy the staged parts to a new version folder of the category ``dest``, switch
    its record (the pointer) to them, then delete versions older than the one replaced."""
    fs, src_path = io.filesystem(src, s3)
    dest_path = io.filesystem(dest, s3)[1]
    version = f"{VERSION_PREFIX}{uuid.uuid4().hex[:12]}"
    previous = _read_record(dest, s3) or {}
    try:
        staged = [i.path for i in fs.get_file_info(pafs.FileSelector(src_path, recursive=True))
                  if i.type == pafs.FileType.File]
        for path in staged:
            fs.copy_file(path, f"{dest_path}/{version}/{path[len(src_path) + 1:]}")
    except (OSError, pa.ArrowException) as err:
        raise io.StorageError(f"cannot publish {dest}: {err}") from None
    files = sorted(f"{version}/{p[len(src_path) + 1:]}" for p in staged)
    io.write_bytes(io.join(dest, COMPLETION_FILE),
                   json.dumps({**record, "files": files}, indent=1, sort_keys=True).encode(), s3)
    keep = {COMPLETION_FILE, version} | {f.split("/", 1)[0] for f in previous.get("files", [])}
    old = [i for i in fs.get_file_info(pafs.FileSelector(dest_path)) if i.base_name not in keep]
    for info in old:
        try:
            fs.delete_dir(info.path) if info.type == pafs.FileType.Directory else fs.delete_file(info.path)
        except FileNotFoundError:
            continue


def _read_record(category_uri: str, s3: S3Config | None) -> dict[str, Any] | None:
    """The completion record in a category folder; None if absent or unreadable."""
    try:
        record = json.loads(io.read_bytes(io.join(category_uri, COMPLETION_FILE), s3))
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def table_files(uri: str, s3: S3Config | None = None) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem and the paths of the Parquet files that make up the table ``uri``
    now: a file itself; else, per category folder, the files its completion record
    names (or, without a record, its Parquet files), plus top-level Parquet files.
    ``_``- and ``.``-prefixed names are never read unless a record names them."""
    fs, path = io.filesystem(uri, s3)
    try:
        kind = fs.get_file_info(path).type
    except (OSError, pa.ArrowException) as err:
        raise io.StorageError(f"cannot read {uri}: {err}") from None
    if kind == pafs.FileType.File:
        return fs, [path]
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"table not found: {uri}")
    base, out = path.rstrip("/"), []
    for top, files in sorted(_table_listing(uri, s3).items()):
        if top.startswith(("_", ".")):
            continue
        if not files:
            out += [f"{base}/{top}"] if top.endswith(".parquet") else []
            continue
        record = _read_record(io.join(uri, top), s3) if COMPLETION_FILE in files else None
        names = record.get("files") if record else None
        if not isinstance(names, list):
            names = [f for f in files if f.endswith(".parquet") and not any(
                part.startswith(("_", ".")) for part in f.split("/"))]
        out += [f"{base}/{top}/{f}" for f in sorted(names)]
    return fs, out


def read_parts(uri: str, s3: S3Config | None = None, columns: Sequence[str] | None = None) -> pa.Table:
    """The rows of ``table_files(uri)`` (only ``columns`` if given), as one table."""
    fs, paths = table_files(uri, s3)
    if not paths:
        return REGION_SCHEMA.empty_table() if columns is None else REGION_SCHEMA.empty_table().select(list(columns))
    try:
        return pads.dataset(paths, filesystem=fs, format="parquet").to_table(columns=columns)
    except FileNotFoundError:
        raise io.StorageError(f"{uri} changed while it was read (republished twice meanwhile): read it again") from None
    except pa.ArrowInvalid as err:
        raise DataError(f"{uri} holds a file that is not Parquet ({str(err).strip().splitlines()[0]})") from None
    except (OSError, pa.ArrowException) as err:
        raise io.StorageError(f"cannot read {uri}: {str(err).strip().splitlines()[0]}") from None


def update_regions(manifest: pa.Table, output: str, mebin: MebinConfig, crop: CropConfig, data: DataConfig,
                   s3: S3Config | None = None, proto: ProtoConfig | None = None,
                   progress: Callable[[str, int, int], None] | None = None) -> PreprocessStats:
    """Both passes in this process, for the categories whose completion record does not
    match; the region table ``<output>/regions`` ends up holding exactly the manifest's
    categories. The in-process twin of ``ray_jobs.preprocess.run_preprocess``: the same
    layout and records, so either skips what the other completed. ``progress(stage,
    done, total)`` is called per image, per category and pass."""
    check_categories(manifest)
    uri = io.join(output, REGIONS_DIR)
    plan = plan_preprocess(manifest, uri, mebin, crop, data, s3, proto)
    remove_entries(uri, plan.stale, s3)
    staging = io.join(uri, f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}")
    images = regions = 0
    try:
        column = manifest.column("category")
        for category, fingerprint in plan.pending.items():
            rows = manifest.filter(pc.equal(column, category)).to_pylist()
            stats = []
            for i, r in enumerate(rows):
                stats.append(image_statistics(r, s3))
                if progress:
                    progress(f"peaks {category}", i + 1, len(rows))
            rng = category_ranges(stats, mebin)[category]
            parts = []
            for start in range(0, len(rows), LOCAL_PART_IMAGES):
                parts.append(process_part(rows[start:start + LOCAL_PART_IMAGES], rng, staging, mebin, crop, data,
                                          s3, proto))
                if progress:
                    progress(f"regions {category}", min(start + LOCAL_PART_IMAGES, len(rows)), len(rows))
            publish_category(staging, uri, completion_record(category, fingerprint, parts, rng), s3)
            images, regions = images + len(rows), regions + sum(p["regions"] for p in parts)
    finally:
        io.delete_dir(staging, s3)
    return PreprocessStats(uri, tuple(plan.pending), plan.complete, plan.stale, images, regions)


def write_regions(table: pa.Table, output: str, s3: S3Config | None = None) -> str:
    """Write a whole region table to ``<output>/regions/`` (one folder per category, no
    completion records) atomically, replacing what was there; returns its URI."""
    dest = io.join(output, REGIONS_DIR)
    staging = io.join(output, f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}")
    column = table.column("category")
    categories = sorted(set(column.to_pylist()))
    for category in categories:
        io.write_table(table.filter(pc.equal(column, category)),
                       io.join(staging, category_dir(category), f"{PART_PREFIX}00000.parquet"), s3)
    if not categories:  # an empty table keeps its schema
        io.write_table(table, io.join(staging, f"{PART_PREFIX}00000.parquet"), s3)
    io.replace_dir(staging, dest, s3)
    return dest


def canonical_order(table: pa.Table) -> pa.Table:
    """``table`` sorted by ``ORDER_COLUMNS`` (the order ``read_regions`` returns)."""
    return table.sort_by([(c, "ascending") for c in ORDER_COLUMNS])


def read_regions(uri: str, s3: S3Config | None = None) -> pa.Table:
    """A region table in canonical order: a Parquet file, or a folder of parts (one
    subfolder per category as written here, or flat): the files ``table_files`` names."""
    table = io.read_table(uri, s3) if uri.endswith(".csv") else read_parts(uri, s3)
    missing = [n for n in REGION_SCHEMA.names if n not in table.column_names]
    if missing:
        raise DataError(f"{uri} is not a region table: missing column(s) {', '.join(missing)}")
    table = table.select(REGION_SCHEMA.names).cast(REGION_SCHEMA)
    return canonical_order(table)
