import cv2
import numpy as np
import pyarrow as pa
import pytest
import timm
import torch
import torch.nn.functional as F

from ncd.infer.features import frozen_region_features, mask_weights, resize_view, weighted_mean
from ncd.train.augment import ViewSpec

PATCH, SIDE = 8, 32  # a 4 x 4 patch grid


def _png(array: np.ndarray) -> bytes:
    return cv2.imencode(".png", array)[1].tobytes()


def _regions(crops: list[np.ndarray], masks: list[np.ndarray]) -> pa.Table:
    return pa.table({"region_id": [f"r{i}" for i in range(len(crops))], "crop_png": [_png(c) for c in crops],
                     "mask_png": [_png(m) for m in masks]})


def _tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=SIDE, patch_size=PATCH,
                             embed_dim=24, depth=3, num_heads=2, num_classes=0).eval()


def _tokens_after(model: torch.nn.Module, x: torch.Tensor, block: int) -> torch.Tensor:
    """Tokens (B, 1+N, D) after block ``block`` (0-based) and the final norm, computed by hand."""
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for b in model.blocks[: block + 1]:
        t = b(t)
    return model.norm(t)


def test_weighted_mean_of_one_hot_is_that_token_and_zero_weights_give_the_mean():
    tokens = torch.randn(2, 5, 3)
    w = torch.zeros(2, 5)
    w[0, 3] = 0.7
    out = weighted_mean(tokens, w)
    assert torch.allclose(out[0], tokens[0, 3])
    assert torch.allclose(out[1], tokens[1].mean(0))


def test_mask_weights_follow_the_patch_grid_row_major():
    masks = torch.zeros(1, 1, 30, 30)  # 3 x 3 grid of 8 px patches, 6 px left over
    masks[0, 0, 8:16, 16:24] = 1.0  # patch (row 1, column 2)
    masks[0, 0, 24:, :] = 1.0  # beyond the grid: dropped like the patch embedding drops it
    w = mask_weights(masks, 8, (3, 3))
    expected = torch.zeros(1, 9)
    expected[0, 1 * 3 + 2] = 1.0
    assert torch.equal(w, expected)


def test_vit_features_match_a_hand_run_of_each_block():
    """One pass gives every block; mask pooling of a one-hot patch mask is that patch's token."""
    model = _tiny_vit()
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for _ in range(3)]
    masks = [np.zeros((SIDE, SIDE), np.uint8) for _ in range(3)]
    masks[0][8:16, 16:24] = 255  # patch (1, 2) -> token 6
    masks[1][0:8, 0:8] = 255  # patch (0, 0) -> token 0
    feats = frozen_region_features(_regions(crops, masks), model, blocks=(0, 2), size=SIDE, view="resize")
    assert sorted(feats) == [f"block{b}/{p}" for b in (0, 2) for p in ("cls", "mask_patch", "mean_patch")]
    spec = ViewSpec(size=SIDE, mean=model.pretrained_cfg["mean"], std=model.pretrained_cfg["std"])
    x = torch.stack([resize_view(torch.from_numpy(c[..., ::-1].copy()).permute(2, 0, 1), torch.zeros(1, SIDE, SIDE),
                                 spec)[0] for c in crops])
    for b in (0, 2):
        with torch.no_grad():
            t = _tokens_after(model, x, b)
        np.testing.assert_allclose(feats[f"block{b}/cls"], t[:, 0].numpy(), atol=1e-5)
        np.testing.assert_allclose(feats[f"block{b}/mean_patch"], t[:, 1:].mean(1).numpy(), atol=1e-5)
        np.testing.assert_allclose(feats[f"block{b}/mask_patch"][0], t[0, 1 + 6].numpy(), atol=1e-5)
        np.testing.assert_allclose(feats[f"block{b}/mask_patch"][1], t[1, 1 + 0].numpy(), atol=1e-5)
        np.testing.assert_allclose(feats[f"block{b}/mask_patch"][2], t[2, 1:].mean(0).numpy(), atol=1e-5)  # empty mask
    assert not np.allclose(feats["block0/cls"], feats["block2/cls"])


