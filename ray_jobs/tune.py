"""Ray Tune over the training run: K, loss weights, teacher temperature, learning rate.

    python -m ray_jobs.tune --config demo --set tune.k_values=4,5,6,7 --set tune.memax_weight=2,4

Each trial is the shared training loop (``ncd.engine.train``) with the trial's values
applied as ``--set`` keys, reporting every epoch to Tune. Selection is label-free by
default: ``cluster_loss`` (the selected head's distillation + mean-entropy loss, with
ASHA early stopping on it) or ``k_score`` (comparable across K: the cosine silhouette
of the trained region embeddings under the model's own partition; in ProtoAnomalyNCD
mode the prototype score of the trained prototypes). ``nmi`` (needs gt)
is reported for benchmarks and selectable with ``tune.metric=nmi``. All trials and the
best config are written to ``<output>/tune/``.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from ncd import io
from ncd.config import (ExperimentConfig, absolute_paths, apply_overrides, dump_config, from_dict, load_config,
                        to_dict)
from ncd.engine import CHECKPOINT_FILE, save_checkpoint, train
from ncd.k_estimation import trained_k_score
from ncd.metrics import cluster_metrics
from ncd.pipeline import SYNTHETIC_BASE, base_set, choose_k, local_infer
from ncd.predict import TrainedModel, image_predictions, region_probabilities
from ncd.region_table import REGIONS_DIR, read_regions
from ncd.validation import validate

log = logging.getLogger(__name__)
SEARCH_KEYS = {  # TuneConfig field -> experiment key
    "k_values": "train.num_novel",
    "memax_weight": "loss.memax_weight",
    "sup_weight": "loss.sup_weight",
    "lr": "train.lr",
    "teacher_temp": "loss.teacher_temp",
}
MODES = {"cluster_loss": "min", "k_score": "max", "nmi": "max"}
FINAL_METRICS = ("k_score", "nmi", "ari", "f1")


class TuneContext:
    """``ncd.engine.RunContext`` inside a Tune trial (one process, the trial's device)."""

    rank, world_size = 0, 1

    def __init__(self, device: str) -> None:
        import torch

        self.device = torch.device(device)

    def prepare_model(self, model):
        return model.to(self.device)

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        heads = [v for k, v in metrics.items() if k.startswith("cluster_head") and not math.isnan(v)]
        out = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        out["cluster_loss"] = min(heads) if heads else math.nan
        out.update({name: math.nan for name in FINAL_METRICS})  # known only after training
        if checkpoint is None:
            tune.report(out)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(checkpoint, os.path.join(tmp, CHECKPOINT_FILE))
            tune.report(out, checkpoint=tune.Checkpoint.from_directory(tmp))

    def latest_checkpoint(self) -> dict[str, Any] | None:
        return None


def final_scores(trained: TrainedModel, regions: pa.Table) -> dict[str, float]:
    """Label-free ``k_score`` and, when gt exists, image-level ``nmi``/``ari``/``f1``."""
    outputs = local_infer(trained, regions)
    probs = region_probabilities(trained, outputs.logits)
    prototypes = trained.model.heads.prototypes()[trained.head, trained.class_map["num_base"]:]
    scores = {"k_score": trained_k_score(trained.cfg.method, outputs.feat, probs, prototypes.detach().cpu().numpy())}
    images, _ = image_predictions(regions, probs, trained.cfg.infer.area_temperature)
    truth = images.column("gt_type").to_pylist()
    if all(truth):
        scores.update(cluster_metrics(truth, images.column("cluster").to_pylist()))
    return scores


def trial(config: dict[str, Any]) -> None:
    """One Tune trial: the base config with this trial's ``--set`` values."""
    import torch

    cfg = apply_overrides(from_dict(ExperimentConfig, config["base"]),
                          [f"{key}={value}" for key, value in config["params"].items()])
    regions = read_regions(config["regions"], cfg.s3)
    base = read_regions(cfg.train.base_table, cfg.s3) if cfg.train.base_table else None
    ctx = TuneContext("cuda" if torch.cuda.is_available() else "cpu")
    result = train(cfg, regions, base, ctx)
    trained = TrainedModel(result.model.eval(), cfg, result.class_map, result.selected_head)
    final = dict(result.history[-1]) if result.history else {}
    heads = [v for k, v in final.items() if k.startswith("cluster_head") and not math.isnan(v)]
    scores = {name: math.nan for name in FINAL_METRICS} | final_scores(trained, regions)
    tune.report({**final, "cluster_loss": min(heads) if heads else math.nan, **scores})


def param_space(cfg: ExperimentConfig) -> dict[str, Any]:
    """Grid over K, random choice over the other searched keys (``tune.*`` lists)."""
    params: dict[str, Any] = {}
    for field, key in SEARCH_KEYS.items():
        values = getattr(cfg.tune, field)
        if values:
            params[key] = tune.grid_search(list(values)) if field == "k_values" else tune.choice(list(values))
    if not params:
        raise ValueError("nothing to search: set at least one of tune.k_values, tune.memax_weight, tune.sup_weight, "
                         "tune.lr, tune.teacher_temp (e.g. --set tune.k_values=4,5,6)")
    return params


def run_tune(cfg: ExperimentConfig, regions_uri: str, storage_path: str | None = None) -> dict[str, Any]:
    """Run the search on the connected cluster; returns the best trial's summary."""
    metric = cfg.tune.metric
    if metric not in MODES:
        raise ValueError(f"tune.metric={metric!r}; valid: {', '.join(MODES)}")
    cfg = absolute_paths(validate(cfg))
    regions_uri = io.absolute(regions_uri)
    if not cfg.tune.k_values and not isinstance(cfg.train.num_novel, int):  # auto / gt: once, for every trial
        cfg, _ = choose_k(cfg, read_regions(regions_uri, cfg.s3))
    if cfg.train.base_table == SYNTHETIC_BASE:  # built once here, read by every trial
        from ray_jobs.discover import ray_stages

        base_set(cfg, ray_stages())
        cfg = apply_overrides(cfg, [f"train.base_table={io.join(cfg.output, 'base', REGIONS_DIR)}"])
    storage = io.absolute(storage_path or io.join(cfg.output, "tune"))
    k_grid = len(cfg.tune.k_values) or 1
    scheduler = (ASHAScheduler(time_attr="training_iteration", grace_period=cfg.tune.grace_period,
                               max_t=cfg.train.epochs + 1)
                 if metric == "cluster_loss" else FIFOScheduler())
    trainable = tune.with_resources(trial, {"cpu": cfg.tune.cpus_per_trial, "gpu": cfg.tune.gpus_per_trial})
    tuner = tune.Tuner(
        trainable,
        param_space={"base": to_dict(cfg), "regions": regions_uri, "params": param_space(cfg)},
        tune_config=tune.TuneConfig(metric=metric, mode=MODES[metric], scheduler=scheduler,
                                    num_samples=max(1, cfg.tune.num_samples // k_grid)),
        run_config=tune.RunConfig(name=cfg.name, storage_path=storage,
                                  storage_filesystem=io.filesystem(storage, cfg.s3)[0] if io.is_s3(storage) else None),
    )
    results = tuner.fit()
    frame = results.get_dataframe()
    best = results.get_best_result(metric=metric, mode=MODES[metric], scope="last")
    best_params = best.config["params"]
    best_cfg = apply_overrides(cfg, [f"{k}={v}" for k, v in best_params.items()])
    keep = [c for c in frame.columns if c.startswith("config/params/") or c in
            ("trial_id", "cluster_loss", "k_score", "nmi", "ari", "f1", "epoch", "training_iteration")]
    io.write_table(pa.Table.from_pandas(frame[keep].reset_index(drop=True)), io.join(storage, "trials.csv"), cfg.s3)
    io.write_bytes(io.join(storage, "best_config.yaml"), dump_config(best_cfg).encode(), cfg.s3)
    summary = {"best_params": best_params, "metric": metric, "best_value": best.metrics.get(metric),
               "num_trials": len(frame), "storage": storage,
               "scores_by_k": _scores_by_k(frame, metric)}
    return summary


def _scores_by_k(frame, metric: str) -> dict[int, float] | None:
    column = "config/params/train.num_novel"
    if column not in frame.columns or metric not in frame.columns:
        return None
    agg = frame.groupby(column)[metric].agg("max" if MODES[metric] == "max" else "min")
    return {int(k): float(v) for k, v in agg.items() if not np.isnan(v)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--regions", default=None, help="region table (default <preprocess.output>/regions)")
    parser.add_argument("--estimate-k", default=None, metavar="LO..HI",
                        help="grid over K (one training per K), selected by k_score, e.g. 2..12")
    parser.add_argument("--storage-path", default=None)
    parser.add_argument("--address", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    from ray_jobs.cli import config_path

    sets = list(args.overrides)
    if args.estimate_k:
        lo, hi = (int(v) for v in args.estimate_k.split(".."))
        sets += [f"tune.k_values={','.join(str(k) for k in range(lo, hi + 1))}", "tune.metric=k_score",
                 f"tune.num_samples={hi - lo + 1}"]
    cfg = validate(load_config(config_path(args.config), sets))
    ray.init(address=args.address, ignore_reinit_error=True, log_to_driver=False)
    summary = run_tune(cfg, args.regions or io.join(cfg.preprocess.output, "regions"), args.storage_path)
    print(summary)


if __name__ == "__main__":
    main()
