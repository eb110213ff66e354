"""One I/O layer for local paths and ``s3://`` URIs (pyarrow filesystems).

Every read and write in ncd goes through here, so the S3 endpoint, credentials and
error messages are handled in one place. Writes are atomic: a file is written under a
temporary name and moved into place (local), or uploaded whole (S3, where a PUT is
atomic), so a failure never leaves a half-written table.
"""
from __future__ import annotations

import functools
import io
import os
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Iterable

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ncd.config import S3Config

S3_ATTEMPTS = 2  # tries per S3 request (a silent endpoint fails after about 2 x s3.request_timeout_s)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAP_EXTENSIONS = (".png", ".npy", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


class DataError(ValueError):
    """Input data is missing, unreadable or inconsistent; the message names the file."""


class StorageError(OSError):
    """A storage location (local directory or S3 endpoint) cannot be reached."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def absolute(uri: str) -> str:
    """``uri`` unchanged for S3, made absolute for a local path (Ray workers run elsewhere)."""
    return uri if is_s3(uri) else os.path.abspath(uri)


def safe_name(name: str) -> str:
    """``name`` (a category, say) as one path segment: percent-encoded, so ``/`` and
    ``=`` never split it or make a hive partition, and never hidden or relative (a
    leading ``.`` or ``_`` is encoded too, so ``..`` cannot climb out of a folder).
    ``urllib.parse.unquote`` gives the name back."""
    if not name:
        raise DataError("an empty name cannot be a file or folder name")
    quoted = urllib.parse.quote(name, safe="")
    return f"%{ord(quoted[0]):02X}{quoted[1:]}" if quoted[0] in "._" else quoted


def join(base: str, *parts: str) -> str:
    """Join URI or path components with '/'."""
    out = base.rstrip("/")
    for p in parts:
        if p:
            out = f"{out}/{p.strip('/')}" if out else p.strip("/")
    return out


@dataclass(frozen=True)
class _S3Key:
    endpoint_override: str
    scheme: str
    region: str
    access_key: str
    secret_key: str
    connect_timeout_s: float
    request_timeout_s: float


@functools.lru_cache(maxsize=8)
def _s3_filesystem(key: _S3Key) -> pafs.S3FileSystem:
    kwargs: dict = {"connect_timeout": key.connect_timeout_s, "request_timeout": key.request_timeout_s}
    if key.endpoint_override:
        kwargs["endpoint_override"] = key.endpoint_override
        kwargs["scheme"] = key.scheme
    if key.region:
        kwargs["region"] = key.region
    if key.access_key:
        kwargs["access_key"] = key.access_key
        kwargs["secret_key"] = key.secret_key
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS)
    return pafs.S3FileSystem(**kwargs)


def _s3_key(cfg: S3Config) -> _S3Key:
    """The resolved S3 settings: ``cfg``, else the AWS environment variables.

    Resolved on every call (cheap), so the filesystem cache never serves a filesystem
    built for an endpoint or region the environment no longer names.
    """
    endpoint = cfg.endpoint_override or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")
    scheme = cfg.scheme
    if "://" in endpoint:
        scheme, endpoint = endpoint.split("://", 1)
    endpoint = endpoint.rstrip("/")
    region = cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION", "")
    return _S3Key(endpoint, scheme, region, cfg.access_key, cfg.secret_key, cfg.connect_timeout_s,
                  cfg.request_timeout_s)


def filesystem(uri: str, s3: S3Config | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it."""
    if is_s3(uri):
        return _s3_filesystem(_s3_key(s3 or S3Config())), uri[len("s3://"):]
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _wrap_errors(uri: str, err: Exception, s3: S3Config | None = None) -> Exception:
    """A one-line error naming ``uri`` (and the endpoint, for S3) and what to do."""
    if isinstance(err, FileNotFoundError):
        return FileNotFoundError(f"not found: {uri}")
    text = str(err)
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    if not is_s3(uri):
        if isinstance(err, pa.ArrowInvalid):
            return DataError(f"{uri}: cannot read it ({first})")
        if isinstance(err, OSError):
            reason = err.strerror or first
            return StorageError(f"{uri}: {reason} (check the path, its permissions and the free space)")
        return err
    if "NO_SUCH_BUCKET" in text:
        return StorageError(f"S3 bucket {uri[len('s3://'):].split('/', 1)[0]!r} does not exist ({uri}): {first}")
    if "ACCESS_DENIED" in text or "HTTP status 403" in text:
        return StorageError(f"access denied to {uri} (check the S3 credentials): {first}")
    if any(s in text for s in ("connect", "Connection", "resolve", "timed out", "Timeout",
                               "curlCode", "Unable to", "endpoint")):
        key = _s3_key(s3 or S3Config())
        where = key.endpoint_override or "the default AWS endpoint"
        return StorageError(f"cannot reach S3 endpoint {where} for {uri} (connect timeout {key.connect_timeout_s:g} s, "
                            f"request timeout {key.request_timeout_s:g} s, {S3_ATTEMPTS} attempts): check "
                            f"s3.endpoint_override and that the server is up ({first})")
    if isinstance(err, pa.ArrowInvalid):
        return DataError(f"{uri}: cannot read it ({first})")
    if isinstance(err, OSError) and uri not in text:
        return OSError(f"{uri}: {first}")
    return err


