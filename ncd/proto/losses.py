"""ProtoAnomalyNCD losses: ProtoGCD's prototype objective with AnomalyNCD's corrected targets.

ProtoGCD (Ma et al., TPAMI 2025, arXiv 2504.03755; code ``mashijie1028/ProtoGCD``,
``models/loss.py``, ``train.py``) on the hypersphere: unit features and prototypes,
vMF logits ``kappa cos``; dual-level adaptive pseudo labels (DAPL), entropy
regularisation and prototype separation, besides SimGCD's supervised terms. How
ProtoAnomalyNCD combines them with AnomalyNCD's corrected pseudo labels is not
readable in its paper; the combination here is ncd's reading (PROTO.md).

Pure functions of tensors and floats; :func:`proto_criterion` assembles them with the
same call signature as :func:`ncd.losses.ncd_criterion` plus the prototypes and ratio.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ncd.config import LossConfig, ProtoConfig
from ncd.losses.corrected_targets import corrected_targets, with_normal_prior
from ncd.losses.criterion import supervised_terms
from ncd.losses.info_nce import info_nce
from ncd.losses.mean_entropy import mean_entropy
from ncd.losses.rows import split_rows
from ncd.losses.self_distillation import self_distillation
from ncd.train import dist as ncd_dist

CONFIDENCE_EPS = 1e-6  # ProtoGCD's top1 / (top2 + eps)


def vmf_logits(feat: Tensor, prototypes: Tensor, kappa: float) -> Tensor:
    """von Mises-Fisher logits ``kappa cos(f_i, mu_c)``: the log posterior up to a constant.

    With equal concentrations and priors, ``p(c | f) = softmax_c(kappa mu_c^T f)`` for unit
    ``f`` and ``mu_c`` (ProtoGCD Sec. 3). Inputs are normalised here.

    Args:
        feat: (B, D) features.
        prototypes: (C, D) prototype directions.
        kappa: concentration (``proto.kappa``; ``1 / student_temp`` of SimGCD).

    Returns:
        (B, C) in the dtype of ``feat``.
    """
    f = F.normalize(feat, dim=-1)
    mu = F.normalize(prototypes.to(f.dtype), dim=-1)
    return kappa * f @ mu.T


def hard_ratio_schedule(epochs: int, start: float, end: float) -> list[float]:
    """Share ``r`` of hard pseudo labels per epoch: linear from ``start`` to ``end`` over training.

    ``r(e) = start + (end - start) e / (epochs - 1)`` (``start`` for a single epoch).
    ProtoGCD ramps over its first ``ramp_ratio_teacher_epochs`` (100 of 200), 0.2 -> 1;
    ncd ramps over the whole run (``proto.hard_ratio_start`` -> ``proto.hard_ratio_end``).
    """
    if epochs < 0:
        raise ValueError(f"train.epochs must be >= 0, got {epochs}")
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
        raise ValueError(f"hard-label ratios must be in [0, 1], got {start} -> {end}")
    if epochs <= 1:
        return [float(start)] * epochs
    return [float(start + (end - start) * e / (epochs - 1)) for e in range(epochs)]


def dual_level_targets(probs: Tensor, ratio: float, n_views: int = 2) -> Tensor:
    """ProtoGCD's dual-level adaptive pseudo labels (DAPL) from teacher distributions.

    Within each view's rows, the ``floor(n_v r)`` rows with the highest confidence
    ``q_(1) / (q_(2) + 1e-6)`` (top-1 over top-2 probability) get the hard label
    ``onehot(argmax q)``; the others keep the soft ``q`` (ProtoGCD ``DistillLoss_ratio``).

    Args:
        probs: (n, C) teacher distributions, view-major (``n_views`` equal blocks of rows);
            treated as constants.
        ratio: r in [0, 1].
        n_views: number of row blocks ranked separately (2 views; 1 ranks all rows).

    Returns:
        (n, C) float32 targets.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"hard-label ratio must be in [0, 1], got {ratio}")
    q = probs.detach().float()
    n, c = q.shape
    if n % n_views:
        raise ValueError(f"dual_level_targets expects {n_views} equal view blocks, got {n} rows")
    if n == 0 or c < 2:
        return q.clone()
    top2 = q.topk(2, dim=-1).values
    confidence = top2[:, 0] / (top2[:, 1] + CONFIDENCE_EPS)
    hard = F.one_hot(q.argmax(dim=-1), c).to(q.dtype)
    per_view = n // n_views
    n_hard = int(per_view * ratio)
    # chosen rows marked by scatter and blended by where (an indexed write would synchronise)
    chosen = confidence.view(n_views, per_view).topk(n_hard, dim=1).indices
    is_hard = torch.zeros(n_views, per_view, device=q.device).scatter_(1, chosen, 1.0).view(n, 1) > 0
    return torch.where(is_hard, hard, q)


