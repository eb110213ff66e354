"""ProtoAnomalyNCD (ncd.proto): region guidance, object prior, prototype losses, K estimation, open set.

Vectorised code is checked against slow references written from the equations in the
module docstrings (PROTO.md; ProtoGCD's ``models/loss.py``), plus properties.
"""
from __future__ import annotations

import math
import warnings

import cv2
import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from timm.models.vision_transformer import VisionTransformer

from ncd.config import LossConfig, ModelConfig, ProtoConfig
from ncd.data import io
from ncd.data.io import DataError
from ncd.losses import info_nce, supcon
from ncd.model.mask_attention import MaskGuidedViT, hard_key_bias, patch_coverage
from ncd.preprocess.crops import padded_crop
from ncd.proto.guidance import RegionGuidance, rgf_key_bias, soft_key_bias
from ncd.proto.k_estimation import accuracy_score, best_k_by_prototype_score, centroid_score, prototype_score
from ncd.proto.losses import (
    dual_level_targets,
    entropy_regularisation,
    hard_ratio_schedule,
    proto_criterion,
    proto_pseudo_labels,
    prototype_separation,
    vmf_logits,
)
from ncd.proto.model import ProtoNCDModel, build_proto_model
from ncd.proto.object_prior import (
    crop_anomaly_map,
    crop_object_mask,
    estimate_object_mask,
    load_object_mask,
    load_object_masks,
    object_mask,
    object_mask_uri,
)
from ncd.proto.openset import auroc, max_cosine, max_softmax, reject

IMG, PATCH = 32, 8  # 4 x 4 patches + CLS = 17 tokens
NP = (IMG // PATCH) ** 2


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_vit(seed: int = 0, fused: bool = True) -> VisionTransformer:
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=32, depth=4, num_heads=2, num_classes=0)
    for blk in vit.blocks:
        blk.attn.fused_attn = fused
    return vit.eval()


def softmax_row(z: list[float], t: float) -> list[float]:
    m = max(z)
    e = [math.exp((x - m) / t) for x in z]
    s = sum(e)
    return [x / s for x in e]


# ================================================================ region guidance


def test_rgf_levels_background_object_anomaly():
    a = torch.tensor([[0.0, 0.0, 0.5, 1.0, 0.25]])
    o = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.5]])
    bias = rgf_key_bias(a, o, -4.0, 0.5, 3.0, num_prefix_tokens=2)
    assert bias.shape == (1, 7)
    expected = [0.0, 0.0, -4.0, 0.5, 0.5 + 1.5, 0.5 + 3.0, 0.5 * -4.0 + 0.5 * (0.5 + 0.75)]
    assert torch.allclose(bias, torch.tensor([expected]))
    # no object prior: every patch is object
    assert torch.allclose(rgf_key_bias(a, None, -4.0, 0.5, 3.0, 1)[0, 1:], 0.5 + 3.0 * a[0])
    assert torch.allclose(soft_key_bias(a, 2.0, 1), torch.cat([torch.zeros(1, 1), 2.0 * a], 1))
    with pytest.raises(ValueError, match="object_cov"):
        rgf_key_bias(a, o[:, :3], -4.0, 0.0, 1.0, 1)


