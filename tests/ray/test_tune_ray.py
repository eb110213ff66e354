import pytest
import yaml

from ncd.config import load_config
from ncd.data.catalog import build_manifest
from ncd.data.io import read_table
from ncd.data.region_table import write_regions
from ncd.preprocess.regions import preprocess_manifest

pytestmark = pytest.mark.ray


def test_tune_grid_over_k(demo_root, ray_local, tmp_path, secret_scan):
    from ray_jobs.tune import run_tune

    cfg = load_config("ncd/configs/demo_smoke.yaml", [
        f"data.root={demo_root}", "data.categories=plate", f"output={tmp_path}", "train.epochs=2",
        "train.checkpoint_every=0", "tune.k_values=3,6", "tune.metric=k_score", "tune.num_samples=4",
        "tune.cpus_per_trial=1", "train.base_table=synthetic",
        "s3.access_key=AKIASENTINEL", f"s3.secret_key={secret_scan.secret}"])  # unused (local data): never written
    regions = write_regions(preprocess_manifest(build_manifest(cfg.data), cfg.mebin, cfg.crop, cfg.data),
                            str(tmp_path / "pp"))
    summary = run_tune(cfg, regions)
    assert summary["num_trials"] == 4
    assert set(summary["scores_by_k"]) == {3, 6}
    trials = read_table(str(tmp_path / "tune" / "trials.csv"))
    assert trials.num_rows == 4 and "k_score" in trials.column_names and "nmi" in trials.column_names
    # the two repeats of each K run with their own seeds, and so differ
    rows = trials.to_pylist()
    runs = {(r["config/params/train.num_novel"], r["config/params/train.seed"]) for r in rows}
    assert runs == {(3, cfg.train.seed), (3, cfg.train.seed + 1), (6, cfg.train.seed), (6, cfg.train.seed + 1)}
    for k in (3, 6):
        losses = [r["cluster_loss"] for r in rows if r["config/params/train.num_novel"] == k]
        assert losses[0] != losses[1]
    best = yaml.safe_load((tmp_path / "tune" / "best_config.yaml").read_text())
    assert best["train"]["num_novel"] == summary["best_params"]["train.num_novel"] in (3, 6)
    # the synthetic labelled base set is built once by the driver and read by every trial
    assert best["train"]["base_table"] == str(tmp_path / "base" / "regions")
    assert read_table(str(tmp_path / "base" / "regions")).num_rows > 0
    k_best = max(summary["scores_by_k"], key=summary["scores_by_k"].get)
    assert best["train"]["num_novel"] == k_best
    # no S3 key in Tune's parameter space, trial state, results or the best config
    assert best["s3"]["secret_key"] == best["s3"]["access_key"] == ""
    assert secret_scan.hits(secret_scan.files(tmp_path)) == []


def test_tune_per_category_searches_each_category_on_its_regions(demo_root, ray_local, tmp_path):
    from ray_jobs.tune import run_tune

    cfg = load_config("ncd/configs/demo_smoke.yaml", [
        f"data.root={demo_root}", f"output={tmp_path}", "train.epochs=1", "train.checkpoint_every=0",
        "train.per_category=true", "tune.k_values=[3]", "tune.num_samples=1", "tune.cpus_per_trial=1"])
    table = preprocess_manifest(build_manifest(cfg.data), cfg.mebin, cfg.crop, cfg.data)
    summary = run_tune(cfg, table)
    counts = {c: table.column("category").to_pylist().count(c) for c in set(table.column("category").to_pylist())}
    assert len(counts) == 2 and set(summary["per_category"]) == set(counts) and summary["num_trials"] == 2
    for category, n in counts.items():
        trials = read_table(str(tmp_path / "tune" / category / "trials.csv"))
        assert trials.column("novel_regions").to_pylist() == [n]
        best = yaml.safe_load((tmp_path / "tune" / category / "best_config.yaml").read_text())
        assert best["data"]["categories"] == [category]
