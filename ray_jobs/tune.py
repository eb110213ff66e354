"""Ray Tune over the training run: K, loss weights, teacher temperature, learning rate.

    python -m ray_jobs.tune --config demo --set tune.k_values=4,5,6,7 --set tune.memax_weight=2,4

Each trial is the shared training loop (``ncd.train.engine.train``) with the trial's values
applied as ``--set`` keys, on exactly the region tables ``run_tune`` was handed (through
the object store). Selection is label-free by default: ``k_score``
(``ncd.evaluate.selection.cluster_score``: the cosine silhouette of the region features under
the model's own partition; in ProtoAnomalyNCD mode the prototype score of its trained
prototypes), reported every epoch and computed identically for every trial,
whatever its loss weights, temperatures or K; ASHA prunes on it when more than a K grid
is searched. ``nmi`` (needs gt) is reported for benchmarks and selectable with
``tune.metric=nmi``. ``cluster_loss`` (the selected head's training clustering loss,
which contains ``memax_weight x L_me``) is reported but not selectable. With a K grid
and ``tune.num_samples`` larger than it, the repeats of each K run with different seeds
(``train.seed``, ``train.seed + 1``, ...). With ``train.per_category`` each category is
searched on its own regions (``<storage>/<category>/``). All trials and the best config
are written to ``<storage>/`` (default ``<output>/tune/``).
"""
from __future__ import annotations

import argparse
import logging
import math
from typing import Any

import numpy as np
import pyarrow as pa
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from ncd.data import io
from ncd.train import checkpoint as ckpt
from ncd.config import (ExperimentConfig, absolute_paths, apply_overrides, dump_config, from_dict,
                        public_dict)
from ncd.data.region_refs import full_rows
from ncd.data.region_table import REGIONS_DIR, read_regions
from ncd.evaluate.metrics import cluster_metrics
from ncd.evaluate.selection import cluster_score, score_sample
from ncd.infer.predict import TrainedModel, image_predictions, region_probabilities
from ncd.model.heads import select_head
from ncd.pipeline import SYNTHETIC_BASE, base_set, category_groups, choose_k, local_infer
from ncd.train.datasets import base_classes
from ncd.train.engine import train
from ncd.train.refine import refine_trained
from ncd.validation import validate
from ray_jobs.session import add_job_arguments, run_storage, start_job
from ray_jobs.train import newest_checkpoint, report_checkpoint

log = logging.getLogger(__name__)
SEARCH_KEYS = {  # TuneConfig field -> experiment key
    "k_values": "train.num_novel",
    "memax_weight": "loss.memax_weight",
    "sup_weight": "loss.sup_weight",
    "lr": "train.lr",
    "teacher_temp": "loss.teacher_temp",
}
MODES = {"k_score": "max", "nmi": "max"}
GT_METRICS = ("nmi", "ari", "f1")


def _cluster_loss(metrics: dict[str, Any]) -> float:
    heads = [v for k, v in metrics.items() if k.startswith("cluster_head") and not math.isnan(v)]
    return min(heads) if heads else math.nan


class TuneContext:
    """``ncd.train.engine.RunContext`` inside a Tune trial (one process, the trial's device); every
    epoch's report carries ``k_score`` of the model as it stands, on ``score_regions``."""

    rank, world_size = 0, 1

    def __init__(self, device: str, cfg: ExperimentConfig, num_base: int, score_regions: pa.Table) -> None:
        import torch

        self.device = torch.device(device)
        self.cfg, self.num_base, self.score_regions = cfg, num_base, score_regions
        self.model = None
        self.k_score = math.nan

    def prepare_model(self, model):
        self.model = model.to(self.device)
        return self.model

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        out = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        out["cluster_loss"] = _cluster_loss(metrics)
        heads = [metrics[f"cluster_head{h}"] for h in range(self.cfg.model.n_head)]
        if any(not math.isnan(v) for v in heads):
            trained = TrainedModel(self.model, self.cfg, {"num_base": self.num_base}, select_head(heads))
            self.k_score = cluster_score(trained, self.score_regions)
        out["k_score"] = self.k_score
        out.update({name: math.nan for name in GT_METRICS})  # known only after training
        report_checkpoint(tune.report, tune.Checkpoint, out, checkpoint)

    def latest_checkpoint(self) -> ckpt.Found | None:
        """A restored trial's newest readable checkpoint."""
        return newest_checkpoint(tune.get_checkpoint(), self.cfg.s3)

    def set_aside(self, found: ckpt.Found) -> None:
        """Nothing to move: Tune keeps the newest ``train.keep_checkpoints`` of the trial."""


