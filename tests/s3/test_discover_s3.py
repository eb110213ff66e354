"""``ncd discover`` with every input and output in the bucket, against the loopback S3 server.

The demo dataset is uploaded to ``s3://<bucket>/<prefix>/data``; ``data.root``, ``output``
and ``preprocess.output`` all name the bucket and ``s3.*`` names the server. The run must
leave every artefact in the bucket (listed with boto3, not through ncd) and nothing in
the working directory.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from ncd.config import ExperimentConfig, load_config
from ncd.data import io
from ncd.data.io import StorageError
from ncd.data.region_table import read_regions
from ncd.pipeline import LOCAL_STAGES, Stages, discover

pytestmark = pytest.mark.s3

CONFIG = Path(__file__).resolve().parents[2] / "ncd" / "configs" / "demo_smoke.yaml"


def _s3_config(data: str, out: str, s3: dict[str, object], *extra: str) -> ExperimentConfig:
    sets = [f"data.root={data}", f"output={out}", f"preprocess.output={out}", "data.categories=plate",
            "train.epochs=1", *(f"s3.{k}={v}" for k, v in s3.items()), *extra]
    return load_config(str(CONFIG), sets)


def _server_settings(server) -> dict[str, object]:
    c = server.config
    return {"endpoint_override": c.endpoint_override, "scheme": c.scheme, "region": c.region,
            "access_key": c.access_key, "secret_key": c.secret_key}


def _snapshot(folders: list[Path]) -> set[str]:
    """The entries of ``folders`` and of their ``outputs/`` (ncd's default output root)."""
    return {str(p) for d in folders for sub in (d, d / "outputs") if sub.is_dir() for p in sub.iterdir()}


def _run_in_bucket(demo_root, s3_server, s3_prefix, monkeypatch, cwd: Path, stages: Stages,
                   *extra: str, watch: tuple[Path, ...] = (), secret: str = "") -> tuple[dict, str]:
    """Upload the demo data and run ``discover`` from the empty folder ``cwd``; returns
    (summary, output URI). Nothing may appear in ``cwd`` nor in the ``watch`` folders.
    ``secret``: the S3 secret key the config gives (the server accepts any)."""
    base = s3_prefix[len(f"s3://{s3_server.bucket}/"):]
    data = s3_server.upload_dir(demo_root, f"{base}/data")
    out = io.join(s3_prefix, "out")
    settings = _server_settings(s3_server) | ({"access_key": "AKIASENTINEL", "secret_key": secret} if secret else {})
    cfg = _s3_config(data, out, settings, *extra)
    assert cfg.s3 == s3_server.config or secret
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = _snapshot(list(watch))
    summary = discover(cfg, stages, progress=lambda s: None)
    assert list(cwd.iterdir()) == [], "discover wrote to the local working directory"
    assert _snapshot(list(watch)) == before, "discover wrote to a worker's working directory"
    return summary, out


def _check_bucket(s3_server, out: str, summary: dict, base: bool) -> list[str]:
    """The artefacts every discover run leaves in the bucket; returns the key listing."""
    keys = s3_server.keys(out)
    if base:  # the synthetic labelled base set: its images and its region table
        assert any(k.startswith("base_data/images/base/") for k in keys), keys
        assert any(k.startswith("base/regions/") and k.endswith(".parquet") for k in keys), keys
    for name in ("manifest.parquet", "model.pt", "image_predictions.parquet", "image_predictions.csv",
                 "region_predictions.parquet", "region_predictions.csv", "region_features.npy", "report.md",
                 "metrics.json", "summary.json"):
        assert name in keys, (name, keys)
    assert any(k.startswith("regions/") and k.endswith(".parquet") for k in keys), keys  # the shards
    assert read_regions(io.join(out, "regions"), s3_server.config).num_rows == summary["regions"] > 0
    assert not any(part.startswith(("_staging-", "_old-")) for k in keys for part in k.split("/")), keys
    assert any(k.startswith("plots/") and k.endswith(".png") for k in keys), keys
    images = io.read_table(io.join(out, "image_predictions.parquet"), s3_server.config)
    assert images.num_rows + summary["images_without_regions"] == summary["images"] and images.num_rows > 0
    assert len(set(images.column("image_id").to_pylist())) == images.num_rows  # one row per image
    csv = io.read_table(io.join(out, "image_predictions.csv"), s3_server.config)
    assert csv.num_rows == images.num_rows
    manifest = io.read_table(io.join(out, "manifest.parquet"), s3_server.config)
    assert manifest.num_rows == summary["images"]
    assert all(u.startswith("s3://") for u in manifest.column("image_uri").to_pylist())
    assert summary["output"] == out
    return keys


def test_discover_local_stages_all_in_s3(demo_root, s3_server, s3_prefix, tmp_path, monkeypatch):
    """Single-process stages; ``LocalContext`` checkpoints in the bucket."""
    summary, out = _run_in_bucket(demo_root, s3_server, s3_prefix, monkeypatch, tmp_path / "cwd", LOCAL_STAGES)
    keys = _check_bucket(s3_server, out, summary, base=False)
    assert any(k.startswith("checkpoints/epoch_") and k.endswith("/checkpoint.pt") for k in keys), keys


@pytest.mark.ray
def test_discover_ray_stages_all_in_s3(demo_root, s3_server, s3_prefix, ray_local, tmp_path, monkeypatch,
                                      secret_scan):
    """Ray Data preprocessing and inference, Ray Train with its run storage in the bucket; the
    synthetic labelled base set is generated into the bucket, preprocessed by Ray Data from
    there and handed to the Ray Train worker (the one test of that path: it costs
    a second preprocessing run, so the single-process test leaves it out)."""
    from ray_jobs.discover import ray_stages

    # the Ray workers' folder (a lambda: cloudpickle ships it by value, this module is not importable there)
    worker_cwd = Path(ray_local.get(ray_local.remote(lambda: os.getcwd()).remote()))
    summary, out = _run_in_bucket(demo_root, s3_server, s3_prefix, monkeypatch, tmp_path / "cwd",
                                  ray_stages(num_workers=1, cpus_per_worker=0.5), "train.base_table=synthetic",
                                  watch=(worker_cwd,), secret=secret_scan.secret)
    keys = _check_bucket(s3_server, out, summary, base=True)
    ckpts = [k for k in keys if k.startswith("ray_train/demo_smoke/") and "/checkpoint_" in k]
    assert any(k.endswith("/checkpoint.pt") for k in ckpts), keys
    # the S3 keys of the config reached no output (model, Ray Train checkpoints and run state
    # included) and nothing Ray keeps: workers got credentials from their environment
    client, prefix = s3_server.client(), s3_prefix[len(f"s3://{s3_server.bucket}/"):]
    objects = {k: client.get_object(Bucket=s3_server.bucket, Key=f"{prefix}/out/{k}")["Body"].read() for k in keys}
    assert secret_scan.hits(objects) == []
    session = Path(ray_local._private.worker._global_node.get_session_dir_path())
    assert secret_scan.hits(secret_scan.files(session)) == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("where", ["data", "output"])
def test_discover_unreachable_endpoint_fails_fast_naming_the_uri(where, demo_root, tmp_path, monkeypatch):
    """Nothing listens at the endpoint: the first S3 call (the catalog of an s3:// dataset,
    or the manifest written to an s3:// output) fails within seconds, naming its URI."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    s3 = {"endpoint_override": f"127.0.0.1:{_closed_port()}", "scheme": "http", "region": "us-east-1",
          "access_key": "testing", "secret_key": "testing"}
    data = "s3://ncd-test/nowhere/data" if where == "data" else str(demo_root)
    cfg = _s3_config(data, "s3://ncd-test/nowhere/out", s3)
    uri = data if where == "data" else "s3://ncd-test/nowhere/out/manifest.parquet"
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=uri):
        discover(cfg, LOCAL_STAGES, progress=lambda s: None)
    assert time.monotonic() - t0 < 10.0
    assert list(cwd.iterdir()) == []
