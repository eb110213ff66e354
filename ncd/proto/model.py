"""The ProtoAnomalyNCD network: AnomalyNCD's encoder, projector and heads with region guidance.

The same family as :class:`ncd.model.NCDModel` (PROTO.md: "the heads are the same family
as AnomalyNCD's"); only the CLS attention bias differs: :class:`RegionGuidance` turns
the crop's guidance maps into a soft per-key bias (``MaskGuidedViT.forward_with_key_bias``).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from ncd.config import ModelConfig, ProtoConfig, S3Config
from ncd.model.heads import Projector, PrototypeHeads
from ncd.model.mask_attention import MaskGuidedViT
from ncd.model.ncd_model import NCDModel, build_ncd_model
from ncd.proto.guidance import RegionGuidance

GUIDE_CHANNELS = ("region", "anomaly", "object")  # channel order of the ``masks`` tensor


class ProtoNCDModel(NCDModel):
    """``forward(images, masks) -> {"feat", "proj", "logits", "prototypes"}``.

    ``masks``: (B, c, H, W) with c in {1, 2, 3} channels in :data:`GUIDE_CHANNELS` order
    (region mask, normalised anomaly map, object mask; all in [0, 1], image geometry);
    missing channels: the anomaly map falls back to the region mask, the object prior to
    "all object". ``masks=None``: the vanilla ViT.

    Outputs as :class:`NCDModel` (``logits``: ``n_head`` tensors (B, L + K) of cosines),
    plus ``prototypes`` (n_head, L + K, D) unit vectors, returned from ``forward`` so
    that the separation loss's gradient goes through DDP's forward like the logits'.
    """

    def __init__(self, encoder: MaskGuidedViT, projector: Projector, heads: PrototypeHeads,
                 guidance: RegionGuidance) -> None:
        super().__init__(encoder, projector, heads)
        self.guidance = guidance

    def key_bias(self, masks: Tensor) -> Tensor:
        """(B, N) CLS key bias of the guidance maps ``masks`` (B, c, H, W)."""
        if masks.ndim != 4 or not 1 <= masks.shape[1] <= len(GUIDE_CHANNELS):
            raise ValueError(f"masks must be (B, 1..3, H, W) {GUIDE_CHANNELS}, got {tuple(masks.shape)}")
        c = masks.shape[1]
        return self.guidance(masks[:, 0:1], masks[:, 1:2] if c > 1 else None, masks[:, 2:3] if c > 2 else None)

    def forward(self, images: Tensor, masks: Tensor | None) -> dict[str, Any]:
        bias = self.key_bias(masks) if masks is not None else None
        feat = self.encoder.forward_with_key_bias(images, bias, masks[:, 0:1] if masks is not None else None)
        return {"feat": feat, "proj": self.projector(feat), "logits": self.heads(feat),
                "prototypes": self.heads.prototypes()}


def build_proto_model(
    cfg: ModelConfig,
    proto: ProtoConfig,
    num_base: int,
    num_novel: int,
    s3: S3Config | None = None,
    *,
    read_bytes: Callable[[str], bytes] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> ProtoNCDModel:
    """:func:`ncd.model.build_ncd_model` plus a :class:`RegionGuidance` from ``proto``."""
    base = build_ncd_model(cfg, num_base, num_novel, s3, read_bytes=read_bytes, model_kwargs=model_kwargs)
    guidance = RegionGuidance.from_config(proto, base.encoder.patch_size, base.encoder.num_prefix_tokens)
    return ProtoNCDModel(base.encoder, base.projector, base.heads, guidance)
