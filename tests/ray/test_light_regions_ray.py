"""Ray stages on light region tables: the crops go from storage to the workers, never
through the driver, and every result equals the in-process one on the full rows."""
import numpy as np
import pyarrow.compute as pc
import pytest

from ncd.config import apply_overrides, load_config
from ncd.data.catalog import build_manifest
from ncd.data.region_refs import full_rows, is_light, light_regions
from ncd.data.region_table import write_regions
from ncd.infer.outputs import region_outputs
from ncd.infer.predict import TrainedModel
from ncd.methods import build_model
from ncd.pipeline import choose_k
from ncd.preprocess.regions import preprocess_manifest

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def stored(demo_root, tmp_path_factory):
    cfg = load_config("ncd/configs/demo_smoke.yaml", [f"data.root={demo_root}"])
    table = preprocess_manifest(build_manifest(cfg.data), cfg.mebin, cfg.crop, cfg.data)
    return cfg, write_regions(table, str(tmp_path_factory.mktemp("light")))


def _subset(uri: str):
    light = light_regions(uri)
    plate = light.filter(pc.equal(light.column("category"), "plate"))
    return plate.take(np.random.default_rng(0).permutation(plate.num_rows))  # not the stored order


def test_inference_of_a_light_subset_equals_in_process_on_its_full_rows(stored, ray_local):
    from ray_jobs.infer import run_inference

    cfg, uri = stored
    part = _subset(uri)
    model = build_model(cfg, 0, 3).eval()
    trained = TrainedModel(model, cfg, {"num_base": 0, "num_novel": 3}, 0)
    got = run_inference(trained, part, batch_size=8)
    want = region_outputs(model, cfg, full_rows(part), "cpu")  # the in-process path
    np.testing.assert_allclose(got.feat, want.feat, rtol=0, atol=1e-5)
    for g, w in zip(got.logits, want.logits):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)


def test_workers_receive_exactly_the_handed_rows(stored, ray_local):
    import ray

    from ray_jobs.train import hand_over, take_over

    cfg, uri = stored
    part = _subset(uri)
    handed = hand_over(part)
    assert isinstance(handed, dict) and handed["uri"] == uri  # ids and a URI, no crops
    rows = ray.get(ray.remote(lambda h: take_over(h, cfg)).remote(handed))
    assert rows.equals(full_rows(part))


def test_k_estimated_on_a_light_table_by_ray_inference_equals_in_process(stored, ray_local):
    from ray_jobs.infer import ray_inference

    cfg, uri = stored
    cfg = apply_overrides(cfg, ["train.num_novel=auto", "infer.k_max=4"])
    part = _subset(uri)
    assert is_light(part)
    _, on_ray = choose_k(cfg, part, infer=ray_inference)
    _, local = choose_k(cfg, full_rows(part))
    assert on_ray["k"] == local["k"]
    assert on_ray["scores"].keys() == local["scores"].keys()
    np.testing.assert_allclose(list(on_ray["scores"].values()), list(local["scores"].values()), atol=1e-4)
    with pytest.raises(ValueError, match="need an inference stage"):
        choose_k(cfg, part)
