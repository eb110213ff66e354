import math

import numpy as np
import pytest
import torch

from ncd.config import load_config
from ncd.data.catalog import build_manifest
from ncd.data.synthetic import SyntheticSpec, write_base_set, write_dataset
from ncd.preprocess.regions import preprocess_manifest
from ncd.train.engine import LocalContext, train


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine")
    root = write_dataset(d / "novel", SyntheticSpec(categories=("plate",), images_per_family=4, normal_images=4,
                                                    image_size=64, seed=2))
    from ncd.data.synthetic import BASE_SPEC
    import dataclasses

    base_root = write_base_set(d / "base", dataclasses.replace(BASE_SPEC, images_per_family=3, image_size=64))
    cfg = load_config("ncd/configs/demo_smoke.yaml", [f"data.root={root}"])
    novel = preprocess_manifest(build_manifest(cfg.data), cfg.mebin, cfg.crop, cfg.data)
    bcfg = load_config("ncd/configs/demo_smoke.yaml", [f"data.root={base_root}"])
    base = preprocess_manifest(build_manifest(bcfg.data), bcfg.mebin, bcfg.crop, bcfg.data)
    return novel, base


def _cfg(*extra):
    return load_config("ncd/configs/demo_smoke.yaml", ["train.batch_size=16", *extra])


def test_loss_decreases_single_process(tables):
    novel, base = tables
    cfg = _cfg("train.epochs=6", "loss.warmup_teacher_temp_epochs=0", "train.lr=0.01", "train.kmeans_init=false")
    res = train(cfg, novel, base, LocalContext())
    losses = [h["loss"] for h in res.history]
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-2:]) < losses[0]
    # base families whose tiny maps all give empty MEBin masks have no region left
    assert res.class_map["num_base"] == len(set(base.column("gt_type").to_pylist())) >= 2
    assert res.class_map["num_novel"] == 6
    assert res.history[0]["cls"] == res.history[0]["cls"]  # labelled terms present with a base set
    assert 0 <= res.selected_head < cfg.model.n_head


def test_without_base_set_labelled_terms_drop(tables):
    novel, _ = tables
    res = train(_cfg("train.epochs=1"), novel, None, LocalContext())
    h = res.history[0]
    assert math.isnan(h["cls"]) and math.isnan(h["supcon"]) and math.isfinite(h["loss"])
    assert res.class_map["num_base"] == 0


def test_training_is_identical_for_any_number_of_loader_workers(tables):
    """The augmentation seeds travel with the sampled indices, so persistent workers change
    nothing: the same seed gives the same run with 0 or 2 workers."""
    novel, base = tables
    runs = [train(_cfg("train.epochs=2", f"train.loader_workers={w}"), novel, base, LocalContext()) for w in (0, 2)]
    assert [h["loss"] for h in runs[0].history] == [h["loss"] for h in runs[1].history]


def test_resume_reproduces_uninterrupted_run(tables, tmp_path):
    novel, base = tables
    cfg = _cfg("train.epochs=3", "train.checkpoint_every=1")
    full = train(cfg, novel, base, LocalContext(str(tmp_path / "a")))

    class Crash(LocalContext):
        def report(self, metrics, checkpoint):
            super().report(metrics, checkpoint)
            if metrics["epoch"] == 1:
                raise KeyboardInterrupt("simulated crash after epoch 1")

    with pytest.raises(KeyboardInterrupt):
        train(cfg, novel, base, Crash(str(tmp_path / "b")))
    ctx = LocalContext(str(tmp_path / "b"))
    saved = ctx.latest_checkpoint().state
    assert saved["epoch"] == 1 and saved["optimizer"]["state"], "optimiser momentum must be checkpointed"
    resumed = train(cfg, novel, base, ctx)
    assert [h["epoch"] for h in ctx.history] == [2]
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_stale_checkpoint_is_refused_on_request_naming_it_and_what_differs(tables, tmp_path):
    from ncd.config import ConfigError

    novel, base = tables
    root = str(tmp_path / "ckpt")
    train(_cfg("train.epochs=1", "train.checkpoint_every=1"), novel, base, LocalContext(root))
    latest = f"{root}/epoch_0000/checkpoint.pt"
    with pytest.raises(ConfigError, match=rf"checkpoint {latest} .*loss\.memax_weight \(4\.0 -> 2\.0\)"):
        train(_cfg("train.epochs=1", "loss.memax_weight=2", "train.on_stale_checkpoint=error"), novel, base,
              LocalContext(root))
    with pytest.raises(ConfigError, match=r"base set \(present -> none\); base classes"):
        train(_cfg("train.epochs=1", "train.on_stale_checkpoint=error"), novel, None, LocalContext(root))
    with pytest.raises(ConfigError, match=r"train\.epochs \(1 -> 2\)"):  # never silently continues
        train(_cfg("train.epochs=2", "train.on_stale_checkpoint=error"), novel, base, LocalContext(root))
    with pytest.raises(ConfigError, match=r"train.on_stale_checkpoint='ask' \(valid: restart, error\)"):
        train(_cfg("train.on_stale_checkpoint=ask"), novel, base, LocalContext(root))
    ctx = LocalContext(root)  # the same settings and data: resumes (nothing left to train)
    again = train(_cfg("train.epochs=1", "train.on_stale_checkpoint=error"), novel, base, ctx)
    assert ctx.history == [] and len(again.history) == 1


