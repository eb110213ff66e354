import pytest

from ncd.config import load_config
from ncd.data.io import read_table
from ncd.pipeline import discover

pytestmark = pytest.mark.ray


def test_discover_on_local_ray(demo_root, ray_local, tmp_path):
    from ray_jobs.discover import ray_stages

    cfg = load_config("ncd/configs/demo_smoke.yaml", [f"data.root={demo_root}", f"output={tmp_path}",
                                                      f"preprocess.output={tmp_path}", "train.epochs=1",
                                                      "data.categories=plate"])
    summary = discover(cfg, ray_stages(num_workers=1, cpus_per_worker=0.5))
    images = read_table(str(tmp_path / "image_predictions.parquet"))
    assert images.num_rows + summary["images_without_regions"] == summary["images"] and images.num_rows > 0
    assert summary["images_without_regions"] > 0  # plate has images with empty MEBin masks: counted
    assert (tmp_path / "report.md").exists() and (tmp_path / "model.pt").exists()
    assert 0.0 <= summary["metrics"]["image"]["mean"]["nmi"] <= 1.0
