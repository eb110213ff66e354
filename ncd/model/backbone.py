"""The timm ViT backbone and where its weights come from (METHOD.md 4.1, DESIGN.md).

``ModelConfig.weights``:

- ``"timm"``: timm's pretrained tag (``vit_base_patch8_224.dino`` = the official DINO
  ViT-B/8); needs network access or a populated Hugging Face cache.
- a local ``.pth`` / ``.pt`` / ``.safetensors`` file, or an ``s3://`` URI: a raw state
  dict, ``{"model": sd}``, ``{"state_dict": sd}``, a DINO training checkpoint's
  ``{"teacher": {"backbone.*": ...}}``, DINO / DINOv2 official key names; converted and
  position-embedding-resampled by timm's ``checkpoint_filter_fn`` and loaded strictly.
- ``"random"``: random initialisation, with a loud warning (tests, smoke runs).
"""
from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from ncd.config import ModelConfig, S3Config

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".ckpt")
_WRAPPER_KEYS = ("model", "state_dict", "teacher")
_SHOW_KEYS = 8


class WeightsError(ValueError):
    """A weight file cannot be read or does not match the backbone."""


def create_backbone(
    name: str,
    image_size: int,
    pretrained: bool = False,
    model_kwargs: Mapping[str, Any] | None = None,
) -> VisionTransformer:
    """A timm ViT without classifier (``num_classes=0``) and with all dropouts at 0.

    Args:
        name: a timm ViT name, e.g. ``vit_base_patch8_224.dino`` or ``vit_small_patch14_dinov2``.
        image_size: input side in pixels (``img_size``).
        pretrained: load timm's pretrained weights for the tag.
        model_kwargs: extra ``timm.create_model`` arguments (tests build tiny ViTs with
            ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``).
    """
    if not timm.is_model(name):
        raise ValueError(f"model.backbone={name!r} is not a timm model name (e.g. vit_base_patch8_224.dino)")
    kwargs: dict[str, Any] = dict(
        num_classes=0,
        img_size=image_size,
        drop_rate=0.0,
        pos_drop_rate=0.0,
        proj_drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.0,
    )
    kwargs.update(model_kwargs or {})
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"model.backbone={name!r} builds a {type(model).__name__}; ncd needs a timm "
            "VisionTransformer (vit_* models) for mask-guided attention"
        )
    return model


def _decode(data: bytes | Path, source: str) -> Any:
    """Deserialise a weight file (safetensors by suffix, else ``torch.load`` weights-only)."""
    try:
        if source.endswith(".safetensors"):
            from safetensors.torch import load as st_load, load_file

            return load_file(str(data)) if isinstance(data, Path) else st_load(data)
        f = str(data) if isinstance(data, Path) else io.BytesIO(data)
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any decoding failure names the file
        raise WeightsError(
            f"cannot read weights from {source}: {err}. Expected a safetensors file or a "
            "torch.save'd state dict (plain tensors, loadable with weights_only=True)"
        ) from None


def extract_state_dict(obj: Any, source: str = "<checkpoint>") -> dict[str, Tensor]:
    """The backbone state dict inside a loaded checkpoint object.

    Unwraps ``{"model": ...}``, ``{"state_dict": ...}`` and ``{"teacher": ...}`` (DINO
    training checkpoints), strips a DDP ``module.`` prefix and, when present, keeps only
    the ``backbone.*`` keys (DINO teacher / student wrappers), prefix removed.
    """
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{source}: no state dict found (got {type(obj).__name__})")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise WeightsError(f"{source}: entries that are not tensors: {bad[:_SHOW_KEYS]}")
    return sd


def load_state_dict_into(model: VisionTransformer, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Convert with timm's ``checkpoint_filter_fn`` (DINO/DINOv2/CLIP names, pos-embed
    resampling) and load strictly; a classifier ``head.*`` is dropped when the model has none.
    """
    sd = checkpoint_filter_fn(dict(state_dict), model)
    if not any(True for _ in model.head.parameters()):
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise WeightsError(f"{source} does not fit the backbone: {err}") from None
    if missing or unexpected:
        raise WeightsError(
            f"{source} does not match the backbone ({len(missing)} missing, {len(unexpected)} "
            f"unexpected keys); missing: {list(missing)[:_SHOW_KEYS]}; "
            f"unexpected: {list(unexpected)[:_SHOW_KEYS]}"
        )


def read_weight_file(
    uri: str,
    s3: S3Config | None = None,
    read_bytes: Callable[[str], bytes] | None = None,
) -> dict[str, Tensor]:
    """The state dict stored at a local path or ``s3://`` URI (see :func:`extract_state_dict`)."""
    if uri.startswith("s3://"):
        if read_bytes is None:
            from ncd.io import read_bytes as io_read_bytes

            def read_bytes(u: str) -> bytes:
                return io_read_bytes(u, s3)

        obj = _decode(read_bytes(uri), uri)
    else:
        path = Path(uri).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.weights: no such weight file: {path}")
        obj = _decode(path, str(path))
    return extract_state_dict(obj, uri)


def load_backbone(
    cfg: ModelConfig,
    s3: S3Config | None = None,
    *,
    read_bytes: Callable[[str], bytes] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> VisionTransformer:
    """Build ``cfg.backbone`` at ``cfg.image_size`` and load ``cfg.weights``.

    Args:
        cfg: model section (``backbone``, ``weights``, ``image_size``).
        s3: endpoint for ``s3://`` weights (used by ``ncd.io.read_bytes``).
        read_bytes: ``uri -> bytes`` for ``s3://`` weights; default ``ncd.io.read_bytes``.
        model_kwargs: extra ``timm.create_model`` arguments (tiny test models).

    Raises:
        FileNotFoundError: a local weight file is missing.
        WeightsError: a file cannot be read or its keys/shapes do not match.
        RuntimeError: ``weights="timm"`` and timm cannot fetch the weights (offline).
    """
    weights = cfg.weights.strip()
    if not weights:
        raise ValueError("model.weights is empty; use 'timm', 'random', a file path or an s3:// URI")
    if weights == "timm":
        if not timm.is_model(cfg.backbone):
            raise ValueError(f"model.backbone={cfg.backbone!r} is not a timm model name")
        try:
            model = create_backbone(cfg.backbone, cfg.image_size, pretrained=True, model_kwargs=model_kwargs)
        except ValueError:
            raise
        except Exception as err:  # noqa: BLE001 - hub/network errors come in many types
            raise RuntimeError(
                f"timm could not load pretrained weights for {cfg.backbone!r} ({type(err).__name__}: "
                f"{err}). Offline? Set model.weights to a local file or an s3:// URI "
                "(see README), or 'random' for a smoke run."
            ) from err
        log.info("backbone %s: timm pretrained weights", cfg.backbone)
        return model
    model = create_backbone(cfg.backbone, cfg.image_size, pretrained=False, model_kwargs=model_kwargs)
    if weights == "random":
        msg = (
            f"backbone {cfg.backbone} is RANDOMLY INITIALISED (model.weights=random): features "
            "carry no pretrained signal; use only for tests and smoke runs"
        )
        warnings.warn(msg, UserWarning, stacklevel=2)
        log.warning(msg)
        return model
    state_dict = read_weight_file(weights, s3, read_bytes)
    load_state_dict_into(model, state_dict, weights)
    log.info("backbone %s: weights from %s", cfg.backbone, weights)
    return model
