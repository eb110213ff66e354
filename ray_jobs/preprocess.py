"""Ray Data preprocessing: MEBin + crops sharded over workers.

Incremental and resumable: ``ncd.data.region_table.plan_preprocess`` compares the manifest with
the completion records of the region table (``<preprocess.output>/regions/<category>/``)
and only the categories whose images or settings changed are processed. Pass 1 maps
their images to map statistics and reduces them per category (the MEBin search range);
pass 2 runs ``ncd.data.region_table.process_part`` over batches with ``map_batches``: each task
writes its category's Parquet part into a staging folder and returns a one-line summary.
The driver streams those summaries and publishes each category (atomic move + record)
as soon as all of its images are in, so a run stopped part-way keeps the categories it
finished and the next one redoes only the rest. The rows equal the in-process path's
(``ncd preprocess --local``) byte for byte.

    python -m ray_jobs.preprocess --config configs/demo_smoke.yaml [--set a.b=v ...]
"""
from __future__ import annotations

import argparse
import logging
import uuid
from collections import Counter

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray

from ncd.config import ExperimentConfig, absolute_paths, redacted
from ncd.data import io
from ncd.data.catalog import build_manifest
from ncd.preprocess.regions import CategoryRange, category_ranges, check_categories, image_statistics
from ncd.data.region_table import (REGIONS_DIR, STAGING_PREFIX, PreprocessStats, completion_record, plan_preprocess,
                              process_part, publish_category, remove_entries)
from ray_jobs.session import add_job_arguments, start_job

log = logging.getLogger(__name__)


def _stats_batch(batch: pd.DataFrame, s3) -> pd.DataFrame:
    """Pass 1 for a batch: per-image map statistics (a few numbers per image)."""
    return pd.DataFrame([image_statistics(r, s3) for r in batch.to_dict("records")])


PART_COLUMNS = ["category", "file", "images", "regions"]


def _stage_batch(batch: pd.DataFrame, ranges: dict[str, CategoryRange], cfg: ExperimentConfig,
                 staging: str) -> pd.DataFrame:
    """Pass 2 for a batch: one staged part per category in it; returns their summaries."""
    groups: dict[str, list[dict]] = {}
    for r in batch.to_dict("records"):
        groups.setdefault(r["category"], []).append(r)
    parts = [process_part(rows, ranges[c], staging, cfg.mebin, cfg.crop, cfg.data, cfg.s3, cfg.proto)
             for c, rows in groups.items()]
    return pd.DataFrame(parts, columns=PART_COLUMNS)


def compute_ranges(ds: "ray.data.Dataset", cfg: ExperimentConfig,
                   concurrency: int | None = None) -> dict[str, CategoryRange]:
    """Pass 1: per-image map statistics, reduced per category on the driver (every peak is
    needed to flag outlier maps)."""
    stats = ds.map_batches(_stats_batch, fn_kwargs={"s3": cfg.s3}, batch_format="pandas",
                           batch_size=cfg.preprocess.batch_size,
                           compute=ray.data.TaskPoolStrategy(size=concurrency))
    return category_ranges(stats.take_all(), cfg.mebin)


def run_preprocess(cfg: ExperimentConfig, manifest: pa.Table | None = None, *,
                   concurrency: int | None = None) -> str:
    """Bring the region table up to date on the current Ray cluster; returns its URI (a directory).

    ``concurrency`` caps the tasks that run a pass at once (default: as many as the
    cluster's CPUs allow).
    """
    return refresh_regions(cfg, manifest, concurrency=concurrency).uri


def refresh_regions(cfg: ExperimentConfig, manifest: pa.Table | None = None, *,
                    concurrency: int | None = None) -> PreprocessStats:
    """``run_preprocess`` with what it did: the categories processed, skipped and removed."""
    cfg = absolute_paths(cfg)
    if manifest is None:
        manifest = build_manifest(cfg.data, cfg.s3)
    check_categories(manifest)
    uri = io.join(cfg.preprocess.output, REGIONS_DIR)
    plan = plan_preprocess(manifest, uri, cfg.mebin, cfg.crop, cfg.data, cfg.s3, cfg.proto)
    log.info("preprocess: %d categories to process, %d complete, %d stale entries", len(plan.pending),
             len(plan.complete), len(plan.stale))
    remove_entries(uri, plan.stale, cfg.s3)  # also the staging folders of interrupted runs
    if not plan.pending:
        return PreprocessStats(uri, (), plan.complete, plan.stale, 0, 0)
    todo = manifest.filter(pc.is_in(manifest.column("category"), pa.array(list(plan.pending))))
    staging = io.join(uri, f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}")
    try:
        ds = ray.data.from_arrow(todo)
        # Each pass is one map operator after a barrier (the repartition) whose outputs are a
        # few bytes per task (the rows go to storage). Ray Data's per-operator reservation
        # would hold it to about half the cluster's CPUs (one task at a time on 2 CPUs), and
        # its downstream-capacity backpressure would throttle it on those tiny outputs:
        # both off, for this dataset's context only.
        ds.context.op_resource_reservation_enabled = False
        ds.context.downstream_capacity_backpressure_ratio = None
        ds = ds.repartition(max(1, todo.num_rows // cfg.preprocess.batch_size))
        worker_cfg = redacted(cfg)  # workers take S3 credentials from their environment
        ranges = compute_ranges(ds, worker_cfg, concurrency)
        log.info("preprocess: ranges %s", {k: (v.min_th, v.max_th) for k, v in ranges.items()})
        parts = ds.map_batches(_stage_batch, fn_kwargs={"ranges": ranges, "cfg": worker_cfg, "staging": staging},
                               batch_format="pandas", batch_size=cfg.preprocess.batch_size,
                               compute=ray.data.TaskPoolStrategy(size=concurrency))
        waiting = Counter(todo.column("category").to_pylist())
        staged: dict[str, dict[str, dict]] = {c: {} for c in waiting}
        for part in parts.iter_rows():  # streamed: a category is published once all its images are in
            category, name = part["category"], part["file"]
            if name in staged[category]:  # a recomputed task rewrote the same part
                continue
            staged[category][name] = {k: part[k] for k in PART_COLUMNS}
            waiting[category] -= int(part["images"])
            if waiting[category] == 0:
                record = completion_record(category, plan.pending[category], list(staged[category].values()),
                                           ranges[category])
                publish_category(staging, uri, record, cfg.s3)
                log.info("preprocess: %s done (%d images, %d regions)", category, record["images"],
                         record["regions"])
        unfinished = sorted(c for c, n in waiting.items() if n)
        if unfinished:
            raise RuntimeError(f"preprocess: images unaccounted for in {', '.join(unfinished)}")
    finally:
        io.delete_dir(staging, cfg.s3)
    done = [p for parts_of in staged.values() for p in parts_of.values()]
    return PreprocessStats(uri, tuple(plan.pending), plan.complete, plan.stale,
                           sum(int(p["images"]) for p in done), sum(int(p["regions"]) for p in done))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(parser)
    cfg = start_job(parser.parse_args(argv))
    print(run_preprocess(cfg))


if __name__ == "__main__":
    main()
