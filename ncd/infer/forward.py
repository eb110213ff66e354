"""Forward passes over region sets without gradients: features and head logits."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from ncd.infer.features import dihedral_mean
from ncd.model.ncd_model import NCDModel
from ncd.train.augment import ViewSpec
from ncd.train.datasets import EvalDataset, RegionSet

TTA_DIHEDRAL = "d8"
TTA_MODES = ("none", TTA_DIHEDRAL)  # infer.tta


@dataclass(frozen=True)
class RegionOutputs:
    """Per-region outputs: ``feat`` (N,D) CLS features, ``logits`` one (N,L+K) array per head."""

    feat: np.ndarray
    logits: list[np.ndarray]


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when enabled; a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def forward_regions(model: NCDModel, regions: RegionSet, spec: ViewSpec, batch_size: int = 64,
                    device: torch.device | str = "cpu", amp: bool = False, workers: int = 0,
                    dihedral: bool = False) -> RegionOutputs:
    """Test-view features and logits of every region, in table order.

    ``dihedral``: each region's feature is the mean of its L2-normalised features over the 8
    dihedral transforms (quarter turns and mirror images) of the crop and its masks, and the
    heads' logits are those of that mean (test-time augmentation, 8 forward passes).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    feats: list[torch.Tensor] = []
    logits: list[list[torch.Tensor]] = []
    loader = DataLoader(EvalDataset(regions, spec), batch_size=batch_size, shuffle=False, num_workers=workers)
    try:
        for batch in loader:
            images, masks = batch["images"].to(device), batch["masks"].to(device)
            with autocast(device, amp):
                out = _dihedral_outputs(model, images, masks) if dihedral else model(images, masks)
            feats.append(out["feat"].float().cpu())
            logits.append([z.float().cpu() for z in out["logits"]])
    finally:
        model.train(was_training)
    n_head = len(logits[0]) if logits else 0
    return RegionOutputs(
        feat=torch.cat(feats).numpy() if feats else np.zeros((0, model.feature_dim), np.float32),
        logits=[torch.cat([b[h] for b in logits]).numpy() for h in range(n_head)],
    )


def _dihedral_outputs(model: NCDModel, images: torch.Tensor, masks: torch.Tensor) -> dict[str, object]:
    """``feat`` averaged over the dihedral group (:func:`ncd.infer.features.dihedral_mean`) and
    the heads' logits of it."""
    feat = dihedral_mean(lambda im, mk: {"feat": model(im, mk)["feat"]}, images, masks)["feat"]
    return {"feat": feat, "logits": model.heads(feat)}
