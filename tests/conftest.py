"""Shared fixtures: a small synthetic dataset, a local Ray instance, a loopback S3 server.

The S3 server is moto's standalone server (``python -m moto.server``, ``tests/loopback_s3.py``,
shared with ``benchmarks/bench_bigdata.py --s3``), run as a separate process for the
whole session and started only when a test asks for it; tests talk to it
over HTTP through ``ncd.data.io`` (pyarrow) and boto3, exactly as they would to MinIO or Ceph.
Nothing in boto3 or pyarrow is patched. Any test (``tests/s3``, ``tests/ray``) can use it::

    def test_x(s3_server):                       # the server, its S3Config and bucket
        uri = s3_server.uri("some/key.parquet")   # s3://<bucket>/some/key.parquet
        io.write_bytes(uri, b"x", s3_server.config)

    def test_y(s3_prefix, s3_config):             # a fresh s3:// prefix per test
        ...

``s3_server.config`` is all ``ncd.data.io`` needs in the test process; Ray workers get the
endpoint from the experiment config (``cfg.s3``) and the credentials from their
environment (``ray_local`` puts the test keys in the runtime env), never from a config.
"""
from __future__ import annotations

import importlib.util
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from ncd.config import S3Config

from loopback_s3 import AWS_ENV, S3Server, serve  # sibling module: pytest puts tests/ on sys.path

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A tiny synthetic dataset in the generic layout (2 categories)."""
    from ncd.data.synthetic import SyntheticSpec, write_dataset

    root = tmp_path_factory.mktemp("demo")
    return write_dataset(root, SyntheticSpec(images_per_family=3, normal_images=3, image_size=96, seed=1))


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance with 2 CPUs for the whole session. Its workers hold the test S3
    credentials in their environment (the job's runtime env), as on a cluster: configs
    handed to workers never carry keys (``ncd.config.redacted``)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
             configure_logging=False, runtime_env={"env_vars": AWS_ENV})
    yield ray
    ray.shutdown()


# --------------------------------------------------------------------------- S3 server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A moto S3 server process on 127.0.0.1 with the bucket ``ncd-test``, for the session.

    Started lazily, on the first test that asks for it (or for ``s3_config``,
    ``s3_bucket``, ``s3_prefix``), and stopped at the end of the session. Its ``config``
    carries the endpoint and credentials explicitly, so nothing depends on the
    environment (Ray workers reach it through ``cfg.s3``); ``aws_test_env`` also sets
    the AWS variables for a test (autouse under ``tests/s3``).
    """
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("boto3") is None:
        pytest.skip("moto[server] and boto3 are needed for the S3 tests (pip install -e '.[dev]')")
    with serve(tmp_path_factory.mktemp("moto") / "server.log") as server:
        yield server


@pytest.fixture
def aws_test_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test credentials and region in the AWS variables, no endpoint or profile from the
    machine (restored after the test, so they never leak into other tests)."""
    for k, v in AWS_ENV.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture(scope="session")
def s3_config(s3_server: S3Server) -> S3Config:
    """The ``S3Config`` that reaches the test server."""
    return s3_server.config


@pytest.fixture(scope="session")
def s3_bucket(s3_server: S3Server) -> str:
    return s3_server.bucket


@pytest.fixture
def s3_prefix(s3_server: S3Server, request: pytest.FixtureRequest) -> str:
    """A fresh ``s3://<bucket>/<test name>-<random>`` prefix (nothing under it yet)."""
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in request.node.name)[:60]
    return s3_server.uri(f"{name}-{uuid.uuid4().hex[:8]}")


# --------------------------------------------------------------------------- secrets

SENTINEL_SECRET = "sentinel-SECRET-9f27c1"  # an S3 secret key no output may contain


def secret_hits(blobs: dict[str, bytes], secret: str = SENTINEL_SECRET) -> list[str]:
    """The names of the ``blobs`` that hold ``secret``: in their bytes, or, for a torch
    file (model, checkpoint), anywhere in the loaded object (strings walked recursively)."""
    import io as _io

    import torch

    def walk(obj: Any) -> bool:
        if isinstance(obj, str):
            return secret in obj
        if isinstance(obj, dict):
            return any(walk(k) or walk(v) for k, v in obj.items())
        if isinstance(obj, (list, tuple)):
            return any(walk(v) for v in obj)
        return False

    hits = []
    for name, data in blobs.items():
        if secret.encode() in data:
            hits.append(name)
        elif data[:2] == b"PK" and name.endswith(".pt"):
            if walk(torch.load(_io.BytesIO(data), map_location="cpu", weights_only=True)):
                hits.append(name)
    return hits


def files_under(*roots: Path) -> dict[str, bytes]:
    """Every file under ``roots`` (recursive) as {path: bytes}."""
    return {str(p): p.read_bytes() for root in roots for p in Path(root).rglob("*") if p.is_file()}


@dataclass(frozen=True)
class SecretScan:
    """What tests need to check that a secret is never written: the sentinel and scanners."""

    secret: str = SENTINEL_SECRET
    hits = staticmethod(secret_hits)
    files = staticmethod(files_under)


@pytest.fixture
def secret_scan() -> SecretScan:
    """``secret_scan.secret`` to put in a config, ``secret_scan.hits(blobs)`` to find it."""
    return SecretScan()


class _Planted:
    """Unpickling this creates the file ``path``: what a crafted model file could do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def malicious_model_bytes():
    """``make(sentinel) -> bytes``: a torch file shaped like an ncd model whose unpickling creates ``sentinel``."""
    import io as _io

    import torch

    def make(sentinel) -> bytes:
        buf = _io.BytesIO()
        torch.save({"model": _Planted(str(sentinel)), "config": {}, "class_map": {}, "head": 0}, buf)
        return buf.getvalue()

    return make
