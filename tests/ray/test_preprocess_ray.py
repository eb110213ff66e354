import pytest

from ncd.config import ExperimentConfig, apply_overrides
from ncd.data.catalog import build_manifest
from ncd.data.region_table import read_regions
from ncd.preprocess.regions import preprocess_manifest

pytestmark = pytest.mark.ray


def test_ray_preprocess_equals_in_process(demo_root, ray_local, tmp_path):
    from ray_jobs.preprocess import run_preprocess

    cfg = apply_overrides(ExperimentConfig(), [f"data.root={demo_root}", f"preprocess.output={tmp_path}",
                                               "preprocess.batch_size=5"])
    manifest = build_manifest(cfg.data)
    local = preprocess_manifest(manifest, cfg.mebin, cfg.crop, cfg.data)
    uri = run_preprocess(cfg)
    distributed = read_regions(uri)
    assert distributed.num_rows == local.num_rows > manifest.num_rows // 2
    diff = [c for c in local.column_names if not local.column(c).equals(distributed.column(c))]
    assert not diff and distributed.equals(local), f"Ray Data output differs from the in-process path in {diff}"
    # a second run replaces the table whole: no duplicated rows, no staging leftovers
    run_preprocess(cfg)
    assert read_regions(uri).num_rows == local.num_rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["regions"]
