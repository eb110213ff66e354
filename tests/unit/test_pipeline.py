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
