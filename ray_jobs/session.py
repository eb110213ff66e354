"""Starting or joining Ray for an ncd job: credentials and console output in one place.

S3 keys given in the config never travel inside a config: every config handed to a
Ray worker is ``ncd.config.redacted``, and the keys reach the workers as the usual
``AWS_*`` variables of the job's runtime env (which the AWS SDK inside pyarrow reads).
On a cluster, prefer giving them in the runtime env of ``ray job submit`` and leaving
them out of the config (cluster/README.md).

By default only ncd's own progress and results are printed; Ray's INFO logs (Ray
Data's execution plans and progress bars, resource tables, Train and Tune status)
appear with ``--verbose``.
"""
from __future__ import annotations

import logging
import os

import pyarrow.fs as pafs

from ncd import io
from ncd.config import S3Config, redacted_s3

RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.air")
# notices that say nothing to an ncd user (the local instance's token auth, Ray Data's
# "progress bars disabled"): shown with --verbose only
NOTICE_LOGGERS = ("ray._private.authentication", "ray.data._internal.progress")


def credential_env(s3: S3Config) -> dict[str, str]:
    """The ``AWS_*`` variables that carry the keys of ``s3`` (empty when it has none)."""
    if not s3.access_key:
        return {}
    return {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}


def quiet_ray(verbose: bool) -> None:
    """Ray's own loggers at WARNING (INFO with ``verbose``), Ray Data without progress bars."""
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    for name in NOTICE_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        try:
            import ray.data

            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
        except ImportError:  # pragma: no cover - Ray without Ray Data
            pass


class PlainFormatter(logging.Formatter):
    """The message alone; warnings and errors say so first."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def setup_logging(verbose: bool) -> None:
    """ncd's own log lines (INFO) as plain text; other libraries' at WARNING; everything,
    with timestamps, under ``verbose``."""
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    else:
        logging.basicConfig(level=logging.WARNING, format="%(message)s", force=True)
        for handler in logging.getLogger().handlers:
            handler.setFormatter(PlainFormatter())
        for name in ("ncd", "ray_jobs"):
            logging.getLogger(name).setLevel(logging.INFO)
    quiet_ray(verbose)


def run_storage(storage: str, s3: S3Config) -> tuple[pafs.FileSystem | None, str]:
    """Ray Train / Tune run storage: (custom filesystem or None, path inside it).

    For ``s3://`` the filesystem carries the endpoint but no keys: Ray pickles it into
    its run state (Tune's ``tuner.pkl``, in the bucket), so its credentials come from
    the environment (``start_ray``)."""
    if not io.is_s3(storage):
        return None, storage
    return io.filesystem(storage, redacted_s3(s3))


def start_ray(address: str | None, s3: S3Config, verbose: bool = False) -> None:
    """Join the Ray cluster at ``address`` (or start a local one) for an ncd job.

    The keys in ``s3`` (if any) go to the workers in the job's runtime env and to this
    process's environment (for the keyless filesystems handed to Ray, ``run_storage``);
    Ray's logs reach the console only with ``verbose``.
    """
    import ray

    quiet_ray(verbose)
    env = credential_env(s3)
    os.environ.update(env)
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=verbose, configure_logging=verbose,
             logging_level=logging.INFO if verbose else logging.WARNING,
             runtime_env={"env_vars": env} if env else None)
    quiet_ray(verbose)  # ray.init may have configured its loggers again
