"""Two-view augmentations with mask-consistent geometry (METHOD.md 5.2).

Geometric steps (resize, crop, flips, 90-degree rotations) apply to the image and its
mask alike; photometric steps (colour jitter, sharpness, blur, posterize) to the image
only. All randomness comes from an explicit ``torch.Generator``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PARITY_SIZE = 224  # the size the upstream blur kernels were chosen for
BLUR_KERNELS = (9, 13, 17, 21, 25, 29, 33)
BLUR_SIGMA = (0.1, 2.0)
BRIGHTNESS = (0.6, 1.4)
CONTRAST = (0.6, 1.4)
SATURATION = (0.6, 1.8)
SHARPNESS = (0.2, 2.0)
POSTERIZE_BITS = (5, 6, 7, 8)


@dataclass(frozen=True)
class ViewSpec:
    """Input geometry: ``resize`` = int(size / crop_pct) (256 for 224 at 0.875)."""

    size: int = 224
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def resize(self) -> int:
        return int(self.size / self.crop_pct)


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _choice(g: torch.Generator, options: tuple) -> object:
    return options[int(torch.randint(len(options), (), generator=g))]


def _resize_shorter(image: torch.Tensor, mask: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = image.shape[-2:]
    if h <= w:
        hw = [side, max(1, int(side * w / h))]
    else:
        hw = [max(1, int(side * h / w)), side]
    image = TF.resize(image, hw, antialias=True)
    mask = TF.resize(mask, hw, antialias=True)
    return image, mask


def _blur_kernel(kernel: int, size: int) -> int:
    k = max(3, int(round(kernel * size / PARITY_SIZE)))
    return k if k % 2 else k + 1


def _normalise(image: torch.Tensor, spec: ViewSpec) -> torch.Tensor:
    return TF.normalize(TF.to_dtype(image, torch.float32, scale=True), list(spec.mean), list(spec.std))


def train_view(image: torch.Tensor, mask: torch.Tensor, spec: ViewSpec,
               g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented view.

    Args: ``image`` (3,H,W) uint8, ``mask`` (1,H,W) float in [0,1].
    Returns: normalised image (3,S,S) float32 and mask (1,S,S) in [0,1].
    """
    image, mask = _resize_shorter(image, mask, spec.resize)
    h, w = image.shape[-2:]
    top = int(float(torch.rand((), generator=g)) * (h - spec.size + 1)) if h > spec.size else 0
    left = int(float(torch.rand((), generator=g)) * (w - spec.size + 1)) if w > spec.size else 0
    image = TF.crop(image, top, left, spec.size, spec.size)
    mask = TF.crop(mask, top, left, spec.size, spec.size)
    if torch.rand((), generator=g) < 0.5:
        image, mask = TF.horizontal_flip(image), TF.horizontal_flip(mask)
    if torch.rand((), generator=g) < 0.5:
        image, mask = TF.vertical_flip(image), TF.vertical_flip(mask)
    jitters = ((TF.adjust_brightness, BRIGHTNESS), (TF.adjust_contrast, CONTRAST), (TF.adjust_saturation, SATURATION))
    for i in torch.randperm(len(jitters), generator=g).tolist():  # ColorJitter's random order
        fn, bounds = jitters[i]
        image = fn(image, _uniform(g, *bounds))
    quarter_turns = int(torch.randint(4, (), generator=g))
    if quarter_turns:
        image, mask = torch.rot90(image, quarter_turns, (-2, -1)), torch.rot90(mask, quarter_turns, (-2, -1))
    image = TF.adjust_sharpness(image, _uniform(g, *SHARPNESS))
    kernel = _blur_kernel(int(_choice(g, BLUR_KERNELS)), spec.size)
    image = TF.gaussian_blur(image, [kernel, kernel], [_uniform(g, *BLUR_SIGMA)] * 2)
    image = TF.posterize(image, int(_choice(g, POSTERIZE_BITS)))
    return _normalise(image, spec), mask.clamp(0, 1)


def eval_view(image: torch.Tensor, mask: torch.Tensor, spec: ViewSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic test view: resize the shorter side, crop at the upstream fixed
    offset ((resize - size) // 2 from the top-left, off-centre for non-square crops)."""
    image, mask = _resize_shorter(image, mask, spec.resize)
    offset = (spec.resize - spec.size) // 2
    image = TF.crop(image, offset, offset, spec.size, spec.size)
    mask = TF.crop(mask, offset, offset, spec.size, spec.size)
    return _normalise(image, spec), mask.clamp(0, 1)
