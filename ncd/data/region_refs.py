"""Light region tables: every column but the crops, with the stored table they come from.

A driver that plans, splits, merges and reports over a region table needs its small
columns only; the crops (PNG bytes, most of a table's size) stay in storage until a
worker or a report gallery reads the rows it needs (:func:`read_rows`, streamed part by
part). A light table carries its source URI in its schema metadata (``filter``,
``take`` and ``slice`` keep it), so a subset of it still names where its crops are.
"""
from __future__ import annotations

from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from ncd.config import S3Config
from ncd.data import io
from ncd.data.io import DataError
from ncd.data.region_table import ORDER_COLUMNS, category_dir, table_files
from ncd.preprocess.regions import REGION_SCHEMA

HEAVY_COLUMNS = ("crop_png", "mask_png", "anomaly_png", "object_png")  # per-row images
LIGHT_COLUMNS = tuple(n for n in REGION_SCHEMA.names if n not in HEAVY_COLUMNS)
SOURCE_KEY = b"ncd.data.region_table"


def table_parts(uri: str, s3: S3Config | None = None,
                categories: Sequence[str] = ()) -> tuple[pafs.FileSystem, list[str]]:
    """``ncd.data.region_table.table_files``, only those in the folders of ``categories`` when
    given and the table has a folder for each (as ``ncd.data.region_table`` writes it)."""
    fs, paths = table_files(uri, s3)
    if categories:
        base = io.filesystem(uri, s3)[1].rstrip("/")
        folders = [f"{base}/{category_dir(c)}/" for c in categories]
        if all(any(p.startswith(f) for p in paths) for f in folders):
            return fs, [p for p in paths if p.startswith(tuple(folders))]
    return fs, paths


def _dataset(uri: str, s3: S3Config | None, categories: Sequence[str] = ()) -> pads.Dataset:
    fs, paths = table_parts(uri, s3, categories)
    if not paths:
        raise DataError(f"{uri} holds no region table parts")
    dataset = pads.dataset(paths, filesystem=fs, format="parquet")
    missing = [n for n in REGION_SCHEMA.names if n not in dataset.schema.names]
    if missing:
        raise DataError(f"{uri} is not a region table: missing column(s) {', '.join(missing)}")
    return dataset


def light_regions(uri: str, s3: S3Config | None = None) -> pa.Table:
    """The stored region table at ``uri`` without its crops, in canonical order (as
    ``ncd.data.region_table.read_regions``), its source URI in the schema metadata."""
    table = _dataset(uri, s3).to_table(columns=list(LIGHT_COLUMNS))
    table = table.cast(pa.schema([REGION_SCHEMA.field(n) for n in LIGHT_COLUMNS]))
    table = table.sort_by([(c, "ascending") for c in ORDER_COLUMNS])
    return table.replace_schema_metadata({SOURCE_KEY: uri.encode()})


def is_light(table: pa.Table) -> bool:
    return "crop_png" not in table.column_names


def source_of(table: pa.Table) -> str:
    """The URI a light table was read from; an error for a table without one."""
    uri = (table.schema.metadata or {}).get(SOURCE_KEY)
    if uri is None:
        raise DataError("a region table without crops (crop_png) and without its source URI: "
                        "read it with ncd.data.region_refs.light_regions or pass the full table")
    return uri.decode()


def read_rows(uri: str, region_ids: Sequence[str] | pa.Array, s3: S3Config | None = None,
              columns: Sequence[str] | None = None, categories: Sequence[str] = ()) -> pa.Table:
    """The rows of ``region_ids`` (in that order) of the stored table at ``uri``, all
    columns or ``columns``; scanned batch by batch, so memory holds the chosen rows only.
    ``categories``: the rows' categories, to scan only their folders."""
    ids = pa.array(region_ids, pa.string()) if not isinstance(region_ids, pa.Array) else region_ids
    wanted = list(columns) if columns is not None else REGION_SCHEMA.names
    if "region_id" not in wanted:
        wanted = ["region_id", *wanted]
    found = _dataset(uri, s3, categories).to_table(columns=wanted, filter=pc.field("region_id").isin(ids))
    position = pc.index_in(ids, value_set=found.column("region_id"))
    if position.null_count:
        missing = ids.filter(pc.is_null(position))
        raise DataError(f"region {missing[0].as_py()!r} is not in the region table {uri} "
                        f"({len(missing)} missing)")
    found = found.take(position)
    return found.cast(pa.schema([REGION_SCHEMA.field(n) for n in wanted]))


def full_rows(table: pa.Table, s3: S3Config | None = None) -> pa.Table:
    """``table`` with its crops: itself when it has them, else its rows read from its source."""
    if not is_light(table):
        return table
    categories = sorted(set(table.column("category").to_pylist()))
    return read_rows(source_of(table), table.column("region_id").combine_chunks(), s3, categories=categories)
