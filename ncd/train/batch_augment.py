"""The training views' augmentations as batched tensor ops (``train.augment_on=device``).

The loader hands over uint8 crops (already cropped to the view size) with each view's
random choices (:class:`ncd.train.augment.ViewParams`, drawn from the sampler's per-draw
seed); here the rest of :func:`ncd.train.augment.train_view` runs on a whole batch at once,
on whatever device the batch is on, with per-sample parameters and without host
synchronisation. Values stay on the uint8 grid between steps (each step floors or
rounds as torchvision does for uint8 images), so a view equals the CPU path's up to
float rounding at a few pixels.

Geometry (flips, quarter turns) is applied first: every photometric step is
position-independent (colour jitter) or symmetric under flips and transposition
(sharpness, Gaussian blur with reflect padding), so the order does not change the result.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ncd.train.augment import BLUR_KERNELS, ViewParams, ViewSpec, _blur_kernel

PARAM_FIELDS = ("hflip", "vflip", "jitter_order", "jitter", "quarter_turns", "sharpness", "blur_kernel",
                "blur_sigma", "posterize_bits")
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def pack_params(params: list[ViewParams]) -> dict[str, torch.Tensor]:
    """Per-view parameters as tensors with a leading view axis (what a loader collates)."""
    return {
        "hflip": torch.tensor([p.hflip for p in params]),
        "vflip": torch.tensor([p.vflip for p in params]),
        "jitter_order": torch.tensor([p.jitter_order for p in params], dtype=torch.int64),
        "jitter": torch.tensor([p.jitter for p in params], dtype=torch.float32),
        "quarter_turns": torch.tensor([p.quarter_turns for p in params], dtype=torch.int64),
        "sharpness": torch.tensor([p.sharpness for p in params], dtype=torch.float32),
        "blur_kernel": torch.tensor([p.blur_kernel for p in params], dtype=torch.int64),
        "blur_sigma": torch.tensor([p.blur_sigma for p in params], dtype=torch.float32),
        "posterize_bits": torch.tensor([p.posterize_bits for p in params], dtype=torch.int64),
    }


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _geometry(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Flips, then counter-clockwise quarter turns (square views), per sample."""
    x = torch.where(_per_sample(params["hflip"]), x.flip(-1), x)
    x = torch.where(_per_sample(params["vflip"]), x.flip(-2), x)
    k = _per_sample(params["quarter_turns"])
    x = torch.where(k % 2 == 1, x.transpose(-2, -1), x)  # rot90 k=1: transpose, flip rows; k=3: flip columns
    x = torch.where((k == 1) | (k == 2), x.flip(-2), x)
    return torch.where((k == 2) | (k == 3), x.flip(-1), x)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (x[:, 0] * GRAY[0] + x[:, 1] * GRAY[1] + x[:, 2] * GRAY[2]).unsqueeze(1).floor()


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor + other * (1.0 - factor)).clamp(0, 255).floor()


def _colour_jitter(x: torch.Tensor, order: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation in each sample's own order."""
    for position in range(order.shape[1]):
        step = order[:, position]
        f = factors.gather(1, step[:, None]).view(-1, 1, 1, 1)
        gray = _gray(x)
        brightness = (x * f).clamp(0, 255).floor()
        contrast = _blend(x, gray.mean(dim=(-3, -2, -1), keepdim=True), f)
        saturation = _blend(x, gray, f)
        x = torch.where(_per_sample(step == 0), brightness, torch.where(_per_sample(step == 1), contrast, saturation))
    return x


def _sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_sharpness: blend with a 3x3-smoothed image inside a 1-pixel border."""
    c = x.shape[1]
    kernel = torch.ones(3, 3, dtype=x.dtype, device=x.device) / 13.0
    kernel[1, 1] = 5.0 / 13.0
    smooth = F.conv2d(x, kernel.expand(c, 1, 3, 3), groups=c).round()
    inner = x[..., 1:-1, 1:-1]
    out = x.clone()
    out[..., 1:-1, 1:-1] = inner + (1.0 - _per_sample(factor)) * (smooth - inner)
    return out.clamp(0, 255).floor()


def _gaussian_blur(x: torch.Tensor, kernel_size: torch.Tensor, sigma: torch.Tensor, max_kernel: int) -> torch.Tensor:
    """Separable Gaussian blur with per-sample odd kernel sizes (zero-padded to ``max_kernel``
    taps: reflect padding makes that equal to each sample's own kernel) and sigmas."""
    n, c, h, w = x.shape
    half = max_kernel // 2
    taps = torch.arange(-half, half + 1, dtype=x.dtype, device=x.device)
    # torchvision's taps lie 1/sqrt(2) apart: linspace(-lim, lim, k), lim = (k - 1) / (2 sqrt 2)
    logits = -((taps / math.sqrt(2.0))[None, :] / sigma[:, None].to(x.dtype)) ** 2
    logits = logits.masked_fill(taps.abs()[None, :] > (kernel_size[:, None] // 2), float("-inf"))
    weights = torch.softmax(logits, dim=1).repeat_interleave(c, dim=0)  # (n*c, K)
    flat = F.pad(x.reshape(1, n * c, h, w), [half, half, half, half], mode="reflect")
    flat = F.conv2d(flat, weights.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(flat, weights.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, h, w).round()


def _posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    step = torch.pow(2.0, (8 - bits).to(x.dtype)).view(-1, 1, 1, 1)
    return torch.floor(x / step) * step


def augment_views(images: torch.Tensor, masks: torch.Tensor, params: dict[str, torch.Tensor],
                  spec: ViewSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` (N,3,S,S) uint8 and ``masks`` (N,c,S,S) uint8 crops with their views'
    parameters (``pack_params``, leading axis N) -> normalised images (N,3,S,S) float32
    and masks (N,c,S,S) in [0,1], on the images' device."""
    params = {k: v.to(images.device, non_blocking=True) for k, v in params.items()}
    x = _geometry(images, params).float()
    m = _geometry(masks, params).float() / 255.0
    x = _colour_jitter(x, params["jitter_order"], params["jitter"])
    x = _sharpness(x, params["sharpness"])
    x = _gaussian_blur(x, params["blur_kernel"], params["blur_sigma"], _blur_kernel(max(BLUR_KERNELS), spec.size))
    x = _posterize(x, params["posterize_bits"])
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
    return (x / 255.0 - mean) / std, m.clamp(0, 1)


def augment_batch(batch: dict[str, torch.Tensor], spec: ViewSpec, device: torch.device) -> dict[str, torch.Tensor]:
    """A collated two-view batch of uint8 crops (``images`` (B,2,3,S,S), ``masks``
    (B,2,c,S,S), ``params`` with (B,2) leading axes) -> the same batch with augmented
    float ``images`` and ``masks`` on ``device`` (the CPU path's layout)."""
    images = batch["images"].to(device, non_blocking=True)
    b, v = images.shape[:2]
    params = {k: t.flatten(0, 1) for k, t in batch["params"].items()}
    x, m = augment_views(images.flatten(0, 1), batch["masks"].to(device, non_blocking=True).flatten(0, 1), params,
                         spec)
    rest = {k: t for k, t in batch.items() if k not in ("images", "masks", "params")}
    return {**rest, "images": x.unflatten(0, (b, v)), "masks": m.unflatten(0, (b, v))}
