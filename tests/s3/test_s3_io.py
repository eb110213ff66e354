"""ncd.data.io and the catalog against a real S3-compatible server on loopback (moto)."""
from __future__ import annotations

import importlib.util
import socket
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest

from ncd.config import DataConfig, S3Config
from ncd.data import io
from ncd.data.catalog import build_manifest
from ncd.data.catalog_realiad import catalog_realiad
from ncd.data.io import StorageError

pytestmark = pytest.mark.s3


def test_bytes_round_trip_and_exists(s3_prefix, s3_config, s3_server):
    uri = io.join(s3_prefix, "a/b/blob.bin")
    assert not io.exists(uri, s3_config)
    io.write_bytes(uri, b"\x00payload\xff", s3_config)
    assert io.read_bytes(uri, s3_config) == b"\x00payload\xff"
    assert io.exists(uri, s3_config) and io.exists(io.join(s3_prefix, "a"), s3_config)
    assert io.is_dir(io.join(s3_prefix, "a/b"), s3_config) and not io.is_dir(uri, s3_config)
    key = uri[len(f"s3://{s3_server.bucket}/"):]
    assert s3_server.client().get_object(Bucket=s3_server.bucket, Key=key)["Body"].read() == b"\x00payload\xff"
    io.write_bytes(uri, b"v2", s3_config)  # overwrite in place
    assert io.read_bytes(uri, s3_config) == b"v2"


def test_missing_object_is_file_not_found_naming_it(s3_prefix, s3_config):
    uri = io.join(s3_prefix, "nope.png")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        io.read_bytes(uri, s3_config)
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        io.read_table(io.join(s3_prefix, "nope.parquet"), s3_config)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        io.list_files(io.join(s3_prefix, "nodir"), s3_config)


def test_missing_bucket_is_a_storage_error_naming_it(s3_config):
    with pytest.raises(StorageError, match="no-such-bucket"):
        io.write_bytes("s3://no-such-bucket/x.bin", b"x", s3_config)
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket/x.bin"):
        io.read_bytes("s3://no-such-bucket/x.bin", s3_config)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_table_round_trip(s3_prefix, s3_config, suffix):
    table = pa.table({"image_id": ["a/x/1", "b/y/2"], "score": [0.25, 1.5]})
    uri = io.join(s3_prefix, f"t/manifest{suffix}")
    io.write_table(table, uri, s3_config)
    assert io.read_table(uri, s3_config).to_pylist() == table.to_pylist()


def test_list_files_is_recursive_sorted_and_filtered(s3_prefix, s3_config, s3_server):
    for rel in ("b/2.png", "a/1.PNG", "a/deep/3.npy", "a/.hidden.png", "c.txt"):
        io.write_bytes(io.join(s3_prefix, "root", rel), b"x", s3_config)
    root = io.join(s3_prefix, "root")
    assert io.list_files(root, s3_config) == ["a/1.PNG", "a/deep/3.npy", "b/2.png", "c.txt"]
    assert io.list_files(root, s3_config, (".png",)) == ["a/1.PNG", "b/2.png"]
    # an explicit "directory marker" object (as some S3 tools write) is not a file
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=f"{root[len('s3://' + s3_server.bucket) + 1:]}/e/",
                                  Body=b"")
    assert io.list_files(root, s3_config) == ["a/1.PNG", "a/deep/3.npy", "b/2.png", "c.txt"]


def test_replace_dir_on_s3_swaps_whole_tables(s3_prefix, s3_config):
    dest = io.join(s3_prefix, "regions")
    first = io.join(s3_prefix, "_staging-1")
    io.write_table(pa.table({"a": [1]}), io.join(first, "part-0.parquet"), s3_config)
    io.write_table(pa.table({"a": [2]}), io.join(first, "part-1.parquet"), s3_config)
    io.replace_dir(first, dest, s3_config)
    assert sorted(io.read_table(dest, s3_config).column("a").to_pylist()) == [1, 2]
    assert not io.exists(first, s3_config)
    second = io.join(s3_prefix, "_staging-2")
    io.write_table(pa.table({"a": [3]}), io.join(second, "sub/part-0.parquet"), s3_config)
    io.replace_dir(second, dest, s3_config)  # the old part-1 must not survive
    assert io.list_files(dest, s3_config) == ["sub/part-0.parquet"]
    assert io.read_table(dest, s3_config).column("a").to_pylist() == [3]
    assert not io.exists(second, s3_config)


