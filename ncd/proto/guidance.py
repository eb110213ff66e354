"""Region Guidance Factor: a soft per-key CLS attention bias from the object and anomaly priors.

ProtoAnomalyNCD (arXiv 2511.12938, PROTO.md items 3-4) adds the patch-pooled anomaly
map as a bias ``M`` to the CLS query's attention logits only,
``Attn = softmax([Q_cls K^T + M ; Q_p K^T]) V``, and its RGF lets attention tell
background, object and anomalous regions apart. The paper's equations could not be
read; the three-level bias below is ncd's reading (PROTO.md, "What ncd decides"):

    M_j = (1 - o_j) b_bg + o_j (b_obj + g a_j)        (patch key j; prefix keys 0)

with ``a_j`` the anomaly map and ``o_j`` the object mask, both average-pooled over
patch ``j`` (in [0, 1]). A background patch gets ``b_bg``, an object patch ``b_obj``, an
anomalous object patch ``b_obj + g a``. Without an object prior ``o = 1``. ``b_bg``,
``b_obj`` and ``g`` are learnable scalars shared by all heads and masked blocks (the
attention bias of :class:`ncd.model.MaskGuidedViT` broadcasts over heads).

Modes (the ablation of PROTO.md): ``rgf`` as above; ``soft``, the pooled map alone
``M_j = g a_j`` (no object levels); ``hard``, AnomalyNCD's mask (``hard_key_bias`` of the
region mask coverage: 0 or the dtype's most negative value).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ncd.config import ProtoConfig
from ncd.model.mask_attention import hard_key_bias, patch_coverage

GUIDANCE_MODES = ("rgf", "soft", "hard")


def rgf_key_bias(
    anomaly_cov: Tensor,
    object_cov: Tensor | None,
    b_bg: Tensor | float,
    b_obj: Tensor | float,
    gain: Tensor | float,
    num_prefix_tokens: int,
) -> Tensor:
    """Per-key CLS bias of the Region Guidance Factor.

    ``M_j = (1 - o_j) b_bg + o_j (b_obj + gain a_j)`` for patch keys, 0 for prefix keys.

    Args:
        anomaly_cov: (B, Np) pooled anomaly map ``a`` in [0, 1].
        object_cov: (B, Np) pooled object mask ``o`` in [0, 1]; None: no object prior (o = 1).
        b_bg, b_obj, gain: scalars (floats or 0-d tensors, differentiable).
        num_prefix_tokens: CLS (+ register) tokens before the patches.

    Returns:
        (B, num_prefix_tokens + Np) in the dtype of ``anomaly_cov`` (float32 for masks).
    """
    a = anomaly_cov.float() if not anomaly_cov.is_floating_point() else anomaly_cov
    if object_cov is None:
        patch = b_obj + gain * a
    else:
        if object_cov.shape != a.shape:
            raise ValueError(f"object_cov {tuple(object_cov.shape)} must match anomaly_cov {tuple(a.shape)}")
        o = object_cov.to(a.dtype)
        patch = (1.0 - o) * b_bg + o * (b_obj + gain * a)
    patch = patch.to(a.dtype)
    prefix = a.new_zeros(a.shape[0], num_prefix_tokens)
    return torch.cat([prefix, patch], dim=1)


def soft_key_bias(anomaly_cov: Tensor, gain: Tensor | float, num_prefix_tokens: int) -> Tensor:
    """Per-key CLS bias of the pooled anomaly map without RGF: ``M_j = gain a_j``; prefix keys 0.

    Args: ``anomaly_cov`` (B, Np) in [0, 1]. Returns (B, num_prefix_tokens + Np).
    """
    a = anomaly_cov.float() if not anomaly_cov.is_floating_point() else anomaly_cov
    return torch.cat([a.new_zeros(a.shape[0], num_prefix_tokens), (gain * a).to(a.dtype)], dim=1)


def _bias_dtype(device: torch.device) -> torch.dtype:
    """The dtype the attention scores will have on ``device``: the autocast dtype when active."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return torch.float32


class RegionGuidance(nn.Module):
    """Maps pixel-level guidance maps of a crop to the (B, N) CLS key bias of a ViT.

    ``forward(region, anomaly=None, objects=None) -> (B, N)``, every map (B, 1, H, W) in
    [0, 1] at the ViT's input size (the same geometry as the image). ``anomaly`` None:
    the region mask stands in for the anomaly map (binary ``a``).

    ``b_bg``, ``b_obj``, ``gain`` (0-d) are ``nn.Parameter`` when ``learnable`` and used by
    the mode (rgf: all three; soft: ``gain``; hard: none), buffers otherwise. Learning them makes the key bias require grad, so the masked
    blocks run with autograd from the first masked block on.
    """

    def __init__(
        self,
        patch_size: tuple[int, int],
        num_prefix_tokens: int,
        mode: str = "rgf",
        b_bg: float = -4.0,
        b_obj: float = 0.0,
        gain: float = 4.0,
        learnable: bool = True,
    ) -> None:
        super().__init__()
        if mode not in GUIDANCE_MODES:
            raise ValueError(f"proto.guidance must be one of {GUIDANCE_MODES}, got {mode!r}")
        self.patch_size = (int(patch_size[0]), int(patch_size[1]))
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.mode = mode
        self.learnable = learnable
        used = {"rgf": ("b_bg", "b_obj", "gain"), "soft": ("gain",), "hard": ()}[mode]
        for name, value in (("b_bg", b_bg), ("b_obj", b_obj), ("gain", gain)):
            t = torch.tensor(float(value))
            if learnable and name in used:  # unused parameters would break DDP's reducer
                self.register_parameter(name, nn.Parameter(t))
            else:
                self.register_buffer(name, t)

    @classmethod
    def from_config(cls, cfg: ProtoConfig, patch_size: tuple[int, int], num_prefix_tokens: int) -> RegionGuidance:
        """From ``proto.guidance``, ``rgf_background``, ``rgf_object``, ``rgf_gain``, ``rgf_learnable``."""
        return cls(patch_size, num_prefix_tokens, mode=cfg.guidance, b_bg=cfg.rgf_background,
                   b_obj=cfg.rgf_object, gain=cfg.rgf_gain, learnable=cfg.rgf_learnable)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, learnable={self.learnable}"

    def forward(self, region: Tensor, anomaly: Tensor | None = None, objects: Tensor | None = None) -> Tensor:
        """(B, N) per-key CLS bias, N = num_prefix_tokens + patches.

        Args:
            region: (B, 1, H, W) region (MEBin) mask of the crop; used by ``hard`` and as
                the anomaly map when ``anomaly`` is None.
            anomaly: (B, 1, H, W) normalised anomaly map of the crop in [0, 1], or None.
            objects: (B, 1, H, W) object mask in [0, 1], or None (no object prior).
        """
        if self.mode == "hard":
            return hard_key_bias(patch_coverage(region, self.patch_size), self.num_prefix_tokens,
                                 _bias_dtype(region.device))
        a = patch_coverage(anomaly if anomaly is not None else region, self.patch_size)
        if self.mode == "soft":
            return soft_key_bias(a, self.gain, self.num_prefix_tokens)
        o = patch_coverage(objects, self.patch_size) if objects is not None else None
        return rgf_key_bias(a, o, self.b_bg, self.b_obj, self.gain, self.num_prefix_tokens)
