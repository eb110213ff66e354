import json

import numpy as np
from sklearn.metrics import normalized_mutual_info_score

from ncd.config import load_config
from ncd.data.io import read_table
from ncd.pipeline import discover


def test_discover_single_process(demo_root, tmp_path):
    cfg = load_config("ncd/configs/demo_smoke.yaml", [f"data.root={demo_root}", f"output={tmp_path}",
                                                      f"preprocess.output={tmp_path}", "train.epochs=2"])
    summary = discover(cfg)
    for name in ("manifest.parquet", "regions", "image_predictions.parquet", "image_predictions.csv",
                 "region_predictions.parquet", "report.md", "metrics.json", "summary.json"):
        assert (tmp_path / name).exists(), name
    images = read_table(str(tmp_path / "image_predictions.parquet"))
    # images with an empty MEBin mask have no region: dropped, and counted
    assert summary["images_without_regions"] > 0
    assert images.num_rows + summary["images_without_regions"] == summary["images"]
    assert min(read_table(str(tmp_path / "regions")).column("area").to_pylist()) > 0
    # the demo's fabric/good/good_002 map peaks far below the others: flagged as setting the MEBin range
    assert summary["mebin_outliers"]["fabric"]["outliers"][0][0] == "fabric/good/good_002"
    report = (tmp_path / "report.md").read_text()
    assert "## Input checks" in report and "fabric/good/good_002 (peak 29)" in report
    assert f"{summary['images_without_regions']} of {summary['images']} images have an empty MEBin mask" in report
    truth, pred = images.column("gt_type").to_pylist(), images.column("cluster").to_pylist()
    rng = np.random.default_rng(0)
    chance = np.mean([normalized_mutual_info_score(truth, rng.permutation(pred)) for _ in range(20)])
    nmi = summary["metrics"]["image"]["mean"]["nmi"]
    assert nmi > chance + 0.05, (nmi, chance)
    per_category = json.loads((tmp_path / "summary.json").read_text())["k"]["per_category"]
    assert {c: i["k"] for c, i in per_category.items()} == {"fabric": 6, "plate": 6}  # one model per category
    assert (tmp_path / "models" / "plate.pt").exists() and (tmp_path / "models" / "fabric.pt").exists()
    # the clusters were refined after training, and the saved model predicts with the refined prototypes
    assert set(summary["refine"]) == {"fabric", "plate"} and summary["image_metrics_before_refine"]["mean"]["nmi"] >= 0
    from ncd.infer.predict import load_model, region_probabilities
    from ncd.pipeline import local_infer

    regions = read_table(str(tmp_path / "regions"))
    plate = regions.filter(np.asarray(regions.column("category").to_pylist()) == "plate")
    trained = load_model(str(tmp_path / "models" / "plate.pt"))
    again = region_probabilities(trained, local_infer(trained, plate).logits).argmax(1)
    written = read_table(str(tmp_path / "region_predictions.parquet"))
    ids = plate.column("region_id").to_pylist()
    by_id = dict(zip(written.column("region_id").to_pylist(), written.column("cluster").to_pylist()))
    assert again.tolist() == [by_id[i] for i in ids]
    # the model file keeps its training regions' features: every image gets a familiarity in [-1, 1]
    assert trained.bank is not None and len(trained.bank_images) == plate.num_rows
    familiarity = images.column("familiarity").to_numpy()
    assert np.isfinite(familiarity).all() and (familiarity <= 1.0001).all() and (familiarity >= -1.0001).all()