def _pixel_maps(b: int = 2, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = gen(seed)
    region = (torch.rand(b, 1, IMG, IMG, generator=g) > 0.5).float()
    anomaly = torch.rand(b, 1, IMG, IMG, generator=g)
    objects = (torch.rand(b, 1, IMG, IMG, generator=g) > 0.3).float()
    return region, anomaly, objects


def test_region_guidance_modes_pool_pixel_maps():
    region, anomaly, objects = _pixel_maps()
    cfg = ProtoConfig(rgf_background=-3.0, rgf_object=0.25, rgf_gain=2.0)
    rgf = RegionGuidance.from_config(cfg, (PATCH, PATCH), 1)
    a, o = patch_coverage(anomaly, (PATCH, PATCH)), patch_coverage(objects, (PATCH, PATCH))
    assert torch.allclose(rgf(region, anomaly, objects), rgf_key_bias(a, o, -3.0, 0.25, 2.0, 1))
    # without an anomaly map the region mask is the anomaly map; without objects, o = 1
    r = patch_coverage(region, (PATCH, PATCH))
    assert torch.allclose(rgf(region), rgf_key_bias(r, None, -3.0, 0.25, 2.0, 1))
    assert {n for n, _ in rgf.named_parameters()} == {"b_bg", "b_obj", "gain"}

    soft = RegionGuidance((PATCH, PATCH), 1, mode="soft", gain=2.0)
    assert torch.allclose(soft(region, anomaly, objects)[:, 1:], 2.0 * a)
    assert {n for n, _ in soft.named_parameters()} == {"gain"}  # unused scalars are buffers (DDP)

    hard = RegionGuidance((PATCH, PATCH), 1, mode="hard")
    assert torch.equal(hard(region, anomaly, objects), hard_key_bias(r, 1, torch.float32))
    assert list(hard.parameters()) == []
    fixed = RegionGuidance((PATCH, PATCH), 1, learnable=False)
    assert list(fixed.parameters()) == [] and float(fixed.b_bg) == -4.0
    with pytest.raises(ValueError, match="guidance"):
        RegionGuidance((PATCH, PATCH), 1, mode="bogus")


@pytest.mark.parametrize("fused", [True, False])
def test_soft_guidance_tends_to_the_hard_mask(fused):
    mg = MaskGuidedViT(tiny_vit(seed=1, fused=fused), mask_layers=3, grad_from_block=4).eval()
    g = gen(7)
    images = torch.randn(3, 3, IMG, IMG, generator=g)
    masks = (torch.rand(3, 1, IMG, IMG, generator=g) > 0.5).float()
    masks[:, :, :PATCH, :PATCH] = 0.5  # a patch at exactly half coverage is kept (>= 0.5)
    cov = patch_coverage(masks, (PATCH, PATCH))
    keep = (cov >= 0.5).float()
    assert 0 < keep.mean() < 1
    with torch.no_grad():
        hard = mg(images, masks)
        errors = []
        for big in (1.0, 4.0, 16.0, 1e4):
            bias = rgf_key_bias(torch.zeros_like(cov), keep, -big, 0.0, 0.0, mg.num_prefix_tokens)
            errors.append((mg.forward_with_key_bias(images, bias) - hard).abs().max().item())
    assert errors == sorted(errors, reverse=True) and errors[0] > 1e-2
    assert errors[-1] < 1e-5


@pytest.mark.parametrize("fused", [True, False])
def test_guidance_bf16_autocast_and_gradients_reach_the_scalars(fused):
    mg = MaskGuidedViT(tiny_vit(seed=2, fused=fused), mask_layers=3, grad_from_block=3)
    guidance = RegionGuidance((PATCH, PATCH), mg.num_prefix_tokens)
    region, anomaly, objects = _pixel_maps(b=2)
    images = torch.randn(2, 3, IMG, IMG, generator=gen(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bias = guidance(region, anomaly, objects)
        out = mg.forward_with_key_bias(images, bias)
        hard_out = mg.forward_with_key_bias(images, RegionGuidance((PATCH, PATCH), 1, mode="hard")(region))
    assert torch.isfinite(out.float()).all() and torch.isfinite(hard_out.float()).all()
    out.float().pow(2).sum().backward()
    for name in ("b_bg", "b_obj", "gain"):
        grad = getattr(guidance, name).grad
        assert grad is not None and torch.isfinite(grad) and grad.abs() > 0, name


@pytest.mark.parametrize("fused", [True, False])
def test_guidance_on_a_dinov2_style_patch14_vit_with_registers(fused):
    """ViT-S/14 layout (DINOv2: 14 px patches, register tokens, no pos-embed on the prefix)."""
    torch.manual_seed(3)
    img = 42  # 3 x 3 patches of 14 px
    vit = VisionTransformer(img_size=img, patch_size=14, embed_dim=32, depth=4, num_heads=2, num_classes=0,
                            reg_tokens=4, no_embed_class=True, init_values=1e-5)
    for blk in vit.blocks:
        blk.attn.fused_attn = fused
    mg = MaskGuidedViT(vit, mask_layers=3, grad_from_block=3)
    assert mg.num_prefix_tokens == 5
    guidance = RegionGuidance((14, 14), mg.num_prefix_tokens)
    g = gen(11)
    region = (torch.rand(2, 1, img, img, generator=g) > 0.5).float()
    anomaly = torch.rand(2, 1, img, img, generator=g)
    objects = (torch.rand(2, 1, img, img, generator=g) > 0.3).float()  # some background patches
    bias = guidance(region, anomaly, objects)
    assert bias.shape == (2, 5 + 9) and (bias[:, :5] == 0).all()  # prefix tokens always visible
    out = mg.forward_with_key_bias(torch.randn(2, 3, img, img, generator=g), bias)
    assert out.shape == (2, 32) and torch.isfinite(out).all()
    out.pow(2).sum().backward()
    assert all(getattr(guidance, n).grad.abs() > 0 for n in ("b_bg", "b_obj", "gain"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_guidance_gradients_on_cuda_bf16_fused_match_unfused():
    """SDPA kernels must pass gradients to a learnable float mask (65 tokens: a padded bias row)."""
    img = 64
    g = gen(9)
    images = torch.randn(4, 3, img, img, generator=g).cuda()
    maps = [torch.rand(4, 1, img, img, generator=g).cuda() for _ in range(3)]
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        vit = VisionTransformer(img_size=img, patch_size=PATCH, embed_dim=64, depth=4, num_heads=2, num_classes=0)
        for blk in vit.blocks:
            blk.attn.fused_attn = fused
        mg = MaskGuidedViT(vit, mask_layers=3, grad_from_block=3).cuda()
        guidance = RegionGuidance((PATCH, PATCH), mg.num_prefix_tokens).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = mg.forward_with_key_bias(images, guidance(*maps))
        out.float().pow(2).mean().backward()
        results.append((out.float(), torch.stack([guidance.b_bg.grad, guidance.b_obj.grad, guidance.gain.grad])))
    (out_f, grad_f), (out_u, grad_u) = results
    assert torch.isfinite(out_f).all() and torch.isfinite(grad_f).all() and (grad_f.abs() > 0).all()
    assert torch.allclose(out_f, out_u, atol=5e-2, rtol=5e-2)
    assert torch.allclose(grad_f, grad_u, atol=1e-3, rtol=0.1)


def test_proto_model_outputs_and_channel_fallbacks():
    cfg = ModelConfig(backbone="vit_tiny_patch16_224", weights="random", image_size=IMG, mask_layers=3,
                      grad_from_block=3, n_head=2, proj_hidden_dim=16, proj_dim=8, proj_layers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_proto_model(cfg, ProtoConfig(), num_base=2, num_novel=3,
                                  model_kwargs=dict(patch_size=PATCH, embed_dim=32, depth=4, num_heads=2))
    assert isinstance(model, ProtoNCDModel)
    region, anomaly, objects = _pixel_maps(b=2)
    images = torch.randn(2, 3, IMG, IMG, generator=gen(5))
    out = model(images, torch.cat([region, anomaly, objects], 1))
    assert out["feat"].shape == (2, 32) and out["proj"].shape == (2, 8)
    assert len(out["logits"]) == 2 and out["logits"][0].shape == (2, 5)
    assert out["prototypes"].shape == (2, 5, 32)
    assert torch.allclose(out["prototypes"].norm(dim=-1), torch.ones(2, 5))
    with torch.no_grad():
        assert torch.allclose(model(images, region)["feat"], model(images, torch.cat([region, region], 1))["feat"])
        assert torch.allclose(model(images, torch.cat([region, anomaly], 1))["feat"],
                              model(images, torch.cat([region, anomaly, torch.ones_like(region)], 1))["feat"],
                              atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"guidance.b_bg", "guidance.b_obj", "guidance.gain", "heads.weight"} <= trainable
    with pytest.raises(ValueError, match="masks"):
        model(images, torch.cat([region] * 4, 1))


# ================================================================ object prior


def _write_png(path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(io.encode_png(arr))


def test_object_masks_from_folder_and_column(tmp_path):
    root = tmp_path / "objects"
    m = np.zeros((6, 8), np.uint8)
    m[1:4, 2:6] = 255
    _write_png(root / "cat" / "scratch" / "001.png", m)
    _write_png(root / "cat" / "good" / "002.png", (m > 0).astype(np.uint8))  # a 0/1 label image
    rows = [{"image_id": "cat/scratch/001"}, {"image_id": "cat/good/002"}]
    assert object_mask_uri("cat/scratch/001", str(root)) == f"{root}/cat/scratch/001.png"
    folder = ProtoConfig(object_prior="folder", object_masks=str(root))
    out = load_object_masks(rows, folder, shapes=[(6, 8), (6, 8)])
    assert all(np.array_equal(x, m) for x in out)
    column = ProtoConfig(object_prior="column")
    rows_c = [dict(r, object_mask_uri=f"{root}/{r['image_id']}.png") for r in rows]
    assert all(np.array_equal(x, m) for x in load_object_masks(rows_c, column))
    image = np.zeros((6, 8, 3), np.uint8)
    assert np.array_equal(object_mask(rows[0], image, folder), m)
    assert (object_mask(rows[0], image, ProtoConfig(object_prior="none")) == 255).all()
    assert (load_object_masks(rows, ProtoConfig(), shapes=[(2, 3), (4, 5)])[1] == 255).all()

    with pytest.raises(DataError, match="cat/bent/009.png"):
        load_object_masks([{"image_id": "cat/bent/009"}], folder)
    with pytest.raises(DataError, match=r"001.png is 8x6 but its image is 9x6"):
        load_object_mask(f"{root}/cat/scratch/001.png", (6, 9))
    with pytest.raises(DataError, match="object_mask_uri"):
        load_object_masks([{"image_id": "x/y/z"}], column)
    (root / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png"):
        load_object_mask(f"{root}/bad.png")


def _part_scene(hole: bool = False, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A dark ellipse (the part) on a light, noisy background; its true mask."""
    rng = np.random.default_rng(seed)
    h, w = 180, 240
    truth = np.zeros((h, w), np.uint8)
    cv2.ellipse(truth, (130, 95), (70, 50), 20, 0, 360, 255, -1)
    img = np.empty((h, w, 3), np.float32)
    img[:] = (200, 205, 210)
    img[truth > 0] = (90, 80, 70)
    if hole:  # a background-coloured defect inside the part
        cv2.circle(img, (130, 95), 12, (200, 205, 210), -1)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), truth > 0


@pytest.mark.parametrize("hole", [False, True])
def test_estimated_object_mask_finds_a_plain_part(hole):
    image, truth = _part_scene(hole)
    est = estimate_object_mask(image)
    assert est.shape == truth.shape and est.dtype == np.uint8 and set(np.unique(est)) <= {0, 255}
    fg = est > 0
    assert (fg & truth).sum() / (fg | truth).sum() > 0.95


def test_estimated_object_mask_falls_back_to_everything():
    rng = np.random.default_rng(1)
    uniform = np.full((64, 80, 3), 128, np.uint8)
    texture = rng.integers(0, 256, (96, 96, 3)).astype(np.uint8)
    for image in (uniform, texture):
        assert (estimate_object_mask(image) == 255).all()
    with pytest.raises(ValueError, match="RGB"):
        estimate_object_mask(uniform[..., 0])


def test_crops_of_guidance_maps_use_the_region_geometry():
    rng = np.random.default_rng(2)
    mask = np.where(rng.random((20, 30)) > 0.5, 255, 0).astype(np.uint8)
    score = rng.uniform(-10, 270, (20, 30)).astype(np.float32)
    for box in [(2, 3, 12, 13), (-5, -4, 10, 11), (22, 12, 36, 26), (-3, -3, 33, 23)]:
        crop = crop_object_mask(mask, box)
        assert np.array_equal(crop, padded_crop(mask, box))
        assert crop.shape == (box[3] - box[1], box[2] - box[0])
        amap = crop_anomaly_map(score, box)
        expected = padded_crop(np.clip(np.rint(score), 0, 255).astype(np.uint8), box)
        assert amap.dtype == np.uint8 and np.array_equal(amap, expected)
    assert crop_object_mask(mask, (-5, -4, 10, 11))[:4].max() == 0  # padding is background


# ================================================================ losses


def ref_separation(protos: list[list[float]], t: float) -> float:
    """ProtoGCD's prototype_separation_loss, written with loops."""
    mu = [[x / math.sqrt(sum(y * y for y in p)) for x in p] for p in protos]
    c = len(mu)
    total = 0.0
    for i in range(c):
        s = sum(math.exp(sum(a * b for a, b in zip(mu[i], mu[j])) / t) for j in range(c) if j != i)
        total += math.log(s / (c - 1))
    return total / c


def ref_dapl(probs: list[list[float]], ratio: float) -> list[list[float]]:
    """DistillLoss_ratio's confidence filtering, per view, written with loops."""
    n = len(probs)
    half = n // 2
    out = [list(r) for r in probs]
    for v in range(2):
        rows = list(range(v * half, (v + 1) * half))
        conf = {}
        for i in rows:
            s = sorted(probs[i], reverse=True)
            conf[i] = s[0] / (s[1] + 1e-6)
        for i in sorted(rows, key=lambda i: -conf[i])[: int(half * ratio)]:
            k = max(range(len(probs[i])), key=lambda c: probs[i][c])
            out[i] = [1.0 if c == k else 0.0 for c in range(len(probs[i]))]
    return out


def ref_corrected(z: list[list[float]], num_base: int, tt: float, scores: list[float], thred: float):
    out = []
    for row, s in zip(z, scores):
        p = softmax_row(row[num_base:], tt)
        w = min(max(0.0, thred - s), 1.0)
        q = [0.0] * num_base + p
        out.append([w * (c == num_base) + (1 - w) * x for c, x in enumerate(q)])
    return out


def test_vmf_logits_and_ratio_schedule():
    g = gen(1)
    f, p = torch.randn(5, 7, generator=g), torch.randn(4, 7, generator=g)
    expected = [[10.0 * F.cosine_similarity(fi, pj, dim=0).item() for pj in p] for fi in f]
    assert torch.allclose(vmf_logits(f, p, 10.0), torch.tensor(expected), atol=1e-5)
    assert hard_ratio_schedule(5, 0.2, 1.0) == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert hard_ratio_schedule(1, 0.3, 1.0) == [0.3] and hard_ratio_schedule(0, 0.0, 1.0) == []
    with pytest.raises(ValueError):
        hard_ratio_schedule(3, 0.0, 1.5)


@pytest.mark.parametrize("ratio", [0.0, 0.4, 0.75, 1.0])
def test_dual_level_targets_match_protogcd(ratio):
    probs = torch.softmax(torch.randn(10, 5, generator=gen(2)) * 3, dim=-1)
    out = dual_level_targets(probs, ratio)
    assert torch.allclose(out, torch.tensor(ref_dapl(probs.tolist(), ratio)), atol=1e-7)
    n_hard = int((out.max(dim=-1).values == 1).sum())
    assert n_hard == 2 * int(5 * ratio)
    assert torch.allclose(out.sum(-1), torch.ones(10))


def test_proto_pseudo_labels_correct_then_harden():
    z = torch.rand(8, 6, generator=gen(3)) * 2 - 1
    scores = torch.tensor([0.0, 0.9, 0.2, 0.7, 0.4, 1.0, 0.1, 0.6])
    out = proto_pseudo_labels(z, 2, 0.07, scores, 0.5, 0.5, "corrected")
    soft = ref_corrected(z.tolist(), 2, 0.07, scores.tolist(), 0.5)
    assert torch.allclose(out, torch.tensor(ref_dapl(soft, 0.5)), atol=1e-6)
    assert (out[:, :2] == 0).all() and torch.allclose(out.sum(-1), torch.ones(8))
    assert torch.allclose(proto_pseudo_labels(z, 2, 0.07, scores, 0.5, 0.0, "corrected"), torch.tensor(soft),
                          atol=1e-6)


def test_proto_pseudo_labels_harden_the_teacher_then_correct():
    """``proto.hard_labels_from=teacher``: the confident share is ranked and hardened on the
    teacher alone; the normal-slot correction stays a soft share of every low-score target."""
    z = torch.rand(8, 6, generator=gen(3)) * 2 - 1
    scores = torch.tensor([0.0, 0.9, 0.2, 0.7, 0.4, 1.0, 0.1, 0.6])
    out = proto_pseudo_labels(z, 2, 0.07, scores, 0.5, 0.5, "teacher")
    teacher = ref_corrected(z.tolist(), 2, 0.07, scores.tolist(), -1.0)
    hard = ref_dapl(teacher, 0.5)
    for row, h, s in zip(out.tolist(), hard, scores.tolist()):
        w = max(0.0, 0.5 - s)
        expected = [(1 - w) * v for v in h]
        expected[2] += w
        assert row == pytest.approx(expected, abs=1e-6)
    assert (out[:, :2] == 0).all() and torch.allclose(out.sum(-1), torch.ones(8))
    # a score-0 crop keeps half its target on its own cluster; "corrected" may harden it to L
    assert out[0, 2] == pytest.approx(0.5 + 0.5 * hard[0][2], abs=1e-6)
    assert not torch.allclose(out, proto_pseudo_labels(z, 2, 0.07, scores, 0.5, 0.5, "corrected"))


def test_prototype_separation_matches_protogcd():
    p = torch.randn(3, 5, 8, generator=gen(4))
    refs = [ref_separation(h.tolist(), 0.1) for h in p]
    assert prototype_separation(p[0], 0.1).item() == pytest.approx(refs[0], rel=1e-5)
    assert prototype_separation(p, 0.1).item() == pytest.approx(sum(refs) / 3, rel=1e-5)
    one = torch.randn(1, 8, requires_grad=True)
    zero = prototype_separation(one)
    assert zero.item() == 0.0 and zero.requires_grad
    # orthogonal prototypes: log(mean exp(0)) = 0; identical ones: 1 / t
    assert prototype_separation(torch.eye(4), 0.1).item() == pytest.approx(0.0, abs=1e-6)
    assert prototype_separation(torch.ones(3, 4), 0.1).item() == pytest.approx(10.0, rel=1e-5)


def _min_angle(p: torch.Tensor) -> float:
    mu = F.normalize(p, dim=-1)
    cos = (mu @ mu.T).fill_diagonal_(-1.0)
    return math.degrees(math.acos(cos.max().clamp(-1, 1).item()))


def test_separation_loss_pushes_prototypes_apart():
    base = torch.randn(1, 16, generator=gen(5))
    p = (base + 0.1 * torch.randn(6, 16, generator=gen(6))).requires_grad_(True)  # a tight bundle
    opt = torch.optim.SGD([p], lr=0.5)
    angles, losses = [_min_angle(p.detach())], []
    for _ in range(30):
        loss = prototype_separation(p, 0.1)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        angles.append(_min_angle(p.detach()))
    assert angles[-1] > angles[0] + 20.0 and losses[-1] < losses[0]


def test_entropy_regularisation_is_protogcds_formula():
    z = torch.rand(6, 5, generator=gen(7)) * 2 - 1
    avg = torch.softmax(z * 10.0, dim=1).mean(0)
    expected = -torch.sum(torch.log(avg ** (-avg))) + math.log(5)  # ProtoGCD's expression
    assert entropy_regularisation(z, 10.0).item() == pytest.approx(expected.item(), rel=1e-5)


def _batch(b=6, c=7, d=5, n_head=3, seed=11, n_lab=3, dim=4):
    g = gen(seed)
    logits = [(torch.rand(2 * b, c, generator=g) * 2 - 1).requires_grad_(True) for _ in range(n_head)]
    proj = torch.randn(2 * b, d, generator=g).requires_grad_(True)
    labelled = torch.zeros(b, dtype=torch.bool)
    labelled[:n_lab] = True
    labels = torch.randint(0, 3, (b,), generator=g)
    scores = torch.rand(b, generator=g)
    protos = F.normalize(torch.randn(n_head, c, dim, generator=g), dim=-1).requires_grad_(True)
    return logits, proj, labels, labelled, scores, protos


def _ref_ce(z: torch.Tensor, y: torch.Tensor, kappa: float) -> float:
    return sum(-math.log(softmax_row(r, 1 / kappa)[t]) for r, t in zip(z.tolist(), y.tolist())) / len(y)


def _ref_distill(student: torch.Tensor, targets: list[list[float]], kappa: float) -> float:
    b = student.shape[0] // 2
    rows = student.tolist()
    total = 0.0
    for i in range(2 * b):
        q = targets[(i + b) % (2 * b)]  # the other view's target
        p = softmax_row(rows[i], 1 / kappa)
        total += -sum(qc * math.log(pc) for qc, pc in zip(q, p))
    return total / (2 * b)


def _ref_entropy(z: torch.Tensor, kappa: float) -> float:
    rows = [softmax_row(r, 1 / kappa) for r in z.tolist()]
    c = len(rows[0])
    pbar = [sum(r[k] for r in rows) / len(rows) for k in range(c)]
    return math.log(c) + sum(p * math.log(p) for p in pbar if p > 0)


def test_proto_criterion_combines_the_terms():
    cfg, pcfg = LossConfig(), ProtoConfig(kappa=8.0, entropy_weight=3.0, separation_weight=0.2)
    logits, proj, labels, labelled, scores, protos = _batch()
    out = proto_criterion(logits, proj, labels, labelled, scores, num_base=3, teacher_temp=0.07, cfg=cfg,
                          prototypes=protos, hard_ratio=0.5, proto_cfg=pcfg)
    lab, unl = labelled.repeat(2), (~labelled).repeat(2)
    lam = cfg.sup_weight
    cls = sum(_ref_ce(z[lab].detach(), labels.repeat(2)[lab], 8.0) for z in logits) / 3
    seps = [ref_separation(p.tolist(), 0.1) for p in protos.detach()]
    clusters = []
    for z in logits:
        zu = z[unl].detach()
        soft = ref_corrected(zu.tolist(), 3, 0.07, scores.repeat(2)[unl].tolist(), 0.5)
        clusters.append(_ref_distill(zu, ref_dapl(soft, 0.5), 8.0) + 3.0 * _ref_entropy(zu, 8.0))
    nce = info_nce(proj.detach(), cfg.infonce_temp).item()
    sc = supcon(torch.stack([proj[:6][labelled], proj[6:][labelled]], 1).detach(), labels[labelled],
                cfg.supcon_temp, cfg.supcon_temp).item()
    expected = ((1 - lam) * (sum(clusters) / 3 + 0.2 * sum(seps) / 3) + lam * cls
                + (1 - lam) * nce + lam * sc)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert out["cls"].item() == pytest.approx(cls, rel=1e-5)
    assert out["separation"].item() == pytest.approx(sum(seps) / 3, rel=1e-5)
    per_head = torch.tensor([c + 0.2 * s for c, s in zip(clusters, seps)])
    assert torch.allclose(out["cluster_per_head"], per_head, rtol=1e-5)
    out["loss"].backward()
    assert all(z.grad is not None for z in logits) and proj.grad is not None
    assert protos.grad is not None and protos.grad.abs().sum() > 0


def test_proto_criterion_without_a_group_drops_its_terms():
    cfg, pcfg = LossConfig(), ProtoConfig()
    logits, proj, labels, labelled, scores, protos = _batch(n_lab=0)
    kw = dict(num_base=3, teacher_temp=0.07, cfg=cfg, prototypes=protos, hard_ratio=1.0, proto_cfg=pcfg)
    out = proto_criterion(logits, proj, labels, labelled, scores, **kw)
    assert math.isnan(out["cls"]) and math.isnan(out["supcon"])
    expected = (1 - cfg.sup_weight) * (out["distill"] + pcfg.entropy_weight * out["entropy"]
                                       + pcfg.separation_weight * out["separation"] + out["infonce"])
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    logits, proj, labels, labelled, scores, protos = _batch(n_lab=6)
    out = proto_criterion(logits, proj, labels, labelled, scores, **dict(kw, prototypes=protos))
    assert torch.isfinite(out["loss"]) and torch.isnan(out["cluster_per_head"]).all()
    shared = protos[0].detach()  # (C, D) shared by every head
    assert torch.isfinite(proto_criterion(logits, proj, labels, labelled, scores,
                                          **dict(kw, prototypes=shared))["loss"])
    with pytest.raises(ValueError, match="view-major"):
        proto_criterion(logits, proj[:-2], labels, labelled, scores, **kw)
    with pytest.raises(ValueError, match="prototypes"):
        proto_criterion(logits, proj, labels, labelled, scores, **dict(kw, prototypes=protos[:, :4]))


# ================================================================ K estimation


@pytest.fixture
def one_faiss_thread():
    """Deterministic, fast FAISS on a loaded 2-core machine."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def sphere_blobs(k: int, d: int = 32, seed: int = 0, spread: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """k gaussian blobs of different sizes around random unit centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sizes = rng.integers(30, 200, size=k)
    x = np.concatenate([c + spread * rng.standard_normal((n, d)) / math.sqrt(d) for c, n in zip(centres, sizes)])
    return x.astype(np.float32), np.repeat(np.arange(k), sizes)


def ref_centroid_score(x: np.ndarray, p: np.ndarray) -> float:
    xs = [r / np.linalg.norm(r) for r in x.astype(np.float64)]
    ps = [r / np.linalg.norm(r) for r in p.astype(np.float64)]
    own = [int(np.argmax([float(xi @ pj) for pj in ps])) for xi in xs]
    used = sorted(set(own))
    total = 0.0
    for xi, a in zip(xs, own):
        d_own = 1 - float(xi @ ps[a])
        d_other = min(1 - float(xi @ ps[j]) for j in used if j != a)
        total += (d_other - d_own) / max(d_own, d_other)
    return total / len(xs)


def test_centroid_score_matches_reference_and_properties():
    rng = np.random.default_rng(3)
    x, p = rng.standard_normal((40, 6)), rng.standard_normal((4, 6))
    assert centroid_score(x, p) == pytest.approx(ref_centroid_score(x, p), rel=1e-5)
    perm = rng.permutation(40)
    assert centroid_score(x[perm], p[::-1]) == pytest.approx(centroid_score(x, p), rel=1e-6)
    unused = np.concatenate([p, p[:1]])  # a copy loses every argmax tie: no row chooses it
    assert centroid_score(x, unused) == pytest.approx(centroid_score(x, p))  # ignored, not a 0-distance rival
    assert centroid_score(x, p[:1]) == 0.0
    tight, _ = sphere_blobs(3, spread=0.01)
    assert centroid_score(tight, np.stack([tight[:10].mean(0), tight[-10:].mean(0)])) < 0.9


def test_prototype_score_adds_the_accuracy_of_labelled_rows():
    x, y = sphere_blobs(4, seed=2)
    centres = np.stack([x[y == k].mean(0) for k in range(4)])
    lab = np.where(np.arange(len(y)) % 3 == 0, y, -1)
    s = prototype_score(x, centres, lab)
    assert s["accuracy"] == 1.0 and s["score"] == pytest.approx(1.0 + s["centroid"])
    free = prototype_score(x, centres)
    assert math.isnan(free["accuracy"]) and free["score"] == free["centroid"]
    assert accuracy_score(np.array([0, 0, 1, 1]), np.array([5, 5, 5, 2])) == 0.75


@pytest.mark.parametrize("k_true, seed", [(6, 0), (6, 1), (3, 2)])
def test_best_k_by_prototype_score_recovers_well_separated_blobs(one_faiss_thread, k_true, seed):
    x, y = sphere_blobs(k_true, seed=seed)
    best, scores = best_k_by_prototype_score(x, range(2, 10), seed=0)
    assert best == k_true and set(scores) == set(range(2, 10))
    lab = np.where(np.random.default_rng(seed).random(len(y)) < 0.3, y, -1)
    assert best_k_by_prototype_score(x, [2, 3, 4, 5, 6, 7, 8], seed=1, labelled_labels=lab)[0] == k_true
    with pytest.raises(ValueError, match="candidate K"):
        best_k_by_prototype_score(x[:5], [2, 6], seed=0)


# ================================================================ open set


def test_rejection_scores():
    g = gen(8)
    z, f, p = torch.rand(7, 4, generator=g) * 2 - 1, torch.randn(7, 5, generator=g), torch.randn(4, 5, generator=g)
    msp = max_softmax(z.numpy(), 10.0)
    assert np.allclose(msp, torch.softmax(10.0 * z.double(), 1).max(1).values.numpy())
    mc = max_cosine(f.numpy(), p.numpy())
    assert np.allclose(mc, F.cosine_similarity(f[:, None], p[None], dim=-1).max(1).values.numpy(), atol=1e-6)
    assert reject(np.array([0.2, 0.5, 0.9]), 0.5).tolist() == [True, False, False]


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(9)
    known = rng.integers(0, 6, 40).astype(float)  # many ties
    unknown = rng.integers(0, 4, 25).astype(float)
    expected = roc_auc_score(np.r_[np.ones(40), np.zeros(25)], np.r_[known, unknown])
    assert auroc(known, unknown) == pytest.approx(expected, rel=1e-12)
    assert auroc([1.0, 2.0], [0.0]) == 1.0 and auroc([0.0], [1.0, 2.0]) == 0.0 and auroc([1.0], [1.0]) == 0.5
    with pytest.raises(ValueError):
        auroc([], [1.0])
    with pytest.raises(ValueError):
        auroc([np.nan], [1.0])


def test_inference_posterior_is_the_vmf_posterior_at_proto_kappa():
    """The rejection score (best merged probability) uses proto.kappa, as training does."""
    from ncd.config import load_config
    from ncd.infer.predict import TrainedModel, region_probabilities

    logits = [np.random.default_rng(0).uniform(-1, 1, (7, 2 + 3))]
    for kappa in (10.0, 30.0):
        cfg = load_config(None, ["method=protoanomalyncd", f"proto.kappa={kappa}"])
        probs = region_probabilities(TrainedModel(None, cfg, {"num_base": 2}, 0), logits)
        z = np.exp(kappa * logits[0][:, 2:])
        np.testing.assert_allclose(probs, z / z.sum(1, keepdims=True), rtol=1e-10)
        np.testing.assert_allclose(probs.max(1), max_softmax(logits[0][:, 2:], kappa), rtol=1e-10)
    cfg = load_config(None, ["method=anomalyncd", "proto.kappa=30", "loss.student_temp=0.05"])
    probs = region_probabilities(TrainedModel(None, cfg, {"num_base": 2}, 0), logits)
    np.testing.assert_allclose(probs.max(1), max_softmax(logits[0][:, 2:], 20.0), rtol=1e-10)  # 1 / student_temp


def test_prototypes_start_from_kmeans_in_proto_mode_unless_told_otherwise():
    from ncd.config import load_config
    from ncd.methods import kmeans_init

    assert kmeans_init(load_config(None, ["method=protoanomalyncd"])) is True  # PROTO.md: region-guided prototypes
    assert kmeans_init(load_config(None, ["method=anomalyncd"])) is False  # the paper's random init
    assert kmeans_init(load_config(None, ["method=protoanomalyncd", "train.kmeans_init=false"])) is False
    assert kmeans_init(load_config(None, ["method=anomalyncd", "train.kmeans_init=true"])) is True


def test_methods_are_chosen_by_name_behind_one_interface():
    """One module per method (ncd/methods/), chosen by name; an unknown name lists the known ones."""
    from ncd.config import ConfigError, load_config
    from ncd.methods import METHODS, get_method, guide_columns, prediction_temperature

    assert METHODS == ("anomalyncd", "protoanomalyncd", "frozen")
    assert [get_method(m).name for m in METHODS] == list(METHODS)
    with pytest.raises(ConfigError, match="unknown method 'protoncd'; known methods: anomalyncd, protoanomalyncd, frozen"):
        get_method("protoncd")
    ncd_cfg = load_config(None, ["loss.student_temp=0.2", "proto.kappa=4"])
    proto_cfg = load_config(None, ["method=protoanomalyncd", "loss.student_temp=0.2", "proto.kappa=4"])
    assert (prediction_temperature(ncd_cfg), prediction_temperature(proto_cfg)) == (0.2, 0.25)
    assert guide_columns(ncd_cfg) == () and guide_columns(proto_cfg) == ("anomaly_png",)
    assert guide_columns(load_config(None, ["method=protoanomalyncd", "proto.object_prior=auto"])) == (
        "anomaly_png", "object_png")
