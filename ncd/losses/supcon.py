"""Supervised contrastive loss on labelled rows (METHOD.md 5.4 item 5; SupConLoss, mode 'all')."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ncd.train import dist as ncd_dist


def supcon(
    proj_lab: Tensor,
    labels: Tensor,
    temperature: float,
    base_temperature: float,
    gather: bool = False,
) -> Tensor:
    """SupCon (Khosla et al. 2020) with contrast mode "all".

    For every anchor view a (all 2n views), with P(a) the other views of the same label
    and A(a) all views but a:

    ``l_a = -(tau / tau_base) * mean_{p in P(a)} [ s_ap / tau - log sum_{k in A(a)} exp(s_ak / tau) ]``

    where ``s`` is the cosine similarity; the loss is the mean of ``l_a`` over anchors.

    Args:
        proj_lab: (n, 2, d) projections of the labelled samples, both views.
        labels: (n,) class labels.
        temperature: tau (0.07).
        base_temperature: tau_base (0.07).
        gather: contrast against all ranks' labelled views; normalise by the global
            anchor count (``ncd.train.dist``). Ranks may hold different n, also 0.

    Returns:
        Scalar. NaN for n == 0 without ``gather``.
    """
    n, n_views, _ = proj_lab.shape
    if n_views != 2:
        raise ValueError(f"supcon expects (n, 2, d) features, got {tuple(proj_lab.shape)}")
    z = F.normalize(proj_lab.float(), dim=-1)
    labels = labels.reshape(-1).long()
    if gather and ncd_dist.world_size() > 1:
        offset, total = ncd_dist.row_offset(n, z.device)
        z_all = ncd_dist.all_gather_with_grad(z)
        labels_all = ncd_dist.all_gather(labels)
    else:
        offset, total = 0, n
        z_all, labels_all = z, labels
    anchors = torch.cat([z[:, 0], z[:, 1]], dim=0)  # (2n, d)
    anchor_labels = labels.repeat(2)
    contrast = torch.cat([z_all[:, 0], z_all[:, 1]], dim=0)  # (2N, d)
    contrast_labels = labels_all.repeat(2)
    if n == 0:
        # No local anchors: an empty loss that still depends on the gathered tensor, so
        # every rank runs the gather's backward collective.
        return ncd_dist.global_row_mean(anchors.sum(dim=1), gather) + 0.0 * contrast.sum()
    local = torch.arange(2 * n, device=z.device)
    self_idx = (local // n) * total + offset + local % n
    logits = anchors @ contrast.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    # a comparison, not an indexed write: index_put on a GPU tensor synchronises
    not_self = torch.arange(logits.shape[1], device=z.device)[None] != self_idx[:, None]
    positive = (anchor_labels[:, None] == contrast_labels[None]) & not_self
    exp_logits = torch.exp(logits) * not_self
    log_prob = logits - torch.log(exp_logits.sum(dim=1, keepdim=True))
    mean_log_prob_pos = (positive * log_prob).sum(dim=1) / positive.sum(dim=1)
    per_anchor = -(temperature / base_temperature) * mean_log_prob_pos
    return ncd_dist.global_row_mean(per_anchor, gather)
