"""method=frozen: the dihedral-averaged two-backbone encoder, k-means prototypes, no training."""
import numpy as np
import pytest
import torch

from ncd.cluster.kmeans import kmeans
from ncd.config import ConfigError, load_config
from ncd.data.synthetic import SyntheticSpec, write_dataset
from ncd.data.catalog import build_manifest
from ncd.infer.forward import forward_regions
from ncd.infer.predict import TrainedModel, model_from_state, model_state
from ncd.methods import build_model, eval_view, kmeans_init, trains
from ncd.preprocess.regions import preprocess_manifest
from ncd.train.datasets import eval_set
from ncd.train.engine import LocalContext, train, view_spec
from ncd.validation import validate

FROZEN = ["method=frozen", "model.frozen_vit_size=32", "train.num_novel=3", "train.base_table="]


@pytest.fixture(scope="module")
def regions(tmp_path_factory):
    root = write_dataset(tmp_path_factory.mktemp("frozen") / "data",
                         SyntheticSpec(categories=("plate",), images_per_family=3, normal_images=2, image_size=64, seed=3))
    cfg = load_config("ncd/configs/demo_smoke.yaml", [f"data.root={root}"])
    return preprocess_manifest(build_manifest(cfg.data), cfg.mebin, cfg.crop, cfg.data)


def _cfg(*extra):
    return load_config("ncd/configs/demo_smoke.yaml", [*FROZEN, *extra])


def test_the_method_trains_nothing_and_reads_the_whole_crop():
    cfg = _cfg("train.kmeans_init=false")
    assert not trains(cfg) and kmeans_init(cfg)  # its prototypes can only come from k-means
    assert eval_view(cfg) == "resize" and view_spec(cfg).whole
    assert eval_view(_cfg("model.eval_view=crop")) == "crop"
    assert eval_view(load_config("ncd/configs/demo_smoke.yaml")) == "crop"  # the trained methods keep the paper's view
    with pytest.raises(ConfigError, match="model.eval_view"):
        validate(_cfg("model.eval_view=square"))


def test_encoder_is_frozen_and_blind_to_the_crop_orientation():
    torch.manual_seed(0)
    model = build_model(_cfg(), 0, 3).eval()
    encoder = model.encoder
    assert not any(p.requires_grad for p in encoder.parameters())
    assert encoder.feature_dim == 192 + 1280  # ViT-Tiny tokens and EfficientNet-Lite0's last map
    encoder.train()
    assert not encoder.training  # BatchNorm statistics stay as pretrained
    images = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 1, 32, 32)
    masks[:, :, 2:10, 4:30] = 1
    feat = encoder(images, masks)
    assert feat.shape == (2, 192 + 1280)
    np.testing.assert_allclose(feat[:, :192].norm(dim=1), 1, atol=1e-4)  # each part unit length
    np.testing.assert_allclose(feat[:, 192:].norm(dim=1), 1, atol=1e-4)
    turned = encoder(torch.rot90(images, 1, (-2, -1)), torch.rot90(masks, 1, (-2, -1)))
    np.testing.assert_allclose(turned.numpy(), feat.numpy(), atol=1e-4)
    other = encoder(images, torch.roll(masks, 12, dims=-2))
    assert (other - feat).abs().max() > 1e-3  # the region mask steers the pooling


def test_training_is_kmeans_of_the_frozen_features_and_saves_a_model(regions, tmp_path):
    cfg = _cfg(f"output={tmp_path}")
    ctx = LocalContext(str(tmp_path / "checkpoints"))
    result = train(cfg, regions, None, ctx)
    assert [m["steps"] for m in ctx.history] == [0]  # reported once, no optimiser step
    assert ctx.latest_checkpoint() is not None
    feats = forward_regions(result.model, eval_set(regions), view_spec(cfg)).feat
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    head = result.selected_head
    expected = kmeans(unit.astype(np.float32), 3, seed=cfg.train.seed + head, spherical=True).labels
    logits = forward_regions(result.model, eval_set(regions), view_spec(cfg)).logits[head]
    assert np.array_equal(logits.argmax(1), expected)
    trained = TrainedModel(result.model, cfg, result.class_map, head)
    again = model_from_state(model_state(trained))
    np.testing.assert_allclose(forward_regions(again.model, eval_set(regions), view_spec(cfg)).logits[head], logits,
                               atol=1e-5)


def test_features_are_remembered_per_crop_and_weights():
    from ncd.model.frozen_ensemble import MEMO

    torch.manual_seed(0)
    encoder = build_model(_cfg(), 0, 3).eval().encoder
    images, masks = torch.randn(3, 3, 32, 32), torch.ones(3, 1, 32, 32)
    before = len(MEMO.items)
    first = encoder(images, masks)
    assert len(MEMO.items) == before + 3
    np.testing.assert_allclose(encoder(images[[2, 0]], masks[[2, 0]]).numpy(), first[[2, 0]].numpy())
    assert len(MEMO.items) == before + 3  # read back, not computed again
    np.testing.assert_allclose(first.numpy(), encoder.features(images, masks).numpy(), atol=1e-6)
    with torch.no_grad():
        encoder.cnn.conv_stem.weight.add_(torch.randn_like(encoder.cnn.conv_stem.weight))  # other weights
    changed = encoder(images, masks)
    assert len(MEMO.items) == before + 6
    assert (changed[:, 192:] - first[:, 192:]).abs().max() > 1e-4


def test_a_method_that_trains_nothing_reads_no_base_set(tmp_path):
    from ncd.pipeline import LOCAL_STAGES, base_set

    assert base_set(_cfg(f"output={tmp_path}", "train.base_table=synthetic"), LOCAL_STAGES) is None
    assert not (tmp_path / "base_data").exists()  # nothing generated either
