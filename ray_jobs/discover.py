"""``ncd discover`` on Ray: preprocessing on Ray Data, training on Ray Train, inference
with Ray Data actors; catalog, K, evaluation and report on the driver.

    python -m ray_jobs.discover --config mtd --set data.maps=s3://bucket/maps [--num-workers 2 --use-gpu]
"""
from __future__ import annotations

import argparse
import logging

import pyarrow as pa

from ncd.cli import add_discover_arguments, discover_config, discover_here
from ncd.config import ExperimentConfig
from ncd.data.region_refs import light_regions
from ncd.infer.predict import TrainedModel, model_from_state
from ncd.pipeline import Stages, discover, summary_text
from ray_jobs.detect import run_detect
from ray_jobs.infer import run_inference
from ray_jobs.preprocess import run_preprocess
from ray_jobs.session import add_discover_ray_arguments, setup_logging, start_ray
from ray_jobs.train import result_state, run_train

log = logging.getLogger(__name__)


def ray_stages(num_workers: int = 1, use_gpu: bool = False, cpus_per_worker: float = 1.0) -> Stages:
    """Stages that run on the connected Ray cluster."""

    def preprocess(cfg: ExperimentConfig, manifest: pa.Table) -> pa.Table:
        return light_regions(run_preprocess(cfg, manifest), cfg.s3)  # the crops stay in storage

    def train(cfg: ExperimentConfig, regions: pa.Table, base: pa.Table | None) -> TrainedModel:
        # the workers train on exactly these tables (a category's part, an open-set split), reading
        # the crops of light tables from storage
        result = run_train(cfg, regions, num_workers, use_gpu, cpus_per_worker=cpus_per_worker, base=base)
        if result.error is not None:
            raise RuntimeError(f"training failed: {result.error}")
        return model_from_state(result_state(result, cfg.s3))

    def infer(trained: TrainedModel, regions: pa.Table):
        return run_inference(trained, regions, num_actors=max(1, num_workers), use_gpu=use_gpu, s3=trained.cfg.s3)

    def detect(cfg: ExperimentConfig) -> pa.Table:
        return run_detect(cfg, num_actors=max(1, num_workers), use_gpu=use_gpu)

    return Stages(preprocess, train, infer, detect)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_discover_arguments(parser)
    add_discover_ray_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    cfg = discover_config(args)
    return run(cfg, args)


def run(cfg: ExperimentConfig, args: argparse.Namespace) -> int:
    """``discover`` with the stages ``args`` ask for (``--local`` or Ray), printing its summary."""
    if args.local:
        return discover_here(cfg)
    start_ray(args.address, cfg.s3, getattr(args, "verbose", False))
    summary = discover(cfg, ray_stages(args.num_workers, args.use_gpu, args.cpus_per_worker), progress=print)
    print(summary_text(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