def test_upload_dir_copies_a_local_tree(tmp_path, s3_prefix, s3_config):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "a" / "1.png").write_bytes(b"one")
    (tmp_path / "a" / "deep" / "2.npy").write_bytes(b"two")
    dest = io.join(s3_prefix, "tree")
    io.upload_dir(str(tmp_path), dest, s3_config)
    assert io.list_files(dest, s3_config) == ["a/1.png", "a/deep/2.npy"]
    assert io.read_bytes(io.join(dest, "a/deep/2.npy"), s3_config) == b"two"


def test_read_image_and_map(s3_prefix, s3_config):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (12, 20), dtype=np.uint8)
    flt = rng.random((12, 20)).astype(np.float32)
    io.write_bytes(io.join(s3_prefix, "img.png"), io.encode_png(rgb), s3_config)
    io.write_bytes(io.join(s3_prefix, "map.png"), cv2.imencode(".png", gray)[1].tobytes(), s3_config)
    buf = pa.BufferOutputStream()
    np.save(buf, flt)  # type: ignore[arg-type]
    io.write_bytes(io.join(s3_prefix, "map.npy"), buf.getvalue().to_pybytes(), s3_config)
    assert np.array_equal(io.read_image(io.join(s3_prefix, "img.png"), s3_config), rgb)
    m8 = io.read_map(io.join(s3_prefix, "map.png"), s3_config)
    assert m8.dtype == np.uint8 and np.array_equal(m8, gray)
    assert np.array_equal(io.read_map(io.join(s3_prefix, "map.npy"), s3_config), flt)


def _relative(rows: list[dict], base: str) -> list[dict]:
    out = []
    for r in rows:
        out.append({k: (v[len(base):] if isinstance(v, str) and k.endswith("_uri") and v.startswith(base) else v)
                    for k, v in r.items()})
    return out


def test_catalog_of_uploaded_dataset_equals_local(demo_root, s3_server, s3_prefix, s3_config):
    prefix = s3_prefix[len(f"s3://{s3_server.bucket}/"):] + "/demo"
    root = s3_server.upload_dir(demo_root, prefix)
    local = build_manifest(DataConfig(layout="generic", root=str(demo_root))).to_pylist()
    remote = build_manifest(DataConfig(layout="generic", root=root), s3_config).to_pylist()
    assert len(remote) == len(local) > 0
    assert all(r["image_uri"].startswith(root + "/images/") for r in remote)
    assert any(r["gt_mask_uri"] for r in remote)
    assert _relative(remote, root) == _relative(local, str(demo_root))
    first = remote[0]
    assert io.read_image(first["image_uri"], s3_config).ndim == 3
    assert io.read_map(first["map_uri"], s3_config).ndim == 2


def test_endpoint_from_environment(s3_server, s3_prefix, monkeypatch):
    """An empty ``endpoint_override`` falls back to ``AWS_ENDPOINT_URL_S3`` (MinIO/Ceph users)."""
    uri = io.join(s3_prefix, "env.bin")
    io.write_bytes(uri, b"env", s3_server.config)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(StorageError, match="env.bin"):
        io.read_bytes(uri, S3Config())
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)  # read again, not cached
    assert io.read_bytes(uri, S3Config()) == b"env"  # scheme and host:port both from the URL


