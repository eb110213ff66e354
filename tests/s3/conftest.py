"""A real S3-compatible server on loopback for the ``s3`` tests.

moto's standalone server (``python -m moto.server``) runs as a separate process for the
whole session; tests talk to it over HTTP through ``ncd.io`` (pyarrow) and boto3, exactly
as they would to MinIO or Ceph. Nothing in boto3 or pyarrow is patched.

Usage in a test (any test under ``tests/s3/``)::

    def test_x(s3_server):                       # the server, its S3Config and bucket
        uri = s3_server.uri("some/key.parquet")   # s3://<bucket>/some/key.parquet
        io.write_bytes(uri, b"x", s3_server.config)

    def test_y(s3_prefix, s3_config):             # a fresh s3:// prefix per test
        ...

Tests elsewhere (e.g. ``tests/ray``) can use the server once these fixtures move to
``tests/conftest.py``; ``s3_server.config`` is all ``ncd.io`` needs, so worker processes
reach it through the experiment config (``cfg.s3``), not the environment.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from ncd import io
from ncd.config import S3Config

BUCKET = "ncd-test"
REGION = "us-east-1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
START_TIMEOUT_S = 30.0
START_ATTEMPTS = 3
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_REGION": REGION,
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",  # never wait on an instance-metadata lookup
}


@dataclass(frozen=True)
class S3Server:
    """A running S3-compatible server with one bucket."""

    endpoint_url: str  # http://127.0.0.1:PORT
    config: S3Config  # what ncd.io needs to reach it
    bucket: str

    def uri(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``."""
        return io.join(f"s3://{self.bucket}", *parts)

    def client(self) -> Any:
        """A boto3 S3 client bound to the server."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def upload_dir(self, local: str | Path, prefix: str) -> str:
        """Upload every file under ``local`` to ``s3://<bucket>/<prefix>/``; returns that URI."""
        client = self.client()
        local = Path(local)
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            client.upload_file(str(path), self.bucket, f"{prefix.strip('/')}/{path.relative_to(local).as_posix()}")
        return self.uri(prefix)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1.0).read()
            return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer means the server is up
        except OSError:
            time.sleep(0.1)
    return False


def _start_server(log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start ``python -m moto.server`` on a free loopback port (retried: the port may be taken)."""
    for _ in range(START_ATTEMPTS):
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        with open(log_path, "ab") as log:  # a file, not a pipe: a full pipe would block the server
            proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                    stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **AWS_ENV})
        if _wait_ready(proc, url, START_TIMEOUT_S):
            return proc, url
        _stop(proc)
    raise RuntimeError(f"moto S3 server did not start; log: {log_path}\n{log_path.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A moto S3 server process on 127.0.0.1 with the bucket ``ncd-test``, for the session.

    Its ``config`` carries the endpoint and credentials explicitly, so nothing depends on
    the environment; ``aws_test_env`` sets the AWS variables for each test here.
    """
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("boto3") is None:
        pytest.skip("moto[server] and boto3 are needed for the S3 tests (pip install -e '.[dev]')")
    proc, url = _start_server(tmp_path_factory.mktemp("moto") / "server.log")
    try:
        server = S3Server(
            endpoint_url=url,
            config=S3Config(endpoint_override=url.split("://", 1)[1], scheme="http", region=REGION,
                            access_key=ACCESS_KEY, secret_key=SECRET_KEY),
            bucket=BUCKET,
        )
        server.client().create_bucket(Bucket=BUCKET)
        yield server
    finally:
        _stop(proc)


@pytest.fixture(autouse=True)
def aws_test_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test credentials and region in the AWS variables for every test under ``tests/s3``
    (restored after each test, so they never leak into other tests of the session)."""
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