def read_bytes(uri: str, s3: S3Config | None = None) -> bytes:
    """The whole content of one file."""
    fs, path = filesystem(uri, s3)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (OSError, pa.ArrowException) as err:
        raise _wrap_errors(uri, err, s3) from None


def write_bytes(uri: str, data: bytes, s3: S3Config | None = None) -> None:
    """Write ``data`` to ``uri`` atomically, creating parent directories."""
    fs, path = filesystem(uri, s3)
    parent = str(PurePosixPath(path).parent)
    try:
        if is_s3(uri):
            with fs.open_output_stream(path) as f:
                f.write(data)
            return
        fs.create_dir(parent, recursive=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):  # a full disk or an interruption leaves no partial file behind
                os.remove(tmp)
            raise
    except (OSError, pa.ArrowException) as err:
        raise _wrap_errors(uri, err, s3) from None


def exists(uri: str, s3: S3Config | None = None) -> bool:
    fs, path = filesystem(uri, s3)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except (OSError, pa.ArrowException) as err:
        raise _wrap_errors(uri, err, s3) from None


def is_dir(uri: str, s3: S3Config | None = None) -> bool:
    fs, path = filesystem(uri, s3)
    try:
        return fs.get_file_info(path).type == pafs.FileType.Directory
    except (OSError, pa.ArrowException) as err:
        raise _wrap_errors(uri, err, s3) from None


def _check_bucket(uri: str, fs: pafs.FileSystem) -> None:
    """A StorageError naming the bucket of an ``s3://`` URI when it does not exist."""
    if not is_s3(uri):
        return
    bucket = uri[len("s3://"):].split("/", 1)[0]
    if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
        raise StorageError(f"S3 bucket {bucket!r} does not exist ({uri}): check the bucket name in the path "
                           "and s3.endpoint_override")


def list_files(root: str, s3: S3Config | None = None, extensions: Iterable[str] | None = None) -> list[str]:
    """Relative POSIX paths of all files under ``root`` (recursive, sorted)."""
    fs, path = filesystem(root, s3)
    exts = tuple(e.lower() for e in extensions) if extensions else None
    try:
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.Directory:
            _check_bucket(root, fs)
            raise FileNotFoundError(f"not a directory: {root}")
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except StorageError:
        raise
    except FileNotFoundError:
        raise FileNotFoundError(f"not a directory: {root}") from None
    except (OSError, pa.ArrowException) as err:
        raise _wrap_errors(root, err, s3) from None
    base = path.rstrip("/") + "/"
    out = []
    for i in infos:
        if i.type != pafs.FileType.File:
            continue
        rel = i.path[len(base):] if i.path.startswith(base) else i.path
        name = rel.rsplit("/", 1)[-1]
        if name.startswith("."):
            continue
        if exts is None or name.lower().endswith(exts):
            out.append(rel)
    return sorted(out)


def decode_image(data: bytes, uri: str) -> np.ndarray:
    """RGB uint8 (H,W,3) from encoded bytes; corrupt data is a DataError naming ``uri``."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if arr is None:
        raise DataError(f"corrupt or unreadable image: {uri}")
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


def read_image(uri: str, s3: S3Config | None = None) -> np.ndarray:
    """RGB uint8 (H,W,3)."""
    return decode_image(read_bytes(uri, s3), uri)


def decode_map(data: bytes, uri: str) -> np.ndarray:
    """A 2-D anomaly map as stored: uint8 or uint16 PNG, ``.npy`` or float TIFF.

    8-bit maps are returned as uint8 (the upstream scale); other dtypes as float32 or
    uint16 for the caller to normalise per category.
    """
    name = uri.lower()
    try:
        if name.endswith(".npy"):
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        elif name.endswith((".tif", ".tiff")):
            import tifffile

            arr = tifffile.imread(io.BytesIO(data))
        else:
            arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
            if arr is not None and arr.ndim == 3:
                arr = arr[..., 0] if arr.shape[2] in (1,) else cv2.cvtColor(arr[..., :3], cv2.COLOR_BGR2GRAY)
    except Exception as err:  # noqa: BLE001 - any decoder failure is a corrupt file
        raise DataError(f"corrupt or unreadable anomaly map: {uri} ({err})") from None
    if arr is None:
        raise DataError(f"corrupt or unreadable anomaly map: {uri}")
    arr = np.asarray(arr)
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr[0] if arr.shape[0] == 1 else arr[..., 0]
    if arr.ndim != 2:
        raise DataError(f"anomaly map must be 2-D, got shape {arr.shape}: {uri}")
    if arr.dtype == np.uint8 or arr.dtype == np.uint16:
        return arr
    if not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"anomaly map has non-numeric dtype {arr.dtype}: {uri}")
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise DataError(f"anomaly map holds NaN or inf values: {uri}")
    return arr


def read_map(uri: str, s3: S3Config | None = None) -> np.ndarray:
    return decode_map(read_bytes(uri, s3), uri)


def encode_png(arr: np.ndarray) -> bytes:
    """PNG bytes of a uint8 gray (H,W) or RGB (H,W,3) array (deterministic)."""
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise DataError("PNG encoding failed")
    return buf.tobytes()


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as the bytes of a ``.npy`` file."""
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def decode_png_gray(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)


