"""Projector and cosine-prototype classifier heads (METHOD.md 4.2)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Projector(nn.Module):
    """SimGCD's projection MLP for the contrastive losses (no BatchNorm, no output norm).

    ``proj_layers=3``: Linear(D, hidden) GELU Linear(hidden, hidden) GELU Linear(hidden, out);
    ``proj_layers=1``: Linear(D, out). Weights trunc-normal(std 0.02), biases 0.
    (B, D) -> (B, out); 768 -> 2048 -> 2048 -> 256 upstream.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256, num_layers: int = 3) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"model.proj_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class PrototypeHeads(nn.Module):
    """``n_head`` independent cosine classifiers over L + K unit prototypes.

    Each head is upstream's ``weight_norm(Linear(D, L+K, bias=False))`` with the gain
    fixed at 1: the weight rows are L2-normalised at every forward (so there is no gain
    parameter at all), and the input is the L2-normalised CLS feature. Logits are
    cosine similarities in [-1, 1]. Directions start from PyTorch's default Linear init
    U(-1/sqrt(D), 1/sqrt(D)), independently per head; rows [L, L+K) can be set from
    k-means centroids with :meth:`init_novel_prototypes`.

    ``weight``: (n_head, L + K, D), the unnormalised directions (``weight_v`` upstream).
    """

    def __init__(self, in_dim: int, num_base: int, num_novel: int, n_head: int = 4) -> None:
        super().__init__()
        if num_novel < 1:
            raise ValueError(f"num_novel (K) must be >= 1, got {num_novel}")
        if num_base < 0 or n_head < 1:
            raise ValueError(f"need num_base >= 0 and n_head >= 1, got {num_base}, {n_head}")
        self.in_dim, self.num_base, self.num_novel, self.n_head = in_dim, num_base, num_novel, n_head
        self.weight = nn.Parameter(torch.empty(n_head, num_base + num_novel, in_dim))
        bound = 1.0 / math.sqrt(in_dim)
        nn.init.uniform_(self.weight, -bound, bound)

    @property
    def num_classes(self) -> int:
        """C = L + K."""
        return self.num_base + self.num_novel

    def prototypes(self) -> Tensor:
        """(n_head, C, D) unit-norm prototypes."""
        return F.normalize(self.weight, dim=-1)

    def forward(self, feat: Tensor) -> list[Tensor]:
        """(B, D) CLS features -> ``n_head`` tensors of (B, C) cosine logits."""
        x = F.normalize(feat, dim=-1)
        logits = torch.einsum("bd,hcd->hbc", x, self.prototypes().to(x.dtype))
        return list(logits.unbind(0))

    @torch.no_grad()
    def init_novel_prototypes(self, centroids: Tensor) -> None:
        """Set the novel prototypes (rows L..L+K) of every head to ``centroids``.

        Args:
            centroids: (K, D) shared by all heads, or (n_head, K, D) one set per head;
                normalised here.
        """
        k, d = self.num_novel, self.in_dim
        if centroids.shape not in ((k, d), (self.n_head, k, d)):
            raise ValueError(f"centroids must be ({k}, {d}) or ({self.n_head}, {k}, {d}), got {tuple(centroids.shape)}")
        c = F.normalize(centroids.to(self.weight), dim=-1)
        self.weight[:, self.num_base :] = c.expand(self.n_head, k, d)


def select_head(losses_per_head: Sequence[float]) -> int:
    """Index of the head with the lowest clustering loss, ignoring NaN (METHOD.md 4.2).

    Ties go to the lowest index (upstream's ``list.index(min(...))``); upstream fails on NaN.

    Raises:
        ValueError: no losses, or every loss is NaN.
    """
    values = [float(v) for v in losses_per_head]
    valid = [(v, i) for i, v in enumerate(values) if not math.isnan(v)]
    if not valid:
        raise ValueError(f"cannot select a head: every head's loss is NaN or there are none ({values})")
    return min(valid)[1]
