"""The interface every method implements (``Method``), and the objective built from it."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ncd.config import ExperimentConfig
from ncd.model.ncd_model import NCDModel
from ncd.train.schedules import teacher_temperature_schedule

# objective(model output, batch, epoch, gather) -> loss parts (``loss``, ``cluster_per_head``, ...)
Objective = Callable[[dict[str, Any], dict[str, torch.Tensor], int, bool], dict[str, torch.Tensor]]
# step_loss(model output, criterion inputs, teacher temperature, epoch, gather) -> loss parts
StepLoss = Callable[[dict[str, Any], tuple, float, int, bool], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Method:
    """What differs between the methods. Everything else (catalog, MEBin, crops, the
    training loop, Ray jobs, reports) is shared."""

    name: str
    # (cfg, num_base, num_novel) -> the model: backbone with its attention guidance, projector, heads
    build_model: Callable[[ExperimentConfig, int, int], NCDModel]
    # (cfg, num_base) -> the loss of one training step (``make_objective`` adds what both share)
    step_loss: Callable[[ExperimentConfig, int], StepLoss]
    # cfg -> region-table columns that become extra mask channels (anomaly map, object prior)
    guide_columns: Callable[[ExperimentConfig], tuple[str, ...]]
    # cfg -> softmax temperature of the region probabilities; their best (area-merged per
    # image) is the rejection score that ``infer.unknown_threshold`` and the open-set protocol read
    temperature: Callable[[ExperimentConfig], float]
    # (region features (R, D), novel logits (R, K), novel prototypes (K, D)) -> label-free
    # score of a trained model's K, comparable across K, higher is better (Tune's ``k_score``)
    trained_k_score: Callable[[np.ndarray, np.ndarray, np.ndarray], float]
    kmeans_init: bool  # train.kmeans_init=auto: whether the novel prototypes start from k-means
    trains: bool = True  # False: the prototypes are k-means centroids of frozen features, no optimiser step
    eval_view: str = "crop"  # model.eval_view=auto: the test view (crop: the paper's; resize: the whole crop)


def criterion_inputs(out: dict[str, Any], batch: dict[str, torch.Tensor]) -> tuple:
    """(logits per head, projections, labels, labelled mask, crop scores): what both criteria read first."""
    labels = batch["label"]
    return [z.float() for z in out["logits"]], out["proj"].float(), labels, labels >= 0, batch["score"]


def make_method_objective(method: Method, cfg: ExperimentConfig, num_base: int) -> Objective:
    """``objective(model_out, batch, epoch, gather) -> loss parts`` of ``method``, with the
    teacher temperature schedule (``objective.teacher_temps``) that both methods use."""
    temps = teacher_temperature_schedule(cfg.train.epochs, cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp,
                                         cfg.loss.warmup_teacher_temp_epochs, cfg.loss.repeat_times)
    step_loss = method.step_loss(cfg, num_base)

    def objective(out: dict[str, Any], batch: dict[str, torch.Tensor], epoch: int, gather: bool) -> dict:
        return step_loss(out, criterion_inputs(out, batch), temps[epoch], epoch, gather)

    objective.teacher_temps = temps  # type: ignore[attr-defined]
    return objective
