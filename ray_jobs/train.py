"""Ray Train entrypoint: ``ncd.train.engine.train`` under DDP with ``TorchTrainer``.

    python -m ray_jobs.train --config demo_smoke --regions outputs/demo_smoke/regions \
        --num-workers 2 [--use-gpu] [--set train.epochs=4]

Checkpoints go to ``RunConfig(storage_path, name)`` (local dir or ``s3://``); running
again with the same name resumes from the latest checkpoint (Ray Train restores the
run's checkpoint state from storage), and ``FailureConfig`` retries failed workers
from it.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, WorkerGroupError
from ray.train.torch import TorchTrainer

from ncd.config import ConfigError, ExperimentConfig, S3Config, absolute_paths, from_dict, public_dict
from ncd.data import io
from ncd.data.io import DataError
from ncd.data.region_refs import is_light, light_regions, read_rows, source_of
from ncd.data.region_table import read_regions
from ncd.infer.predict import load_model, save_model
from ncd.pipeline import choose_k, finish_model
from ncd.train import checkpoint as ckpt
from ncd.train.engine import train
from ncd.validation import validate
from ray_jobs.infer import ray_inference, run_inference
from ray_jobs.session import add_job_arguments, run_storage, start_job

log = logging.getLogger(__name__)


def checkpoint_uri(checkpoint: Checkpoint) -> str:
    """Where a Ray checkpoint folder lies, as an ncd URI (``s3://`` or a local path)."""
    return f"s3://{checkpoint.path}" if checkpoint.filesystem.type_name == "s3" else checkpoint.path


def report_checkpoint(report: Callable[..., None], checkpoint_cls: type, metrics: dict[str, Any],
                      state: dict[str, Any] | None) -> None:
    """``report`` (Ray Train's or Tune's) the metrics and, when given, a checkpoint folder holding ``state``."""
    if state is None:
        report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt.save(state, os.path.join(tmp, ckpt.CHECKPOINT_FILE))
        report(metrics, checkpoint=checkpoint_cls.from_directory(tmp))


def newest_checkpoint(checkpoint: Checkpoint | None, s3: S3Config | None) -> ckpt.Found | None:
    """The newest readable of Ray's latest checkpoint and the older ones beside it in the run folder."""
    if checkpoint is None:
        return None
    uri = checkpoint_uri(checkpoint)
    run, name = uri.rstrip("/").rsplit("/", 1)
    older = sorted({f.split("/", 1)[0] for f in io.list_files(run, s3) if f.count("/") == 1
                    and f.endswith("/" + ckpt.CHECKPOINT_FILE) and f.startswith("checkpoint_") and f < name},
                   reverse=True)
    return ckpt.newest_readable([io.join(d, ckpt.CHECKPOINT_FILE) for d in [uri] + [io.join(run, o) for o in older]],
                                s3)


def result_state(result: ray.train.Result, s3: S3Config | None = None) -> dict[str, Any]:
    """The state dict of a finished run's checkpoint."""
    return ckpt.load(io.join(checkpoint_uri(result.checkpoint), ckpt.CHECKPOINT_FILE), s3)


class RayTrainContext:
    """``ncd.train.engine.RunContext`` on a Ray Train worker; every report carries ``novel_regions``,
    the number of unlabelled regions this worker trains on. Ray keeps the newest
    ``train.keep_checkpoints``."""

    def __init__(self, novel_regions: int, s3: S3Config | None = None) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.novel_regions, self.s3 = novel_regions, s3
        self.history: list[dict[str, Any]] = []

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model)

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        metrics = {**metrics, "novel_regions": self.novel_regions}
        self.history.append(metrics)
        report_checkpoint(ray.train.report, Checkpoint, metrics, checkpoint)

    def latest_checkpoint(self) -> ckpt.Found | None:
        return newest_checkpoint(ray.train.get_checkpoint(), self.s3)

    def set_aside(self, found: ckpt.Found) -> None:
        """Nothing to move: the fresh run's checkpoints replace the old ones (``train.keep_checkpoints``)."""


def stored_regions(cfg: ExperimentConfig, regions_uri: str) -> pa.Table:
    """The stored region table, filtered to ``data.categories`` when set (one category's model)."""
    novel = read_regions(regions_uri, cfg.s3)
    if cfg.data.categories:
        novel = novel.filter(pc.is_in(novel.column("category"), pa.array(list(cfg.data.categories))))
    return novel


def light_stored_regions(cfg: ExperimentConfig, regions_uri: str) -> pa.Table:
    """``stored_regions`` without the crops (``ncd.data.region_refs.light_regions``)."""
    novel = light_regions(regions_uri, cfg.s3)
    if cfg.data.categories:
        novel = novel.filter(pc.is_in(novel.column("category"), pa.array(list(cfg.data.categories))))
    return novel


def hand_over(table: pa.Table) -> Any:
    """What goes to the workers for a table: the table itself (an object ref), or for a
    light table (``ncd.data.region_refs``) its source URI and region ids, so that its crops go
    from storage to the workers and never through the driver."""
    if is_light(table):
        return {"uri": source_of(table), "region_ids": ray.put(table.column("region_id").combine_chunks())}
    return ray.put(table)


