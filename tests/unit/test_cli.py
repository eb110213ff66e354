import json

import pyarrow as pa

from ncd.data.io import read_table, write_table
from ray_jobs.cli import main


def test_catalog_preprocess_evaluate(demo_root, tmp_path, capsys):
    common = ["--set", f"data.root={demo_root}", "--set", f"output={tmp_path}", "--set", f"preprocess.output={tmp_path}"]
    assert main(["catalog", *common]) == 0
    manifest = read_table(str(tmp_path / "manifest.parquet"))
    assert manifest.num_rows > 0
    assert main(["preprocess", "--local", *common]) == 0
    regions = read_table(str(tmp_path / "regions"))
    assert 0 < regions.num_rows and set(regions.column("image_id").to_pylist()) <= set(manifest.column("image_id").to_pylist())
    assert "[regions " in capsys.readouterr().err  # progress per category
    assert main(["preprocess", "--local", *common]) == 0  # a re-run skips the complete categories
    assert "0 images -> 0 regions" in capsys.readouterr().out and read_table(str(tmp_path / "regions")).equals(regions)
    preds = pa.table({"category": ["c"] * 5, "gt_type": ["a", "a", "b", "b", ""], "cluster": [1, 1, 0, 0, 1]})
    write_table(preds, str(tmp_path / "p.csv"))
    assert main(["evaluate", str(tmp_path / "p.csv"), "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["mean"] == {"nmi": 1.0, "ari": 1.0, "f1": 1.0}
    out = capsys.readouterr().out
    assert "| c | 4 | 1.000 | 1.000 | 1.000 |" in out
    assert "Scored 4 rows; 1 without ground truth not scored" in out  # never dropped silently


def test_errors_are_clear_and_exit_2(tmp_path, capsys):
    assert main(["catalog", "--set", "mebin.sample_rat=3"]) == 2
    err = capsys.readouterr().err
    assert "mebin.sample_rat" in err and "sample_rate" in err
    assert main(["catalog", "--set", f"data.root={tmp_path}/missing"]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["catalog", "--config", "no_such_config"]) == 2
    assert "demo_smoke" in capsys.readouterr().err


def test_demo_data(tmp_path):
    assert main(["demo-data", "--out", str(tmp_path), "--per-family", "1"]) == 0
    assert (tmp_path / "images").is_dir() and (tmp_path / "maps").is_dir() and (tmp_path / "masks").is_dir()


def test_train_refuses_bad_values_before_reading_anything(tmp_path, capsys):
    assert main(["train", "--config", "demo_smoke", "--regions", str(tmp_path / "missing"),
                 "--set", "train.num_novel=-1", "--set", "train.batch_size=0"]) == 2
    err = capsys.readouterr().err
    assert "train.num_novel=-1" in err and "train.batch_size=0" in err and "missing" not in err


def test_faults_are_one_line_errors_with_tracebacks_only_under_verbose(demo_root, tmp_path, capsys):
    bad = tmp_path / "predictions.parquet"
    bad.write_bytes(b"not parquet at all")
    assert main(["evaluate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and "Traceback" not in err
    assert main(["-v", "evaluate", str(bad)]) == 2
    assert "Traceback" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_bytes(b"x")  # the output folder cannot be created
    assert main(["catalog", "--set", f"data.root={demo_root}", "--out", str(blocker / "out" / "m.parquet")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ncd catalog: error:")]
    assert len(errors) == 1 and str(blocker / "out") in errors[0] and "Traceback" not in err


def _options(parser) -> dict[str, set[str]]:
    sub = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    return {name: {s for a in p._actions for s in a.option_strings} for name, p in sub.choices.items()}


def test_the_ncd_command_offers_every_ray_free_command_with_its_flags():
    """``ray_jobs.cli`` (the ``ncd`` entry point) delegates the commands of ``ncd.cli``: same
    names, a superset of their flags (plus where to run: --local, --address...)."""
    from ncd import cli as library
    from ray_jobs.cli import build_parser

    ray_side, ray_free = _options(build_parser()), _options(library.build_parser())
    assert set(ray_free) == {"demo-data", "catalog", "preprocess", "evaluate", "train", "detect", "discover"}
    assert set(ray_side) == set(ray_free) | {"demo"}
    for name, flags in ray_free.items():
        if name != "discover":  # on Ray, discover reads its own arguments (python -m ray_jobs.discover)
            assert flags <= ray_side[name], name
    assert "--local" in ray_side["preprocess"] and "--local" not in ray_free["preprocess"]


def test_train_saves_the_refined_prototypes(demo_root, tmp_path):
    import numpy as np

    from ncd.config import apply_overrides
    from ncd.infer.predict import load_model
    from ncd.pipeline import local_infer
    from ncd.train.refine import refine_trained

    common = ["--config", "demo_smoke", "--set", f"data.root={demo_root}", "--set", f"preprocess.output={tmp_path}",
              "--set", "data.categories=plate", "--set", "train.epochs=1", "--set", "train.num_novel=3"]
    assert main(["preprocess", "--local", *common]) == 0
    assert main(["train", *common, "--set", f"output={tmp_path / 'raw'}", "--set", "refine.enabled=false"]) == 0
    assert main(["train", *common, "--set", f"output={tmp_path / 'refined'}"]) == 0
    raw, refined = load_model(str(tmp_path / "raw" / "model.pt")), load_model(str(tmp_path / "refined" / "model.pt"))
    regions = read_table(str(tmp_path / "regions"))
    # the same training, then the refinement of the head's novel prototypes on the training regions' features
    raw.cfg = apply_overrides(raw.cfg, ["refine.enabled=true"])
    expected = refine_trained(raw, local_infer(raw, regions), raw.cfg.train.seed)[0]
    got = refined.model.heads.prototypes()[refined.head].detach().numpy()
    np.testing.assert_allclose(got, expected.model.heads.prototypes()[expected.head].detach().numpy(), atol=1e-5)
    assert not np.allclose(got, load_model(str(tmp_path / "raw" / "model.pt")).model.heads.prototypes()[raw.head]
                           .detach().numpy(), atol=1e-3)