def test_changed_epochs_restart_with_a_warning_and_set_the_old_checkpoints_aside(tables, tmp_path, caplog):
    novel, base = tables
    root = tmp_path / "ckpt"
    first = train(_cfg("train.epochs=1", "train.checkpoint_every=1"), novel, base, LocalContext(str(root)))
    ctx = LocalContext(str(root))
    longer = train(_cfg("train.epochs=2", "train.checkpoint_every=1"), novel, base, ctx)
    assert [h["epoch"] for h in ctx.history] == [0, 1], "the old schedule was continued"
    assert longer.history[0]["lr"] == first.history[0]["lr"] and longer.history[1]["lr"] > 0
    assert f"not resuming checkpoint {root}/epoch_0000/checkpoint.pt" in caplog.text
    assert "train.epochs (1 -> 2)" in caplog.text
    assert sorted(p.name for p in root.iterdir()) == ["_stale", "epoch_0000", "epoch_0001"]
    assert (root / "_stale" / "epoch_0000" / "checkpoint.pt").is_file()


def _one_region_changed(novel):
    """The table after one anomaly map changed: the same region ids, one crop's pixels differ."""
    import pyarrow as pa

    crops = novel.column("crop_png").to_pylist()
    crops[0] = crops[1]
    return novel.set_column(novel.column_names.index("crop_png"), "crop_png", pa.array(crops, pa.binary()))


@pytest.mark.parametrize("change", ["content", "regions"])
def test_rerun_after_the_data_changed_does_not_return_the_old_model(tables, tmp_path, change):
    novel, base = tables
    root = str(tmp_path / "ckpt")
    cfg = _cfg("train.epochs=1", "train.checkpoint_every=1", "train.kmeans_init=false")
    train(cfg, novel, base, LocalContext(root))
    changed = _one_region_changed(novel) if change == "content" else novel.slice(1)
    ctx = LocalContext(root)
    train(cfg, changed, base, ctx)
    assert [h["epoch"] for h in ctx.history] == [0], "the finished old model was returned"
    assert ctx.latest_checkpoint().state["fingerprint"]["novel"]["regions"] == changed.num_rows


def test_resume_skips_a_truncated_or_planted_latest_checkpoint(tables, tmp_path, caplog, malicious_model_bytes):
    novel, base = tables
    root = tmp_path / "ckpt"
    cfg = _cfg("train.epochs=3", "train.checkpoint_every=1")
    train(cfg, novel, base, LocalContext(str(root), keep=3))
    assert sorted(p.name for p in root.iterdir()) == ["epoch_0000", "epoch_0001", "epoch_0002"]
    last = root / "epoch_0002" / "checkpoint.pt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    sentinel = tmp_path / "pwned"
    (root / "epoch_0009").mkdir()
    (root / "epoch_0009" / "checkpoint.pt").write_bytes(malicious_model_bytes(sentinel))  # planted
    ctx = LocalContext(str(root), keep=2)
    resumed = train(cfg, novel, base, ctx)
    assert not sentinel.exists(), "the planted checkpoint ran its payload"
    assert [h["epoch"] for h in ctx.history] == [2] and len(resumed.history) == 3
    assert str(last) in caplog.text and str(root / "epoch_0009" / "checkpoint.pt") in caplog.text
    assert sorted(p.name for p in root.iterdir()) == ["epoch_0001", "epoch_0002"], "keep 2, none newer than the run"


