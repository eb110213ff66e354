"""Publishing a category of the region table on S3 while others read it (loopback S3 server)."""
from __future__ import annotations

import threading

import pyarrow as pa
import pytest

from ncd.data import io
from ncd.data.region_table import COMPLETION_FILE, VERSION_PREFIX, publish_category, read_regions
from ncd.preprocess.regions import REGION_SCHEMA

pytestmark = pytest.mark.s3
PARTS, ROWS = 3, 4  # parts per version, rows per part


def _stage(staging: str, category: str, version: int, s3) -> dict:
    """Stage one version of ``category``: every row's ``gt_type`` names the version."""
    names = []
    for p in range(PARTS):
        rows = [{"region_id": f"{category}/{p}/{i}", "image_id": f"{category}/{p}/{i}", "region_index": 0,
                 "category": category, "gt_type": f"v{version}", "area": 1} for i in range(ROWS)]
        names.append(f"part-{p}.parquet")
        io.write_table(pa.Table.from_pylist(rows, schema=REGION_SCHEMA), io.join(staging, category, names[-1]), s3)
    return {"category": category, "fingerprint": f"v{version}", "files": names, "images": PARTS * ROWS}


def test_a_concurrent_reader_never_sees_a_partial_category(s3_prefix, s3_config, s3_server):
    uri = io.join(s3_prefix, "regions")
    publish_category(io.join(s3_prefix, "_staging-0"), uri, _stage(io.join(s3_prefix, "_staging-0"), "plate", 0,
                                                                    s3_config), s3_config)
    seen, problems, done = [], [], threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                table = read_regions(uri, s3_config)
            except Exception as err:  # noqa: BLE001 - every failure is a finding
                problems.append(repr(err))
                continue
            versions = set(table.column("gt_type").to_pylist())
            if table.num_rows != PARTS * ROWS or len(versions) != 1:
                problems.append(f"{table.num_rows} rows of versions {sorted(versions)}")
            seen.extend(versions)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for version in range(1, 6):
            staging = io.join(s3_prefix, f"_staging-{version}")
            publish_category(staging, uri, _stage(staging, "plate", version, s3_config), s3_config)
            io.delete_dir(staging, s3_config)
    finally:
        done.set()
        thread.join()
    assert problems == []
    assert len(set(seen)) >= 3, sorted(set(seen))  # the reader really overlapped the publishing
    assert set(read_regions(uri, s3_config).column("gt_type").to_pylist()) == {"v5"}
    # the record names the newest version; only it and the one before are kept
    keys = s3_server.keys(io.join(uri, "plate"))
    versions = {k.split("/", 1)[0] for k in keys if k.startswith(VERSION_PREFIX)}
    assert COMPLETION_FILE in keys and len(versions) == 2, keys
