"""Checkpoints and model files: safe loading, atomic writes, fingerprints, the resume policy.

Every run context (one process here and in ``ncd.train.engine``, Ray Train and Ray Tune in
``ray_jobs``) saves, finds and resumes through this module.

- A checkpoint or model file is a plain dict (dicts, lists, tensors, numbers, strings)
  written with ``torch.save`` and read with ``torch.load(weights_only=True)``: a file
  holding any other object is refused, never unpickled (unpickling runs code).
- Writes are atomic (``io.write_bytes``: a temporary file moved into place, removed
  when the write fails), so a full disk never leaves a half-written checkpoint.
- A checkpoint records a fingerprint of what it was trained on: the training regions'
  ids and content digests, the base set's, K and the class map, and every training
  setting (``train.epochs`` included: the cosine schedule depends on it). A run resumes
  only a checkpoint whose fingerprint equals its own; otherwise
  ``train.on_stale_checkpoint`` decides: ``restart`` (default) trains afresh with a
  warning naming the checkpoint and what differs, and sets the old checkpoints aside
  (``<checkpoints>/_stale/``, replacing the set put there before); ``error`` refuses.
- Resume takes the newest readable checkpoint: an unreadable (truncated, corrupt or
  unsafe) one is skipped with a warning. Only the newest ``train.keep_checkpoints`` are kept.
"""
from __future__ import annotations

import hashlib
import io as _io
import logging
import re
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Protocol

import numpy as np
import pyarrow as pa
import torch

from ncd.config import RENAMED, ConfigError, ExperimentConfig, S3Config, flat_dict, to_dict
from ncd.data import io
from ncd.data.io import DataError

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "checkpoint.pt"
STALE_DIR = "_stale"
STALE_POLICIES = ("restart", "error")
SETTING_SECTIONS = ("method", "model.", "loss.", "proto.", "train.")
# keys that do not change what is trained (the data and K are compared by the fingerprint itself)
FREE_KEYS = ("train.loader_workers", "train.checkpoint_every", "train.keep_checkpoints", "train.on_stale_checkpoint",
             "train.base_table", "train.num_novel")
CONTENT_COLUMNS = ("category", "gt_type", "crop_png", "mask_png", "anomaly_png", "object_png", "box", "area", "score")
_EPOCH_DIR = re.compile(r"^epoch_(\d+)$")


class ModelFileError(DataError):
    """A checkpoint or model file that cannot be loaded; the message names the file."""


@dataclass(frozen=True)
class Found:
    """A loaded checkpoint and where it was read from."""

    uri: str
    state: dict[str, Any]


# --- files -------------------------------------------------------------------------------

def _plain(value: Any, where: str) -> Any:
    """``value`` made loadable weights-only (numpy scalars to numbers); anything else is an error."""
    if isinstance(value, np.generic):  # before float: numpy.float64 is a float
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.dtype, torch.device)):
        return value
    if isinstance(value, dict):
        out = OrderedDict() if isinstance(value, OrderedDict) else {}
        for k, v in value.items():
            out[k] = _plain(v, f"{where}.{k}")
        if hasattr(value, "_metadata"):  # a module state dict's version record
            out._metadata = value._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f"{where} holds a {type(value).__name__}: checkpoints hold only dicts, lists, tensors, "
                    "numbers and strings")


def state_bytes(state: dict[str, Any]) -> bytes:
    """``state`` serialised so that it loads weights-only."""
    buf = _io.BytesIO()
    torch.save(_plain(state, "state"), buf)
    return buf.getvalue()


