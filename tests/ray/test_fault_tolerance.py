"""Fault tolerance on a local Ray cluster: a training worker killed mid-run resumes from
the latest checkpoint; preprocessing re-runs redo only what changed.

Nothing is mocked: the kill is a real SIGKILL of a ``RayTrainWorker`` process (found by
its process title among this test process's descendants, so no other Ray instance on
the machine is touched), and the preprocessing tests read what ``run_preprocess``
wrote and returned.
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest

from ncd.config import ExperimentConfig, apply_overrides, load_config
from ncd.data.catalog import build_manifest
from ncd.data.region_table import read_completion, read_regions, update_regions, write_regions
from ncd.preprocess.regions import preprocess_manifest
from ncd.train.checkpoint import CHECKPOINT_FILE, load

pytestmark = pytest.mark.ray

WORKER_TITLE = b"ray::RayTrainWorker"
EPOCHS = 3
POLL_S = 0.05
RUN_TIMEOUT_S = 600.0  # generous: a loaded machine slows Ray start-up and every epoch


# --------------------------------------------------------------------------- worker kill


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[1])


def _descends_from(pid: int, ancestor: int) -> bool:
    try:
        while pid > 1:
            pid = _parent(pid)
            if pid == ancestor:
                return True
    except (OSError, ValueError, IndexError):
        return False
    return False


def _train_worker_pids() -> set[int]:
    """Live Ray Train worker processes started by this test process's Ray instance."""
    me, out = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read()
        except OSError:
            continue
        if title.startswith(WORKER_TITLE) and _descends_from(int(entry), me):
            out.add(int(entry))
    return out


def _registered_checkpoints(run_dir: Path) -> dict[str, int]:
    """Checkpoint dir name -> epoch, for the checkpoints Ray Train has registered.

    A checkpoint counts once its folder name appears in the controller's checkpoint
    manager snapshot (written on registration), so a folder still being uploaded, or
    one whose report was lost with a killed worker, is never taken for a resume point.
    """
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        text = snapshot.read_text()
    except OSError:
        return {}
    out = {}
    for d in run_dir.glob("checkpoint_*"):
        if d.is_dir() and d.name in text:
            try:
                out[d.name] = int(load(str(d / CHECKPOINT_FILE))["epoch"])
            except Exception:  # noqa: BLE001 - deleted (num_to_keep) or replaced while read: next poll
                continue
    return out


def _nan_free(history: list[dict]) -> list[dict]:
    """History rows with NaN (unused loss terms) as None, so equal rows compare equal."""
    return [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in h.items()} for h in history]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds worker processes through /proc")
def test_killed_worker_resumes_from_latest_checkpoint(demo_root, ray_local, tmp_path):
    from ray_jobs.train import run_train

    cfg = load_config("ncd/configs/demo_smoke.yaml", [f"data.root={demo_root}", "data.categories=plate",
                                                      f"output={tmp_path}", f"train.epochs={EPOCHS}",
                                                      "train.checkpoint_every=1", "train.batch_size=8"])
    regions = write_regions(preprocess_manifest(build_manifest(cfg.data), cfg.mebin, cfg.crop, cfg.data),
                            str(tmp_path / "pp"))
    storage, name = tmp_path / "ray_train", "killed"
    run_dir = storage / name
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = run_train(cfg, regions, num_workers=2, cpus_per_worker=0.5,
                                          storage_path=str(storage), name=name, max_failures=2)
        except BaseException as err:  # noqa: BLE001 - re-raised by the assertions below
            outcome["error"] = err

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    seen: dict[str, int] = {}  # registered checkpoint -> epoch, in the order first seen
    killed: dict = {}
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while thread.is_alive() and time.monotonic() < deadline:
        for d, epoch in sorted(_registered_checkpoints(run_dir).items()):
            seen.setdefault(d, epoch)
        if not killed and seen:
            workers = _train_worker_pids()
            if len(workers) == 2:
                latest = max(seen, key=seen.get)
                killed.update(pid=min(workers), workers=workers, epoch=seen[latest], seen=len(seen),
                              state=load(str(run_dir / latest / CHECKPOINT_FILE)))
                os.kill(killed["pid"], signal.SIGKILL)
        elif killed and "restarted" not in killed:
            fresh = _train_worker_pids() - killed["workers"]
            if fresh:
                killed["restarted"] = fresh
        time.sleep(POLL_S)
    thread.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not thread.is_alive(), f"training did not finish in {RUN_TIMEOUT_S:.0f}s"
    for d, epoch in sorted(_registered_checkpoints(run_dir).items()):  # the last ones, registered at the end
        seen.setdefault(d, epoch)
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]

    assert killed, "no checkpoint was registered while the run was alive: nothing was killed"
    assert killed["epoch"] < EPOCHS - 1, "the kill came after the last epoch: nothing left to resume"
    assert killed.get("restarted"), "Ray Train did not start a new worker group after the kill"
    assert result.error is None
    # every epoch checkpointed exactly once: the first one after the kill is the
    # checkpointed epoch + 1 (a restart from scratch would report epoch 0 again)
    epochs = [seen[d] for d in sorted(seen)]
    assert epochs == list(range(EPOCHS)), epochs
    assert epochs[killed["seen"]] == killed["epoch"] + 1
    final = load(str(Path(result.checkpoint.path) / CHECKPOINT_FILE))
    assert final["epoch"] == EPOCHS - 1
    assert [h["epoch"] for h in final["history"]] == list(range(EPOCHS))
    # the epochs before the kill are the checkpointed ones, carried over, not recomputed
    assert _nan_free(final["history"][: killed["epoch"] + 1]) == _nan_free(killed["state"]["history"])


