import json

import numpy as np
from sklearn.metrics import normalized_mutual_info_score

from ncd.config import load_config
from ncd.io import read_table
from ncd.pipeline import discover


def test_discover_single_process(demo_root, tmp_path):
    cfg = load_config("ncd/configs/demo_smoke.yaml", [f"data.root={demo_root}", f"output={tmp_path}",
                                                      f"preprocess.output={tmp_path}", "train.epochs=2"])
    summary = discover(cfg)
    for name in ("manifest.parquet", "regions", "image_predictions.parquet", "image_predictions.csv",
                 "region_predictions.parquet", "report.md", "metrics.json", "summary.json"):
        assert (tmp_path / name).exists(), name
    images = read_table(str(tmp_path / "image_predictions.parquet"))
    assert images.num_rows == summary["images"]
    truth, pred = images.column("gt_type").to_pylist(), images.column("cluster").to_pylist()
    rng = np.random.default_rng(0)
    chance = np.mean([normalized_mutual_info_score(truth, rng.permutation(pred)) for _ in range(20)])
    nmi = summary["metrics"]["image"]["mean"]["nmi"]
    assert nmi > chance + 0.05, (nmi, chance)
    per_category = json.loads((tmp_path / "summary.json").read_text())["k"]["per_category"]
    assert {c: i["k"] for c, i in per_category.items()} == {"fabric": 6, "plate": 6}  # one model per category
    assert (tmp_path / "models" / "plate.pt").exists() and (tmp_path / "models" / "fabric.pt").exists()


def test_local_preprocess_matches_in_memory_and_skips_complete_categories(demo_root, tmp_path):
    from ncd.catalog import build_manifest
    from ncd.pipeline import local_preprocess
    from ncd.preprocess import preprocess_manifest
    from ncd.region_table import canonical_order

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
