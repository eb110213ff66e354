"""infer.tta=d8: a trained model's test features averaged over the crop's dihedral transforms."""
import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch

from ncd.config import ConfigError, load_config
from ncd.infer.outputs import dihedral_tta, region_outputs
from ncd.methods import build_model
from ncd.validation import validate

SIDE = 32  # demo_smoke's image size: a 2 x 2 grid of 16 px patches


def _png(array: np.ndarray) -> bytes:
    return cv2.imencode(".png", array)[1].tobytes()


def _cfg(*extra: str):
    # the whole crop resized: a centre crop of an odd margin would not commute with a quarter turn
    return load_config("ncd/configs/demo_smoke.yaml", ["train.num_novel=3", "model.eval_view=resize", *extra])


@pytest.fixture(scope="module")
def turned_regions() -> pa.Table:
    """One crop with an off-centre region, the same turned a quarter and mirrored."""
    rng = np.random.default_rng(3)
    crop = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    mask = np.zeros((SIDE, SIDE), np.uint8)
    mask[2:12, 4:30] = 255
    crops = [crop, np.rot90(crop), crop[:, ::-1]]
    masks = [mask, np.rot90(mask), mask[:, ::-1]]
    return pa.table({"region_id": ["r0", "r1", "r2"],
                     "crop_png": [_png(np.ascontiguousarray(c)) for c in crops],
                     "mask_png": [_png(np.ascontiguousarray(m)) for m in masks]})


def test_dihedral_features_ignore_the_orientation_and_the_heads_read_them(turned_regions):
    torch.manual_seed(0)
    model = build_model(_cfg(), 0, 3).eval()
    plain = region_outputs(model, _cfg(), turned_regions, "cpu")
    d8 = region_outputs(model, _cfg("infer.tta=d8"), turned_regions, "cpu")
    assert np.abs(plain.feat[0] - plain.feat[1]).max() > 1e-3  # one view alone sees the turn
    np.testing.assert_allclose(d8.feat[1], d8.feat[0], atol=1e-5)
    np.testing.assert_allclose(d8.feat[2], d8.feat[0], atol=1e-5)
    assert np.linalg.norm(d8.feat[0]) <= 1 + 1e-5  # a mean of unit vectors
    with torch.no_grad():
        logits = model.heads(torch.from_numpy(d8.feat))
    for h in range(len(logits)):
        np.testing.assert_allclose(d8.logits[h], logits[h].numpy(), atol=1e-5)
        np.testing.assert_allclose(d8.logits[h][1], d8.logits[h][0], atol=1e-4)


def test_tta_applies_to_trained_methods_and_is_validated():
    assert dihedral_tta(_cfg("infer.tta=d8"))
    assert not dihedral_tta(_cfg())  # the paper's single test view by default
    # method=frozen averages its features over the group already: no second average
    assert not dihedral_tta(_cfg("infer.tta=d8", "method=frozen"))
    with pytest.raises(ConfigError, match="infer.tta"):
        validate(_cfg("infer.tta=d4"))