def test_local_preprocess_matches_in_memory_and_skips_complete_categories(demo_root, tmp_path):
    from ncd.data.catalog import build_manifest
    from ncd.data.region_table import canonical_order
    from ncd.pipeline import local_preprocess
    from ncd.preprocess.regions import preprocess_manifest

    def cfg_with(*sets):
        return load_config("ncd/configs/demo_smoke.yaml", [f"data.root={demo_root}", f"preprocess.output={tmp_path}",
                                                           *sets])

    cfg = cfg_with()
    manifest = build_manifest(cfg.data)
    first = local_preprocess(cfg, manifest)
    expected = preprocess_manifest(manifest, cfg.mebin, cfg.crop, cfg.data)
    assert first.equals(canonical_order(expected))
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "regions").rglob("part-*.parquet")}
    assert len(stamps) == len(set(manifest.column("category").to_pylist()))
    assert local_preprocess(cfg, manifest).equals(first)  # nothing changed: every category skipped
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "regions").rglob("part-*.parquet")} == stamps
    padded = local_preprocess(cfg_with("crop.padding=0.3"), manifest)  # a setting changed: recomputed
    assert padded.column("crop_png") != first.column("crop_png")
    assert padded.equals(canonical_order(preprocess_manifest(manifest, cfg.mebin, cfg_with("crop.padding=0.3").crop,
                                                             cfg.data)))


def test_k_is_never_taken_from_labels_unless_asked(demo_root):
    """gt is the oracle and says so; auto estimates with infer.k_criterion (the eigengap by
    default) in both modes and names it; bad values are errors."""
    import pyarrow as pa
    import pytest

    from ncd.config import ConfigError, apply_overrides
    from ncd.data.catalog import build_manifest
    from ncd.evaluate.k_estimation import estimate_k
    from ncd.pipeline import choose_k, frozen_features, k_label, summary_text
    from ncd.preprocess.regions import preprocess_manifest
    from ncd.validation import validate

    cfg = load_config("ncd/configs/demo_smoke.yaml", [f"data.root={demo_root}", "data.categories=plate",
                                                      "infer.k_max=5"])
    regions = preprocess_manifest(build_manifest(cfg.data), cfg.mebin, cfg.crop, cfg.data, proto=cfg.proto)
    assert choose_k(cfg, regions)[1]["source"] == "given"
    oracle, info = choose_k(apply_overrides(cfg, ["train.num_novel=gt"]), regions)
    assert oracle.train.num_novel == 6 and info["source"] == "oracle"
    shown = summary_text({"images": 1, "regions": 1, "k": {**info, "k_true": 6}, "metrics": None,
                          "seconds": {"total": 1.0}, "output": "o"})
    assert "K = 6 (ORACLE" in shown and "ORACLE" in k_label(info)
    unlabelled = regions.set_column(regions.schema.get_field_index("gt_type"), "gt_type",
                                    pa.array([""] * regions.num_rows))
    with pytest.raises(ConfigError, match="no gt types"):
        choose_k(apply_overrides(cfg, ["train.num_novel=gt"]), unlabelled)
    for method in ("anomalyncd", "protoanomalyncd"):  # one criterion and one K range (infer.*) in both modes
        auto = apply_overrides(cfg, ["train.num_novel=auto", f"method={method}"])
        resolved, info = choose_k(auto, unlabelled)  # no labels needed
        assert info["source"] == "estimated" and info["criterion"].startswith("eigengap"), info
        assert resolved.train.num_novel == info["k"] == info["k_estimated"] and set(info["scores"]) == {2, 3, 4, 5}
    est = estimate_k(frozen_features(auto, regions), 2, 5, auto.train.seed, criterion="eigengap")
    assert info["k"] == est.k and info["scores"] == est.scores
    chosen = choose_k(apply_overrides(auto, ["infer.k_criterion=silhouette"]), unlabelled)[1]
    assert chosen["criterion"].startswith("silhouette")
    with pytest.raises(ConfigError, match="infer.k_criterion"):
        validate(apply_overrides(auto, ["infer.k_criterion=elbow"]))  # every entry point, before any stage