def test_an_epoch_of_skipped_batches_is_an_error_not_a_result(tables, tmp_path):
    """Batches of one row never hold labelled and unlabelled rows together: nothing trains,
    so there must be no model and no checkpoint to report."""
    from ncd.train.engine import TrainingError

    novel, base = tables
    cfg = _cfg("train.epochs=1", "train.batch_size=1", "train.kmeans_init=false", "train.checkpoint_every=1")
    with pytest.raises(TrainingError, match=r"epoch 0: no usable batch \(6 skipped.*train\.batch_size"):
        train(cfg, novel.slice(0, 3), base.slice(0, 3), LocalContext(str(tmp_path)))
    assert not list(tmp_path.rglob("*.pt"))


def test_a_non_finite_loss_stops_training_naming_epoch_and_step(tables, tmp_path):
    from ncd.train.engine import TrainingError

    novel, base = tables
    cfg = _cfg("train.epochs=2", "loss.infonce_temp=1e-45", "train.checkpoint_every=1")  # logits / 0 -> inf
    with pytest.raises(TrainingError, match=r"non-finite .* in epoch 0, step 0 of \d+"):
        train(cfg, novel, base, LocalContext(str(tmp_path)))
    assert not list(tmp_path.rglob("*.pt")), "no checkpoint of a diverged model"


def test_training_refuses_invalid_config_and_unresolved_k(tables):
    from ncd.config import ConfigError

    novel, base = tables
    with pytest.raises(ConfigError, match=r"train\.epochs=0 .*train\.batch_size=0"):
        train(_cfg("train.epochs=0", "train.batch_size=0"), novel, base, LocalContext())
    for k in ("auto", "gt"):  # the entry point resolves K (and reports how), never the loop
        with pytest.raises(ConfigError, match=f"train.num_novel='{k}' reached training unresolved"):
            train(_cfg("train.epochs=1", f"train.num_novel={k}"), novel, base, LocalContext())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["anomalyncd", "protoanomalyncd"])
def test_train_step_never_synchronises_with_the_device(method):
    """A step only enqueues work: any host-device synchronisation (a boolean-mask
    selection, an indexed write, a pageable copy) stalls the kernel launches behind it."""
    from ncd.methods import build_model, guide_columns, make_objective
    from ncd.train.engine import parameter_groups, train_step

    dev = torch.device("cuda")
    cfg = load_config(None, ["model.backbone=vit_small_patch16_224", "model.weights=random", f"method={method}"])
    model = build_model(cfg, 4, 6).to(dev)
    channels = 1 + len(guide_columns(cfg))
    optimizer = torch.optim.SGD(parameter_groups(model, 5e-5), lr=1e-4, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.randn(8, 2, 3, 224, 224, generator=g).to(dev),
             "masks": torch.rand(8, 2, channels, 224, 224, generator=g).round().to(dev),
             "label": torch.tensor([0, 1, 2, 3, -1, -1, -1, -1]), "score": torch.rand(8, generator=g)}
    objective = make_objective(cfg, 4)
    train_step(model, batch, optimizer, objective, 0, device=dev, amp=True)  # warm-up: allocations, momentum
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        parts = train_step(model, batch, optimizer, objective, 0, device=dev, amp=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(parts["loss"]).item()


def test_training_with_device_augmentation_matches_the_loader_path(tables):
    """train.augment_on=device (crops decoded once, views augmented as batched tensor ops on
    the training device) trains on the loader path's views: the same losses up to float rounding."""
    novel, base = tables
    runs = [train(_cfg("train.epochs=2", "train.loader_workers=0", f"train.augment_on={where}"), novel, base,
                  LocalContext("", device="cpu")) for where in ("loader", "device")]
    loader, device = ([h["loss"] for h in r.history] for r in runs)
    assert all(math.isfinite(v) for v in device) and runs[1].history[0]["steps"] == runs[0].history[0]["steps"]
    assert np.allclose(device, loader, rtol=2e-3, atol=1e-3), (device, loader)