def proto_pseudo_labels(
    teacher_logits: Tensor,
    num_base: int,
    teacher_temp: float,
    scores: Tensor,
    anomaly_thred: float,
    ratio: float,
    hard_from: str,
) -> Tensor:
    """DAPL combined with AnomalyNCD's normal-slot correction (ncd's reading).

    ``q`` is the teacher's softmax over the novel columns at ``teacher_temp``.
    ``hard_from="teacher"``: :func:`dual_level_targets` of ``q`` per view (the
    confident ``r`` share becomes ``onehot(argmax q)``), then the correction
    ``w e_L + (1 - w) DAPL(q)``, ``w = max(0, thred - s)``, stays soft, as in AnomalyNCD.
    ``"corrected"`` (default): DAPL of the corrected ``q'``, the first reading: a low-score
    crop's correction makes it look confident and can harden its label to the normal slot
    ``L``. Where most crops score low (DeepPCB) the heads collapsed into ``L`` in 2 of 3
    seeds; ``teacher`` did not prevent that (README, Results).

    Args:
        teacher_logits: (2n, C) cosine logits of the unlabelled rows, view-major.
        num_base: L.
        teacher_temp: tau_t of this epoch.
        scores: (2n,) crop scores in [0, 1].
        anomaly_thred: 0.5; -1 disables the correction.
        ratio: r of this epoch (:func:`hard_ratio_schedule`).
        hard_from: ``teacher`` or ``corrected`` (``proto.hard_labels_from``).

    Returns:
        (2n, C) float32 targets, zero on the base columns.
    """
    if hard_from == "corrected":
        q = corrected_targets(teacher_logits, num_base, teacher_temp, scores, anomaly_thred)
        return dual_level_targets(q, ratio, n_views=2)
    q = corrected_targets(teacher_logits, num_base, teacher_temp, scores, -1.0)  # -1: no correction
    return with_normal_prior(dual_level_targets(q, ratio, n_views=2), num_base, scores, anomaly_thred)


def entropy_regularisation(logits: Tensor, kappa: float, gather: bool = False) -> Tensor:
    """ProtoGCD's entropy regulariser ``log C - H(mean_i softmax(kappa cos_i))`` (>= 0).

    Identical to SimGCD's mean-entropy term (:func:`ncd.losses.mean_entropy`) at
    ``student_temp = 1 / kappa``.

    Args: ``logits`` (n, C) cosine logits. Returns a scalar (NaN for n == 0).
    """
    return mean_entropy(logits, 1.0 / kappa, gather)


def prototype_separation(prototypes: Tensor, temperature: float = 0.1) -> Tensor:
    """ProtoGCD's prototype separation: contrastive repulsion between unit prototypes.

    ``L_sep = (1/C) sum_i log( (1/(C-1)) sum_{j != i} exp(mu_i^T mu_j / t) )``
    (``prototype_separation_loss``, with ``temperature / base_temperature = 1``). Its
    minimum over unit vectors spreads the prototypes evenly on the sphere.

    Args:
        prototypes: (C, D) or (H, C, D) (one set per head; the mean over heads);
            normalised here.
        temperature: t (0.1).

    Returns:
        Scalar, float32; 0 (attached) for C < 2.
    """
    mu = F.normalize(prototypes.float(), dim=-1)
    if mu.ndim == 2:
        mu = mu[None]
    c = mu.shape[-2]
    if c < 2:
        return mu.sum() * 0.0
    sim = mu @ mu.transpose(-1, -2) / temperature  # (H, C, C)
    eye = torch.eye(c, dtype=torch.bool, device=mu.device)
    sim = sim.masked_fill(eye, float("-inf"))
    per_proto = torch.logsumexp(sim, dim=-1) - math.log(c - 1)  # (H, C)
    return per_proto.mean()