# --------------------------------------------------------------------------- incremental preprocessing

CATEGORIES = ("fabric", "plate")


@pytest.fixture
def tiny_root(tmp_path):
    """A private 12-image dataset (the tests add and damage files in it)."""
    from ncd.data.synthetic import SyntheticSpec, write_dataset

    return write_dataset(tmp_path / "data", SyntheticSpec(categories=CATEGORIES, images_per_family=1,
                                                          normal_images=1, image_size=64, seed=3))


def _config(root: Path, out: Path, *overrides: str) -> ExperimentConfig:
    return apply_overrides(ExperimentConfig(), [f"data.root={root}", f"preprocess.output={out}",
                                                "preprocess.batch_size=4", *overrides])


def _expected(cfg: ExperimentConfig):
    """The whole table computed in this process from scratch."""
    return preprocess_manifest(build_manifest(cfg.data), cfg.mebin, cfg.crop, cfg.data, proto=cfg.proto)


def _files(uri: str, category: str) -> dict[str, int]:
    """Relative path -> mtime (ns) of every file of one category's folder."""
    folder = Path(uri) / category
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _entries(uri: str) -> list[str]:
    return sorted(p.name for p in Path(uri).iterdir())


def test_preprocess_rerun_redoes_only_what_changed(tiny_root, ray_local, tmp_path):
    from ray_jobs.preprocess import refresh_regions

    cfg = _config(tiny_root, tmp_path / "out")
    # the in-process path writes the same layout and records, so a Ray run skips its work
    first = update_regions(build_manifest(cfg.data), str(tmp_path / "out"), cfg.mebin, cfg.crop, cfg.data,
                           proto=cfg.proto)
    assert first.processed == CATEGORIES and first.images == 12
    assert read_regions(first.uri).equals(_expected(cfg))
    before = {c: _files(first.uri, c) for c in CATEGORIES}

    same = refresh_regions(cfg)
    assert same.uri == first.uri
    assert (same.processed, same.skipped, same.images) == ((), CATEGORIES, 0)
    assert {c: _files(same.uri, c) for c in CATEGORIES} == before, "a skipped category must not be rewritten"

    # one more plate image: plate is redone, fabric left alone
    for kind in ("images", "maps", "masks"):
        folder = tiny_root / kind / "plate" / "hole"
        shutil.copy(folder / "hole_000.png", folder / "hole_001.png")
    grown = refresh_regions(cfg)
    assert (grown.processed, grown.skipped, grown.images) == (("plate",), ("fabric",), 7)
    assert _files(grown.uri, "fabric") == before["fabric"]
    assert all(t > max(before["plate"].values()) for t in _files(grown.uri, "plate").values())
    assert read_completion(grown.uri, "plate")["images"] == 7
    assert read_regions(grown.uri).equals(_expected(cfg))
    assert _entries(grown.uri) == list(CATEGORIES), "no staging or swapped-out folder may be left"
    assert refresh_regions(cfg).processed == ()

    # a setting the rows depend on invalidates every category
    changed = _config(tiny_root, tmp_path / "out", "mebin.min_interval_len=2")
    redone = refresh_regions(changed)
    assert (redone.processed, redone.skipped) == (CATEGORIES, ())
    assert read_regions(redone.uri).equals(_expected(changed))
    # settings of other stages change nothing; a category no longer in the manifest goes
    narrowed = refresh_regions(_config(tiny_root, tmp_path / "out", "mebin.min_interval_len=2", "train.epochs=7",
                                       "data.categories=plate"))
    assert (narrowed.processed, narrowed.skipped, narrowed.removed) == ((), ("plate",), ("fabric",))
    assert _entries(narrowed.uri) == ["plate"]


def _category_rows(table, category: str):
    return table.filter(pc.equal(table.column("category"), category))


def test_interrupted_preprocess_leaves_whole_categories(tiny_root, ray_local, tmp_path):
    from ray_jobs.preprocess import refresh_regions

    cfg = _config(tiny_root, tmp_path / "out")
    uri = refresh_regions(cfg).uri
    old, old_records = read_regions(uri), {c: read_completion(uri, c) for c in CATEGORIES}
    # new settings, and a damaged plate image: the run fails in pass 2 (pass 1 reads only maps)
    changed = _config(tiny_root, tmp_path / "out", "mebin.min_interval_len=2")
    damaged = tiny_root / "images" / "plate" / "stain" / "stain_000.png"
    good_bytes = damaged.read_bytes()
    damaged.write_bytes(b"not a png")
    with pytest.raises(Exception, match="corrupt or unreadable image"):
        refresh_regions(changed)
    damaged.write_bytes(good_bytes)

    assert _entries(uri) == list(CATEGORIES), "the failed run must remove its staging folder"
    new, table = _expected(changed), read_regions(uri)
    published = []
    for category in CATEGORIES:  # each category whole: as before, or finished by the failed run and recorded
        record = read_completion(uri, category)
        if record == old_records[category]:
            assert _category_rows(table, category).equals(_category_rows(old, category)), category
        else:
            published.append(category)
            assert _category_rows(table, category).equals(_category_rows(new, category)), category
            assert record["images"] == 6
    assert "plate" not in published
    # the re-run redoes what the failed run did not finish, nothing else
    rerun = refresh_regions(changed)
    assert set(rerun.processed) == set(CATEGORIES) - set(published) and rerun.skipped == tuple(published)
    assert read_regions(uri).equals(new)
