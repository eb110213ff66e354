"""Frozen features (``method=frozen``): no backbone is trained. The regions' features come
from two pretrained backbones, each averaged over the crop's 8 dihedral transforms
(``ncd.model.frozen_ensemble``); the novel prototypes are spherical k-means centroids of
them, refined by neighbour consistency (``ncd.train.refine``) like every method's.

It gives ncd's best classes on MTD, DeepPCB and the demo (README Results), and it is the
reference a trained method has to beat on the same crops.
"""
from __future__ import annotations

from typing import Any

import torch

from ncd.config import ExperimentConfig
from ncd.methods import anomalyncd
from ncd.methods.base import Method, StepLoss
from ncd.model.frozen_ensemble import build_frozen_ensemble
from ncd.model.heads import Projector, PrototypeHeads
from ncd.model.ncd_model import NCDModel


def build_model(cfg: ExperimentConfig, num_base: int, num_novel: int) -> NCDModel:
    encoder = build_frozen_ensemble(cfg.model, cfg.s3)
    projector = Projector(encoder.feature_dim, cfg.model.proj_hidden_dim, cfg.model.proj_dim, 1)
    return NCDModel(encoder, projector, PrototypeHeads(encoder.feature_dim, num_base, num_novel, cfg.model.n_head))


def step_loss(cfg: ExperimentConfig, num_base: int) -> StepLoss:
    def loss(out: dict[str, Any], inputs: tuple, teacher_temp: float, epoch: int,
             gather: bool) -> dict[str, torch.Tensor]:
        raise RuntimeError("method=frozen trains nothing: it has no training loss")

    return loss


def guide_columns(cfg: ExperimentConfig) -> tuple[str, ...]:
    return ()  # the region mask alone


METHOD = Method("frozen", build_model, step_loss, guide_columns, anomalyncd.temperature,
                anomalyncd.trained_k_score, kmeans_init=True, trains=False,
                eval_view="resize")
