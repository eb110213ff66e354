"""Mean-entropy maximisation regulariser (METHOD.md 5.4 item 3)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ncd.train.dist import all_gather_with_grad


def mean_entropy(logits: Tensor, student_temp: float, gather: bool = False) -> Tensor:
    """``L_me = log C - H(p_bar) = log C + sum_c p_bar_c log p_bar_c >= 0``.

    ``p_bar = mean_i softmax(z_i / tau_s)`` over all C columns; 0 iff ``p_bar`` is uniform.

    Args:
        logits: (n, C) logits of the unlabelled rows (both views).
        student_temp: tau_s (0.1).
        gather: average the probabilities over the global batch
            (``ncd.train.dist.all_gather_with_grad``); every rank then returns the same value.

    Returns:
        Scalar. NaN for n == 0 (globally, with ``gather``).
    """
    p = torch.softmax(logits.float() / student_temp, dim=-1)
    if gather:
        p = all_gather_with_grad(p)
    p_bar = p.mean(dim=0)
    return torch.xlogy(p_bar, p_bar).sum() + math.log(p.shape[-1])
