"""A loopback S3-compatible server: moto's standalone server (``python -m moto.server``)
as a separate process on 127.0.0.1, reached over HTTP through ``ncd.data.io`` (pyarrow)
and boto3 exactly as MinIO or Ceph would be. Nothing in boto3 or pyarrow is patched.

Shared by the S3 fixtures (``tests/conftest.py`` imports it as a sibling module) and
``benchmarks/bench_bigdata.py --s3`` (as ``tests.loopback_s3``)::

    with serve(log_path) as server:              # started, bucket created; always stopped
        uri = server.uri("some/key.parquet")     # s3://<bucket>/some/key.parquet
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ncd.config import S3Config
from ncd.data import io

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
    config: S3Config  # what ncd.data.io needs to reach it
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

    def keys(self, uri: str) -> list[str]:
        """Every object key under ``uri`` (``s3://<bucket>/<prefix>``), relative to it, sorted."""
        prefix = uri[len(f"s3://{self.bucket}/"):].strip("/") + "/"
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"][len(prefix):] for page in pages for o in page.get("Contents", []))


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


@contextmanager
def serve(log_path: Path) -> Iterator[S3Server]:
    """A server on a free loopback port with the bucket ``BUCKET``; its output goes to
    ``log_path``. Its ``config`` carries the endpoint and credentials explicitly. The
    process is stopped on leaving, also on an error (bucket creation included)."""
    proc, url = _start_server(log_path)
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
