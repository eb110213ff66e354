"""Frozen features of region crops: pooled tokens of chosen ViT blocks, or a CNN's pooled map.

One forward pass per batch gives every requested block (timm ``forward_intermediates``,
final norm applied, as DINOv2's linear probes). Per block, three poolings:

- ``cls``: the class token;
- ``mean_patch``: the mean of the patch tokens;
- ``mask_patch``: the patch tokens weighted by the share of each patch the region mask
  covers (the mask column of the region table, soft values kept); a region whose mask
  covers no patch of the view falls back to the plain mean.

A CNN (e.g. EfficientNet-Lite0, :func:`ncd.model.weights.load_efficientnet_lite0`) gives
``pool`` (mean of its last feature map) and ``mask_pool`` (the same, mask-weighted).

Views (``view``): ``eval``, ncd's deterministic test view (:func:`ncd.train.augment.eval_view`:
shorter side to size / crop_pct, then a size x size crop), or ``resize``, the whole crop
resized to size x size. Inputs are normalised with the backbone's own mean and std
(``pretrained_cfg``; ImageNet's when it has none).

``dihedral=True`` averages each feature over the 8 dihedral transforms of the view (4
quarter turns, each also mirrored; image and mask alike), each L2-normalised first:
test-time augmentation that makes the features blind to a defect's orientation, which
carries no type information on surfaces, boards and tiles (8 forward passes).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ncd.train.augment import IMAGENET_MEAN, IMAGENET_STD, ViewSpec, eval_view
from ncd.train.datasets import RegionSet, eval_set

VIEWS = ("eval", "resize")
VIT_POOLINGS = ("cls", "mean_patch", "mask_patch")
CNN_POOLINGS = ("pool", "mask_pool")


def resize_view(image: torch.Tensor, mask: torch.Tensor, spec: ViewSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole crop resized to ``spec.size`` square (aspect not kept); image (3,H,W) uint8,
    mask (C,H,W) in [0,1] -> normalised image (3,S,S) float32 and mask (C,S,S)."""
    return eval_view(image, mask, replace(spec, whole=True))


