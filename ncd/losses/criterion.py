"""The AnomalyNCD training objective: all terms of METHOD.md 5.4 combined.

``L = (1-lam) mean_h (L_distill_h + w_me L_me_h) + lam mean_h L_cls_h
      + (1-lam) L_infoNCE + lam L_SupCon``
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ncd.config import LossConfig
from ncd.losses.corrected_targets import corrected_targets
from ncd.losses.info_nce import info_nce
from ncd.losses.mean_entropy import mean_entropy
from ncd.losses.rows import RowSplit, split_rows
from ncd.losses.self_distillation import self_distillation
from ncd.losses.supcon import supcon
from ncd.losses.supervised_ce import supervised_ce
from ncd.train import dist as ncd_dist

def supervised_terms(logits: Sequence[Tensor], proj: Tensor, split: RowSplit, student_temp: float,
                     supcon_temp: float, gather: bool) -> tuple[Tensor, Tensor]:
    """Head-mean supervised CE and SupCon on the labelled rows (METHOD.md 5.4.1, 5.4.5)."""
    b = proj.shape[0] // 2
    labels_rows = split.lab_labels
    cls = torch.stack([supervised_ce(z.index_select(0, split.lab_rows), labels_rows, student_temp, gather)
                       for z in logits]).mean()
    proj_lab = torch.stack([proj[:b].index_select(0, split.lab_samples),
                            proj[b:].index_select(0, split.lab_samples)], dim=1)
    return cls, supcon(proj_lab, labels_rows[: split.n_lab], supcon_temp, supcon_temp, gather)


def ncd_criterion(
    logits: Sequence[Tensor],
    proj: Tensor,
    labels: Tensor,
    labelled: Tensor,
    scores: Tensor,
    *,
    num_base: int,
    teacher_temp: float,
    cfg: LossConfig,
    gather: bool = False,
) -> dict[str, Tensor]:
    """Total loss and its named parts for one batch of B samples x 2 views.

    Labelled rows get the supervised terms (cross-entropy, SupCon); unlabelled rows the
    clustering terms (self-distillation with corrected pseudo labels, mean entropy);
    all rows the info-NCE. A group with no rows (globally, with ``gather``) has its
    terms dropped from ``loss`` and reported as NaN; the remaining weights are not
    renormalised (upstream skips such batches, so this is the ncd choice for training
    without a labelled base set: ``loss = (1-lam) (cluster + infoNCE)``).

    Args:
        logits: ``n_head`` tensors (2B, C), C = L + K, view-major (rows i and i + B are
            the two views of sample i).
        proj: (2B, d) projector outputs, view-major.
        labels: (B,) base labels in [0, L) for labelled samples (other entries ignored).
        labelled: (B,) bool, True for samples of the labelled base set.
        scores: (B,) crop scores in [0, 1] (used for unlabelled samples only).
        num_base: L.
        teacher_temp: tau_t of this epoch.
        cfg: weights and temperatures (``sup_weight``, ``memax_weight``,
            ``anomaly_thred``, ``student_temp``, ``supcon_temp``, ``infonce_temp``).
        gather: global-batch contrastive terms and global row normalisation for DDP
            (``ncd.train.dist``); a no-op in one process.

    Returns:
        ``loss`` (scalar, differentiable); the head means ``cls``, ``distill``, ``memax``,
        ``cluster`` and the batch terms ``supcon``, ``infonce`` (detached scalars); and
        ``cluster_per_head`` (n_head,) detached ``L_distill_h + w_me L_me_h``, the
        quantity whose last-epoch mean selects the reported head (``select_head``).
    """
    if len(logits) == 0:
        raise ValueError("ncd_criterion needs at least one head's logits")
    n_rows = proj.shape[0]
    b = labelled.shape[0]
    if n_rows != 2 * b or any(z.shape[0] != n_rows for z in logits):
        raise ValueError(
            f"expected 2B = {2 * b} view-major rows in proj and every head's logits; got proj "
            f"{tuple(proj.shape)} and logits {[tuple(z.shape) for z in logits]}"
        )
    lam = cfg.sup_weight
    device = proj.device
    split = split_rows(labelled, labels, scores, device)
    n_lab_local = split.n_lab
    n_lab = ncd_dist.global_count(n_lab_local, device) if gather else n_lab_local
    n_unl = ncd_dist.global_count(b - n_lab_local, device) if gather else b - n_lab_local
    nan = torch.full((), math.nan, device=device)
    n_head = len(logits)

    nce = info_nce(proj, cfg.infonce_temp, gather)
    loss = (1.0 - lam) * nce
    parts: dict[str, Tensor] = {"infonce": nce.detach()}

    if n_lab > 0:
        cls, sc = supervised_terms(logits, proj, split, cfg.student_temp, cfg.supcon_temp, gather)
        loss = loss + lam * cls + lam * sc
        parts["cls"], parts["supcon"] = cls.detach(), sc.detach()
    else:
        parts["cls"], parts["supcon"] = nan, nan

    if n_unl > 0:
        scores_rows = split.unl_scores
        distill, memax = [], []
        for z in logits:
            z_unl = z.index_select(0, split.unl_rows)
            targets = corrected_targets(z_unl, num_base, teacher_temp, scores_rows, cfg.anomaly_thred)
            distill.append(self_distillation(z_unl, targets, cfg.student_temp, gather))
            memax.append(mean_entropy(z_unl, cfg.student_temp, gather))
        distill_h, memax_h = torch.stack(distill), torch.stack(memax)
        cluster_h = distill_h + cfg.memax_weight * memax_h
        loss = loss + (1.0 - lam) * cluster_h.mean()
        parts["distill"], parts["memax"] = distill_h.mean().detach(), memax_h.mean().detach()
        parts["cluster"] = cluster_h.mean().detach()
        parts["cluster_per_head"] = cluster_h.detach()
    else:
        parts["distill"] = parts["memax"] = parts["cluster"] = nan
        parts["cluster_per_head"] = torch.full((n_head,), math.nan, device=device)

    parts["loss"] = loss
    return parts