def read_state(data: bytes, uri: str, what: str = "model file") -> dict[str, Any]:
    """The dict in ``data`` (the bytes of ``uri``), loaded weights-only; a ModelFileError naming the file otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(_io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever the bytes are, the answer is the same
        text = str(err).strip()
        if not data:
            reason = "it is empty"
        elif data.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(_io.BytesIO(data)):
            reason = "it is truncated (an incomplete torch file)"
        elif "Weights only load failed" in text:
            reason = ("it is corrupt or holds objects other than weights (dicts, lists, tensors, numbers, strings), "
                      "which ncd never unpickles")
        else:
            reason = f"it is not a readable torch file ({type(err).__name__}: {text.splitlines()[0] if text else ''})"
        raise ModelFileError(f"cannot load {what} {uri}: {reason}; re-create it with ncd (discover or train), "
                             "and load model files only from sources you trust") from None
    if not isinstance(state, dict):
        raise ModelFileError(f"cannot load {what} {uri}: it holds a {type(state).__name__}, not an ncd state dict; "
                             "re-create it with ncd (discover or train)")
    return state


def save(state: dict[str, Any], uri: str, s3: S3Config | None = None) -> None:
    """Write ``state`` to ``uri`` atomically (a StorageError naming the file when the write
    fails, and nothing left behind: ``io.write_bytes``)."""
    io.write_bytes(uri, state_bytes(state), s3)


def load(uri: str, s3: S3Config | None = None, what: str = "checkpoint") -> dict[str, Any]:
    """The state dict in ``uri``, loaded weights-only."""
    return read_state(io.read_bytes(uri, s3), uri, what)


def newest_readable(uris: Iterable[str], s3: S3Config | None = None) -> Found | None:
    """The first of ``uris`` (newest first) that loads; unreadable ones are skipped with a warning."""
    for uri in uris:
        try:
            return Found(uri, load(uri, s3))
        except (ModelFileError, FileNotFoundError) as err:
            log.warning("%s; skipping it, resuming from an older checkpoint if there is one", err)
    return None


class CheckpointFolder:
    """``<root>/epoch_NNNN/checkpoint.pt`` (local or ``s3://``) with the newest ``keep`` kept."""

    def __init__(self, root: str, s3: S3Config | None = None, keep: int = 2) -> None:
        self.root, self.s3, self.keep = root, s3, keep

    def epoch_dirs(self) -> dict[str, int]:
        """The epoch folders holding a checkpoint and their epochs, newest first."""
        if not io.exists(self.root, self.s3):
            return {}
        found = (_EPOCH_DIR.match(f.split("/", 1)[0]) for f in io.list_files(self.root, self.s3)
                 if f.count("/") == 1 and f.endswith("/" + CHECKPOINT_FILE))
        return dict(sorted(((m.group(0), int(m.group(1))) for m in found if m), key=lambda d: -d[1]))

    def save(self, state: dict[str, Any], epoch: int) -> str:
        """Write the checkpoint of ``epoch``, then drop all but the newest ``keep`` up to it and
        any later one (unreadable ones that a resume skipped)."""
        uri = io.join(self.root, f"epoch_{epoch:04d}", CHECKPOINT_FILE)
        save(state, uri, self.s3)
        dirs = self.epoch_dirs()
        for old in [d for d, e in dirs.items() if e > epoch] + [d for d, e in dirs.items() if e <= epoch][self.keep:]:
            io.delete_dir(io.join(self.root, old), self.s3)
        return uri

    def latest(self) -> Found | None:
        return newest_readable((io.join(self.root, d, CHECKPOINT_FILE) for d in self.epoch_dirs()), self.s3)

    def set_aside(self) -> str:
        """Move every epoch folder to ``<root>/_stale/`` (replacing what was there); returns that folder."""
        stale = io.join(self.root, STALE_DIR)
        io.delete_dir(stale, self.s3)
        for d in self.epoch_dirs():
            io.move_dir(io.join(self.root, d), io.join(stale, d), self.s3)
        return stale


# --- fingerprint and resume policy -------------------------------------------------------

def table_digest(table: pa.Table) -> dict[str, Any]:
    """Region count and digests of the region ids and of the content training reads (order-free)."""
    ids = table.column("region_id").to_pylist()
    order = sorted(range(len(ids)), key=ids.__getitem__)
    ids_hash, content = hashlib.sha256(), hashlib.sha256()
    for i in order:
        ids_hash.update(ids[i].encode() + b"\0")
    for name in CONTENT_COLUMNS:
        if name not in table.column_names:
            continue
        values = table.column(name).to_pylist()
        content.update(name.encode() + b"\0")
        for i in order:
            v = values[i]
            content.update(v if isinstance(v, bytes) else repr(v).encode())
            content.update(b"\0")
    return {"regions": len(ids), "ids": ids_hash.hexdigest(), "content": content.hexdigest()}


def training_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """Every setting that changes what training does (flat ``section.key`` names)."""
    return {k: v for k, v in flat_dict(to_dict(cfg)).items() if k.startswith(SETTING_SECTIONS) and k not in FREE_KEYS}


def fingerprint(cfg: ExperimentConfig, novel: pa.Table, base: pa.Table | None,
                class_map: dict[str, Any]) -> dict[str, Any]:
    """What a model is trained on: data digests, classes and settings."""
    return {"novel": table_digest(novel), "base": table_digest(base) if base is not None else None,
            "classes": {k: class_map[k] for k in ("base_classes", "num_novel", "categories")},
            "settings": training_settings(cfg)}


def _data_change(name: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> str | None:
    if old == new:
        return None
    if old is None or new is None:
        return f"{name} ({'none' if old is None else 'present'} -> {'none' if new is None else 'present'})"
    if old["ids"] != new["ids"]:
        return f"{name} (other region ids: {old['regions']} -> {new['regions']} regions)"
    return f"{name} (same {new['regions']} region ids, other content)"


def differences(saved: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's fingerprint and the run's, one phrase per key.

    A setting added to ncd after the checkpoint was written is no difference while the run
    keeps it at ncd's default: a new setting's default keeps the old behaviour, so
    upgrading ncd does not discard a run's training.
    """
    if not saved:
        return ["fingerprint (none: written by an older ncd)"]
    out = [d for d in (_data_change("training regions", saved.get("novel"), now["novel"]),
                       _data_change("base set", saved.get("base"), now["base"])) if d]
    old_classes = saved.get("classes", {})
    names = {"num_novel": "K", "base_classes": "base classes", "categories": "categories"}
    out += [f"{names[k]} ({old_classes.get(k)!r} -> {v!r})" for k, v in now["classes"].items()
            if old_classes.get(k) != v]
    old_set = {k: v for k, v in saved.get("settings", {}).items() if k not in RENAMED}  # moved, unused by training
    defaults = training_settings(ExperimentConfig())
    new_set = {k: v for k, v in now["settings"].items() if k in old_set or k not in defaults or v != defaults[k]}
    out += [f"{k} ({old_set.get(k)!r} -> {new_set.get(k)!r})" for k in sorted(set(old_set) | set(new_set))
            if old_set.get(k) != new_set.get(k)]
    return out


class Resumable(Protocol):
    def latest_checkpoint(self) -> Found | None: ...

    def set_aside(self, found: Found) -> None: ...


def resume(ctx: Resumable, fp: dict[str, Any], policy: str = "restart") -> dict[str, Any] | None:
    """The checkpoint state to resume from: the newest readable one of ``ctx`` when its
    fingerprint equals ``fp``; else None (``restart``: warned, set aside) or a ConfigError (``error``)."""
    found = ctx.latest_checkpoint()
    if found is None:
        return None
    differ = differences(found.state.get("fingerprint"), fp)
    if not differ:
        return found.state
    what = "; ".join(differ)
    if policy == "error":
        raise ConfigError(f"checkpoint {found.uri} was trained on other data or settings: {what}; remove it, use "
                          "another output folder, or set train.on_stale_checkpoint=restart")
    log.warning("not resuming checkpoint %s, trained on other data or settings: %s; training afresh "
                "(train.on_stale_checkpoint=restart)", found.uri, what)
    ctx.set_aside(found)
    return None
