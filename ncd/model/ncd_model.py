"""The AnomalyNCD network: mask-guided ViT + projector + prototype heads (METHOD.md 4, 5.3)."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from ncd.config import ModelConfig, S3Config
from ncd.model.backbone import load_backbone
from ncd.model.heads import Projector, PrototypeHeads
from ncd.model.mask_attention import MaskGuidedViT


class NCDModel(nn.Module):
    """``forward(images, masks) -> {"feat", "proj", "logits"}``.

    - ``feat``: (B, D) region feature (``model.feature``: the final-norm CLS by default, not
      L2-normalised);
    - ``proj``: (B, proj_dim) projector output of ``feat`` (normalised by the losses);
    - ``logits``: ``n_head`` tensors (B, L + K) of cosine logits of normalised ``feat``.

    The teacher of self-distillation is this same forward, detached (no EMA).
    """

    def __init__(self, encoder: MaskGuidedViT, projector: Projector, heads: PrototypeHeads) -> None:
        super().__init__()
        self.encoder, self.projector, self.heads = encoder, projector, heads

    @property
    def feature_dim(self) -> int:
        return self.encoder.feature_dim

    def forward(self, images: Tensor, masks: Tensor | None) -> dict[str, Any]:
        feat = self.encoder(images, masks)
        return {"feat": feat, "proj": self.projector(feat), "logits": self.heads(feat)}


def build_ncd_model(
    cfg: ModelConfig,
    num_base: int,
    num_novel: int,
    s3: S3Config | None = None,
    *,
    read_bytes: Callable[[str], bytes] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> NCDModel:
    """Backbone with weights (``load_backbone``), mask guidance, projector and heads from ``cfg``.

    Args:
        cfg: model section.
        num_base: L, labelled base classes (0 without a base set).
        num_novel: K, novel classes.
        s3, read_bytes, model_kwargs: passed to :func:`ncd.model.backbone.load_backbone`.
    """
    backbone = load_backbone(cfg, s3, read_bytes=read_bytes, model_kwargs=model_kwargs)
    encoder = MaskGuidedViT(backbone, cfg.mask_layers, cfg.grad_from_block, cfg.feature, cfg.feature_block,
                            cfg.feature_context)
    projector = Projector(encoder.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers)
    heads = PrototypeHeads(encoder.feature_dim, num_base, num_novel, cfg.n_head)
    return NCDModel(encoder, projector, heads)