@pytest.mark.parametrize("op", ["read_bytes", "write_bytes", "exists", "list_files", "read_table"])
def test_unreachable_endpoint_is_a_quick_storage_error(op):
    cfg = S3Config(endpoint_override=f"127.0.0.1:{_closed_port()}", scheme="http", region="us-east-1",
                   access_key="testing", secret_key="testing")
    uri = f"s3://ncd-test/unreachable/{op}.parquet"
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=f"s3://ncd-test/unreachable/{op}.parquet"):
        if op == "write_bytes":
            io.write_bytes(uri, b"x", cfg)
        else:
            getattr(io, op)(uri, cfg)
    assert time.monotonic() - t0 < 10.0


@pytest.fixture
def silent_endpoint():
    """host:port of a loopback socket that accepts connections and never answers."""
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


@pytest.mark.parametrize("op", ["read_bytes", "write_bytes", "list_files"])
def test_silent_endpoint_fails_within_the_request_timeout_naming_it(op, silent_endpoint):
    """Connections succeed but no answer comes: each request gives up after
    ``s3.request_timeout_s`` (2 attempts), and the error names the endpoint."""
    cfg = S3Config(endpoint_override=silent_endpoint, scheme="http", region="us-east-1",
                   access_key="testing", secret_key="testing", request_timeout_s=1.0)
    uri = f"s3://ncd-test/silent/{op}.bin"
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=f"cannot reach S3 endpoint {silent_endpoint} for {uri}") as err:
        if op == "write_bytes":
            io.write_bytes(uri, b"x", cfg)
        else:
            getattr(io, op)(uri, cfg)
    assert time.monotonic() - t0 < 8.0  # 2 x 1 s and a back-off, not the 2 x 30 s of before
    assert "request timeout 1 s" in str(err.value) and "\n" not in str(err.value)


def test_missing_bucket_is_named_when_listing(s3_config):
    with pytest.raises(StorageError, match="S3 bucket 'missing-bucket' does not exist"):
        io.list_files("s3://missing-bucket/data/images", s3_config)


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_realiad_catalog_on_s3_equals_local(tmp_path, s3_server, s3_prefix, s3_config):
    spec = importlib.util.spec_from_file_location(
        "_realiad_tree", Path(__file__).resolve().parents[1] / "unit" / "test_catalog_realiad.py")
    tree = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tree)  # type: ignore[union-attr]
    root, maps = tree.make_realiad(tmp_path / "Real-IAD")
    local = catalog_realiad(str(root), str(maps), views=("C2",))
    base = s3_prefix[len(f"s3://{s3_server.bucket}/"):]
    s3_root = s3_server.upload_dir(root, f"{base}/Real-IAD")
    remote = catalog_realiad(s3_root, io.join(s3_root, "maps"), s3_config, views=("C2",))
    assert len(remote) == len(local) == 6
    assert _relative(remote, s3_root) == _relative(local, str(root))


def test_malicious_model_file_on_s3_is_refused_naming_it(s3_prefix, s3_config, tmp_path, malicious_model_bytes):
    from ncd.infer.predict import load_model
    from ncd.train.checkpoint import ModelFileError

    sentinel = tmp_path / "pwned"
    uri = f"{s3_prefix}/model.pt"
    io.write_bytes(uri, malicious_model_bytes(sentinel), s3_config)
    with pytest.raises(ModelFileError, match=f"cannot load model file {uri}: "):
        load_model(uri, s3_config)
    assert not sentinel.exists(), "loading the model file ran its payload"


def test_checkpoint_folder_on_s3_keeps_the_newest_and_sets_them_aside(s3_prefix, s3_config):
    from ncd.train.checkpoint import CheckpointFolder

    root = f"{s3_prefix}/checkpoints"
    folder = CheckpointFolder(root, s3_config, keep=2)
    for epoch in range(3):
        folder.save({"epoch": epoch}, epoch)
    assert io.list_files(root, s3_config) == ["epoch_0001/checkpoint.pt", "epoch_0002/checkpoint.pt"]
    assert folder.latest().state["epoch"] == 2
    folder.set_aside()
    assert folder.latest() is None
    assert io.list_files(root, s3_config) == ["_stale/epoch_0001/checkpoint.pt", "_stale/epoch_0002/checkpoint.pt"]
