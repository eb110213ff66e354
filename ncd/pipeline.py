"""``discover``: catalog -> preprocess -> train -> infer -> evaluate, into one output folder.

The heavy stages are pluggable (``Stages``): in one process here, on Ray Data and Ray
Train in ``ray_jobs/discover.py``. Everything else (tables, K estimation, metrics,
report) is this one function.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ncd.data import io
from ncd.data.catalog import build_manifest
from ncd.config import K_AUTO, K_ORACLE, ConfigError, ExperimentConfig, absolute_paths, apply_overrides, public_dict
from ncd.train.engine import LocalContext, train
from ncd.evaluate.predictions import evaluate_predictions, metrics_markdown, scored_text
from ncd.evaluate.health import CollapseError, cluster_health, collapse_message
from ncd.infer.forward import RegionOutputs
from ncd.infer.outputs import region_outputs
from ncd.evaluate.k_estimation import KEstimate, estimate_k
from ncd.methods import build_model, trains
from ncd.infer.rejection import attach_bank, prediction_tables
from ncd.infer.predict import (TrainedModel, image_predictions, region_probabilities, save_model,
                         warn_unseen_categories)
from ncd.preprocess.input_checks import input_checks, input_notes
from ncd.data.io import DataError
from ncd.train.refine import RefineResult, refine_summary, refine_trained
from ncd.data.region_refs import is_light
from ncd.data.region_table import REGIONS_DIR, read_regions, update_regions
from ncd.validation import validate

log = logging.getLogger(__name__)
SYNTHETIC_BASE = "synthetic"


@dataclass
class Stages:
    """How the heavy stages run: ``preprocess(cfg, manifest) -> regions``,
    ``train(cfg, regions, base) -> TrainedModel``, ``infer(trained, regions) -> RegionOutputs``."""

    preprocess: Callable[[ExperimentConfig, pa.Table], pa.Table]
    train: Callable[[ExperimentConfig, pa.Table, pa.Table | None], TrainedModel]
    infer: Callable[[TrainedModel, pa.Table], RegionOutputs]
    detect: Callable[[ExperimentConfig], Any] | None = None  # maps when none are given; None: in process


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def local_preprocess(cfg: ExperimentConfig, manifest: pa.Table) -> pa.Table:
    """Bring ``<preprocess.output>/regions`` up to date in this process (categories whose
    completion record matches are skipped, as on Ray) and read it back."""
    stats = update_regions(manifest, cfg.preprocess.output, cfg.mebin, cfg.crop, cfg.data, cfg.s3, cfg.proto)
    if stats.skipped:
        log.info("preprocess: %d categories already complete, skipped: %s", len(stats.skipped),
                 ", ".join(stats.skipped))
    return read_regions(stats.uri, cfg.s3)


def local_train(cfg: ExperimentConfig, regions: pa.Table, base: pa.Table | None) -> TrainedModel:
    ctx = LocalContext(io.join(cfg.output, "checkpoints"), s3=cfg.s3, keep=cfg.train.keep_checkpoints)
    result = train(cfg, regions, base, ctx)
    return TrainedModel(result.model.eval(), cfg, result.class_map, result.selected_head)


def local_infer(trained: TrainedModel, regions: pa.Table) -> RegionOutputs:
    cfg = trained.cfg
    warn_unseen_categories(trained, regions.column("category").to_pylist())
    return region_outputs(trained.model, cfg, regions, next(trained.model.parameters()).device)


LOCAL_STAGES = Stages(local_preprocess, local_train, local_infer)


def base_set(cfg: ExperimentConfig, stages: Stages) -> pa.Table | None:
    """The labelled base region table: a table URI, ncd's synthetic families, or none (also for
    a method that trains nothing).

    The synthetic base set's images and maps are written to ``<output>/base_data`` and its
    regions to ``<output>/base``, beside the run's other outputs. For an ``s3://`` output
    the images are generated in a local temporary directory (removed afterwards) and
    uploaded there, so the run leaves nothing on the local disk and Ray workers on any
    node can read them.
    """
    if not cfg.train.base_table or not trains(cfg):  # a method that trains nothing reads no labels
        return None
    if cfg.train.base_table != SYNTHETIC_BASE:
        return read_regions(cfg.train.base_table, cfg.s3)
    from ncd.data.synthetic import write_base_set

    root = io.join(cfg.output, "base_data")
    if io.is_s3(root):
        with tempfile.TemporaryDirectory(prefix="ncd-base-") as tmp:
            write_base_set(tmp)
            io.upload_dir(tmp, root, cfg.s3)
    else:
        write_base_set(root)
    base_cfg = apply_overrides(cfg, [f"data.root={root}", "data.layout=generic", "data.maps=", "data.categories=",
                                     f"preprocess.output={io.join(cfg.output, 'base')}"])
    return stages.preprocess(base_cfg, build_manifest(base_cfg.data, cfg.s3))


Infer = Callable[[TrainedModel, pa.Table], RegionOutputs]


def frozen_features(cfg: ExperimentConfig, regions: pa.Table, infer: Infer | None = None) -> np.ndarray:
    """Mask-guided CLS features of the pretrained backbone (before any training); for a
    light table (crops in storage, ``ncd.data.region_refs``) computed by ``infer`` (a stage's)."""
    torch.manual_seed(cfg.train.seed)  # the untrained head (and a random backbone) are reproducible too
    model = build_model(cfg, 0, 1)
    if is_light(regions):
        if infer is None:
            raise ValueError("features of a region table without crops need an inference stage (infer=...)")
        return infer(TrainedModel(model.eval(), cfg, {"num_base": 0, "num_novel": 1}, 0), regions).feat
    return region_outputs(model.to(device()), cfg, regions, device()).feat


def category_groups(cfg: ExperimentConfig, regions: pa.Table) -> list[tuple[str, pa.Table]]:
    """One model per category (``train.per_category``, as the paper) or one for all."""
    categories = sorted(set(regions.column("category").to_pylist()))
    if not cfg.train.per_category or len(categories) == 1:
        return [(categories[0] if len(categories) == 1 else "all", regions)]
    column = regions.column("category")
    return [(c, regions.filter(pc.equal(column, c))) for c in categories]


def true_k(regions: pa.Table) -> int:
    return len({t for t in regions.column("gt_type").to_pylist() if t})


def estimate_novel_k(cfg: ExperimentConfig, regions: pa.Table, infer: Infer | None = None,
                     feats: np.ndarray | None = None) -> KEstimate:
    """K without labels from the frozen features of ``regions`` (the model before training;
    ``feats`` when already computed), by ``infer.k_criterion`` (``ncd.evaluate.k_estimation``)
    over ``infer.k_min..k_max`` (every method)."""
    feats = frozen_features(cfg, regions, infer) if feats is None else feats
    return estimate_k(feats, cfg.infer.k_min, cfg.infer.k_max, cfg.train.seed, criterion=cfg.infer.k_criterion)


def choose_k(cfg: ExperimentConfig, regions: pa.Table,
             infer: Infer | None = None) -> tuple[ExperimentConfig, dict[str, Any]]:
    """Resolve ``train.num_novel`` for training on ``regions``: a given number, ``auto``
    (estimated without labels, logged with its criterion) or ``gt`` (the oracle count of
    ground-truth types, only when asked). Returns the config with K as a number and what
    the report shows: ``k``, ``source`` (given | estimated | oracle), ``k_estimated``,
    ``criterion``, ``scores``."""
    requested = cfg.train.num_novel
    info: dict[str, Any] = {"k": requested, "source": "given", "k_estimated": None, "criterion": None, "scores": None}
    if isinstance(requested, int):
        return cfg, info
    if requested == K_ORACLE:
        k = true_k(regions)
        if k == 0:
            raise ConfigError("train.num_novel=gt asks for the number of ground-truth types, but the regions have no "
                              "gt types: set train.num_novel to a number, or to auto")
        log.warning("K = %d: the ORACLE number of ground-truth types (train.num_novel=gt); not a label-free result", k)
        info.update(k=k, source="oracle", criterion="oracle: ground-truth type count")
    elif requested == K_AUTO:
        est = estimate_novel_k(cfg, regions, infer)
        log.info("K = %d estimated by %s over %d..%d: %s", est.k, est.criterion, min(est.scores), max(est.scores),
                 {k: round(v, 3) for k, v in est.scores.items()})
        info.update(k=est.k, source="estimated", k_estimated=est.k, criterion=est.criterion, scores=est.scores)
    else:
        validate(cfg)  # raises: names the bad value
    return apply_overrides(cfg, [f"train.num_novel={info['k']}"]), info


def k_label(info: dict[str, Any]) -> str:
    """``K = 6`` with how it was chosen, for printed summaries."""
    text = f"K = {info['k']}"
    if info.get("source") == "oracle":
        return text + " (ORACLE: the ground-truth type count, train.num_novel=gt)"
    if info.get("k_estimated") is not None:
        return text + f" (estimated by {info['criterion']}; truth {info.get('k_true')})"
    return text


def model_path(num_groups: int, name: str) -> str:
    """Where a trained model goes, relative to the output: ``model.pt`` for one model,
    else ``models/<category>.pt`` (the name path-safe: ``io.safe_name``)."""
    return "model.pt" if num_groups == 1 else f"models/{io.safe_name(name)}.pt"


def write_predictions(out: str, name: str, table: pa.Table, s3) -> None:
    io.write_table(table, io.join(out, f"{name}.parquet"), s3)
    flat = table.drop_columns([c for c in ("top3", "top3_prob") if c in table.column_names])
    flat = flat.append_column("top3", pa.array([",".join(map(str, v)) for v in table.column("top3").to_pylist()]))
    io.write_table(flat, io.join(out, f"{name}.csv"), s3)


def evaluate_tables(region_pred: pa.Table, image_pred: pa.Table,
                    k: int | dict[str, int] | None = None) -> dict[str, Any] | None:
    """Image- and region-level metrics (``k``: the K of every category, or per category),
    or None without ground truth."""
    if not any(image_pred.column("gt_type").to_pylist()):
        return None
    return {"image": evaluate_predictions(image_pred, k=k), "region": evaluate_predictions(region_pred, k=k)}


def finish_model(trained: TrainedModel, outputs: RegionOutputs, image_ids: list[str]
                 ) -> tuple[TrainedModel, RegionOutputs, RefineResult | None]:
    """A trained model made ready to save, from its outputs on its own training regions: the
    selected head's prototypes refined (``refine.*``) and the familiarity bank attached.
    Every way of training a model (discover, ``ncd train``, Ray Train) ends here."""
    trained, outputs, refined = refine_trained(trained, outputs, trained.cfg.train.seed)
    attach_bank(trained, outputs.feat, image_ids)
    return trained, outputs, refined


def refine_report(name: str, refined: RefineResult, head_images: pa.Table, cfg: ExperimentConfig,
                  progress: Callable[[str], None]) -> dict[str, Any]:
    """What the refinement did to one model's clusters, shown and returned for the summary; a
    warning when the trained heads had collapsed (the refinement may hide it)."""
    if refined.kept_start:
        log.warning(f"{name}: the refinement would have collapsed the clusters it started from, so its start was "
                    f"kept (largest cluster {refined.start_largest_share:.0%})")
    else:
        progress(f"      refined the clusters by neighbour consistency: {refined.changed_share:.0%} of regions "
                 f"moved, largest cluster {refined.start_largest_share:.0%} -> {refined.end_largest_share:.0%}")
    head_health = cluster_health(head_images.column("cluster").to_numpy(), cfg.train.num_novel,
                                 cfg.infer.collapse_share)
    if head_health["collapsed"]:
        log.warning(f"{name}: the trained heads collapsed ({head_health['largest_share']:.0%} of the images in one "
                    f"cluster, {head_health['clusters_used']} of K={cfg.train.num_novel} used); the clusters reported "
                    "are the refinement's, from k-means of the trained features")
    return {**refine_summary(refined), "head_health": head_health}


def with_detected_maps(cfg: ExperimentConfig, stages: Stages, progress: Callable[[str], None]) -> ExperimentConfig:
    """``cfg`` unchanged when the dataset has maps; else the built-in detector writes them
    to ``detect.output`` (default ``<output>/maps``) and ``data.maps`` points there."""
    from ncd.data.catalog import layout_has_maps
    from ncd.detect import detect_local, maps_root

    if layout_has_maps(cfg.data, cfg.s3):
        return cfg
    root = maps_root(cfg)
    progress(f"      no anomaly maps given: the built-in detector ({cfg.detect.mode}) writes them to {root}")
    (stages.detect or detect_local)(cfg)
    return apply_overrides(cfg, [f"data.maps={root}"])


def discover(cfg: ExperimentConfig, stages: Stages = LOCAL_STAGES,
             progress: Callable[[str], None] = lambda s: log.info(s), manifest: pa.Table | None = None) -> dict[str, Any]:
    """Run every stage; returns the summary also written to ``<output>/summary.json``.

    ``manifest`` replaces the catalog stage (a benchmark's chosen split, say).
    """
    cfg = absolute_paths(validate(cfg))
    out, s3 = cfg.output, cfg.s3
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()

    def stage(i: int, name: str) -> Callable[[], None]:
        t0 = time.perf_counter()
        progress(f"[{i}/6] {name} ...")

        def done() -> None:
            seconds[name] = round(time.perf_counter() - t0, 2)
            progress(f"[{i}/6] {name} done in {seconds[name]:.1f}s")

        return done

    done = stage(1, "catalog")
    if manifest is None:
        cfg = with_detected_maps(cfg, stages, progress)
        manifest = build_manifest(cfg.data, s3)
    io.write_table(manifest, io.join(out, "manifest.parquet"), s3)
    done()

    done = stage(2, "preprocess")
    regions = stages.preprocess(cfg, manifest)
    done()
    progress(f"      {manifest.num_rows} images -> {regions.num_rows} regions")
    checks = input_checks(manifest, regions, io.join(cfg.preprocess.output, REGIONS_DIR), s3)
    notes = input_notes(checks, manifest.num_rows)
    for note in notes:
        progress(f"      note: {note}")
    if regions.num_rows == 0:
        raise DataError(f"no defect regions in {cfg.data.root}: every anomaly map gives an empty MEBin mask "
                        "(all-constant maps?); check data.maps")

    done = stage(3, "base set")
    base = base_set(cfg, stages)
    done()

    groups = category_groups(cfg, regions)
    parts, feats, region_preds, image_preds, k_infos, heads, models, healths = [], [], [], [], {}, {}, {}, {}
    raw_image_preds, refine_infos = [], {}
    for g, (name, part) in enumerate(groups):
        label = f" ({name}, {g + 1}/{len(groups)})" if len(groups) > 1 else ""
        done = stage(4, "train" + label)
        part_cfg, k_info = choose_k(cfg, part, stages.infer)
        if len(groups) > 1:
            part_cfg = apply_overrides(part_cfg, [f"data.categories={name}",
                                                  f"output={io.join(out, 'models', io.safe_name(name))}"])
        trained = stages.train(part_cfg, part, base)
        done()
        done = stage(5, "infer" + label)
        outputs = stages.infer(trained, part)
        head_images = image_predictions(part, region_probabilities(trained, outputs.logits),
                                        cfg.infer.area_temperature, cfg.infer.unknown_threshold)[0]
        trained, outputs, refined = finish_model(trained, outputs, part.column("image_id").to_pylist())
        if refined is not None:
            raw_image_preds.append(head_images)
            refine_infos[name] = refine_report(name, refined, head_images, part_cfg, progress)
        region_table, image_table = prediction_tables(trained, part, outputs)
        region_preds.append(region_table)
        image_preds.append(image_table)
        healths[name] = cluster_health(image_preds[-1].column("cluster").to_numpy(), part_cfg.train.num_novel,
                                       cfg.infer.collapse_share)
        if healths[name]["collapsed"]:
            log.warning(collapse_message(name, healths[name], part_cfg.train.num_novel))
        models[name] = model_path(len(groups), name)
        save_model(trained, io.join(out, models[name]), s3)
        parts.append(part)
        feats.append(outputs.feat)
        heads[name] = trained.head
        k_infos[name] = {**k_info, "k_true": true_k(part) or None}
        done()
    regions = pa.concat_tables(parts)
    region_pred, image_pred = pa.concat_tables(region_preds), pa.concat_tables(image_preds)
    features = np.concatenate(feats)
    write_predictions(out, "region_predictions", region_pred, s3)
    write_predictions(out, "image_predictions", image_pred, s3)
    io.write_bytes(io.join(out, "region_features.npy"), io.npy_bytes(features), s3)
    k_info = k_infos[groups[0][0]] if len(groups) == 1 else {"per_category": k_infos}

    done = stage(6, "evaluate")
    metrics = evaluate_tables(region_pred, image_pred, k_info["k"] if len(groups) == 1
                              else {name: info["k"] for name, info in k_infos.items()})
    try:
        from ncd.evaluate.report import write_report

        write_report(out, image_predictions=image_pred, region_predictions=region_pred, regions=regions,
                     features=features, metrics=metrics, k_info=k_info, title=f"ncd discover: {cfg.name}", s3=s3,
                     notes=notes)
    except ImportError:  # pragma: no cover - the report module is optional in stripped installs
        io.write_bytes(io.join(out, "report.md"), (metrics_markdown(metrics["image"]) if metrics else "").encode(), s3)
    if metrics:
        io.write_bytes(io.join(out, "metrics.json"), json.dumps(metrics, indent=2).encode(), s3)
    done()
    before_refine = None
    if metrics and raw_image_preds:
        before_refine = evaluate_predictions(pa.concat_tables(raw_image_preds), k=k_info["k"] if len(groups) == 1
                                             else {name: info["k"] for name, info in k_infos.items()})
    seconds["total"] = round(time.perf_counter() - t_all, 2)
    summary = {"output": out, "images": manifest.num_rows, "regions": regions.num_rows, "k": k_info,
               "images_without_regions": checks["images_without_regions"],
               "mebin_outliers": checks["mebin_outliers"], "notes": notes,
               "selected_head": heads, "models": models, "health": healths,
               "collapsed": sorted(n for n, h in healths.items() if h["collapsed"]), "metrics": metrics, "seconds": seconds,
               "refine": refine_infos, "image_metrics_before_refine": before_refine,
               "backbone": cfg.model.backbone, "weights": cfg.model.weights, "config": public_dict(cfg)}
    io.write_bytes(io.join(out, "summary.json"), json.dumps(summary, indent=2, default=str).encode(), s3)
    if summary["collapsed"] and cfg.infer.on_collapse == "error":
        raise CollapseError("; ".join(collapse_message(n, healths[n], k_infos[n]["k"]) for n in summary["collapsed"])
                            + f" (outputs kept in {out}; infer.on_collapse=warn returns them as a result)")
    return summary


def summary_text(summary: dict[str, Any]) -> str:
    """What a person reads at the end of ``ncd discover``."""
    infos = summary["k"].get("per_category") or {"": summary["k"]}
    ks = ", ".join(f"{name + ': ' if name else ''}{k_label(i)}" for name, i in infos.items())
    lines = [f"ncd discover: {summary['images']} images, {summary['regions']} regions, {ks}"]
    if summary["metrics"]:
        for level in ("image", "region"):
            result = summary["metrics"][level]
            m, w = result["mean"], result["weighted_mean"]
            lines.append(f"  {level:6s} level: NMI {m['nmi']:.3f}  ARI {m['ari']:.3f}  F1 {m['f1']:.3f}"
                         + (f"  (weighted by samples: NMI {w['nmi']:.3f}  ARI {w['ari']:.3f}  F1 {w['f1']:.3f})"
                            if len(result["per_category"]) > 1 else "") + f"; {scored_text(result)}")
    lines += [f"  note: {note}" for note in summary.get("notes", ())]
    lines.append("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in summary["seconds"].items()))
    models = list(summary.get("models", {}).values()) or ["model.pt"]
    shown = models[0] if len(models) == 1 else f"models/<category>.pt for {len(models)} categories"
    lines.append(f"  output: {summary['output']} (report.md, predictions, {shown})")
    return "\n".join(lines)

