import numpy as np
import pyarrow as pa
import pytest

from ncd.config import load_config
from ncd.data import io
from ncd.data.catalog import build_manifest
from ncd.data.region_table import read_regions
from ncd.infer.outputs import region_outputs
from ncd.infer.predict import TrainedModel
from ncd.methods import build_model
from ncd.preprocess.regions import preprocess_manifest

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def trained_and_regions(demo_root):
    cfg = load_config("ncd/configs/demo_smoke.yaml", [f"data.root={demo_root}", "data.categories=plate"])
    model = build_model(cfg, 2, 3).eval()
    regions = preprocess_manifest(build_manifest(cfg.data), cfg.mebin, cfg.crop, cfg.data)
    return TrainedModel(model, cfg, {"num_base": 2, "num_novel": 3}, 0), regions


def _expected(trained: TrainedModel, table: pa.Table):
    return region_outputs(trained.model, trained.cfg, table, "cpu")  # the in-process path


def _assert_same(got, want) -> None:
    assert got.feat.shape == want.feat.shape and len(got.logits) == len(want.logits) == 2
    np.testing.assert_allclose(got.feat, want.feat, rtol=0, atol=1e-5)
    for g, w in zip(got.logits, want.logits):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)


def test_streaming_inference_equals_in_process(trained_and_regions, ray_local, tmp_path):
    from ray_jobs.infer import METADATA_COLUMNS, region_metadata, run_inference

    trained, regions = trained_and_regions
    assert regions.num_rows >= 12
    # shards out of canonical order in folders, one with a single row: outputs come back in
    # canonical order; ``_``-prefixed entries (staging, records) are not part of the table
    shuffled = regions.take(np.random.default_rng(0).permutation(regions.num_rows))
    cuts = [0, 1, regions.num_rows // 2, regions.num_rows]
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        io.write_table(shuffled.slice(a, b - a), str(tmp_path / "regions" / f"dir{i % 2}" / f"part-{i}.parquet"))
    io.write_table(shuffled.slice(0, 3), str(tmp_path / "regions" / "_staging-x" / "part-0.parquet"))
    (tmp_path / "regions" / "dir0" / "_complete.json").write_text("{}")
    uri = str(tmp_path / "regions")
    got = run_inference(trained, uri, num_actors=2, batch_size=5)
    canonical = read_regions(uri)
    _assert_same(got, _expected(trained, canonical))
    assert region_metadata(uri).equals(canonical.select(list(METADATA_COLUMNS)))  # what the CLI labels
    # an in-memory table keeps its own row order
    _assert_same(run_inference(trained, shuffled, num_actors=1, batch_size=7), _expected(trained, shuffled))


def test_streaming_inference_names_missing_columns(trained_and_regions, tmp_path):
    from ray_jobs.infer import run_inference

    trained, regions = trained_and_regions
    io.write_table(regions.drop_columns(["mask_png"]), str(tmp_path / "bad" / "part-0.parquet"))
    with pytest.raises(io.DataError, match="mask_png"):
        run_inference(trained, str(tmp_path / "bad"))


@pytest.mark.s3
def test_streaming_inference_from_s3(trained_and_regions, ray_local, s3_config, s3_prefix):
    from ray_jobs.infer import run_inference

    trained, regions = trained_and_regions
    io.write_table(regions, io.join(s3_prefix, "regions", "part-0.parquet"), s3_config)
    got = run_inference(trained, io.join(s3_prefix, "regions"), s3=s3_config)  # the workers read the bucket
    _assert_same(got, _expected(trained, regions))


def test_inference_cli_warns_on_a_category_the_model_never_saw(demo_root, ray_local, tmp_path):
    from ncd.data.region_table import write_regions
    from ncd.infer.predict import UnseenCategoryWarning, save_model
    from ray_jobs.infer import main

    cfg = load_config("ncd/configs/demo_smoke.yaml", [f"data.root={demo_root}"])
    regions = preprocess_manifest(build_manifest(cfg.data), cfg.mebin, cfg.crop, cfg.data)
    uri = write_regions(regions, str(tmp_path / "pp"))
    trained = TrainedModel(build_model(cfg, 0, 3).eval(), cfg, {"num_base": 0, "num_novel": 3, "base_classes": [],
                                                                 "categories": ["plate"]}, 0)
    save_model(trained, str(tmp_path / "model.pt"))
    with pytest.warns(UnseenCategoryWarning, match="never saw fabric"):
        main(["--model", str(tmp_path / "model.pt"), "--regions", uri, "--out", str(tmp_path / "pred")])
    assert io.read_table(str(tmp_path / "pred" / "region_predictions.parquet")).num_rows == regions.num_rows
