import cv2
import numpy as np
import pyarrow as pa
import pytest
import tifffile

from ncd.config import S3Config
from ncd.data import io
from ncd.data.io import DataError, StorageError


def test_map_formats_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    m8 = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    m16 = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    mf = rng.random((20, 30)).astype(np.float32)
    cv2.imwrite(str(tmp_path / "a.png"), m8)
    cv2.imwrite(str(tmp_path / "b.png"), m16)
    np.save(tmp_path / "c.npy", mf)
    tifffile.imwrite(tmp_path / "d.tiff", mf)
    assert np.array_equal(io.read_map(str(tmp_path / "a.png")), m8) and io.read_map(str(tmp_path / "a.png")).dtype == np.uint8
    assert np.array_equal(io.read_map(str(tmp_path / "b.png")), m16)
    assert np.array_equal(io.read_map(str(tmp_path / "c.npy")), mf)
    assert np.array_equal(io.read_map(str(tmp_path / "d.tiff")), mf)


def test_corrupt_files_are_named(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png"):
        io.read_image(str(tmp_path / "bad.png"))
    with pytest.raises(DataError, match="bad.png"):
        io.read_map(str(tmp_path / "bad.png"))
    np.save(tmp_path / "nan.npy", np.array([[np.nan, 1.0], [0.0, 1.0]], np.float32))
    with pytest.raises(DataError, match="NaN"):
        io.read_map(str(tmp_path / "nan.npy"))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        io.read_image(str(tmp_path / "missing.png"))


def test_write_table_is_atomic_and_keeps_old_on_failure(tmp_path):
    uri = str(tmp_path / "t" / "x.parquet")
    io.write_table(pa.table({"a": [1, 2]}), uri)
    assert io.read_table(uri).column("a").to_pylist() == [1, 2]

    class Boom:
        pass

    with pytest.raises(Exception):
        io.write_table(pa.table({"a": [Boom()]}), uri)  # cannot even build: nothing written
    assert io.read_table(uri).column("a").to_pylist() == [1, 2]
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["x.parquet"]


def test_replace_dir_swaps_whole_directories(tmp_path):
    dest = str(tmp_path / "regions")
    for n, value in ((0, 1), (1, 2)):
        staging = str(tmp_path / f"_staging{n}")
        io.write_table(pa.table({"a": [value]}), staging + "/part-0.parquet")
        io.replace_dir(staging, dest)
        assert io.read_table(dest).column("a").to_pylist() == [value]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["regions"]


def test_unreachable_s3_is_a_clear_error():
    cfg = S3Config(endpoint_override="127.0.0.1:9", scheme="http", access_key="a", secret_key="b",
                   connect_timeout_s=1.0)
    with pytest.raises((StorageError, OSError), match="s3://bucket/x.parquet"):
        io.read_bytes("s3://bucket/x.parquet", cfg)


@pytest.mark.parametrize("name", ["../x", "..", ".", "a/b", "/abs", "x=1", "_hidden", ".dot", "ü ß%", "plate"])
def test_safe_name_is_one_plain_segment_that_round_trips(name, tmp_path):
    import urllib.parse

    safe = io.safe_name(name)
    assert "/" not in safe and "=" not in safe and safe not in (".", "..") and not safe.startswith((".", "_"))
    assert urllib.parse.unquote(safe) == name
    target = tmp_path / "out" / f"{safe}.pt"
    io.write_bytes(str(target), b"x")  # lands inside the folder, under that one name
    assert [p.name for p in (tmp_path / "out").iterdir()] == [f"{safe}.pt"]
    assert io.safe_name("plate") == "plate"  # plain names stay readable


def test_safe_name_rejects_an_empty_name():
    with pytest.raises(io.DataError, match="empty"):
        io.safe_name("")


def test_unwritable_output_is_a_storage_error_naming_it_and_leaves_no_temporary_file(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_bytes(b"x")  # a folder that cannot be created (a file is in the way)
    with pytest.raises(StorageError, match=f"{blocker}/out/summary.json"):
        io.write_bytes(str(blocker / "out" / "summary.json"), b"{}")
    out = tmp_path / "out"
    out.mkdir()
    (out / "t.bin").mkdir()  # the final name is taken by a folder: the rename fails after the write
    with pytest.raises(StorageError, match="t.bin"):
        io.write_bytes(str(out / "t.bin"), b"payload")
    assert sorted(p.name for p in out.iterdir()) == ["t.bin"]  # no t.bin.tmp-* left behind


def test_a_table_that_is_not_parquet_is_a_data_error_naming_it(tmp_path):
    bad = tmp_path / "predictions.parquet"
    bad.write_text("image_id,cluster\na,1\n")
    with pytest.raises(DataError, match=f"{bad} is not a readable Parquet table"):
        io.read_table(str(bad))
