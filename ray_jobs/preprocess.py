"""Ray Data preprocessing: MEBin + crops sharded over workers.

Pass 1 maps every image to its map statistics and reduces them per category (the
MEBin search range); pass 2 runs ``ncd.preprocess.process_image`` per image with
``map_batches`` and writes the region table as Parquet shards (local dir or S3).
The rows equal the in-process path's (``ncd preprocess --local``) byte for byte.

    python -m ray_jobs.preprocess --config configs/demo_smoke.yaml [--set a.b=v ...]
"""
from __future__ import annotations

import argparse
import logging
import uuid
from typing import Any

import pandas as pd
import pyarrow as pa
import ray
from ray.data.aggregate import Max, Min

from ncd import io
from ncd.catalog import build_manifest
from ncd.config import ExperimentConfig, absolute_paths, load_config
from ncd.preprocess import (REGION_SCHEMA, REGIONS_DIR, CategoryRange, check_categories, image_statistics,
                            process_image, reduce_range)

log = logging.getLogger(__name__)


def _stats_batch(batch: pd.DataFrame, s3) -> pd.DataFrame:
    rows = [image_statistics(r, s3) for r in batch.to_dict("records")]
    df = pd.DataFrame(rows)
    df["is_uint8"] = df["is_uint8"].astype("int64")
    return df


def _regions_batch(batch: pd.DataFrame, ranges: dict[str, CategoryRange], cfg: ExperimentConfig) -> pa.Table:
    rows: list[dict[str, Any]] = []
    for r in batch.to_dict("records"):
        rows.extend(process_image(r, ranges[r["category"]], cfg.mebin, cfg.crop, cfg.data, cfg.s3, cfg.proto))
    return pa.Table.from_pylist(rows, schema=REGION_SCHEMA)


def compute_ranges(ds: "ray.data.Dataset", cfg: ExperimentConfig) -> dict[str, CategoryRange]:
    """Pass 1: per-category reduction of per-image map statistics."""
    stats = ds.map_batches(_stats_batch, fn_kwargs={"s3": cfg.s3}, batch_format="pandas",
                           batch_size=cfg.preprocess.batch_size)
    agg = stats.groupby("category").aggregate(
        Min("is_uint8", alias_name="all_uint8"), Min("lo", alias_name="lo"), Max("hi", alias_name="hi"),
        Min("peak", alias_name="min_peak"), Max("peak", alias_name="max_peak"),
    ).take_all()
    return {a["category"]: reduce_range(bool(a["all_uint8"]), a["lo"], a["hi"], a["min_peak"], a["max_peak"], cfg.mebin)
            for a in agg}


def run_preprocess(cfg: ExperimentConfig, manifest: pa.Table | None = None) -> str:
    """Both passes on the current Ray cluster; returns the region table URI (a directory)."""
    cfg = absolute_paths(cfg)
    if manifest is None:
        manifest = build_manifest(cfg.data, cfg.s3)
    check_categories(manifest)
    out_uri = io.join(cfg.preprocess.output, REGIONS_DIR)
    staging = io.join(cfg.preprocess.output, f"_staging-{uuid.uuid4().hex[:8]}")
    ds = ray.data.from_arrow(manifest).repartition(max(1, manifest.num_rows // cfg.preprocess.batch_size))
    ranges = compute_ranges(ds, cfg)
    log.info("preprocess: ranges %s", {k: (v.min_th, v.max_th) for k, v in ranges.items()})
    regions = ds.map_batches(_regions_batch, fn_kwargs={"ranges": ranges, "cfg": cfg}, batch_format="pandas",
                             batch_size=cfg.preprocess.batch_size)
    fs, staging_path = io.filesystem(staging, cfg.s3)
    regions.write_parquet(staging_path, filesystem=fs)
    io.replace_dir(staging, out_uri, cfg.s3)
    return out_uri


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--address", default=None, help="Ray address (default: local or RAY_ADDRESS)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ray_jobs.cli import config_path

    cfg = load_config(config_path(args.config), args.overrides)
    ray.init(address=args.address, ignore_reinit_error=True)
    print(run_preprocess(cfg))


if __name__ == "__main__":
    main()