def test_invalid_config_fails_before_any_stage(demo_root, tmp_path):
    import pytest

    from ncd.config import ConfigError

    cfg = load_config("ncd/configs/demo_smoke.yaml", [f"data.root={demo_root}", f"output={tmp_path}/out",
                                                      "train.epochs=0", "train.num_novel=-1", "method=proto"])
    with pytest.raises(ConfigError, match=r"train\.epochs=0.*train\.num_novel=-1") as err:
        discover(cfg)
    assert "method='proto'" in str(err.value)
    assert not (tmp_path / "out").exists(), "nothing may run (or be written) before the config is valid"


def test_discover_runs_the_detector_when_no_maps_are_given(demo_root, tmp_path):
    """A generic layout without ``maps/`` and no ``data.maps``: discover makes its own maps."""
    data = tmp_path / "data"
    data.mkdir()
    for sub in ("images", "masks"):
        (data / sub).symlink_to(demo_root / sub)
    out = tmp_path / "out"
    cfg = load_config("ncd/configs/demo_smoke.yaml", [f"data.root={data}", f"output={out}", f"preprocess.output={out}",
                                                      "data.categories=plate", "train.epochs=1",
                                                      "detect.backbone=vit_tiny_patch16_224", "detect.weights=random",
                                                      "detect.image_size=32", "detect.blocks=1,3", "detect.radii=1"])
    summary = discover(cfg)
    assert summary["config"]["data"]["maps"] == str(out / "maps")
    maps = sorted((out / "maps" / "plate").rglob("*.png"))
    assert len(maps) == summary["images"] > 0 and (out / "maps" / "image_scores.parquet").is_file()
    assert not (out / "maps" / "fabric").exists()  # only the selected category


def test_discover_keeps_hostile_category_names_inside_the_output_and_writes_no_secret(
        demo_root, tmp_path, capsys, caplog, secret_scan):
    """Categories named ``../escaped`` and ``a/b`` (from a manifest) get percent-encoded
    folders and model files inside the output; S3 keys given in the config appear in no
    output file (summary, model files, checkpoints, report) and in no log line."""
    import logging

    import pyarrow as pa
    import urllib.parse

    from ncd.data.catalog import build_manifest

    out = tmp_path / "out"
    cfg = load_config("ncd/configs/demo_smoke.yaml", [
        f"data.root={demo_root}", f"output={out}", f"preprocess.output={out}", "train.epochs=1",
        "s3.access_key=AKIASENTINEL", f"s3.secret_key={secret_scan.secret}"])
    manifest = build_manifest(cfg.data)
    renamed = {"fabric": "../escaped", "plate": "a/b"}
    manifest = manifest.set_column(manifest.schema.get_field_index("category"), "category",
                                   pa.array([renamed[c] for c in manifest.column("category").to_pylist()]))
    caplog.set_level(logging.INFO)
    summary = discover(cfg, manifest=manifest, progress=print)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing escaped the output folder
    models = sorted(p.name for p in (out / "models").glob("*.pt"))
    assert models == ["%2E.%2Fescaped.pt", "a%2Fb.pt"]
    assert sorted(summary["models"]) == ["../escaped", "a/b"]
    assert {urllib.parse.unquote(m[:-3]) for m in models} == {"../escaped", "a/b"}
    assert sorted(p.name for p in (out / "regions").iterdir() if not p.name.startswith("_")) == [
        "%2E.%2Fescaped", "a%2Fb"]
    md = (out / "report.md").read_text()
    assert "plots/%252E.%252Fescaped/" in md  # the link names the literal folder
    assert (out / "plots" / "%2E.%2Fescaped").is_dir()
    # no secret anywhere: every file (model files and checkpoints loaded and walked), the logs
    files = secret_scan.files(tmp_path)
    assert any(name.endswith(".pt") for name in files)
    assert secret_scan.hits(files) == []
    assert json.loads((out / "summary.json").read_text())["config"]["s3"]["secret_key"] == ""
    captured = capsys.readouterr()
    assert secret_scan.secret not in captured.out + captured.err + caplog.text
    assert "AKIASENTINEL" not in captured.out + captured.err + caplog.text


