"""ProtoAnomalyNCD (PROTO.md): region guidance over the anomaly map and an object prior,
vMF prototypes trained with ProtoGCD's losses from k-means prototypes, probabilities at
``1 / proto.kappa`` (the vMF posterior)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ncd.config import ExperimentConfig
from ncd.methods.base import Method, StepLoss
from ncd.model.ncd_model import NCDModel
from ncd.proto.k_estimation import prototype_score
from ncd.proto.losses import hard_ratio_schedule, proto_criterion
from ncd.proto.model import build_proto_model


def build_model(cfg: ExperimentConfig, num_base: int, num_novel: int) -> NCDModel:
    return build_proto_model(cfg.model, cfg.proto, num_base, num_novel, cfg.s3)


def step_loss(cfg: ExperimentConfig, num_base: int) -> StepLoss:
    """ProtoGCD's criterion with the ramped share of hard pseudo labels (``proto.hard_ratio_*``)."""
    ratios = hard_ratio_schedule(cfg.train.epochs, cfg.proto.hard_ratio_start, cfg.proto.hard_ratio_end)

    def loss(out: dict[str, Any], inputs: tuple, teacher_temp: float, epoch: int,
             gather: bool) -> dict[str, torch.Tensor]:
        return proto_criterion(*inputs, num_base=num_base, teacher_temp=teacher_temp, cfg=cfg.loss,
                               prototypes=out["prototypes"].float(), hard_ratio=ratios[epoch], proto_cfg=cfg.proto,
                               gather=gather)

    return loss


def guide_columns(cfg: ExperimentConfig) -> tuple[str, ...]:
    return ("anomaly_png",) if cfg.proto.object_prior == "none" else ("anomaly_png", "object_png")


def temperature(cfg: ExperimentConfig) -> float:
    return 1.0 / cfg.proto.kappa  # the vMF posterior the model was trained with


def trained_k_score(feat: np.ndarray, novel_logits: np.ndarray, novel_prototypes: np.ndarray) -> float:
    """ProtoGCD's prototype score of the K novel prototypes (centroid score alone: no labelled rows)."""
    return prototype_score(feat, novel_prototypes)["score"]


METHOD = Method("protoanomalyncd", build_model, step_loss, guide_columns, temperature, trained_k_score,
                kmeans_init=True)  # PROTO.md: region-guided prototypes
