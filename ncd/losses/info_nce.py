"""Unsupervised contrastive loss between the two views (METHOD.md 5.4 item 4).

SimGCD's ``info_nce_logits`` semantics, optionally over the global batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ncd.train import dist as ncd_dist


def info_nce_logits(proj: Tensor, temperature: float, gather: bool = False) -> tuple[Tensor, Tensor]:
    """Logits of each row against every other row, the positive (other view) first.

    Rows are L2-normalised; row i's positive is row ``(i + B) mod 2B``; the remaining
    ``2B - 2`` rows (self excluded) are negatives, in their row order.

    Args:
        proj: (2b, d) view-major projections of this rank: rows [0, b) view 1,
            [b, 2b) view 2.
        temperature: info-NCE temperature (1.0).
        gather: contrast against the global batch. The global batch is arranged view
            major over the rank-ordered samples, i.e. exactly what one process would
            see with all ranks' samples concatenated.

    Returns:
        logits: (2b, 2B - 1), column 0 the positive, divided by ``temperature``;
        targets: (2b,) long zeros (the cross-entropy target).
    """
    n, d = proj.shape
    if n % 2:
        raise ValueError(f"info_nce expects 2B view-major rows, got {n}")
    b = n // 2
    z = F.normalize(proj.float(), dim=-1)
    if gather and ncd_dist.world_size() > 1:
        pairs = torch.stack([z[:b], z[b:]], dim=1)  # (b, 2, d)
        offset, total = ncd_dist.row_offset(b, z.device)
        keys_pairs = ncd_dist.all_gather_with_grad(pairs)  # (B, 2, d)
        keys = torch.cat([keys_pairs[:, 0], keys_pairs[:, 1]], dim=0)
    else:
        offset, total = 0, b
        keys = z
    local = torch.arange(n, device=z.device)
    view, sample = local // b, local % b
    self_idx = view * total + offset + sample
    pos_idx = (1 - view) * total + offset + sample
    sim = z @ keys.T  # (2b, 2B)
    # the negatives' columns in ascending order: every column but self and positive,
    # as gather indices (a boolean-mask selection would synchronise with the device)
    first, second = torch.minimum(self_idx, pos_idx)[:, None], torch.maximum(self_idx, pos_idx)[:, None]
    cols = torch.arange(2 * total - 2, device=z.device)[None]
    cols = cols + (cols >= first)
    cols = cols + (cols >= second)
    positives = sim.gather(1, pos_idx[:, None])
    negatives = sim.gather(1, cols)
    logits = torch.cat([positives, negatives], dim=1) / temperature
    return logits, torch.zeros(n, dtype=torch.long, device=z.device)


def info_nce(proj: Tensor, temperature: float, gather: bool = False) -> Tensor:
    """``L_infoNCE = mean_i CE(info_nce_logits_i, 0)`` over all 2B rows.

    Args:
        proj: (2b, d) view-major projections (see :func:`info_nce_logits`).
        temperature: 1.0 upstream.
        gather: global batch and global row normalisation (``ncd.train.dist``).

    Returns:
        Scalar.
    """
    logits, targets = info_nce_logits(proj, temperature, gather)
    per_row = F.cross_entropy(logits, targets, reduction="none")
    return ncd_dist.global_row_mean(per_row, gather)