def proto_criterion(
    logits: Sequence[Tensor],
    proj: Tensor,
    labels: Tensor,
    labelled: Tensor,
    scores: Tensor,
    *,
    num_base: int,
    teacher_temp: float,
    cfg: LossConfig,
    prototypes: Tensor,
    hard_ratio: float,
    proto_cfg: ProtoConfig,
    gather: bool = False,
) -> dict[str, Tensor]:
    """ProtoAnomalyNCD objective for one batch of B samples x 2 views.

    ``L = (1-lam) mean_h (L_dapl_h + w_ent L_ent_h + w_sep L_sep_h) + lam mean_h L_cls_h
          + (1-lam) L_infoNCE + lam L_SupCon``

    (ProtoGCD ``train.py``), student logits ``kappa cos`` everywhere (cross-entropy,
    distillation, entropy), teacher targets :func:`proto_pseudo_labels`. As in
    :func:`ncd.losses.ncd_criterion`, the distillation and entropy terms use the
    unlabelled rows only (ProtoGCD uses all rows; AnomalyNCD's corrected targets zero
    the base columns, so they cannot serve labelled base rows); a group without rows is
    dropped and reported NaN. The separation term does not depend on rows and is
    always in ``loss``. DAPL ranks confidence within this rank's batch.

    Args:
        logits: ``n_head`` tensors (2B, C) of cosine logits, view-major.
        proj: (2B, d) projector outputs, view-major.
        labels: (B,) base labels (ignored for unlabelled samples).
        labelled: (B,) bool.
        scores: (B,) crop scores in [0, 1].
        num_base: L.
        teacher_temp: tau_t of this epoch.
        cfg: ``sup_weight``, ``anomaly_thred``, ``supcon_temp``, ``infonce_temp``
            (``student_temp`` and ``memax_weight`` are replaced by ``1 / kappa`` and
            ``proto_cfg.entropy_weight``).
        prototypes: (n_head, C, D) (or (C, D) shared) prototypes of the heads.
        hard_ratio: DAPL's r for this epoch (:func:`hard_ratio_schedule`).
        proto_cfg: ``kappa``, ``entropy_weight``, ``separation_weight``, ``separation_temp``.
        gather: global-batch terms for DDP (``ncd.train.dist``); a no-op in one process.

    Returns:
        ``loss``; detached means ``cls``, ``distill``, ``entropy``, ``separation``,
        ``cluster``; batch terms ``supcon``, ``infonce``; ``cluster_per_head`` (n_head,)
        ``L_dapl_h + w_ent L_ent_h + w_sep L_sep_h`` for head selection.
    """
    n_head = len(logits)
    if n_head == 0:
        raise ValueError("proto_criterion needs at least one head's logits")
    n_rows = proj.shape[0]
    b = labelled.shape[0]
    if n_rows != 2 * b or any(z.shape[0] != n_rows for z in logits):
        raise ValueError(
            f"expected 2B = {2 * b} view-major rows in proj and every head's logits; got proj "
            f"{tuple(proj.shape)} and logits {[tuple(z.shape) for z in logits]}"
        )
    protos = prototypes if prototypes.ndim == 3 else prototypes[None].expand(n_head, *prototypes.shape)
    if protos.shape[0] != n_head or protos.shape[1] != logits[0].shape[1]:
        raise ValueError(f"prototypes {tuple(prototypes.shape)} do not match {n_head} heads of "
                         f"{logits[0].shape[1]} classes")
    lam = cfg.sup_weight
    student_temp = 1.0 / proto_cfg.kappa
    device = proj.device
    split = split_rows(labelled, labels, scores, device)
    n_lab_local = split.n_lab
    n_lab = ncd_dist.global_count(n_lab_local, device) if gather else n_lab_local
    n_unl = ncd_dist.global_count(b - n_lab_local, device) if gather else b - n_lab_local
    nan = torch.full((), math.nan, device=device)

    nce = info_nce(proj, cfg.infonce_temp, gather)
    sep_h = torch.stack([prototype_separation(p, proto_cfg.separation_temp) for p in protos.unbind(0)])
    loss = (1.0 - lam) * nce + (1.0 - lam) * proto_cfg.separation_weight * sep_h.mean()
    parts: dict[str, Tensor] = {"infonce": nce.detach(), "separation": sep_h.mean().detach()}

    if n_lab > 0:
        cls, sc = supervised_terms(logits, proj, split, student_temp, cfg.supcon_temp, gather)
        loss = loss + lam * cls + lam * sc
        parts["cls"], parts["supcon"] = cls.detach(), sc.detach()
    else:
        parts["cls"], parts["supcon"] = nan, nan

    if n_unl > 0:
        scores_rows = split.unl_scores
        distill, entropy = [], []
        for z in logits:
            z_unl = z.index_select(0, split.unl_rows)
            targets = proto_pseudo_labels(z_unl, num_base, teacher_temp, scores_rows, cfg.anomaly_thred, hard_ratio,
                                          proto_cfg.hard_labels_from)
            distill.append(self_distillation(z_unl, targets, student_temp, gather))
            entropy.append(entropy_regularisation(z_unl, proto_cfg.kappa, gather))
        distill_h, entropy_h = torch.stack(distill), torch.stack(entropy)
        cluster_h = distill_h + proto_cfg.entropy_weight * entropy_h
        loss = loss + (1.0 - lam) * cluster_h.mean()
        cluster_h = cluster_h + proto_cfg.separation_weight * sep_h
        parts["distill"], parts["entropy"] = distill_h.mean().detach(), entropy_h.mean().detach()
        parts["cluster"] = cluster_h.mean().detach()
        parts["cluster_per_head"] = cluster_h.detach()
    else:
        parts["distill"] = parts["entropy"] = parts["cluster"] = nan
        parts["cluster_per_head"] = torch.full((n_head,), math.nan, device=device)

    parts["loss"] = loss
    return parts
