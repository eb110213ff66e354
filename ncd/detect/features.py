"""Patch features for the detector: DINOv2 patch tokens of a few blocks (DETECT.md).

Images are resized to a square ``detect.image_size`` (plain resize, ImageNet mean/std,
as MuSc); the tokens of each block in ``detect.blocks`` are taken with the final
LayerNorm applied. Per image: ``layers`` (L, h, w, C) float16 and the CLS token of the
last block (C,) float32, used to re-score image scores. Neighbourhood aggregation
(LNAMD) runs at scoring time (:func:`aggregate`), so only L token maps are stored.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ncd.config import ConfigError, DetectConfig, ModelConfig, S3Config
from ncd.model.precision import uses_bf16

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def backbone_config(cfg: DetectConfig) -> ModelConfig:
    """The model section that loads the detector's backbone (blocks past the last used dropped)."""
    return ModelConfig(backbone=cfg.backbone, weights=cfg.weights, image_size=cfg.image_size,
                       keep_blocks=max(cfg.blocks) + 1, mask_layers=0, grad_from_block=0)


def check_detect_config(cfg: DetectConfig) -> None:
    """A ``ConfigError`` listing the ``detect.*`` settings the detector cannot run with."""
    from ncd.config import ExperimentConfig
    from ncd.validation import validate

    validate(ExperimentConfig(detect=cfg))


def preprocess(image: np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> normalised float32 (3, size, size)."""
    x = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
    return ((x - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


class PatchFeatureExtractor:
    """The detector's backbone; ``extractor(images)`` -> (layers (B, L, h, w, C) fp16, cls (B, C) fp32)."""

    def __init__(self, cfg: DetectConfig, s3: S3Config | None = None, device: str | None = None,
                 model_kwargs: Mapping[str, Any] | None = None) -> None:
        from ncd.model.backbone import load_backbone

        check_detect_config(cfg)
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        with torch.random.fork_rng():  # random weights (tests) are seeded too, the caller's RNG untouched
            torch.manual_seed(cfg.seed)
            model = load_backbone(backbone_config(cfg), s3, model_kwargs=model_kwargs).eval()
        if max(cfg.blocks) >= len(model.blocks):
            raise ConfigError(f"detect.blocks={list(cfg.blocks)}: the backbone has blocks 0..{len(model.blocks) - 1}")
        self.model = model.to(self.device)
        self.half = uses_bf16(self.device, cfg.amp)  # CUDA, or a CPU with native bf16
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.stack([preprocess(im, self.cfg.image_size) for im in images])).to(self.device)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.half):
            out = self.model.forward_intermediates(x, indices=sorted(self.cfg.blocks), return_prefix_tokens=True,
                                                   norm=True, output_fmt="NLC", intermediates_only=True)
        h, w = self.model.patch_embed.grid_size
        layers = torch.stack([spatial for spatial, _ in out], 1)  # (B, L, h*w, C)
        layers = layers.reshape(layers.shape[0], layers.shape[1], h, w, -1)
        cls = out[-1][1][:, 0]
        return layers.half().cpu().numpy(), cls.float().cpu().numpy()


def aggregate(layer: torch.Tensor, radius: int) -> torch.Tensor:
    """LNAMD for one layer: (N, h, w, C) tokens -> (N, h*w, C) L2-normalised patch vectors.

    Each image's token map is normalised (zero mean, unit variance over all positions
    and channels, no affine), each channel averaged over the r x r neighbourhood (stride
    1, zero padding counted), then each patch vector L2-normalised.
    """
    x = layer.float()
    n, h, w, c = x.shape
    x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) / (x.std(dim=(1, 2, 3), unbiased=False, keepdim=True) + 1e-6)
    if radius > 1:
        x = F.avg_pool2d(x.permute(0, 3, 1, 2), radius, stride=1, padding=radius // 2,
                         count_include_pad=True).permute(0, 2, 3, 1)
    return F.normalize(x.reshape(n, h * w, c), dim=-1)
