import pyarrow.compute as pc
import pytest

from ncd.config import load_config
from ncd.data.catalog import build_manifest
from ncd.evaluate.openset_eval import held_out_auroc, open_set_protocol
from ncd.pipeline import LOCAL_STAGES, Stages
from ncd.preprocess.regions import preprocess_manifest


@pytest.fixture(scope="module")
def plate(demo_root, tmp_path_factory):
    cfg = load_config("ncd/configs/demo_smoke.yaml", [f"data.root={demo_root}", "data.categories=plate",
                                                      "train.epochs=1", "method=protoanomalyncd",
                                                      f"output={tmp_path_factory.mktemp('openset')}"])
    return cfg, preprocess_manifest(build_manifest(cfg.data), cfg.mebin, cfg.crop, cfg.data, proto=cfg.proto)


def test_held_out_type_never_reaches_training(plate):
    cfg, regions = plate
    seen_by_training = []

    def spy_train(c, r, base):
        seen_by_training.append(set(r.column("gt_type").to_pylist()))
        return LOCAL_STAGES.train(c, r, base)

    stages = Stages(LOCAL_STAGES.preprocess, spy_train, LOCAL_STAGES.infer)
    result = held_out_auroc(cfg, regions, "scratch", stages)
    assert seen_by_training == [{"crack", "good", "hole", "missing", "stain"}]
    assert result["k_seen"] == 5
    held = regions.filter(pc.equal(regions.column("gt_type"), "scratch"))
    assert result["held_out_images"] == len(set(held.column("image_id").to_pylist()))
    assert 0.0 <= result["auroc"] <= 1.0 and 0.0 <= result["auroc_similarity"] <= 1.0
    assert 0.0 <= result["auroc_nearest"] <= 1.0 and 0.0 <= result["auroc_nearest_half"] <= 1.0


def test_protocol_averages_over_types_each_split_in_its_own_folder(plate):
    cfg, regions = plate
    outputs = []

    def spy_train(c, r, base):
        outputs.append(c.output)
        return LOCAL_STAGES.train(c, r, base)

    result = open_set_protocol(cfg, regions, Stages(LOCAL_STAGES.preprocess, spy_train, LOCAL_STAGES.infer),
                               ["hole", "crack"])
    assert outputs == [f"{cfg.output}/openset/hole", f"{cfg.output}/openset/crack"], "splits share a folder"
    assert set(result["per_type"]) == {"hole", "crack"}
    assert result["auroc"] == pytest.approx(sum(result["per_type"].values()) / 2)
    assert result["auroc_similarity"] == pytest.approx(sum(result["per_type_similarity"].values()) / 2)
    assert result["auroc_nearest"] == pytest.approx(sum(result["per_type_nearest"].values()) / 2)
    with pytest.raises(ValueError, match="no regions"):
        held_out_auroc(cfg, regions, "no-such-type", LOCAL_STAGES)


def test_nearest_similarity_leaves_out_the_regions_own_image():
    import numpy as np

    from ncd.evaluate.k_criteria import l2_normalise
    from ncd.infer.rejection import nearest_other_image_similarity

    feat = np.array([[1, 0], [1, 0.01], [0, 1], [0.6, 0.8]], np.float32)
    ids = ["a", "a", "b", "c"]
    got = nearest_other_image_similarity(feat, ids, l2_normalise(feat[:3]), ids[:3])
    # a's regions see only b (cosine ~0), not each other; b sees a; c (not in the bank) sees its nearest bank row
    assert got[0] == pytest.approx(0.0, abs=1e-6) and got[1] == pytest.approx(0.01, abs=1e-3)
    assert got[2] == pytest.approx(0.01, abs=1e-3) and got[3] == pytest.approx(0.8, abs=1e-3)
    alone = nearest_other_image_similarity(feat[:1], ["a"], l2_normalise(feat[:2]), ["a", "a"])
    assert alone.tolist() == [-1.0]  # only its own image in the bank


def test_nearest_similarity_is_the_same_in_small_chunks():
    import numpy as np

    from ncd.evaluate.k_criteria import l2_normalise
    from ncd.infer.rejection import nearest_other_image_similarity

    rng = np.random.default_rng(0)
    feat = rng.normal(size=(50, 8)).astype(np.float32)
    ids = [f"img{i // 3}" for i in range(50)]
    bank, owners = l2_normalise(feat[:30]), ids[:30]
    whole = nearest_other_image_similarity(feat, ids, bank, owners)
    chunked = nearest_other_image_similarity(feat, ids, bank, owners, max_chunk_cells=31)  # one row per chunk
    np.testing.assert_allclose(whole, chunked, atol=1e-6)  # BLAS may round chunks differently
    empty = nearest_other_image_similarity(feat[:2], ids[:2], np.zeros((0, 8), np.float32), [])
    assert empty.tolist() == [-1.0, -1.0]