def gt_scores(trained: TrainedModel, regions: pa.Table) -> dict[str, float]:
    """Image-level ``nmi``/``ari``/``f1`` when every image has gt, else nothing; of the model as
    discover would save it (its prototypes refined, ``refine.*``)."""
    trained, outputs, _ = refine_trained(trained, local_infer(trained, regions), trained.cfg.train.seed)
    probs = region_probabilities(trained, outputs.logits)
    images, _ = image_predictions(regions, probs, trained.cfg.infer.area_temperature)
    truth = images.column("gt_type").to_pylist()
    return cluster_metrics(truth, images.column("cluster").to_pylist()) if all(truth) else {}


def trial(config: dict[str, Any], regions: pa.Table, base: pa.Table | None) -> None:
    """One Tune trial: the base config with this trial's ``--set`` values, on ``regions``/``base``."""
    import torch

    cfg = apply_overrides(from_dict(ExperimentConfig, config["base"]),
                          [f"{key}={value}" for key, value in config["params"].items()])
    # a light table (Ray preprocessing hands those to the driver): the trial reads its crops itself
    regions = full_rows(regions, cfg.s3)
    base = full_rows(base, cfg.s3) if base is not None else None
    ctx = TuneContext("cuda" if torch.cuda.is_available() else "cpu", cfg, len(base_classes(base)),
                      score_sample(regions))
    result = train(cfg, regions, base, ctx)
    trained = TrainedModel(result.model.eval(), cfg, result.class_map, result.selected_head)
    final = dict(result.history[-1]) if result.history else {}
    scores = {name: math.nan for name in GT_METRICS} | gt_scores(trained, regions)
    tune.report({**final, "cluster_loss": _cluster_loss(final), "k_score": ctx.k_score,
                 "novel_regions": regions.num_rows, **scores})


