import pytest
import torch

from ncd.config import ConfigError, apply_overrides, load_config
from ncd.data.catalog import build_manifest
from ncd.data.region_table import write_regions
from ncd.preprocess.regions import preprocess_manifest

pytestmark = pytest.mark.ray


def _plate_regions(demo_root, tmp_path, *settings: str):
    """The smoke config on the demo's plate category (``settings`` on top) and its region table's URI."""
    cfg = load_config("ncd/configs/demo_smoke.yaml", [f"data.root={demo_root}", "data.categories=plate",
                                                      f"output={tmp_path}", *settings])
    regions = write_regions(preprocess_manifest(build_manifest(cfg.data), cfg.mebin, cfg.crop, cfg.data),
                            str(tmp_path / "pp"))
    return cfg, regions


def test_ray_train_two_workers_checkpoints_and_never_continues_a_stale_run(demo_root, ray_local, tmp_path):
    from ray_jobs.train import result_state, run_train

    cfg, regions = _plate_regions(demo_root, tmp_path, "train.epochs=2", "train.checkpoint_every=1",
                                  "train.batch_size=8")
    first = run_train(cfg, regions, num_workers=2, cpus_per_worker=0.5, name="resume")
    assert first.error is None
    assert first.metrics["epoch"] == 1 and first.metrics["steps"] > 0
    saved = result_state(first)
    assert saved["epoch"] == 1 and saved["optimizer"]["state"]
    assert saved["class_map"]["num_novel"] == 6 and saved["fingerprint"]["settings"]["train.epochs"] == 2

    longer = load_config("ncd/configs/demo_smoke.yaml", [f"data.root={demo_root}", "data.categories=plate",
                                                         f"output={tmp_path}", "train.epochs=3",
                                                         "train.checkpoint_every=1", "train.batch_size=8"])
    with pytest.raises(ConfigError, match=r"checkpoint .*/resume/checkpoint_.*train\.epochs \(2 -> 3\)") as err:
        run_train(apply_overrides(longer, ["train.on_stale_checkpoint=error"]), regions, num_workers=2,
                  cpus_per_worker=0.5, name="resume", max_failures=0)
    assert "\n" not in str(err.value)

    second = run_train(longer, regions, num_workers=2, cpus_per_worker=0.5, name="resume")
    final = result_state(second)
    assert [h["epoch"] for h in final["history"]] == [0, 1, 2]
    # trained afresh on the 3-epoch schedule, not the 2-epoch run continued
    assert final["history"][1]["lr"] != saved["history"][1]["lr"]

    # the run's model file is finished as discover's: refined prototypes, a familiarity bank
    from ncd.data.region_table import read_regions
    from ncd.infer.predict import load_model
    from ray_jobs.train import checkpoint_uri, save_finished_model

    out = save_finished_model(longer, second.checkpoint, regions)
    model, raw = load_model(out), load_model(f"{checkpoint_uri(second.checkpoint)}/checkpoint.pt")
    assert out == str(tmp_path / "model.pt")
    table = read_regions(regions)
    assert model.bank.shape == (table.num_rows, model.model.feature_dim)
    assert sorted(model.bank_images) == sorted(table.column("image_id").to_pylist())
    assert raw.bank is None
    novel = slice(model.model.heads.num_base, None)
    refined_protos, raw_protos = (m.model.heads.weight[m.head, novel] for m in (model, raw))
    assert not torch.allclose(refined_protos, raw_protos)
    for name, tensor in raw.model.state_dict().items():
        if not name.startswith("heads."):  # the backbone is the checkpoint's
            assert torch.equal(tensor, model.model.state_dict()[name]), name


def test_ray_train_stage_trains_on_the_table_it_is_handed(demo_root, ray_local, tmp_path):
    """A filtered table (one category, one type held out, as the open-set protocol passes)
    must reach the workers, although the full table sits in <preprocess.output>/regions."""
    import pyarrow.compute as pc

    from ray_jobs.discover import ray_stages
    from ray_jobs.train import run_train

    cfg = load_config("ncd/configs/demo_smoke.yaml", [f"data.root={demo_root}", f"output={tmp_path}",
                                                      f"preprocess.output={tmp_path / 'pp'}", "train.epochs=1",
                                                      "train.checkpoint_every=0", "train.num_novel=2"])
    table = preprocess_manifest(build_manifest(cfg.data), cfg.mebin, cfg.crop, cfg.data)
    write_regions(table, str(tmp_path / "pp" / "regions"))
    plate = table.filter(pc.equal(table.column("category"), "plate"))
    held_out = sorted(set(plate.column("gt_type").to_pylist()))[0]
    seen = plate.filter(pc.not_equal(plate.column("gt_type"), held_out))
    assert 0 < seen.num_rows < plate.num_rows < table.num_rows

    result = run_train(cfg, seen, num_workers=1, cpus_per_worker=1, name="handed")
    assert result.error is None and result.metrics["novel_regions"] == seen.num_rows
    trained = ray_stages(1, cpus_per_worker=1).train(cfg, seen, None)
    assert trained.class_map["categories"] == ["plate"]
    assert trained.class_map["num_base"] == 0  # no base table handed: none used


def test_ray_train_resolves_k_once_on_the_driver(demo_root, ray_local, tmp_path):
    """auto / gt never reach the workers: the driver estimates K (or takes the oracle count
    when asked) and every worker trains with that number."""
    from ray_jobs.train import build_trainer

    cfg = load_config("ncd/configs/demo_smoke.yaml", [f"data.root={demo_root}", "data.categories=plate",
                                                      f"output={tmp_path}", "infer.k_max=4"])
    regions = write_regions(preprocess_manifest(build_manifest(cfg.data), cfg.mebin, cfg.crop, cfg.data),
                            str(tmp_path / "pp"))
    ks = {}
    for k in ("gt", "auto"):
        trainer = build_trainer(cfg.__class__(**{**cfg.__dict__, "train": cfg.train.__class__(
            **{**cfg.train.__dict__, "num_novel": k})}), regions, 1, False)
        ks[k] = trainer.train_loop_config["cfg"]["train"]["num_novel"]
    assert ks["gt"] == 6 and ks["auto"] in (2, 3, 4)


def test_ray_train_runs_the_frozen_method_without_a_step(demo_root, ray_local, tmp_path):
    """method=frozen under Ray Train: every worker reports once (epoch 0, no step), rank 0's
    checkpoint holds the k-means prototypes, and the finished model file labels the regions."""
    import numpy as np

    from ncd.infer.predict import load_model
    from ray_jobs.train import result_state, run_train, save_finished_model

    cfg, regions = _plate_regions(demo_root, tmp_path, "method=frozen", "model.frozen_vit_size=32",
                                  "train.num_novel=3")
    result = run_train(cfg, regions, num_workers=2, cpus_per_worker=0.5, name="frozen")
    assert result.error is None
    assert result.metrics["epoch"] == 0 and result.metrics["steps"] == 0
    state = result_state(result)
    assert "optimizer" not in state and state["history"][0]["steps"] == 0
    model = load_model(save_finished_model(cfg, result.checkpoint, regions))
    assert model.bank is not None and model.model.feature_dim == 192 + 1280
    novel = model.model.heads.weight[model.head, model.model.heads.num_base:]
    assert novel.shape[0] == 3 and bool(np.isfinite(novel.detach().numpy()).all())