def take_over(handed: Any, cfg: ExperimentConfig) -> pa.Table:
    """The table ``hand_over`` sent, on a worker."""
    if isinstance(handed, dict):
        return read_rows(handed["uri"], ray.get(handed["region_ids"]), cfg.s3)
    return ray.get(handed)


def worker_tables(config: dict[str, Any], cfg: ExperimentConfig) -> tuple[pa.Table, pa.Table | None]:
    """The novel and base tables a worker trains on: exactly the tables the driver handed
    over (``hand_over``), or, given a URI, the stored table (``data.categories`` filters it)
    and ``train.base_table``."""
    if not isinstance(config["regions"], str):
        return (take_over(config["regions"], cfg),
                take_over(config["base"], cfg) if config.get("base") is not None else None)
    novel = stored_regions(cfg, config["regions"])
    return novel, (read_regions(cfg.train.base_table, cfg.s3) if cfg.train.base_table else None)


def train_worker(config: dict[str, Any]) -> None:
    """Per-worker function: the region tables, then the shared loop."""
    cfg = from_dict(ExperimentConfig, config["cfg"])
    novel, base = worker_tables(config, cfg)
    train(cfg, novel, base, RayTrainContext(novel.num_rows, cfg.s3))


def build_trainer(cfg: ExperimentConfig, regions: str | pa.Table, num_workers: int, use_gpu: bool,
                  storage_path: str | None = None, name: str | None = None, max_failures: int = 2,
                  cpus_per_worker: float = 1.0, base: pa.Table | None = None) -> TorchTrainer:
    """``regions`` (and ``base``) as tables go to the workers through the object store, as
    they are; as a URI, each worker reads it (``base`` then comes from ``train.base_table``)."""
    cfg = absolute_paths(validate(cfg))
    if not isinstance(cfg.train.num_novel, int):  # auto / gt: resolved once here, so every worker has the same K
        table = regions if isinstance(regions, pa.Table) else light_stored_regions(cfg, io.absolute(regions))
        cfg, _ = choose_k(cfg, table, infer=ray_inference)
    loop_config: dict[str, Any] = {"cfg": public_dict(cfg),  # no secrets: workers read credentials from their env
                                   "regions": hand_over(regions) if isinstance(regions, pa.Table) else io.absolute(regions)}
    if isinstance(regions, pa.Table):
        loop_config["base"] = None if base is None else hand_over(base)
    storage = io.absolute(storage_path or io.join(cfg.output, "ray_train"))
    # s3://: ncd's filesystem (endpoint; credentials from the environment) and, as Ray requires
    # with a custom ``storage_filesystem``, the path inside it ("bucket/prefix", no scheme).
    filesystem, fs_path = run_storage(storage, cfg.s3)
    return TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=name or cfg.name, storage_path=fs_path, storage_filesystem=filesystem,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )


def run_train(cfg: ExperimentConfig, regions: str | pa.Table, num_workers: int = 1, use_gpu: bool = False,
              **kwargs: Any):
    """Fit on the current Ray cluster; returns the ``ray.train.Result`` (see ``build_trainer``).
    A worker's config or data error (a stale checkpoint refused, say) is raised as itself, one
    line, not as Ray's report."""
    try:
        return build_trainer(cfg, regions, num_workers, use_gpu, **kwargs).fit()
    except WorkerGroupError as err:
        for failure in err.worker_failures.values():
            cause: BaseException | None = failure
            while cause is not None:
                if isinstance(cause, (ConfigError, DataError)):
                    raise type(cause)(str(cause)) from None
                cause = cause.__cause__ or getattr(cause, "cause", None)
        raise


def save_finished_model(cfg: ExperimentConfig, checkpoint: Checkpoint, regions_uri: str, num_actors: int = 1,
                        use_gpu: bool = False) -> str:
    """``<output>/model.pt`` from a run's final checkpoint, finished as every ncd model is
    (``ncd.pipeline.finish_model``: refined prototypes, familiarity bank) after one Ray
    inference pass over the training regions; returns its URI."""
    trained = load_model(io.join(checkpoint_uri(checkpoint), ckpt.CHECKPOINT_FILE), cfg.s3)
    novel = light_stored_regions(cfg, regions_uri)
    outputs = run_inference(trained, novel, num_actors=num_actors, use_gpu=use_gpu, s3=cfg.s3)
    trained = finish_model(trained, outputs, novel.column("image_id").to_pylist())[0]
    out = io.join(cfg.output, "model.pt")
    save_model(trained, out, cfg.s3)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(parser)
    parser.add_argument("--regions", default=None, help="region table (default <preprocess.output>/regions)")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--storage-path", default=None, help="run storage, local or s3:// (default <output>/ray_train)")
    parser.add_argument("--name", default=None, help="run name; the same name resumes")
    args = parser.parse_args(argv)
    cfg = start_job(args)
    regions = args.regions or io.join(cfg.preprocess.output, "regions")
    result = run_train(cfg, regions, args.num_workers, args.use_gpu, storage_path=args.storage_path, name=args.name)
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    if result.checkpoint is not None:
        out = save_finished_model(cfg, result.checkpoint, regions, args.num_workers, args.use_gpu)
        print(f"model -> {out}")


if __name__ == "__main__":
    main()
