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
    """Input geometry: ``resize`` = int(size / crop_pct) (256 for 224 at 0.875); ``whole``: the
    test view is the whole crop resized to size x size instead of a crop of it."""

    size: int = 224
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    whole: bool = False

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


@dataclass(frozen=True)
class ViewParams:
    """The random choices of one training view (drawn by :func:`draw_view_params`).

    ``jitter_order`` lists indices into (brightness, contrast, saturation), applied in
    that order; ``jitter`` holds their factors by that index; ``blur_kernel`` is the
    kernel size already scaled to the view size.
    """

    top: int
    left: int
    hflip: bool
    vflip: bool
    jitter_order: tuple[int, int, int]
    jitter: tuple[float, float, float]
    quarter_turns: int
    sharpness: float
    blur_kernel: int
    blur_sigma: float
    posterize_bits: int


JITTER_BOUNDS = (BRIGHTNESS, CONTRAST, SATURATION)


def draw_view_params(g: torch.Generator, height: int, width: int, spec: ViewSpec) -> ViewParams:
    """One view's random choices for an image resized to (``height``, ``width``), drawn from
    ``g`` in a fixed order (both augmentation paths use it: equal seeds, equal choices)."""
    top = int(float(torch.rand((), generator=g)) * (height - spec.size + 1)) if height > spec.size else 0
    left = int(float(torch.rand((), generator=g)) * (width - spec.size + 1)) if width > spec.size else 0
    hflip = bool(torch.rand((), generator=g) < 0.5)
    vflip = bool(torch.rand((), generator=g) < 0.5)
    order = tuple(torch.randperm(len(JITTER_BOUNDS), generator=g).tolist())  # ColorJitter's random order
    jitter = [1.0] * len(JITTER_BOUNDS)
    for i in order:
        jitter[i] = _uniform(g, *JITTER_BOUNDS[i])
    quarter_turns = int(torch.randint(4, (), generator=g))
    sharpness = _uniform(g, *SHARPNESS)
    kernel = _blur_kernel(int(_choice(g, BLUR_KERNELS)), spec.size)
    sigma = _uniform(g, *BLUR_SIGMA)
    bits = int(_choice(g, POSTERIZE_BITS))
    return ViewParams(top, left, hflip, vflip, order, tuple(jitter), quarter_turns, sharpness, kernel, sigma, bits)


def resize_for_views(image: torch.Tensor, mask: torch.Tensor, spec: ViewSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The first, deterministic step of every view: the shorter side resized to ``spec.resize``."""
    return _resize_shorter(image, mask, spec.resize)


def train_view(image: torch.Tensor, mask: torch.Tensor, spec: ViewSpec,
               g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented view.

    Args: ``image`` (3,H,W) uint8, ``mask`` (1,H,W) float in [0,1].
    Returns: normalised image (3,S,S) float32 and mask (1,S,S) in [0,1].
    """
    image, mask = resize_for_views(image, mask, spec)
    p = draw_view_params(g, *image.shape[-2:], spec)
    image = TF.crop(image, p.top, p.left, spec.size, spec.size)
    mask = TF.crop(mask, p.top, p.left, spec.size, spec.size)
    if p.hflip:
        image, mask = TF.horizontal_flip(image), TF.horizontal_flip(mask)
    if p.vflip:
        image, mask = TF.vertical_flip(image), TF.vertical_flip(mask)
    jitters = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for i in p.jitter_order:
        image = jitters[i](image, p.jitter[i])
    if p.quarter_turns:
        image, mask = torch.rot90(image, p.quarter_turns, (-2, -1)), torch.rot90(mask, p.quarter_turns, (-2, -1))
    image = TF.adjust_sharpness(image, p.sharpness)
    image = TF.gaussian_blur(image, [p.blur_kernel, p.blur_kernel], [p.blur_sigma] * 2)
    image = TF.posterize(image, p.posterize_bits)
    return _normalise(image, spec), mask.clamp(0, 1)


def eval_view(image: torch.Tensor, mask: torch.Tensor, spec: ViewSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic test view: resize the shorter side, crop at the upstream fixed
    offset ((resize - size) // 2 from the top-left, off-centre for non-square crops); with
    ``spec.whole``, the whole crop resized to size x size (aspect not kept)."""
    if spec.whole:
        image = TF.resize(image, [spec.size, spec.size], antialias=True)
        mask = TF.resize(mask, [spec.size, spec.size], antialias=True)
        return _normalise(image, spec), mask.clamp(0, 1)
    image, mask = _resize_shorter(image, mask, spec.resize)
    offset = (spec.resize - spec.size) // 2
    image = TF.crop(image, offset, offset, spec.size, spec.size)
    mask = TF.crop(mask, offset, offset, spec.size, spec.size)
    return _normalise(image, spec), mask.clamp(0, 1)
