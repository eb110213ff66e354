"""Checkpoint and model files: weights-only loading, atomic writes, pruning, fallback, fingerprints."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest
import torch

from ncd.config import load_config
from ncd.data.io import StorageError
from ncd.train import checkpoint as ckpt


def test_malicious_checkpoint_is_refused_without_running_it(tmp_path, malicious_model_bytes):
    sentinel = tmp_path / "pwned"
    bad = tmp_path / "model.pt"
    bad.write_bytes(malicious_model_bytes(sentinel))
    with pytest.raises(ckpt.ModelFileError, match=f"cannot load model file {bad}: .*never unpickles") as err:
        ckpt.load(str(bad), what="model file")
    assert "\n" not in str(err.value)
    assert not sentinel.exists(), "the payload ran"


@pytest.mark.parametrize("content, reason", [(b"", "empty"), (b"\x00garbage" * 50, "corrupt"),
                                             (b"hello world", "not a readable torch file"),
                                             ("half", "truncated"), ("head", "truncated")])
def test_garbage_or_truncated_file_is_one_line_naming_it(tmp_path, content, reason):
    path = tmp_path / "checkpoint.pt"
    if content in ("half", "head"):
        ckpt.save({"w": torch.zeros(4096)}, str(path))
        content = path.read_bytes()[: path.stat().st_size // 2 if content == "half" else 100]
    path.write_bytes(content)
    with pytest.raises(ckpt.ModelFileError, match=reason) as err:
        ckpt.load(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_saved_state_loads_weights_only_with_numpy_scalars_made_plain(tmp_path):
    state = {"loss": np.float32(0.5), "epoch": np.int64(3), "sd": {"w": torch.ones(2)}, "hist": [{"lr": np.float64(1)}]}
    ckpt.save(state, str(tmp_path / "c.pt"))
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    assert loaded["loss"] == 0.5 and type(loaded["loss"]) is float and type(loaded["epoch"]) is int
    assert type(loaded["hist"][0]["lr"]) is float and torch.equal(loaded["sd"]["w"], torch.ones(2))
    with pytest.raises(TypeError, match=r"state\.bad holds a set"):
        ckpt.save({"bad": {1, 2}}, str(tmp_path / "d.pt"))


def test_failed_write_leaves_no_temporary_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "epoch_0001" / "checkpoint.pt"
    target.mkdir(parents=True)  # a folder in the way of the final rename
    with pytest.raises(StorageError, match=rf"{target}: Is a directory \(check the path") as err:
        ckpt.save({"w": torch.zeros(1000)}, str(target))
    assert "\n" not in str(err.value)
    assert os.listdir(target.parent) == ["checkpoint.pt"], "a temporary file was left behind"


def test_disk_full_mid_write_leaves_no_temporary_file(tmp_path):
    """A real short write: the process may not grow a file past 64 kB (RLIMIT_FSIZE), as on a full disk."""
    script = textwrap.dedent(f"""
        import resource, signal, sys, torch
        from ncd.data.io import StorageError
        from ncd.train import checkpoint as ckpt
        ckpt.save({{"w": torch.zeros(10)}}, {str(tmp_path / "c.pt")!r})  # the previous checkpoint
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        try:
            ckpt.save({{"w": torch.zeros(1_000_000)}}, {str(tmp_path / "c.pt")!r})
        except StorageError as err:
            print(err)
            sys.exit(3)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert run.returncode == 3, run.stderr
    assert run.stdout.startswith(f"{tmp_path / 'c.pt'}: ") and "File too large" in run.stdout
    assert sorted(os.listdir(tmp_path)) == ["c.pt"], "a temporary file was left behind"
    assert ckpt.load(str(tmp_path / "c.pt"))["w"].shape == (10,), "the previous checkpoint was damaged"


def test_folder_keeps_the_newest_and_falls_back_past_unreadable_ones(tmp_path, caplog):
    folder = ckpt.CheckpointFolder(str(tmp_path), keep=2)
    for epoch in range(4):
        folder.save({"epoch": epoch}, epoch)
    assert sorted(os.listdir(tmp_path)) == ["epoch_0002", "epoch_0003"]
    newest = tmp_path / "epoch_0003" / ckpt.CHECKPOINT_FILE
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a crash or a full disk
    found = folder.latest()
    assert found.state["epoch"] == 2 and found.uri.endswith("epoch_0002/checkpoint.pt")
    assert str(newest) in caplog.text and "truncated" in caplog.text
    aside = folder.set_aside()
    assert folder.latest() is None and sorted(os.listdir(aside)) == ["epoch_0002", "epoch_0003"]


def _table(ids, crops):
    return pa.table({"region_id": ids, "category": ["c"] * len(ids), "gt_type": ["t"] * len(ids), "crop_png": crops})


def test_fingerprint_names_what_changed():
    cfg = load_config("ncd/configs/demo_smoke.yaml")
    classes = {"base_classes": [], "num_base": 0, "num_novel": 3, "categories": ["c"]}
    old = ckpt.fingerprint(cfg, _table(["a", "b"], [b"1", b"2"]), None, classes)
    assert ckpt.differences(old, ckpt.fingerprint(cfg, _table(["b", "a"], [b"2", b"1"]), None, classes)) == []
    changed = ckpt.fingerprint(load_config("ncd/configs/demo_smoke.yaml", ["train.epochs=5"]),
                               _table(["a", "b"], [b"1", b"x"]), None, {**classes, "num_novel": 4})
    assert ckpt.differences(old, changed) == ["training regions (same 2 region ids, other content)", "K (3 -> 4)",
                                              "train.epochs (2 -> 5)"]
    fewer = ckpt.fingerprint(cfg, _table(["a"], [b"1"]), None, classes)
    assert ckpt.differences(old, fewer) == ["training regions (other region ids: 2 -> 1 regions)"]
    free = load_config("ncd/configs/demo_smoke.yaml", ["train.loader_workers=3", "train.keep_checkpoints=5"])
    assert ckpt.differences(old, ckpt.fingerprint(free, _table(["a", "b"], [b"1", b"2"]), None, classes)) == []
    assert ckpt.differences(None, old) == ["fingerprint (none: written by an older ncd)"]


def test_a_setting_newer_than_the_checkpoint_differs_only_off_its_default():
    cfg = load_config("ncd/configs/demo_smoke.yaml")
    classes = {"base_classes": [], "num_base": 0, "num_novel": 3, "categories": ["c"]}
    table = _table(["a", "b"], [b"1", b"2"])
    older = ckpt.fingerprint(cfg, table, None, classes)
    del older["settings"]["model.eval_view"]  # written before the setting existed
    assert ckpt.differences(older, ckpt.fingerprint(cfg, table, None, classes)) == []
    resize = load_config("ncd/configs/demo_smoke.yaml", ["model.eval_view=resize"])
    assert ckpt.differences(older, ckpt.fingerprint(resize, table, None, classes)) == [
        "model.eval_view (None -> 'resize')"]
    epochs = ckpt.fingerprint(load_config("ncd/configs/demo_smoke.yaml", ["train.epochs=5"]), table, None, classes)
    del older["settings"]["train.epochs"]  # a key the checkpoint lacks, at a value other than ncd's default
    assert ckpt.differences(older, epochs) == ["train.epochs (None -> 5)"]
