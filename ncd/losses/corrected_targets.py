"""Corrected pseudo labels for self-distillation (METHOD.md 5.4 item 2)."""
from __future__ import annotations

import torch
from torch import Tensor


def corrected_targets(
    teacher_logits: Tensor,
    num_base: int,
    teacher_temp: float,
    scores: Tensor,
    anomaly_thred: float,
) -> Tensor:
    """Teacher targets with base columns removed and mass moved to the "normal" slot.

    ``q = softmax(z / tau_t)`` with the first ``L`` columns zeroed and the rest
    renormalised (computed as a softmax over the novel columns, which is identical and
    cannot underflow), then ``q' = w e_L + (1 - w) q`` with ``w = max(0, thred - s)``.
    ``anomaly_thred = -1`` gives ``w = 0`` for scores in [0, 1]. ``w`` is also capped
    at 1 (only reachable with ``anomaly_thred > 1``, where the upstream formula would
    give negative targets).

    Args:
        teacher_logits: (n, C) logits; detached here (the teacher is the same forward).
        num_base: L, the number of base (labelled) classes; ``C > L``.
        teacher_temp: tau_t for this epoch (``ncd.train.schedules.teacher_temperature_schedule``).
        scores: (n,) crop scores in [0, 1], one per row.
        anomaly_thred: 0.5 upstream; -1 disables the correction.

    Returns:
        (n, C) float32 rows summing to 1, zero on the base columns.
    """
    z = teacher_logits.detach().float()
    n, c = z.shape
    if not 0 <= num_base < c:
        raise ValueError(f"num_base={num_base} must be in [0, {c}) for {c} logit columns")
    q = torch.zeros_like(z)
    q[:, num_base:] = torch.softmax(z[:, num_base:] / teacher_temp, dim=-1)
    return with_normal_prior(q, num_base, scores, anomaly_thred)


def with_normal_prior(q: Tensor, num_base: int, scores: Tensor, anomaly_thred: float) -> Tensor:
    """``w e_L + (1 - w) q`` with ``w = max(0, thred - s)`` capped at 1: the share of a
    low-score crop's target moved to the "normal" slot ``L`` (METHOD.md 5.4 item 2)."""
    w = (anomaly_thred - scores.detach().float().reshape(q.shape[0], 1)).clamp(0.0, 1.0)
    normal = torch.zeros_like(q)
    normal[:, num_base] = 1.0
    return w * normal + (1.0 - w) * q
