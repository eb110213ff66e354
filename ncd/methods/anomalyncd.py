"""AnomalyNCD (CVPR 2025; METHOD.md): hard region-mask attention guidance, SimGCD losses,
randomly initialised prototypes, probabilities at the student temperature."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ncd.config import ExperimentConfig
from ncd.evaluate.k_criteria import cosine_silhouette, l2_normalise
from ncd.losses.criterion import ncd_criterion
from ncd.methods.base import Method, StepLoss
from ncd.model.ncd_model import NCDModel, build_ncd_model


def build_model(cfg: ExperimentConfig, num_base: int, num_novel: int) -> NCDModel:
    return build_ncd_model(cfg.model, num_base, num_novel, cfg.s3)


def step_loss(cfg: ExperimentConfig, num_base: int) -> StepLoss:
    """The SimGCD-style criterion (METHOD.md 5.4-5.5)."""

    def loss(out: dict[str, Any], inputs: tuple, teacher_temp: float, epoch: int,
             gather: bool) -> dict[str, torch.Tensor]:
        return ncd_criterion(*inputs, num_base=num_base, teacher_temp=teacher_temp, cfg=cfg.loss, gather=gather)

    return loss


def guide_columns(cfg: ExperimentConfig) -> tuple[str, ...]:
    return ()  # the region mask alone


def temperature(cfg: ExperimentConfig) -> float:
    return cfg.loss.student_temp  # METHOD.md 6.1


def trained_k_score(feat: np.ndarray, novel_logits: np.ndarray, novel_prototypes: np.ndarray) -> float:
    """The cosine silhouette of the region features under the model's partition."""
    return cosine_silhouette(l2_normalise(feat), novel_logits.argmax(1))


METHOD = Method("anomalyncd", build_model, step_loss, guide_columns, temperature, trained_k_score,
                kmeans_init=False)  # the paper's random prototype init
