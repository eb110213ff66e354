"""Cross-view self-distillation (METHOD.md 5.4 item 2, SimGCD's DistillLoss)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ncd.train.dist import global_row_mean


def self_distillation(
    student_logits: Tensor,
    teacher_targets: Tensor,
    student_temp: float,
    gather: bool = False,
) -> Tensor:
    """Cross-entropy of each view's student against the *other* view's teacher target.

    ``L_distill = 1/2 sum_{v != v'} mean_i [ -sum_c q'^{(v)}_{ic} log softmax(z^{(v')}_i / tau_s)_c ]``

    The student is a log-softmax over all C columns (base included).

    Args:
        student_logits: (2B, C) view-major: rows [0, B) view 1, [B, 2B) view 2,
            row i and i + B the same sample.
        teacher_targets: (2B, C) target distributions (``corrected_targets``), same
            layout; treated as constants.
        student_temp: tau_s (0.1).
        gather: normalise by the global row count (``ncd.train.dist.global_row_mean``).

    Returns:
        Scalar. NaN for B == 0 without ``gather``.
    """
    n = student_logits.shape[0]
    if n % 2:
        raise ValueError(f"self_distillation expects 2B view-major rows, got {n}")
    b = n // 2
    targets = teacher_targets.detach().float()
    swapped = torch.cat([targets[b:], targets[:b]], dim=0)
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    per_row = -(swapped * log_p).sum(dim=-1)
    return global_row_mean(per_row, gather)
