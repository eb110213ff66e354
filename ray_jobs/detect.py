"""``ncd detect`` on Ray: patch features on a Ray Data actor pool (GPU when asked), then
every stratified subset of every category scored as its own task against the category's
reference (put in the object store once), and each category's maps written by a task.
The results equal the in-process path's (``ncd.detect.detect_local``).

    python -m ray_jobs.detect --config C [--images DIR --layout L --out MAPS] [--num-actors N --use-gpu]
"""
from __future__ import annotations

import argparse
import logging
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from ncd.cli import Progress as ProgressLine, add_detect_arguments, detect_config
from ncd.config import DetectConfig, ExperimentConfig, S3Config, absolute_paths, redacted_s3
from ncd.data.catalog import catalog_images
from ncd.detect.features import PatchFeatureExtractor
from ncd.detect.maps import write_maps
from ncd.detect.run import (FEW_SHOT, CategoryResult, Features, Progress, detect_category, feature_batch,
                            feature_rows, maps_root, plan_detection, score_subset, score_table,
                            stratified_subsets, write_scores)
from ray_jobs.session import add_detect_ray_arguments, setup_logging, start_ray

log = logging.getLogger(__name__)


class FeatureActor:
    """A Ray Data actor holding the detector's backbone: image rows -> stored features."""

    def __init__(self, cfg: DetectConfig, s3: S3Config, threads: int = 0,
                 model_kwargs: Mapping[str, Any] | None = None) -> None:
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        self.extractor = PatchFeatureExtractor(cfg, s3, model_kwargs=model_kwargs)
        self.s3 = s3

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [{"image_id": i, "image_uri": u} for i, u in zip(batch["image_id"], batch["image_uri"])]
        f = feature_batch(self.extractor, rows, self.s3)
        return {"image_id": np.array(f.ids), "layers": f.layers, "cls": f.cls, "shapes": f.shapes}


@ray.remote
def _score(query: np.ndarray, self_index: np.ndarray, reference: np.ndarray, mode: str,
           cfg: DetectConfig) -> np.ndarray:
    return score_subset(query, self_index, reference, mode, cfg)


@ray.remote
def _write(ids: list[str], patch_maps: np.ndarray, shapes: np.ndarray, lo: float, hi: float, root: str,
           blur: float, cfg: DetectConfig, s3: S3Config) -> list[str]:
    return write_maps(ids, patch_maps, shapes, lo, hi, root, blur, cfg.image_size, cfg.write_npy, s3)


def ray_features(rows: Sequence[dict], cfg: DetectConfig, s3: S3Config, num_actors: int, use_gpu: bool,
                 progress: Progress | None, model_kwargs: Mapping[str, Any] | None) -> Features:
    """Features of ``rows`` from ``num_actors`` actors; batches come back as they finish."""
    ds = ray.data.from_items([{"image_id": r["image_id"], "image_uri": r["image_uri"]} for r in rows])
    out = ds.map_batches(FeatureActor, fn_constructor_kwargs={"cfg": cfg, "s3": s3, "threads": 0 if use_gpu else 1,
                                                              "model_kwargs": model_kwargs},
                         batch_size=cfg.batch_size, batch_format="numpy", num_gpus=1 if use_gpu else 0,
                         num_cpus=1, compute=ray.data.ActorPoolStrategy(size=num_actors))
    parts, done = [], 0
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        parts.append(Features(list(batch["image_id"]), np.asarray(batch["layers"]), np.asarray(batch["cls"]),
                              np.asarray(batch["shapes"])))
        done += len(batch["image_id"])
        if progress:
            progress("features", done, len(rows))
    features = Features.concat(parts)
    return features.take([r["image_id"] for r in rows])  # the rows' order, whatever the actors' order


def run_detect(cfg: ExperimentConfig, rows: Sequence[dict] | None = None, num_actors: int = 1,
               use_gpu: bool = False, progress: Progress | None = None,
               model_kwargs: Mapping[str, Any] | None = None) -> pa.Table:
    """``ncd detect`` on the connected Ray cluster; returns the image-score table (also
    written beside the maps), as ``detect_local``."""
    cfg = absolute_paths(cfg)
    rows = list(rows) if rows is not None else catalog_images(cfg.data, cfg.s3)
    jobs = plan_detection(rows, cfg.detect, cfg.s3)
    worker_s3 = redacted_s3(cfg.s3)  # workers take S3 credentials from their environment
    features = ray_features(feature_rows(jobs), cfg.detect, worker_s3, num_actors, use_gpu, progress, model_kwargs)
    root = maps_root(cfg)
    lock, finished = threading.Lock(), [0]
    total = sum(len(stratified_subsets([r["gt_type"] for r in j.images], cfg.detect.subset_size, cfg.detect.seed))
                for j in jobs)

    def run_subsets(reference, subsets, mode, dcfg):
        ref = ray.put(reference)
        score = _score.options(num_gpus=1) if use_gpu else _score
        pending = [score.remote(q, s, ref, mode, dcfg) for q, s in subsets]
        waiting = list(pending)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            with lock:
                finished[0] += len(ready)
                if progress:
                    progress("score", finished[0], total)
        return ray.get(pending)

    def one(job) -> CategoryResult:
        res = detect_category(job, features, cfg.detect, run_subsets)
        lo, hi = res.range
        ids = [r["image_id"] for r in job.images]
        blur = cfg.detect.blur_sigma if job.mode == FEW_SHOT else 0.0
        ray.get(_write.remote(ids, res.patch_maps, features.take(ids).shapes, lo, hi, root, blur, cfg.detect,
                              worker_s3))
        log.info("detect: %s (%s, %d images) done", job.category, job.mode, len(job.images))
        return res

    with ThreadPoolExecutor(max_workers=min(8, len(jobs))) as pool:  # categories side by side
        results = list(pool.map(one, jobs))
    table = score_table(results, root)
    write_scores(table, root, cfg.s3)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_detect_arguments(parser)
    add_detect_ray_arguments(parser)
    args = parser.parse_args(argv)
    args.verbose = getattr(args, "verbose", False)
    setup_logging(args.verbose)
    cfg = detect_config(args)
    start_ray(args.address, cfg.s3, args.verbose)
    table = run_detect(cfg, num_actors=args.num_actors, use_gpu=args.use_gpu, progress=ProgressLine())
    print(f"{table.num_rows} maps -> {maps_root(cfg)} (image scores: image_scores.parquet)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
