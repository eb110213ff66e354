import math

import pyarrow as pa
import pytest
import torch

from ncd.config import load_config
from ncd.data.catalog import build_manifest
from ncd.evaluate.selection import cluster_score, score_sample
from ncd.infer.predict import TrainedModel
from ncd.methods import build_model, make_objective
from ncd.preprocess.regions import preprocess_manifest

SEARCHED = ["loss.memax_weight=8.0", "loss.sup_weight=0.1", "loss.teacher_temp=0.2", "train.lr=0.5",
            "train.seed=7"]


@pytest.fixture(scope="module")
def plate(demo_root):
    cfg = load_config("ncd/configs/demo_smoke.yaml", [f"data.root={demo_root}", "data.categories=plate"])
    return cfg, preprocess_manifest(build_manifest(cfg.data), cfg.mebin, cfg.crop, cfg.data)


@pytest.mark.parametrize("method,change", [("anomalyncd", c) for c in SEARCHED]
                         + [("protoanomalyncd", c) for c in ("loss.memax_weight=8.0", "proto.kappa=20.0")])
def test_selection_score_of_a_fixed_model_ignores_the_searched_loss_settings(plate, method, change):
    cfg, regions = plate
    cfg = load_config("ncd/configs/demo_smoke.yaml", [f"data.root={cfg.data.root}", f"method={method}"])
    torch.manual_seed(0)
    model = build_model(cfg, 0, 3).eval()
    changed = load_config("ncd/configs/demo_smoke.yaml", [f"data.root={cfg.data.root}", f"method={method}", change])
    scores = [cluster_score(TrainedModel(model, c, {"num_base": 0}, 1), regions) for c in (cfg, changed)]
    assert -1.0 < scores[0] <= 1.0 and scores[0] == scores[1]  # > -1: the model makes several clusters

    if change.startswith("loss.memax_weight") and method == "anomalyncd":  # what Tune selected on before: it moves with the weight
        images, masks = torch.rand(8, 3, 32, 32), torch.ones(8, 1, 32, 32)
        batch = {"label": torch.full((4,), -1), "score": torch.ones(4)}
        with torch.no_grad():
            out = model(images, masks)
            losses = [make_objective(c, 0)(out, batch, 0, False)["cluster_per_head"][1] for c in (cfg, changed)]
        assert not math.isclose(float(losses[0]), float(losses[1]))


def test_score_sample_is_fixed_and_bounded():
    table = pa.table({"region_id": [str(i) for i in range(50)]})
    a, b = score_sample(table, 10), score_sample(table, 10)
    assert a.num_rows == 10 and a.column("region_id").to_pylist() == b.column("region_id").to_pylist()
    assert score_sample(table, 100).num_rows == 50
