"""Mask-guided ViT, projector and prototype heads (METHOD.md section 4)."""
from ncd.model.backbone import WeightsError, create_backbone, load_backbone
from ncd.model.heads import Projector, PrototypeHeads, select_head
from ncd.model.mask_attention import (
    MaskGuidedViT,
    cls_attention_bias,
    hard_key_bias,
    masked_value,
    patch_coverage,
)
from ncd.model.ncd_model import NCDModel, build_ncd_model

__all__ = [
    "MaskGuidedViT",
    "NCDModel",
    "Projector",
    "PrototypeHeads",
    "WeightsError",
    "build_ncd_model",
    "cls_attention_bias",
    "create_backbone",
    "hard_key_bias",
    "load_backbone",
    "masked_value",
    "patch_coverage",
    "select_head",
]