class RegionViews(Dataset):
    """One deterministic view (``eval`` or ``resize``) of every crop, with its region mask."""

    def __init__(self, regions: RegionSet, spec: ViewSpec, view: str) -> None:
        if view not in VIEWS:
            raise ValueError(f"view must be one of {', '.join(VIEWS)}, got {view!r}")
        self.regions, self.spec, self.view = regions, spec, view

    def __len__(self) -> int:
        return len(self.regions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, masks = self.regions.load(i)
        fn = eval_view if self.view == "eval" else resize_view
        image, masks = fn(image, masks[:1], self.spec)
        return image, masks


def mask_weights(masks: torch.Tensor, patch: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B,1,S,S) masks -> (B, gh*gw) share of each patch covered, row-major as ViT tokens.

    Pixels beyond ``grid * patch`` (a size that is not a multiple of the patch) are
    dropped, as the patch embedding drops them.
    """
    gh, gw = grid
    cover = F.avg_pool2d(masks[:, :1, : gh * patch, : gw * patch].float(), patch)
    return cover.flatten(1)


def weighted_mean(tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B,N,D) tokens, (B,N) non-negative weights -> (B,D) weighted mean; rows whose weights
    sum to zero get the plain mean."""
    total = weights.sum(1, keepdim=True)
    w = torch.where(total > 0, weights / total.clamp_min(1e-12), torch.full_like(weights, 1.0 / weights.shape[1]))
    return torch.einsum("bn,bnd->bd", w, tokens)


def _spec(backbone: nn.Module, size: int, crop_pct: float) -> ViewSpec:
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return ViewSpec(size=size, crop_pct=crop_pct, mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
                    std=tuple(cfg.get("std", IMAGENET_STD)))


def vit_batch_features(backbone: nn.Module, images: torch.Tensor, masks: torch.Tensor,
                       blocks: Sequence[int]) -> dict[str, torch.Tensor]:
    out = backbone.forward_intermediates(images, indices=list(blocks), return_prefix_tokens=True, norm=True,
                                         output_fmt="NLC", intermediates_only=True)
    patch = backbone.patch_embed.patch_size[0]
    n = out[0][0].shape[1]
    grid = tuple(backbone.patch_embed.dynamic_feat_size(images.shape[-2:]))
    if grid[0] * grid[1] != n:
        raise ValueError(f"patch grid {grid} does not match {n} patch tokens")
    weights = mask_weights(masks, patch, grid)
    feats = {}
    for b, (tokens, prefix) in zip(blocks, out):
        feats[f"block{b}/cls"] = prefix[:, 0]
        feats[f"block{b}/mean_patch"] = tokens.mean(1)
        feats[f"block{b}/mask_patch"] = weighted_mean(tokens, weights)
    return feats


def cnn_batch_features(backbone: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    fmap = backbone.forward_features(images)  # (B,C,h,w)
    tokens = fmap.flatten(2).transpose(1, 2)  # (B,h*w,C)
    weights = F.adaptive_avg_pool2d(masks[:, :1].float(), fmap.shape[-2:]).flatten(1)
    return {"pool": tokens.mean(1), "mask_pool": weighted_mean(tokens, weights)}


def dihedral_transform(x: torch.Tensor, t: int) -> torch.Tensor:
    """Transform ``t`` (0..7) of the dihedral group on the last two axes: ``t % 4`` quarter
    turns, mirrored left-right first when ``t >= 4``."""
    if t >= 4:
        x = x.flip(-1)
    return torch.rot90(x, t % 4, dims=(-2, -1))


def dihedral_mean(batch_features: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
                   images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each feature of ``batch_features`` L2-normalised and averaged over the 8 dihedral transforms."""
    total: dict[str, torch.Tensor] = {}
    for t in range(8):
        for k, v in batch_features(dihedral_transform(images, t), dihedral_transform(masks, t)).items():
            total[k] = total.get(k, 0) + F.normalize(v.float(), dim=1) / 8
    return total


def is_vit(backbone: nn.Module) -> bool:
    """Whether ``backbone`` is a timm ViT (token features) rather than a CNN (feature maps)."""
    return hasattr(backbone, "patch_embed") and hasattr(backbone, "forward_intermediates")


@torch.no_grad()
def frozen_region_features(regions: pa.Table | RegionSet, backbone: nn.Module, blocks: Sequence[int] = (),
                           size: int = 224, view: str = "eval", *, crop_pct: float = 0.875,
                           batch_size: int = 64, device: torch.device | str = "cpu",
                           dihedral: bool = False) -> dict[str, np.ndarray]:
    """Frozen features of every region crop, one forward pass per batch for all blocks.

    Args:
        regions: a region table (``region_id``, ``crop_png``, ``mask_png``) or a RegionSet.
        backbone: a timm ViT built for ``size`` px (``blocks`` index its blocks, 0-based) or a
            CNN with ``forward_features`` (``blocks`` must be empty).
        size: input side in pixels; view: ``eval`` or ``resize`` (module docstring).
        dihedral: average over the view's 8 dihedral transforms (module docstring).

    Returns:
        {variant: (N, D) float32}: ``block<b>/<cls|mean_patch|mask_patch>`` for a ViT,
        ``pool`` and ``mask_pool`` for a CNN, rows in the table's order.
    """
    vit = is_vit(backbone)
    if vit and not blocks:
        raise ValueError("frozen_region_features: name the ViT blocks to read (e.g. blocks=range(4, 9))")
    if not vit and blocks:
        raise ValueError("frozen_region_features: blocks apply to a ViT only; this backbone is a CNN")
    if vit and max(blocks) >= len(backbone.blocks):
        raise ValueError(f"block {max(blocks)} out of range: the backbone has {len(backbone.blocks)} blocks")
    data = regions if isinstance(regions, RegionSet) else eval_set(regions)
    loader = DataLoader(RegionViews(data, _spec(backbone, size, crop_pct), view), batch_size=batch_size)
    layout = torch.contiguous_format if vit else torch.channels_last  # 3-5x faster depthwise convs on CPU
    backbone = backbone.eval().to(device, memory_format=layout)
    parts: dict[str, list[torch.Tensor]] = {}

    def batch_features(x: torch.Tensor, m: torch.Tensor) -> dict[str, torch.Tensor]:
        return vit_batch_features(backbone, x, m, blocks) if vit else cnn_batch_features(backbone, x, m)

    for images, masks in loader:
        images, masks = images.to(device, memory_format=layout), masks.to(device)
        feats = dihedral_mean(batch_features, images, masks) if dihedral else batch_features(images, masks)
        for k, v in feats.items():
            parts.setdefault(k, []).append(v.float().cpu())
    return {k: torch.cat(v).numpy() for k, v in parts.items()}
