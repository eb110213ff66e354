"""Forward passes over region sets without gradients: features and head logits."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from ncd.model.ncd_model import NCDModel
from ncd.model.precision import autocast
from ncd.train.augment import ViewSpec
from ncd.train.datasets import EvalDataset, RegionSet


@dataclass(frozen=True)
class RegionOutputs:
    """Per-region outputs: ``feat`` (N,D) CLS features, ``logits`` one (N,L+K) array per head."""

    feat: np.ndarray
    logits: list[np.ndarray]


@torch.no_grad()
def forward_regions(model: NCDModel, regions: RegionSet, spec: ViewSpec, batch_size: int = 64,
                    device: torch.device | str = "cpu", amp: bool = False, workers: int = 0) -> RegionOutputs:
    """Test-view features and logits of every region, in table order."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    feats: list[torch.Tensor] = []
    logits: list[list[torch.Tensor]] = []
    loader = DataLoader(EvalDataset(regions, spec), batch_size=batch_size, shuffle=False, num_workers=workers)
    try:
        for batch in loader:
            with autocast(device, amp):
                out = model(batch["images"].to(device), batch["masks"].to(device))
            feats.append(out["feat"].float().cpu())
            logits.append([z.float().cpu() for z in out["logits"]])
    finally:
        model.train(was_training)
    n_head = len(logits[0]) if logits else 0
    return RegionOutputs(
        feat=torch.cat(feats).numpy() if feats else np.zeros((0, model.feature_dim), np.float32),
        logits=[torch.cat([b[h] for b in logits]).numpy() for h in range(n_head)],
    )
