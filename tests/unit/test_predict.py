import numpy as np
import pyarrow as pa
import torch

from ncd.infer.predict import (UNKNOWN, TrainedModel, image_predictions, load_model, region_predictions, save_model)


def _regions(image_ids, areas):
    n = len(image_ids)
    return pa.table({"region_id": [f"{i}_crop{j}" for j, i in enumerate(image_ids)], "image_id": image_ids,
                     "category": ["c"] * n, "gt_type": ["t"] * n, "area": pa.array(areas, pa.int64())})


def test_region_and_image_predictions():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.34, 0.33, 0.33]])
    regions = _regions(["a", "a", "b"], [100, 100, 50])
    rp = region_predictions(regions, probs)
    assert rp.column("cluster").to_pylist() == [0, 2, 0]
    assert rp.column("top3").to_pylist()[1] == [2, 1, 0]
    ip, merged = image_predictions(regions, probs, area_temperature=50.0)
    assert ip.column("image_id").to_pylist() == ["a", "b"]
    assert np.allclose(merged[0], probs[:2].mean(0))  # equal areas -> plain mean
    assert np.allclose(merged[1], probs[2])  # one region -> its probabilities
    assert ip.column("num_regions").to_pylist() == [2, 1]
    assert all(0 <= c < 3 for c in ip.column("cluster").to_pylist())  # always a novel index


def test_unknown_threshold():
    probs = np.array([[0.9, 0.1], [0.55, 0.45]])
    rp = region_predictions(_regions(["a", "b"], [1, 1]), probs, unknown_threshold=0.6)
    assert rp.column("cluster").to_pylist() == [0, UNKNOWN]


def test_saved_model_predicts_the_same(tmp_path):
    from ncd.config import load_config
    from ncd.model.ncd_model import build_ncd_model

    cfg = load_config("ncd/configs/demo_smoke.yaml")
    model = build_ncd_model(cfg.model, 2, 3).eval()
    trained = TrainedModel(model, cfg, {"num_base": 2, "num_novel": 3, "base_classes": ["x", "y"]}, 1)
    save_model(trained, str(tmp_path / "m.pt"))
    loaded = load_model(str(tmp_path / "m.pt"))
    images, masks = torch.randn(3, 3, 32, 32), torch.ones(3, 1, 32, 32)
    a, b = model(images, masks), loaded.model(images, masks)
    assert loaded.head == 1 and loaded.class_map["num_novel"] == 3
    assert all(torch.allclose(x, y) for x, y in zip(a["logits"], b["logits"]))


def test_inference_on_a_category_the_model_never_saw_warns(demo_root):
    import warnings

    import pytest

    from ncd.config import load_config
    from ncd.data.catalog import build_manifest
    from ncd.infer.predict import UnseenCategoryWarning, warn_unseen_categories
    from ncd.model.ncd_model import build_ncd_model
    from ncd.pipeline import local_infer
    from ncd.preprocess.regions import preprocess_manifest

    cfg = load_config("ncd/configs/demo_smoke.yaml", [f"data.root={demo_root}"])
    regions = preprocess_manifest(build_manifest(cfg.data), cfg.mebin, cfg.crop, cfg.data)
    assert set(regions.column("category").to_pylist()) == {"fabric", "plate"}
    trained = TrainedModel(build_ncd_model(cfg.model, 0, 3).eval(), cfg,
                           {"num_base": 0, "num_novel": 3, "categories": ["plate"]}, 0)
    with pytest.warns(UnseenCategoryWarning, match="never saw fabric"):
        outputs = local_infer(trained, regions)
    assert len(outputs.feat) == regions.num_rows  # it still labels them, loudly
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnseenCategoryWarning)
        assert warn_unseen_categories(trained, ["plate"]) == []
        seen_all = TrainedModel(trained.model, cfg, {**trained.class_map, "categories": ["fabric", "plate"]}, 0)
        assert warn_unseen_categories(seen_all, regions.column("category").to_pylist()) == []


def test_malicious_or_foreign_model_file_is_refused_naming_it(tmp_path, malicious_model_bytes):
    import pytest

    from ncd.train.checkpoint import ModelFileError, save

    sentinel = tmp_path / "pwned"
    bad = tmp_path / "model.pt"
    bad.write_bytes(malicious_model_bytes(sentinel))
    with pytest.raises(ModelFileError, match=f"cannot load model file {bad}: .*never unpickles"):
        load_model(str(bad))
    assert not sentinel.exists(), "loading the model file ran its payload"
    save({"weights": torch.zeros(2)}, str(tmp_path / "other.pt"))  # loadable, but not an ncd model
    with pytest.raises(ModelFileError, match=f"cannot load model file {tmp_path / 'other.pt'}: not an ncd model "
                                             r"\(missing 'config'\)"):
        load_model(str(tmp_path / "other.pt"))


def test_infer_job_with_a_truncated_model_file_exits_with_one_line_naming_it(tmp_path):
    import pytest

    from ncd.train.checkpoint import save
    from ray_jobs.infer import main

    path = tmp_path / "model.pt"
    save({"model": {"w": torch.zeros(10_000)}}, str(path))
    path.write_bytes(path.read_bytes()[:5000])  # an interrupted copy
    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(path), "--regions", str(tmp_path / "regions"), "--out", str(tmp_path / "out")])
    message = str(exit_.value.code)
    assert message.startswith(f"ray_jobs.infer: error: cannot load model file {path}: ") and "truncated" in message
    assert "\n" not in message and not (tmp_path / "out").exists()


def test_familiarity_travels_with_the_model_file_and_rejects_the_unfamiliar(tmp_path):
    from ncd.config import apply_overrides, load_config
    from ncd.infer.forward import RegionOutputs
    from ncd.infer.rejection import attach_bank, prediction_tables
    from ncd.model.ncd_model import build_ncd_model

    cfg = apply_overrides(load_config("ncd/configs/demo_smoke.yaml"), ["infer.unknown_familiarity=0.5"])
    model = build_ncd_model(cfg.model, 0, 2).eval()
    dim = model.feature_dim
    train_feat = np.zeros((3, dim), np.float32)
    train_feat[[0, 1, 2], [0, 0, 1]] = 1.0  # images a and b share a direction, c has its own
    trained = attach_bank(TrainedModel(model, cfg, {"num_base": 0, "num_novel": 2}, 0), train_feat, ["a", "b", "c"])
    save_model(trained, str(tmp_path / "m.pt"))
    loaded = load_model(str(tmp_path / "m.pt"))
    assert loaded.bank.dtype == np.float16 and loaded.bank.shape == (3, dim) and loaded.bank_images == ["a", "b", "c"]

    new_feat = np.zeros((4, dim), np.float32)
    new_feat[[0, 1, 2, 3], [0, 1, 2, 2]] = 1.0  # like a/b, like c, unlike anything (twice, one image)
    regions = _regions(["a", "c", "z", "z"], [10, 10, 10, 10])
    logits = [np.zeros((4, 2), np.float32)]
    region_table, image_table = prediction_tables(loaded, regions, RegionOutputs(new_feat, logits))
    # a's own bank row is left out, but b is as close; c's only match is itself: left out, nothing else close
    assert region_table.column("familiarity").to_pylist() == [1.0, 0.0, 0.0, 0.0]
    assert region_table.column("cluster").to_pylist()[0] != UNKNOWN
    assert region_table.column("cluster").to_pylist()[1:] == [UNKNOWN] * 3
    assert image_table.column("image_id").to_pylist() == ["a", "c", "z"]
    assert image_table.column("cluster").to_pylist()[1:] == [UNKNOWN, UNKNOWN]