def test_eval_view_crops_the_centre_and_resize_keeps_the_whole_crop():
    """A bright border is cut away by the eval view (crop_pct 0.5) but kept by the resize view."""
    model = _tiny_vit()
    crop = np.zeros((64, 64, 3), np.uint8)
    crop[:16] = 255
    mask = np.full((64, 64), 255, np.uint8)
    table = _regions([crop], [mask])
    kw = dict(blocks=(2,), size=SIDE, crop_pct=0.5)
    ev = frozen_region_features(table, model, view="eval", **kw)["block2/mean_patch"]
    rs = frozen_region_features(table, model, view="resize", **kw)["block2/mean_patch"]
    black = frozen_region_features(_regions([np.zeros_like(crop)], [mask]), model, view="resize", **kw)
    np.testing.assert_allclose(ev, black["block2/mean_patch"], atol=1e-5)
    assert not np.allclose(rs, ev, atol=1e-3)


def test_cnn_features_pool_the_last_feature_map():
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    rng = np.random.default_rng(1)
    crops = [rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for _ in range(2)]
    masks = [np.full((SIDE, SIDE), 255, np.uint8), np.zeros((SIDE, SIDE), np.uint8)]
    feats = frozen_region_features(_regions(crops, masks), model, size=SIDE, view="resize")
    assert sorted(feats) == ["mask_pool", "pool"]
    spec = ViewSpec(size=SIDE, mean=(0.5,) * 3, std=(0.5,) * 3)  # the model's own normalisation
    x = torch.stack([resize_view(torch.from_numpy(c[..., ::-1].copy()).permute(2, 0, 1), torch.zeros(1, SIDE, SIDE),
                                 spec)[0] for c in crops])
    with torch.no_grad():
        expected = model(x).numpy()  # timm's global average pool
    np.testing.assert_allclose(feats["pool"], expected, atol=1e-4)
    np.testing.assert_allclose(feats["mask_pool"], expected, atol=1e-4)  # full mask and empty mask: the plain mean
    with pytest.raises(ValueError, match="ViT only"):
        frozen_region_features(_regions(crops, masks), model, blocks=(1,), size=SIDE)


def test_vit_needs_blocks_in_range():
    model = _tiny_vit()
    table = _regions([np.zeros((SIDE, SIDE, 3), np.uint8)], [np.zeros((SIDE, SIDE), np.uint8)])
    with pytest.raises(ValueError, match="name the ViT blocks"):
        frozen_region_features(table, model, size=SIDE)
    with pytest.raises(ValueError, match="block 3 out of range"):
        frozen_region_features(table, model, blocks=(3,), size=SIDE)
    with pytest.raises(ValueError, match="view must be one of"):
        frozen_region_features(table, model, blocks=(1,), size=SIDE, view="centre")


def test_dihedral_features_ignore_the_crop_orientation():
    model = _tiny_vit()
    rng = np.random.default_rng(3)
    crop = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    mask = np.zeros((SIDE, SIDE), np.uint8)
    mask[2:12, 4:30] = 255  # an elongated region, off-centre
    turned = np.ascontiguousarray(np.rot90(crop)), np.ascontiguousarray(np.rot90(mask))
    mirrored = np.ascontiguousarray(crop[:, ::-1]), np.ascontiguousarray(mask[:, ::-1])
    table = _regions([crop, turned[0], mirrored[0]], [mask, turned[1], mirrored[1]])
    kw = dict(blocks=(2,), size=SIDE, view="resize")
    plain = frozen_region_features(table, model, **kw)["block2/mask_patch"]
    d8 = frozen_region_features(table, model, dihedral=True, **kw)
    assert np.abs(plain[0] - plain[1]).max() > 1e-2  # one view alone sees the turn
    for key in ("block2/cls", "block2/mean_patch", "block2/mask_patch"):
        np.testing.assert_allclose(d8[key][1], d8[key][0], atol=1e-5)
        np.testing.assert_allclose(d8[key][2], d8[key][0], atol=1e-5)
    one = F.normalize(torch.from_numpy(plain), dim=1).numpy()
    assert np.linalg.norm(d8["block2/mask_patch"][0]) <= 1 + 1e-5  # a mean of unit vectors
    assert not np.allclose(d8["block2/mask_patch"][0], one[0], atol=1e-3)
