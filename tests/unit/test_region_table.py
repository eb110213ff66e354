"""Housekeeping of the region table folder: other runs' staging folders."""
import os
import time

import pyarrow as pa

from ncd.config import load_config
from ncd.data import io
from ncd.data.catalog import build_manifest
from ncd.data.region_table import STALE_AFTER_S, plan_preprocess


def test_only_old_staging_folders_of_other_runs_are_stale(demo_root, tmp_path):
    cfg = load_config("ncd/configs/demo_smoke.yaml", [f"data.root={demo_root}", "data.categories=plate"])
    uri = str(tmp_path / "regions")
    for name in ("_staging-running", "_staging-crashed", "_old-crashed", "gone-category"):
        io.write_table(pa.table({"a": [1]}), f"{uri}/{name}/x/part-0.parquet")
    old = time.time() - STALE_AFTER_S - 60
    for name in ("_staging-crashed", "_old-crashed"):
        os.utime(f"{uri}/{name}/x/part-0.parquet", (old, old))
    plan = plan_preprocess(build_manifest(cfg.data), uri, cfg.mebin, cfg.crop, cfg.data)
    # a running job's staging (written to recently) is never removed; a crashed one's is
    assert plan.stale == ("_old-crashed", "_staging-crashed", "gone-category")
