"""Supervised cross-entropy on labelled rows (METHOD.md 5.4 item 1)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ncd.train.dist import global_row_mean


def supervised_ce(logits_lab: Tensor, labels: Tensor, student_temp: float, gather: bool = False) -> Tensor:
    """Cross-entropy of the tempered logits against the base labels, over all C columns.

    ``L_cls = mean_i [ -log softmax(z_i / tau_s)_{y_i} ]``

    Args:
        logits_lab: (n, C) head logits of the labelled rows (both views).
        labels: (n,) long, base class indices in [0, L).
        student_temp: tau_s (0.1).
        gather: normalise by the global row count (``ncd.train.dist.global_row_mean``).

    Returns:
        Scalar. NaN for n == 0 without ``gather``.
    """
    per_row = F.cross_entropy(logits_lab.float() / student_temp, labels.long(), reduction="none")
    return global_row_mean(per_row, gather)