def search_space(cfg: ExperimentConfig) -> dict[str, Any]:
    """The searched keys: a grid over K, a random choice over the other ``tune.*`` lists, and
    ``tune.num_samples // len(K grid)`` seeds as a grid (one trial per grid point), so repeats
    of a K never repeat the same run."""
    params: dict[str, Any] = {}
    for field, key in SEARCH_KEYS.items():
        values = getattr(cfg.tune, field)
        if values:
            params[key] = tune.grid_search(list(values)) if field == "k_values" else tune.choice(list(values))
    if not params:
        raise ValueError("nothing to search: set at least one of tune.k_values, tune.memax_weight, tune.sup_weight, "
                         "tune.lr, tune.teacher_temp (e.g. --set tune.k_values=4,5,6)")
    repeats = max(1, cfg.tune.num_samples // (len(cfg.tune.k_values) or 1))
    if repeats > 1:
        params["train.seed"] = tune.grid_search([cfg.train.seed + i for i in range(repeats)])
    return params


def run_tune(cfg: ExperimentConfig, regions: pa.Table | str, storage_path: str | None = None) -> dict[str, Any]:
    """Run the search on the connected cluster over ``regions`` (a table, or a URI read
    here); one search per category with ``train.per_category``. Returns the best trial's
    summary, or ``{"per_category": {category: summary}, ...}``."""
    metric = cfg.tune.metric
    if metric not in MODES:
        raise ValueError(f"tune.metric={metric!r}; valid: {', '.join(MODES)} (cluster_loss contains "
                         "memax_weight x L_me and is not a fair selection score)")
    cfg = absolute_paths(validate(cfg))
    if not isinstance(regions, pa.Table):
        regions = read_regions(io.absolute(regions), cfg.s3)
    base = None
    if cfg.train.base_table == SYNTHETIC_BASE:  # built once here, handed to every trial
        from ray_jobs.discover import ray_stages

        base = base_set(cfg, ray_stages())
        cfg = apply_overrides(cfg, [f"train.base_table={io.join(cfg.output, 'base', REGIONS_DIR)}"])
    elif cfg.train.base_table:
        base = read_regions(cfg.train.base_table, cfg.s3)
    storage = io.absolute(storage_path or io.join(cfg.output, "tune"))
    groups = category_groups(cfg, regions)
    if len(groups) == 1:
        return _search(cfg, regions, base, storage)
    per_category = {name: _search(apply_overrides(cfg, [f"data.categories={name}", f"name={cfg.name}-{name}"]),
                                  part, base, io.join(storage, name))
                    for name, part in groups}
    return {"per_category": per_category, "metric": metric, "storage": storage,
            "num_trials": sum(s["num_trials"] for s in per_category.values())}


def _search(cfg: ExperimentConfig, regions: pa.Table, base: pa.Table | None, storage: str) -> dict[str, Any]:
    """One Tune search over ``regions``; trials and the best config written to ``storage``."""
    metric = cfg.tune.metric
    if not cfg.tune.k_values and not isinstance(cfg.train.num_novel, int):  # auto / gt: once, for every trial
        cfg, _ = choose_k(cfg, regions)
    params = search_space(cfg)
    # ASHA compares trials on the per-epoch k_score; a pure K grid runs every K to the end
    prune = metric == "k_score" and (len(params) > 1 or "train.num_novel" not in params)
    scheduler = (ASHAScheduler(time_attr="training_iteration", grace_period=cfg.tune.grace_period,
                               max_t=cfg.train.epochs + 1) if prune else FIFOScheduler())
    trainable = tune.with_resources(tune.with_parameters(trial, regions=regions, base=base),
                                    {"cpu": cfg.tune.cpus_per_trial, "gpu": cfg.tune.gpus_per_trial})
    tuner = tune.Tuner(
        trainable,
        param_space={"base": public_dict(cfg), "params": params},
        tune_config=tune.TuneConfig(metric=metric, mode=MODES[metric], scheduler=scheduler, num_samples=1),
        run_config=tune.RunConfig(name=cfg.name, storage_path=storage,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                                  storage_filesystem=run_storage(storage, cfg.s3)[0]),
    )
    results = tuner.fit()
    frame = results.get_dataframe()
    best = results.get_best_result(metric=metric, mode=MODES[metric], scope="last")
    best_params = best.config["params"]
    best_cfg = apply_overrides(cfg, [f"{k}={v}" for k, v in best_params.items()])
    keep = [c for c in frame.columns if c.startswith("config/params/") or c in
            ("trial_id", "cluster_loss", "k_score", *GT_METRICS, "novel_regions", "epoch", "training_iteration")]
    io.write_table(pa.Table.from_pandas(frame[keep].reset_index(drop=True)), io.join(storage, "trials.csv"), cfg.s3)
    io.write_bytes(io.join(storage, "best_config.yaml"), dump_config(best_cfg).encode(), cfg.s3)
    return {"best_params": best_params, "metric": metric, "best_value": best.metrics.get(metric),
            "num_trials": len(frame), "storage": storage, "scores_by_k": _scores_by_k(frame, metric)}


def _scores_by_k(frame, metric: str) -> dict[int, float] | None:
    column = "config/params/train.num_novel"
    if column not in frame.columns or metric not in frame.columns:
        return None
    agg = frame.groupby(column)[metric].agg("max" if MODES[metric] == "max" else "min")
    return {int(k): float(v) for k, v in agg.items() if not np.isnan(v)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(parser)
    parser.add_argument("--regions", default=None, help="region table (default <preprocess.output>/regions)")
    parser.add_argument("--estimate-k", default=None, metavar="LO..HI",
                        help="grid over K (one training per K), selected by k_score, e.g. 2..12")
    parser.add_argument("--storage-path", default=None)
    args = parser.parse_args(argv)
    sets = list(args.overrides)
    if args.estimate_k:
        lo, hi = (int(v) for v in args.estimate_k.split(".."))
        sets += [f"tune.k_values={','.join(str(k) for k in range(lo, hi + 1))}", "tune.metric=k_score",
                 f"tune.num_samples={hi - lo + 1}"]
    cfg = start_job(args, sets)
    summary = run_tune(cfg, args.regions or io.join(cfg.preprocess.output, "regions"), args.storage_path)
    print(summary)


if __name__ == "__main__":
    main()
