"""Whole-config validation, run by every entry point before its first stage.

Parsing (``ncd.config``) checks types and keys; this checks values and names, and
reports every bad key at once, so that a run never fails (or silently degrades) after
hours of preprocessing because of a typo.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from ncd.data.catalog import LAYOUTS
from ncd.train.checkpoint import STALE_POLICIES
from ncd.config import AUTO, K_AUTO, K_ORACLE, ConfigError, ExperimentConfig, flat_dict, to_dict
from ncd.preprocess.crops import MERGE_MODES
from ncd.train.datasets import AUGMENT_ON
from ncd.evaluate.k_criteria import CRITERIA
from ncd.methods import METHODS
from ncd.proto.guidance import GUIDANCE_MODES
from ncd.proto.object_prior import OBJECT_PRIORS

MAP_SIZE_POLICIES = ("resize", "error")


def _at_least(lo: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= lo else f"must be >= {lo}"


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _unit(v: Any) -> str | None:
    return None if 0 <= v <= 1 else "must be in [0, 1]"


def _one_of(options: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else f"valid: {', '.join(options)}"


def _k(v: Any) -> str | None:
    if isinstance(v, int) and v >= 1 or v in (K_AUTO, K_ORACLE):
        return None
    return f"a positive K, {K_AUTO!r} (estimated without labels) or {K_ORACLE!r} (the oracle ground-truth count)"


def _switch(v: Any) -> str | None:
    return None if isinstance(v, bool) or v == AUTO else f"true, false or {AUTO!r}"


def _ks(v: Any) -> str | None:
    return None if all(k >= 1 for k in v) else "every K must be >= 1"


RULES: dict[str, Callable[[Any], str | None]] = {
    "method": _one_of(METHODS),
    "data.layout": _one_of(LAYOUTS),
    "data.map_size_policy": _one_of(MAP_SIZE_POLICIES),
    "data.max_aspect_mismatch": _at_least(0),
    "mebin.sample_rate": _at_least(1),
    "mebin.min_interval_len": _at_least(1),
    "mebin.erode_kernel": _at_least(1),
    "crop.merge": _one_of(MERGE_MODES),
    "crop.padding": _at_least(0),
    "crop.max_merge_dist": _at_least(0),
    "crop.min_crop_size": _unit,
    "preprocess.batch_size": _at_least(1),
    "model.image_size": _at_least(1),
    "model.crop_pct": lambda v: None if 0 < v <= 1 else "must be in (0, 1]",
    "model.mask_layers": _at_least(0),
    "model.n_head": _at_least(1),
    "model.proj_hidden_dim": _at_least(1),
    "model.proj_dim": _at_least(1),
    "model.proj_layers": _at_least(1),
    "model.keep_blocks": _at_least(0),
    "model.reinit_top_blocks": _at_least(0),
    "model.eval_view": _one_of(("crop", "resize", AUTO)),
    "model.frozen_vit_size": _at_least(1),
    "loss.sup_weight": _at_least(0),
    "loss.memax_weight": _at_least(0),
    "loss.anomaly_thred": lambda v: None if v == -1 or 0 <= v <= 1 else "must be in [0, 1], or -1 (no correction)",
    "loss.student_temp": _positive,
    "loss.teacher_temp": _positive,
    "loss.warmup_teacher_temp": _positive,
    "loss.warmup_teacher_temp_epochs": _at_least(0),
    "loss.repeat_times": _at_least(1),
    "loss.supcon_temp": _positive,
    "loss.infonce_temp": _positive,
    "train.epochs": _at_least(1),
    "train.batch_size": _at_least(1),
    "train.lr": _positive,
    "train.momentum": lambda v: None if 0 <= v < 1 else "must be in [0, 1)",
    "train.weight_decay": _at_least(0),
    "train.eta_min_ratio": _at_least(0),
    "train.loader_workers": _at_least(0),
    "train.augment_on": _one_of(AUGMENT_ON),
    "train.num_novel": _k,
    "train.kmeans_init": _switch,
    "train.checkpoint_every": _at_least(0),
    "train.keep_checkpoints": _at_least(1),
    "train.on_stale_checkpoint": _one_of(STALE_POLICIES),
    "infer.area_temperature": _positive,
    "infer.unknown_threshold": _unit,
    "infer.unknown_familiarity": _unit,
    "infer.batch_size": _at_least(1),
    "infer.k_min": _at_least(2),
    "infer.k_criterion": _one_of(tuple(CRITERIA)),
    "infer.collapse_share": _unit,
    "infer.on_collapse": _one_of(("error", "warn")),
    "refine.init": _one_of(("kmeans", "head")),
    "refine.neighbours": _at_least(1),
    "refine.steps": _at_least(0),
    "refine.batch_size": _at_least(1),
    "refine.lr": _positive,
    "refine.entropy_weight": _at_least(0),
    "refine.kmeans_restarts": _at_least(1),
    "proto.hard_labels_from": _one_of(("corrected", "teacher")),
    "proto.object_prior": _one_of(OBJECT_PRIORS),
    "proto.guidance": _one_of(GUIDANCE_MODES),
    "proto.kappa": _positive,
    "proto.separation_weight": _at_least(0),
    "proto.separation_temp": _positive,
    "proto.entropy_weight": _at_least(0),
    "proto.hard_ratio_start": _unit,
    "proto.hard_ratio_end": _unit,
    "tune.num_samples": _at_least(1),
    "tune.k_values": _ks,
    "tune.grace_period": _at_least(1),
    "tune.cpus_per_trial": _positive,
    "tune.gpus_per_trial": _at_least(0),
    "detect.mode": _one_of(("auto", "zero_shot", "few_shot")),
    "detect.knn": _one_of(("faiss", "exact")),
    "detect.image_size": _positive,
    "detect.blocks": lambda v: None if v and min(v) >= 0 else "give block indices >= 0, e.g. 2,5,8",
    "detect.radii": lambda v: None if v and all(r >= 1 and r % 2 for r in v) else "give odd sizes >= 1, e.g. 1,3,5",
    "detect.reference_images": lambda v: None if v == 0 or v >= 2 else "0 (all images) or >= 2",
    "detect.fraction": lambda v: None if 0 < v <= 1 else "must be in (0, 1]",
    "detect.knn_candidates": _at_least(0),
    "detect.bank_max_patches": _at_least(1),
    "detect.blur_sigma": _at_least(0),
    "detect.subset_size": _at_least(0),
    "detect.batch_size": _at_least(1),
}
RANGES = (("infer.k_min", "infer.k_max"),)


def problems(cfg: ExperimentConfig) -> list[str]:
    """Every invalid value of ``cfg`` as ``"key=value (why)"``; empty when valid."""
    flat = flat_dict(to_dict(cfg))
    out = []
    for key, rule in RULES.items():
        value = flat[key]
        why = "not a finite number" if isinstance(value, float) and not math.isfinite(value) else rule(value)
        if why:
            out.append(f"{key}={value!r} ({why})")
    for lo, hi in RANGES:
        if flat[hi] < flat[lo]:
            out.append(f"{hi}={flat[hi]!r} (must be >= {lo}={flat[lo]!r})")
    return out


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` unchanged, or a ``ConfigError`` that lists every invalid key."""
    bad = problems(cfg)
    if bad:
        raise ConfigError(f"invalid config ({len(bad)} key{'s' if len(bad) > 1 else ''}): " + "; ".join(bad)
                          + ". Fix them in the config file or with --set KEY=VALUE")
    return cfg