def test_closing_line_names_the_model_files_written():
    from ncd.pipeline import model_path, summary_text

    base = {"images": 4, "regions": 5, "metrics": None, "seconds": {"total": 1.0}, "output": "/o"}
    one = {**base, "k": {"k": 3, "k_estimated": None}, "models": {"plate": model_path(1, "plate")}}
    assert summary_text(one).splitlines()[-1] == "  output: /o (report.md, predictions, model.pt)"
    infos = {"a/b": {"k": 3, "k_estimated": None}, "c": {"k": 2, "k_estimated": None}}
    many = {**base, "k": {"per_category": infos}, "models": {c: model_path(2, c) for c in infos}}
    assert model_path(2, "a/b") == "models/a%2Fb.pt"
    last = summary_text(many).splitlines()[-1]
    assert "model.pt" not in last and "models/<category>.pt for 2 categories" in last


def test_a_collapsed_model_fails_loudly_after_writing_its_outputs(demo_root, tmp_path):
    import pytest

    from ncd.evaluate.health import CollapseError

    # collapse_share=0.01: any partition counts as collapsed, so the check must fire after every output is written
    over = [f"data.root={demo_root}", f"output={tmp_path}", f"preprocess.output={tmp_path}", "train.epochs=1",
            "data.categories=plate", "train.num_novel=2", "infer.collapse_share=0.01"]
    with pytest.raises(CollapseError, match="plate: training collapsed"):
        discover(load_config("ncd/configs/demo_smoke.yaml", over))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["collapsed"] == ["plate"] and summary["health"]["plate"]["collapsed"]
    assert (tmp_path / "image_predictions.parquet").exists()
    warned = discover(load_config("ncd/configs/demo_smoke.yaml", over + ["infer.on_collapse=warn"]))
    assert warned["collapsed"] == ["plate"]


def test_rerun_after_one_map_changed_trains_afresh_not_the_old_model(tmp_path, caplog):
    """Issue 16.1: the regions are recomputed from the changed map, so the finished model
    of the earlier run must not be returned (it was trained on other regions)."""
    import cv2

    from ncd.data.catalog import build_manifest
    from ncd.data.synthetic import SyntheticSpec, write_dataset
    from ncd.pipeline import local_preprocess, local_train

    root = write_dataset(tmp_path / "data", SyntheticSpec(categories=("plate",), images_per_family=2,
                                                          normal_images=2, image_size=64, seed=3))
    cfg = load_config("ncd/configs/demo_smoke.yaml", [f"data.root={root}", f"output={tmp_path / 'out'}",
                                                      f"preprocess.output={tmp_path / 'pp'}", "train.epochs=1",
                                                      "train.checkpoint_every=1"])
    first = local_preprocess(cfg, build_manifest(cfg.data))
    local_train(cfg, first, None)
    maps = tmp_path / "data" / "maps" / "plate"
    changed_map = np.fliplr(cv2.imread(str(maps / "hole" / "hole_000.png"), cv2.IMREAD_UNCHANGED))
    cv2.imwrite(str(maps / "hole" / "hole_000.png"), np.ascontiguousarray(changed_map))  # a new detector run
    second = local_preprocess(cfg, build_manifest(cfg.data))

    def boxes(table):
        return sorted(zip(table.column("region_id").to_pylist(), table.column("box").to_pylist()))

    assert boxes(second) != boxes(first), "the changed map did not change the regions"
    caplog.clear()
    local_train(cfg, second, None)
    checkpoints = tmp_path / "out" / "checkpoints"
    assert f"not resuming checkpoint {checkpoints}/epoch_0000/checkpoint.pt" in caplog.text
    assert "training regions" in caplog.text
    assert (checkpoints / "_stale" / "epoch_0000" / "checkpoint.pt").is_file()
