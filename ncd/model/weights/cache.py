"""A cache of converted state dicts on local disk (``$NCD_CACHE_DIR`` or ``~/.cache/ncd``).

A conversion is stored as one ``.safetensors`` file named after what produced it
(``<name>-<key>.safetensors``), so it runs once per source file and converter version.
"""
from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

log = logging.getLogger(__name__)

CACHE_ENV = "NCD_CACHE_DIR"


def cache_dir() -> Path:
    """``$NCD_CACHE_DIR`` when set, else ``~/.cache/ncd``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ncd"


def file_key(path: Path, version: int) -> str:
    """A short key of a source file (size + mtime) and the converter ``version``."""
    st = path.stat()
    text = f"{version}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(name: str, key: str) -> Path:
    """Where the conversion ``name`` with ``key`` is (or would be) stored."""
    return cache_dir() / f"{name}-{key}.safetensors"


def cached_state_dict(name: str, key: str, build: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """The state dict cached under (``name``, ``key``), built by ``build()`` on a miss.

    A cache that cannot be read is rebuilt; one that cannot be written is skipped with
    a warning (the state dict is still returned).
    """
    from safetensors.torch import load_file, save_file

    path = cache_path(name, key)
    if path.is_file():
        try:
            sd = load_file(str(path))
            log.debug("%s: cached conversion %s", name, path)
            return sd
        except Exception as err:  # noqa: BLE001 - a corrupt cache is rebuilt, whatever the cause
            log.warning("%s: unreadable cache %s (%s); converting again", name, path, err)
    sd = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # same filesystem
        try:
            save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata={"ncd_key": key})
            os.replace(tmp, path)  # atomic: concurrent readers see the old state or the whole file
        finally:
            tmp.unlink(missing_ok=True)
        log.info("%s: conversion cached at %s", name, path)
    except Exception as err:  # noqa: BLE001 - a cache that cannot be written must not fail the load
        log.warning("%s: cannot write cache %s (%s); conversion will run again next time", name, path, err)
    return sd
