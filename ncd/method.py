"""The method switch: ``anomalyncd`` (default) or ``protoanomalyncd``.

Only three things differ between the modes: the model's attention guidance (hard mask
vs. region guidance over the anomaly map and object prior), the training objective
(SimGCD losses vs. vMF prototype losses) and the extra mask channels the data carries.
Everything else (catalog, MEBin, crops, loop, Ray jobs, reports) is shared.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ncd.config import AUTO, ExperimentConfig
from ncd.losses.criterion import ncd_criterion
from ncd.model.ncd_model import NCDModel, build_ncd_model
from ncd.proto.losses import hard_ratio_schedule, proto_criterion
from ncd.proto.model import build_proto_model
from ncd.schedules import teacher_temperature_schedule

METHODS = ("anomalyncd", "protoanomalyncd")
Objective = Callable[[dict[str, Any], dict[str, torch.Tensor], int, bool], dict[str, torch.Tensor]]


def check_method(cfg: ExperimentConfig) -> str:
    if cfg.method not in METHODS:
        raise ValueError(f"method={cfg.method!r}; valid: {', '.join(METHODS)}")
    return cfg.method


def guide_columns(cfg: ExperimentConfig) -> tuple[str, ...]:
    """Region-table columns that become extra mask channels (anomaly map, object prior)."""
    if check_method(cfg) == "anomalyncd":
        return ()
    return ("anomaly_png",) if cfg.proto.object_prior == "none" else ("anomaly_png", "object_png")


def kmeans_init(cfg: ExperimentConfig) -> bool:
    """Whether the novel prototypes start from k-means: ``train.kmeans_init``, where ``auto``
    means on in ProtoAnomalyNCD mode (PROTO.md: "region-guided" prototypes) and off in
    AnomalyNCD mode (the paper's random init)."""
    if cfg.train.kmeans_init == AUTO:
        return check_method(cfg) == "protoanomalyncd"
    return bool(cfg.train.kmeans_init)


def prediction_temperature(cfg: ExperimentConfig) -> float:
    """The softmax temperature of region probabilities: ``loss.student_temp`` (METHOD.md 6.1),
    or ``1 / proto.kappa`` in ProtoAnomalyNCD mode (the vMF posterior the model was trained with)."""
    return 1.0 / cfg.proto.kappa if check_method(cfg) == "protoanomalyncd" else cfg.loss.student_temp


def build_model(cfg: ExperimentConfig, num_base: int, num_novel: int) -> NCDModel:
    if check_method(cfg) == "anomalyncd":
        return build_ncd_model(cfg.model, num_base, num_novel, cfg.s3)
    return build_proto_model(cfg.model, cfg.proto, num_base, num_novel, cfg.s3)


def make_objective(cfg: ExperimentConfig, num_base: int) -> Objective:
    """``objective(model_out, batch, epoch, gather) -> loss parts`` for this method."""
    temps = teacher_temperature_schedule(cfg.train.epochs, cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp,
                                         cfg.loss.warmup_teacher_temp_epochs, cfg.loss.repeat_times)
    proto = check_method(cfg) == "protoanomalyncd"
    ratios = hard_ratio_schedule(cfg.train.epochs, cfg.proto.hard_ratio_start, cfg.proto.hard_ratio_end)

    def objective(out: dict[str, Any], batch: dict[str, torch.Tensor], epoch: int, gather: bool) -> dict:
        labels = batch["label"]
        args = ([z.float() for z in out["logits"]], out["proj"].float(), labels, labels >= 0, batch["score"])
        if proto:
            return proto_criterion(*args, num_base=num_base, teacher_temp=temps[epoch], cfg=cfg.loss,
                                   prototypes=out["prototypes"].float(), hard_ratio=ratios[epoch],
                                   proto_cfg=cfg.proto, gather=gather)
        return ncd_criterion(*args, num_base=num_base, teacher_temp=temps[epoch], cfg=cfg.loss, gather=gather)

    objective.teacher_temps = temps  # type: ignore[attr-defined]
    return objective
