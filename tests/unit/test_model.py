"""Backbone loading, mask-guided attention and heads (METHOD.md 4; invariants 16-19)."""
from __future__ import annotations

import logging
import math
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from ncd.config import ModelConfig
from ncd.model import (
    MaskGuidedViT,
    NCDModel,
    Projector,
    PrototypeHeads,
    WeightsError,
    build_ncd_model,
    cls_attention_bias,
    hard_key_bias,
    load_backbone,
    masked_value,
    patch_coverage,
    select_head,
)
from ncd.model import backbone as backbone_mod

TINY = dict(patch_size=8, embed_dim=32, depth=4, num_heads=2)
TINY_NAME = "vit_tiny_patch16_224"
IMG = 32  # 4 x 4 patches + CLS = 17 tokens


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(backbone=TINY_NAME, weights="random", image_size=IMG, mask_layers=3, grad_from_block=3,
                n_head=4, proj_hidden_dim=64, proj_dim=16, proj_layers=3)
    base.update(kw)
    return ModelConfig(**base)


def tiny_vit(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    args = dict(TINY, **kw)
    img = args.pop("img_size", IMG)
    return timm.create_model(TINY_NAME, pretrained=False, num_classes=0, img_size=img, **args).eval()


def set_fused(model: torch.nn.Module, fused: bool) -> None:
    for blk in model.blocks:
        blk.attn.fused_attn = fused


def random_inputs(b: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, IMG, IMG, generator=g)
    masks = (torch.rand(b, 1, IMG, IMG, generator=g) > 0.5).float()
    return images, masks


# ---------------------------------------------------------------- weights


def test_random_weights_warn_loudly(caplog):
    with caplog.at_level(logging.WARNING), pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        model = load_backbone(tiny_cfg(), model_kwargs=TINY)
    assert "RANDOMLY INITIALISED" in caplog.text
    assert model.num_features == 32 and len(model.blocks) == 4
    assert all(getattr(m, "p", 0.0) == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def _same_params(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("wrap", ["raw", "model", "state_dict", "module_prefix", "dino_teacher", "safetensors"])
def test_load_weight_file_formats(tmp_path, wrap):
    src = tiny_vit(seed=5)
    sd = src.state_dict()
    path = tmp_path / ("w.safetensors" if wrap == "safetensors" else "w.pth")
    if wrap == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        obj = {
            "raw": sd,
            "model": {"model": sd, "epoch": 3},
            "state_dict": {"state_dict": sd},
            "module_prefix": {f"module.{k}": v for k, v in sd.items()},
            "dino_teacher": {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()},
                                         "head.mlp.0.weight": torch.zeros(4, 32)}},
        }[wrap]
        torch.save(obj, path)
    model = load_backbone(tiny_cfg(weights=str(path)), model_kwargs=TINY)
    assert _same_params(model, src)


def test_dino_official_keys_with_other_resolution_are_resampled(tmp_path):
    # An official DINO file: timm key names, no head, pos-embed for another grid (8x8 here).
    src = tiny_vit(seed=6, img_size=64)
    sd = src.state_dict()
    torch.save(sd, tmp_path / "dino.pth")
    model = load_backbone(tiny_cfg(weights=str(tmp_path / "dino.pth")), model_kwargs=TINY)
    assert model.pos_embed.shape == (1, 17, 32)
    expected = resample_abs_pos_embed(sd["pos_embed"], new_size=(4, 4), num_prefix_tokens=1)
    assert torch.allclose(model.pos_embed, expected)
    assert torch.equal(model.blocks[2].attn.qkv.weight, sd["blocks.2.attn.qkv.weight"])


def test_dinov2_official_keys_are_converted(tmp_path):
    src = tiny_vit(seed=7, init_values=1e-5)  # LayerScale, as DINOv2
    sd = dict(src.state_dict())
    sd["mask_token"] = torch.zeros(1, 32)  # only in official DINOv2 checkpoints
    torch.save(sd, tmp_path / "dinov2.pth")
    model = load_backbone(tiny_cfg(weights=str(tmp_path / "dinov2.pth")), model_kwargs=dict(TINY, init_values=1e-5))
    assert _same_params(model, src)


def test_classifier_head_in_file_is_dropped(tmp_path):
    sd = dict(tiny_vit(seed=8).state_dict(), **{"head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10)})
    torch.save(sd, tmp_path / "in1k.pth")
    load_backbone(tiny_cfg(weights=str(tmp_path / "in1k.pth")), model_kwargs=TINY)


def test_missing_weight_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "dino.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_backbone(tiny_cfg(weights=str(missing)), model_kwargs=TINY)


def test_mismatched_keys_are_listed(tmp_path):
    sd = dict(tiny_vit().state_dict())
    sd.pop("blocks.1.attn.qkv.weight")
    sd["blocks.9.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"blocks\.1\.attn\.qkv\.weight.*blocks\.9\.extra"):
        load_backbone(tiny_cfg(weights=str(tmp_path / "bad.pth")), model_kwargs=TINY)


def test_wrong_shapes_and_garbage_files_are_weights_errors(tmp_path):
    torch.save(tiny_vit(embed_dim=64).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(WeightsError, match="wide.pth"):
        load_backbone(tiny_cfg(weights=str(tmp_path / "wide.pth")), model_kwargs=TINY)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pth"):
        load_backbone(tiny_cfg(weights=str(tmp_path / "junk.pth")), model_kwargs=TINY)


def test_s3_weights_go_through_read_bytes(tmp_path):
    src = tiny_vit(seed=9)
    torch.save({"model": src.state_dict()}, tmp_path / "w.pth")
    seen = []

    def read_bytes(uri: str) -> bytes:
        seen.append(uri)
        return (tmp_path / "w.pth").read_bytes()

    model = load_backbone(tiny_cfg(weights="s3://bucket/dino/w.pth"), read_bytes=read_bytes, model_kwargs=TINY)
    assert seen == ["s3://bucket/dino/w.pth"] and _same_params(model, src)


def test_timm_weights_use_the_pretrained_tag(monkeypatch):
    calls = {}
    real = timm.create_model

    def fake_create(name, pretrained=False, **kw):
        calls.update(name=name, pretrained=pretrained, **kw)
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(backbone_mod.timm, "create_model", fake_create)
    load_backbone(tiny_cfg(weights="timm"), model_kwargs=TINY)
    assert calls["pretrained"] is True and calls["num_classes"] == 0 and calls["img_size"] == IMG
    assert calls["drop_path_rate"] == 0.0 and calls["drop_rate"] == 0.0


def test_timm_weights_offline_explain_the_alternatives(monkeypatch):
    def failing(*a, **kw):
        raise OSError("no network")

    monkeypatch.setattr(backbone_mod.timm, "create_model", failing)
    with pytest.raises(RuntimeError, match="model.weights"):
        load_backbone(tiny_cfg(weights="timm"), model_kwargs=TINY)
    with pytest.raises(ValueError, match="not a timm model"):
        load_backbone(tiny_cfg(backbone="no_such_vit", weights="timm"))


# ---------------------------------------------------------------- mask-guided attention


def test_first_masked_block_is_depth_minus_mask_layers():  # invariant 19
    vit12 = tiny_vit(depth=12)
    assert MaskGuidedViT(vit12, mask_layers=9, grad_from_block=11).first_masked_block == 3
    assert MaskGuidedViT(tiny_vit(), mask_layers=3, grad_from_block=3).first_masked_block == 1
    with pytest.raises(ValueError, match="mask_layers"):
        MaskGuidedViT(tiny_vit(), mask_layers=5, grad_from_block=3)


@pytest.mark.parametrize("fused", [True, False])
def test_all_ones_mask_equals_vanilla_vit(fused):  # invariant 16
    vit = tiny_vit(seed=2)
    set_fused(vit, fused)
    mg = MaskGuidedViT(vit, mask_layers=4, grad_from_block=3).eval()
    images, _ = random_inputs()
    with torch.no_grad():
        expected = vit(images)
        out = mg(images, torch.ones(images.shape[0], 1, IMG, IMG))
        assert torch.allclose(out, expected, atol=1e-5)
        assert torch.allclose(mg(images, None), expected, atol=1e-6)


def test_register_tokens_and_patch14_dinov2_layout():
    # DINOv2-like: patch 14, LayerScale, 4 registers (prefix tokens = CLS + 4, no pos-embed on them)
    vit = tiny_vit(seed=10, patch_size=14, img_size=28, init_values=1e-5, reg_tokens=4, no_embed_class=True)
    assert vit.num_prefix_tokens == 5
    mg = MaskGuidedViT(vit, mask_layers=4, grad_from_block=4).eval()
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(mg(images, torch.ones(2, 1, 28, 28)), vit(images), atol=1e-5)
    rows = _cls_attention_rows(mg, images, torch.zeros(2, 1, 28, 28))
    for r in rows:
        assert r.shape[-1] == 9 and r[..., 5:].abs().max() < 1e-6  # no patch visible
        assert (r[..., 1:5] > 1e-4).all()  # registers always kept


def _reference_mgvit(vit, images: torch.Tensor, masks: torch.Tensor, first_masked: int) -> torch.Tensor:
    """Upstream's MaskedBlock written out: scores QK^T/sqrt(d), CLS row -1e9 where coverage < 0.5."""
    x = vit._pos_embed(vit.patch_embed(images))
    b, n, d = x.shape
    cover = F.avg_pool2d(masks, 8, 8).flatten(1)
    keep = torch.cat([torch.ones(b, 1), cover], dim=1) >= 0.5
    for i, blk in enumerate(vit.blocks):
        a = blk.attn
        h = a.num_heads
        qkv = a.qkv(blk.norm1(x)).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = (q @ k.transpose(-2, -1)) * (d // h) ** -0.5
        if i >= first_masked:
            for bi in range(b):
                for j in range(n):
                    if not keep[bi, j]:
                        scores[bi, :, 0, j] = -1e9
        attn = scores.softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(b, n, d)
        x = x + a.proj(y)
        x = x + blk.mlp(blk.norm2(x))
    return vit.norm(x)[:, 0]


@pytest.mark.parametrize("fused", [True, False])
def test_matches_upstream_masked_block_reference(fused):
    vit = tiny_vit(seed=3)
    set_fused(vit, fused)
    mg = MaskGuidedViT(vit, mask_layers=3, grad_from_block=4).eval()
    images, masks = random_inputs()
    masks[0] = 0.0  # the empty-mask (whole-image) crop
    with torch.no_grad():
        out = mg(images, masks)
        ref = _reference_mgvit(vit, images, masks, first_masked=1)
        vanilla = vit(images)
    assert torch.allclose(out, ref, atol=1e-5)
    assert not torch.allclose(out, vanilla, atol=1e-3)


def _cls_attention_rows(mg: MaskGuidedViT, images, masks) -> list[torch.Tensor]:
    """Recompute each block's CLS attention row (B, heads, N) from its captured input and mask."""
    rows: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        x = args[0]
        b, n, d = x.shape
        h = module.num_heads
        qkv = module.qkv(x).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        scores = (qkv[0] @ qkv[1].transpose(-2, -1)) * module.scale
        bias = kwargs.get("attn_mask")
        if bias is not None:
            scores = scores + bias
        rows.append(scores.softmax(-1)[:, :, 0, :])

    handles = [blk.attn.register_forward_pre_hook(hook, with_kwargs=True) for blk in mg.backbone.blocks]
    try:
        with torch.no_grad():
            mg(images, masks)
    finally:
        for hd in handles:
            hd.remove()
    return rows


def test_cls_attention_respects_the_mask():  # invariant 17
    vit = tiny_vit(seed=4)
    mg = MaskGuidedViT(vit, mask_layers=3, grad_from_block=4).eval()
    images, _ = random_inputs(b=2)
    # all-zero mask: CLS attends only to itself in the masked blocks
    rows = _cls_attention_rows(mg, images, torch.zeros(2, 1, IMG, IMG))
    assert not torch.allclose(rows[0][..., 0], torch.ones(()))  # block 0 is vanilla
    for r in rows[1:]:
        assert torch.allclose(r[..., 0], torch.ones(()), atol=1e-6)
        assert r[..., 1:].abs().max() < 1e-6
    # mixed coverage: patch 0 exactly 0.5 (kept), patch 1 0.484 (dropped), patch 5 full
    masks = torch.zeros(2, 1, IMG, IMG)
    masks[:, :, 0:4, 0:8] = 1.0  # 32 / 64 pixels of patch (0, 0)
    masks[:, :, 0:8, 8:12] = 1.0  # 32 / 64 of patch (0, 1) ...
    masks[:, :, 0, 11] = 0.0  # ... minus one pixel: 31 / 64
    masks[:, :, 8:16, 8:16] = 1.0  # patch (1, 1) = token 1 + 5
    cover = patch_coverage(masks, (8, 8))[0]
    assert cover[0] == 0.5 and cover[1] == 31 / 64 and cover[5] == 1.0
    rows = _cls_attention_rows(mg, images, masks)
    kept_tokens = {0, 1, 6}  # CLS, patch 0 (coverage exactly 0.5), patch 5
    for r in rows[1:]:
        for t in range(17):
            if t in kept_tokens:
                assert (r[..., t] > 1e-4).all(), t
            else:
                assert r[..., t].abs().max() < 1e-6, t
        assert torch.allclose(r.sum(-1), torch.ones(()), atol=1e-5)


def test_cls_attention_bias_layout_and_soft_gradients():
    kb = torch.randn(2, 5, requires_grad=True)
    bias = cls_attention_bias(kb)
    assert bias.shape == (2, 1, 5, 5)
    assert torch.equal(bias[:, 0, 0], kb) and bias[:, :, 1:].abs().sum() == 0
    assert bias.stride(-2) % 16 == 0  # aligned rows for the CUDA kernels
    mg = MaskGuidedViT(tiny_vit(), mask_layers=2, grad_from_block=4)
    images, _ = random_inputs(b=2)
    soft = torch.zeros(2, 17, requires_grad=True)
    (mg.forward_with_key_bias(images, soft) * torch.randn(2, 32)).sum().backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0


def test_hard_key_bias_values():
    cov = torch.tensor([[0.0, 0.49, 0.5, 1.0]])
    bias = hard_key_bias(cov, num_prefix_tokens=2, dtype=torch.float16)
    assert bias.dtype == torch.float16
    assert bias.tolist()[0] == [0, 0, masked_value(torch.float16), masked_value(torch.float16), 0, 0]


def test_mask_of_wrong_size_is_rejected():
    mg = MaskGuidedViT(tiny_vit(), mask_layers=2, grad_from_block=4)
    images, _ = random_inputs(b=1)
    with pytest.raises(ValueError, match="image's size"):
        mg(images, torch.ones(1, 1, 16, 16))


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_autocast_has_no_nan(fused):
    vit = tiny_vit(seed=5)
    set_fused(vit, fused)
    mg = MaskGuidedViT(vit, mask_layers=4, grad_from_block=3)
    images, masks = random_inputs(b=2)
    masks[0] = 0.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mg(images, masks)
    assert torch.isfinite(out).all()
    mg16 = MaskGuidedViT(tiny_vit(seed=5), mask_layers=4, grad_from_block=3).to(torch.bfloat16)
    set_fused(mg16.backbone, fused)
    assert torch.isfinite(mg16(images.bfloat16(), masks.bfloat16()).float()).all()


def test_frozen_prefix_runs_without_autograd_and_tail_trains():
    vit = tiny_vit(seed=6)
    mg = MaskGuidedViT(vit, mask_layers=3, grad_from_block=3)
    trainable = {n for n, p in mg.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("backbone.blocks.3.") for n in trainable)
    seen = {}
    handles = [
        blk.register_forward_pre_hook(lambda m, a, kw, i=i: seen.__setitem__(i, a[0].requires_grad), with_kwargs=True)
        for i, blk in enumerate(vit.blocks)
    ]
    images, masks = random_inputs(b=2)
    out = mg(images, masks)
    for h in handles:
        h.remove()
    assert seen == {0: False, 1: False, 2: False, 3: False}
    assert out.requires_grad
    (out * torch.randn(out.shape)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in mg.named_parameters() if n in trainable)
    # unfreezing earlier parameters switches the no-grad prefix off, same values
    with torch.no_grad():
        ref = mg(images, masks)
    vit.pos_embed.requires_grad_(True)
    out_full = mg(images, masks)
    assert torch.allclose(out_full, ref, atol=1e-6)
    (out_full * torch.randn(out_full.shape)).sum().backward()
    assert vit.pos_embed.grad is not None and vit.pos_embed.grad.abs().sum() > 0


# ---------------------------------------------------------------- heads and the full model


def test_projector_architecture_and_init():
    proj = Projector(32, hidden_dim=64, out_dim=16, num_layers=3)
    linears = [m for m in proj.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 64), (64, 64), (64, 16)]
    assert sum(isinstance(m, torch.nn.GELU) for m in proj.mlp) == 2
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in proj.modules())
    assert all(m.bias.abs().sum() == 0 for m in linears)
    assert all(m.weight.abs().max() <= 2.0 and 0.01 < m.weight.std() < 0.03 for m in linears)
    assert Projector(32, 64, 16, num_layers=1)(torch.randn(2, 32)).shape == (2, 16)


def test_prototype_heads_cosine_logits_and_init():
    heads = PrototypeHeads(32, num_base=4, num_novel=3, n_head=4)
    assert heads.weight.shape == (4, 7, 32)
    assert not torch.allclose(heads.weight[0], heads.weight[1])  # independent inits
    feat = torch.randn(5, 32) * 10
    logits = heads(feat)
    assert len(logits) == 4 and all(z.shape == (5, 7) for z in logits)
    assert all(z.abs().max() <= 1.0 + 1e-6 for z in logits)
    w = F.normalize(heads.weight[2], dim=-1)
    assert torch.allclose(logits[2], F.normalize(feat, dim=-1) @ w.T, atol=1e-6)
    # scaling the directions changes nothing: the gain is fixed at 1
    with torch.no_grad():
        heads.weight.mul_(3.0)
    assert torch.allclose(heads(feat)[2], logits[2], atol=1e-6)
    centroids = torch.randn(3, 32)
    heads.init_novel_prototypes(centroids)
    protos = heads.prototypes()
    assert torch.allclose(protos[:, 4:], F.normalize(centroids, dim=-1).expand(4, 3, 32), atol=1e-6)
    assert torch.allclose(protos.norm(dim=-1), torch.ones(4, 7), atol=1e-6)
    with pytest.raises(ValueError, match="centroids"):
        heads.init_novel_prototypes(torch.randn(2, 32))


def test_select_head_ignores_nan():
    assert select_head([0.5, float("nan"), 0.2, 0.2]) == 2
    assert select_head([float("nan"), 1.0]) == 1
    with pytest.raises(ValueError, match="NaN"):
        select_head([float("nan"), float("nan")])
    with pytest.raises(ValueError):
        select_head([])


def test_ncd_model_trainable_set_and_outputs():  # invariant 18
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = build_ncd_model(tiny_cfg(), num_base=4, num_novel=3, model_kwargs=TINY)
    assert isinstance(model, NCDModel) and model.feature_dim == 32
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("encoder.")} == {
        f"encoder.backbone.{n}" for n, _ in model.encoder.backbone.blocks[3].named_parameters(prefix="blocks.3")
    }
    assert {n for n in trainable if not n.startswith("encoder.")} == (
        {f"projector.{n}" for n, _ in model.projector.named_parameters()} | {"heads.weight"}
    )
    assert not any("weight_g" in n or "gain" in n for n, _ in model.named_parameters())
    images, masks = random_inputs(b=2)
    out = model(images, masks)
    assert out["feat"].shape == (2, 32) and out["proj"].shape == (2, 16)
    assert len(out["logits"]) == 4 and all(z.shape == (2, 7) for z in out["logits"])
    assert all(z.abs().max() <= 1 + 1e-6 for z in out["logits"])
    sum(z.sum() for z in out["logits"]).add(out["proj"].sum()).backward()
    assert math.isfinite(float(model.heads.weight.grad.abs().sum()))


def _manual_patch_tokens(vit: torch.nn.Module, images: torch.Tensor, block: int) -> torch.Tensor:
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    for blk in vit.blocks[: block + 1]:
        x = blk(x)
    return vit.norm(x)[:, vit.num_prefix_tokens:]


def test_patch_feature_weighs_the_region_softly():
    vit = tiny_vit()
    enc = MaskGuidedViT(vit, mask_layers=3, grad_from_block=3, feature="patch", feature_block=1,
                        feature_context=0.0)
    images = torch.randn(2, 3, IMG, IMG)
    masks = torch.zeros(2, 1, IMG, IMG)
    masks[:, :, :8, :8] = 1.0  # exactly patch 0
    tokens = _manual_patch_tokens(vit, images, 1)
    with torch.no_grad():
        torch.testing.assert_close(enc(images, masks), tokens[:, 0], atol=1e-5, rtol=1e-5)
        enc.feature_context = 1.0  # every patch alike: the plain mean
        torch.testing.assert_close(enc(images, masks), tokens.mean(1), atol=1e-5, rtol=1e-5)
        enc.feature_context = 0.5
        w = torch.full((16,), 0.5)
        w[0] = 1.0
        expected = (w[None, :, None] * tokens).sum(1) / w.sum()
        torch.testing.assert_close(enc(images, masks), expected, atol=1e-5, rtol=1e-5)


def test_cls_plus_patch_feature_concatenates_unit_halves():
    vit = tiny_vit()
    enc = MaskGuidedViT(vit, mask_layers=3, grad_from_block=3, feature="cls+patch", feature_block=-1)
    cls_only = MaskGuidedViT(tiny_vit(), mask_layers=3, grad_from_block=3)
    images, masks = torch.randn(2, 3, IMG, IMG), (torch.rand(2, 1, IMG, IMG) > 0.5).float()
    with torch.no_grad():
        feat = enc(images, masks)
        cls = cls_only(images, masks)
    assert enc.feature_dim == 2 * vit.num_features == feat.shape[1]
    torch.testing.assert_close(feat[:, : vit.num_features], F.normalize(cls, dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feat[:, vit.num_features:].norm(dim=1), torch.ones(2), atol=1e-5, rtol=1e-5)


def test_unknown_feature_settings_are_rejected():
    with pytest.raises(ValueError, match="model.feature="):
        MaskGuidedViT(tiny_vit(), 3, 3, feature="mean")
    with pytest.raises(ValueError, match="model.feature_block"):
        MaskGuidedViT(tiny_vit(), 3, 3, feature="patch", feature_block=4)
