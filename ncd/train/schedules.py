"""Per-epoch schedules (METHOD.md 5.5, 5.6): pure functions of the epoch."""
from __future__ import annotations

import math

import numpy as np


def teacher_temperature_schedule(
    epochs: int,
    warmup_temp: float,
    final_temp: float,
    warmup_epochs: int,
    repeat_times: int,
) -> list[float]:
    """AnomalyNCD's staircase teacher temperature, one value per epoch (METHOD.md 5.5).

    ``linspace(warmup_temp, final_temp, warmup_epochs // repeat_times)``, each value
    repeated ``repeat_times`` times, then ``final_temp`` until ``epochs``. Defaults
    (50, 0.07, 0.04, 40, 4): epochs 0-3 0.07, 4-7 0.0667, ..., 36-49 0.04.

    Upstream crashes (IndexError) when ``repeat_times`` does not divide
    ``warmup_epochs``; here that is a ValueError. When ``epochs < warmup_epochs`` the
    staircase is cut at ``epochs`` (upstream would fail; smoke runs need it).

    Returns:
        A list of length ``epochs``.
    """
    if epochs < 0:
        raise ValueError(f"train.epochs must be >= 0, got {epochs}")
    if repeat_times < 1:
        raise ValueError(f"loss.repeat_times must be >= 1, got {repeat_times}")
    if warmup_epochs < 0:
        raise ValueError(f"loss.warmup_teacher_temp_epochs must be >= 0, got {warmup_epochs}")
    if warmup_epochs % repeat_times:
        raise ValueError(
            f"loss.warmup_teacher_temp_epochs ({warmup_epochs}) must be a multiple of "
            f"loss.repeat_times ({repeat_times})"
        )
    stairs = np.linspace(warmup_temp, final_temp, warmup_epochs // repeat_times).tolist()
    values = [t for t in stairs for _ in range(repeat_times)]
    values += [float(final_temp)] * max(0, epochs - len(values))
    return values[:epochs]


def cosine_lr(epoch: int, base_lr: float, epochs: int, eta_min_ratio: float) -> float:
    """Learning rate of ``epoch`` under per-epoch cosine annealing (METHOD.md 5.6).

    ``lr(e) = eta_min + (base_lr - eta_min) (1 + cos(pi e / epochs)) / 2`` with
    ``eta_min = base_lr * eta_min_ratio`` (``CosineAnnealingLR(T_max=epochs)`` stepped
    once per epoch); e.g. 0.003 -> 0.0015015 at e=25 of 50.
    """
    if epochs <= 0:
        raise ValueError(f"train.epochs must be > 0, got {epochs}")
    eta_min = base_lr * eta_min_ratio
    return eta_min + (base_lr - eta_min) * (1.0 + math.cos(math.pi * epoch / epochs)) / 2.0
