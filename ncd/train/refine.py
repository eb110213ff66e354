"""Neighbour-consistency refinement of the novel prototypes on fixed region features.

After training, the selected head's K novel prototypes are tuned on the model's own
region features (no augmentation, no backbone pass): each region should get the same
cluster as its nearest neighbours in feature space (SCAN, Van Gansbeke et al., ECCV
2020), while the mean prediction stays spread over the K clusters (mean-entropy). The
prototypes start from the trained head (``refine.init=head``) or from spherical k-means
of the features (``kmeans``). The refined prototypes replace the head's, so the saved
model predicts with them. Cheap: a few hundred Adam steps on a (K, D) matrix.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ncd.cluster.kmeans import kmeans
from ncd.config import RefineConfig
from ncd.evaluate.health import COLLAPSE_SHARE, cluster_health
from ncd.evaluate.k_criteria import l2_normalise
from ncd.infer.forward import RegionOutputs
from ncd.methods import prediction_temperature
from ncd.infer.predict import TrainedModel


@dataclass(frozen=True)
class RefineResult:
    """Refined unit prototypes (K, D) and how far the assignment moved from the start."""

    prototypes: np.ndarray
    changed_share: float  # share of regions whose argmax cluster differs from the start's
    start_largest_share: float
    end_largest_share: float
    kept_start: bool = False  # the tuned prototypes collapsed a spread start, so the start was kept


def neighbour_indices(x: torch.Tensor, k: int, max_chunk_cells: int = 1 << 23) -> torch.Tensor:
    """(N, k) indices of each row's k most cosine-similar other rows (k clipped to N - 1).
    Works in row chunks of at most ``max_chunk_cells`` similarities (32 MiB), so memory
    grows with N, not N x N (a driver refines every region of a run)."""
    n = x.shape[0]
    k = max(1, min(k, n - 1))
    rows = max(1, min(n, max_chunk_cells // max(1, n)))
    buffer = x.new_empty((rows, n))  # reused: fresh chunk-sized allocations can fragment the heap and pile up
    out = []
    for start in range(0, n, rows):
        sim = buffer[:min(rows, n - start)]
        torch.matmul(x[start:start + rows], x.T, out=sim)
        own = torch.arange(len(sim))
        sim[own, own + start] = -float("inf")
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out)


def start_prototypes(feats: np.ndarray, head_prototypes: np.ndarray, cfg: RefineConfig, seed: int) -> np.ndarray:
    """The (K, D) prototypes refinement starts from: the head's, or spherical k-means centroids."""
    if cfg.init == "head":
        return l2_normalise(head_prototypes)
    k = head_prototypes.shape[0]
    return l2_normalise(kmeans(l2_normalise(feats), k, seed=seed, spherical=True, nredo=cfg.kmeans_restarts).centroids)


def _largest_share(labels: torch.Tensor, k: int) -> float:
    return float(torch.bincount(labels, minlength=k).max()) / max(1, len(labels))


def refine_prototypes(feats: np.ndarray, head_prototypes: np.ndarray, temperature: float, cfg: RefineConfig,
                      seed: int = 0, collapse_share: float = COLLAPSE_SHARE) -> RefineResult:
    """Tune K prototypes on (N, D) region features by neighbour consistency and mean entropy.

    When the tuned prototypes' clusters have collapsed (:func:`ncd.evaluate.health.cluster_health`,
    ``collapse_share``) and the start's had not, the start is kept (``kept_start``): the
    refinement never turns spread clusters into a collapse.

    Loss per batch: ``-mean log <p_i, p_j>`` for a random neighbour j of each i (among
    ``cfg.neighbours`` nearest), plus ``cfg.entropy_weight * sum(m log m)`` with m the mean
    prediction; ``p = softmax(cos(x, W) / temperature)``. Deterministic given ``seed``.
    """
    x = torch.from_numpy(l2_normalise(feats))
    n, k = x.shape[0], head_prototypes.shape[0]
    start = torch.from_numpy(start_prototypes(feats, head_prototypes, cfg, seed))
    if n < 2 or k < 2:
        labels = (x @ start.T).argmax(1)
        share = _largest_share(labels, k)
        return RefineResult(start.numpy(), 0.0, share, share)
    weights = torch.nn.Parameter(start.clone())
    neighbours = neighbour_indices(x, cfg.neighbours)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([weights], lr=cfg.lr)
    batch = min(n, cfg.batch_size)
    for _ in range(cfg.steps):
        i = torch.randint(n, (batch,), generator=gen)
        j = neighbours[i, torch.randint(neighbours.shape[1], (batch,), generator=gen)]
        w = F.normalize(weights, dim=1)
        p_i = F.softmax(x[i] @ w.T / temperature, dim=1)
        p_j = F.softmax(x[j] @ w.T / temperature, dim=1)
        consistency = -torch.log((p_i * p_j).sum(1).clamp_min(1e-8)).mean()
        mean_p = p_i.mean(0)
        neg_entropy = (mean_p * torch.log(mean_p.clamp_min(1e-8))).sum()
        loss = consistency + cfg.entropy_weight * neg_entropy
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = F.normalize(weights.detach(), dim=1)
    before, after = (x @ start.T).argmax(1), (x @ end.T).argmax(1)
    if (cluster_health(after.numpy(), k, collapse_share)["collapsed"]
            and not cluster_health(before.numpy(), k, collapse_share)["collapsed"]):
        share = _largest_share(before, k)
        return RefineResult(start.numpy(), 0.0, share, share, kept_start=True)
    return RefineResult(end.numpy(), float((before != after).float().mean()), _largest_share(before, k),
                        _largest_share(after, k))


def refine_trained(trained: TrainedModel, outputs: RegionOutputs, seed: int = 0
                   ) -> tuple[TrainedModel, RegionOutputs, RefineResult | None]:
    """``trained`` with its selected head's novel prototypes refined on ``outputs.feat`` (in
    place: the model's weights change) and the outputs' logits recomputed; unchanged, with
    no result, when ``refine.enabled`` is false or there is nothing to refine."""
    cfg = trained.cfg.refine
    if not cfg.enabled or len(outputs.feat) == 0:
        return trained, outputs, None
    heads = trained.model.heads
    base = heads.num_base
    head_protos = heads.prototypes()[trained.head, base:].detach().cpu().numpy()
    result = refine_prototypes(outputs.feat, head_protos, prediction_temperature(trained.cfg), cfg, seed,
                               trained.cfg.infer.collapse_share)
    with torch.no_grad():
        heads.weight[trained.head, base:] = torch.from_numpy(result.prototypes).to(heads.weight)
    return trained, RegionOutputs(feat=outputs.feat, logits=head_logits(trained, outputs.feat)), result


def head_logits(trained: TrainedModel, feat: np.ndarray) -> list[np.ndarray]:
    """Every head's logits for (N, D) region features (the heads alone, no backbone pass)."""
    heads = trained.model.heads
    with torch.no_grad():
        return [z.float().cpu().numpy() for z in heads(torch.from_numpy(feat).to(heads.weight))]


def refine_summary(result: RefineResult) -> dict[str, float | bool]:
    """The figures of a refinement worth keeping in a run summary."""
    return {"changed_share": round(result.changed_share, 4), "start_largest_share": round(result.start_largest_share, 4),
            "end_largest_share": round(result.end_largest_share, 4), "kept_start": result.kept_start}
