"""Teacher-temperature staircase and cosine learning rate (METHOD.md 5.5-5.6; invariants 23, 25)."""
from __future__ import annotations

import math

import pytest
import torch

from ncd.config import LossConfig, TrainConfig
from ncd.train.schedules import cosine_lr, teacher_temperature_schedule


def default_schedule() -> list[float]:
    loss, train = LossConfig(), TrainConfig()
    return teacher_temperature_schedule(
        train.epochs, loss.warmup_teacher_temp, loss.teacher_temp, loss.warmup_teacher_temp_epochs, loss.repeat_times
    )


def test_teacher_schedule_defaults_invariant_23():
    s = default_schedule()
    assert len(s) == 50
    assert s[0] == pytest.approx(0.07) and s[3] == pytest.approx(0.07)
    assert s[4] == pytest.approx(0.0667, abs=1e-4) and s[7] == s[4]
    assert s[8] == pytest.approx(0.0633, abs=1e-4)
    assert s[32] == pytest.approx(0.0433, abs=1e-4)
    assert s[36] == pytest.approx(0.04) and s[49] == pytest.approx(0.04)
    assert all(a >= b for a, b in zip(s, s[1:]))  # a non-increasing staircase
    assert len(set(s[:40])) == 10


def test_teacher_schedule_rejects_indivisible_warmup():
    with pytest.raises(ValueError, match=r"warmup_teacher_temp_epochs \(30\).*repeat_times \(4\)"):
        teacher_temperature_schedule(50, 0.07, 0.04, 30, 4)
    with pytest.raises(ValueError, match="repeat_times"):
        teacher_temperature_schedule(50, 0.07, 0.04, 40, 0)


def test_teacher_schedule_edge_lengths():
    assert teacher_temperature_schedule(3, 0.07, 0.04, 40, 4) == [0.07] * 3  # smoke run inside the warm-up
    assert teacher_temperature_schedule(5, 0.07, 0.04, 0, 4) == [0.04] * 5
    assert teacher_temperature_schedule(6, 0.07, 0.04, 4, 4) == [0.07] * 4 + [0.04] * 2
    assert teacher_temperature_schedule(0, 0.07, 0.04, 40, 4) == []


def test_cosine_lr_invariant_25():
    base, epochs, ratio = 0.003, 50, 1e-3
    assert cosine_lr(0, base, epochs, ratio) == pytest.approx(0.003)
    assert cosine_lr(25, base, epochs, ratio) == pytest.approx(0.0015, abs=2e-6)
    assert cosine_lr(49, base, epochs, ratio) == pytest.approx(6e-6, rel=0.05)
    assert cosine_lr(50, base, epochs, ratio) == pytest.approx(base * ratio)


def test_cosine_lr_matches_torch_scheduler():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.003)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50, eta_min=0.003 * 1e-3)
    for epoch in range(50):
        assert cosine_lr(epoch, 0.003, 50, 1e-3) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        opt.step()
        sched.step()
    assert not math.isnan(cosine_lr(7, 0.1, 10, 0.0))