def write_table(table: pa.Table, uri: str, s3: S3Config | None = None) -> None:
    """Write a Parquet (``.parquet``) or CSV (``.csv``) table atomically."""
    sink = pa.BufferOutputStream()
    if uri.endswith(".csv"):
        pacsv.write_csv(table, sink)
    else:
        pq.write_table(table, sink, compression="zstd")
    write_bytes(uri, sink.getvalue().to_pybytes(), s3)


def read_table(uri: str, s3: S3Config | None = None) -> pa.Table:
    """Read a Parquet file, a directory of Parquet files, or a CSV file."""
    fs, path = filesystem(uri, s3)
    try:
        if uri.endswith(".csv"):
            return pacsv.read_csv(io.BytesIO(read_bytes(uri, s3)))
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"table not found: {uri}")
        return pq.read_table(path, filesystem=fs)
    except FileNotFoundError:
        raise
    except pa.ArrowInvalid as err:
        kind = "CSV" if uri.endswith(".csv") else "Parquet"
        raise DataError(f"{uri} is not a readable {kind} table ({str(err).strip().splitlines()[0]}); "
                        "give a Parquet file (or folder of them) or a .csv file") from None
    except (OSError, pa.ArrowException) as err:
        raise _wrap_errors(uri, err, s3) from None


def upload_dir(local_dir: str, dest: str, s3: S3Config | None = None) -> None:
    """Copy every file under the local directory ``local_dir`` to ``dest`` (local or
    ``s3://``), keeping relative paths; files already under ``dest`` are overwritten.

    Not atomic as a whole (each S3 object is, as in ``write_bytes``): for staging inputs
    such as a generated dataset, not for tables readers may be reading.
    """
    dst_fs, dst = filesystem(dest, s3)
    try:
        pafs.copy_files(os.path.abspath(local_dir), dst, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=dst_fs)
    except (OSError, pa.ArrowException) as err:
        raise _wrap_errors(dest, err, s3) from None


def delete_dir(uri: str, s3: S3Config | None = None) -> None:
    fs, path = filesystem(uri, s3)
    try:
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)
    except (OSError, pa.ArrowException) as err:
        raise _wrap_errors(uri, err, s3) from None


def move_dir(src: str, dest: str, s3: S3Config | None = None) -> None:
    """Move the directory ``src`` to ``dest`` (which must not exist): a rename locally,
    copy then delete per object on S3."""
    fs, source = filesystem(src, s3)
    _, target = filesystem(dest, s3)
    try:
        if not is_s3(src):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(source, target)
            return
        pafs.copy_files(source, target, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(source)
    except (OSError, pa.ArrowException) as err:
        raise _wrap_errors(src, err) from None


def replace_dir(staging: str, dest: str, s3: S3Config | None = None) -> None:
    """Move a fully written ``staging`` directory to ``dest``, replacing what was there.

    Local: two renames, so ``dest`` is never half-written. S3 has no rename: the old
    objects are deleted, the new ones copied, then the staging prefix is deleted, so a
    concurrent reader may see the table missing or partial (never a truncated file):
    for whole-table writes nobody reads yet (tests, benchmarks). Tables that readers
    use while they change are published per category by ``region_table.publish_category``.
    """
    fs, src = filesystem(staging, s3)
    _, dst = filesystem(dest, s3)
    try:
        if not is_s3(dest):
            old = f"{dst}.old-{uuid.uuid4().hex[:8]}"
            had_old = os.path.isdir(dst)
            if had_old:
                os.replace(dst, old)
            os.replace(src, dst)
            if had_old:
                fs.delete_dir(old)
            return
        if fs.get_file_info(dst).type == pafs.FileType.Directory:
            fs.delete_dir(dst)
        for info in fs.get_file_info(pafs.FileSelector(src, recursive=True)):
            if info.type == pafs.FileType.File:
                fs.copy_file(info.path, dst + info.path[len(src):])
        fs.delete_dir(src)
    except (OSError, pa.ArrowException) as err:
        raise _wrap_errors(dest, err, s3) from None
