import pytest
import yaml

from ncd.catalog import build_manifest
from ncd.config import load_config
from ncd.io import read_table
from ncd.preprocess import preprocess_manifest
from ncd.region_table import write_regions

pytestmark = pytest.mark.ray


def test_tune_grid_over_k(demo_root, ray_local, tmp_path):
    from ray_jobs.tune import run_tune

    cfg = load_config("ncd/configs/demo_smoke.yaml", [
        f"data.root={demo_root}", "data.categories=plate", f"output={tmp_path}", "train.epochs=2",
        "train.checkpoint_every=0", "tune.k_values=3,6", "tune.metric=k_score", "tune.num_samples=2",
        "tune.cpus_per_trial=1", "train.base_table=synthetic"])
    regions = write_regions(preprocess_manifest(build_manifest(cfg.data), cfg.mebin, cfg.crop, cfg.data),
                            str(tmp_path / "pp"))
    summary = run_tune(cfg, regions)
    assert summary["num_trials"] == 2
    assert set(summary["scores_by_k"]) == {3, 6}
    trials = read_table(str(tmp_path / "tune" / "trials.csv"))
    assert trials.num_rows == 2 and "k_score" in trials.column_names and "nmi" in trials.column_names
    best = yaml.safe_load((tmp_path / "tune" / "best_config.yaml").read_text())
    assert best["train"]["num_novel"] == summary["best_params"]["train.num_novel"] in (3, 6)
    # the synthetic labelled base set is built once by the driver and read by every trial
    assert best["train"]["base_table"] == str(tmp_path / "base" / "regions")
    assert read_table(str(tmp_path / "base" / "regions")).num_rows > 0
    k_best = max(summary["scores_by_k"], key=summary["scores_by_k"].get)
    assert best["train"]["num_novel"] == k_best
