"""The Ray wiring every launcher shares: its command-line flags, console output, starting
or joining Ray with the job's credentials (``start_job``), and Train/Tune run storage.
Launchers (``ray_jobs.<stage>``) import this module and ``ncd``, never each other in a
circle (``tests/unit/test_imports.py`` checks).

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

import argparse
import logging
import os
from collections.abc import Sequence

import pyarrow.fs as pafs

from ncd.cli import checked_config, console_logging
from ncd.config import ExperimentConfig, S3Config, redacted_s3
from ncd.data import io

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


def setup_logging(verbose: bool) -> None:
    """ncd's and the launchers' own log lines (INFO) as plain text, other libraries' and
    Ray's at WARNING; everything, with timestamps, under ``verbose``."""
    console_logging(verbose, ("ncd", "ray_jobs"))
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


def add_ray_arguments(p: argparse.ArgumentParser, local: str | None = None) -> argparse.ArgumentParser:
    """``--local`` (with its help line ``local``; None: no such flag) and ``--address``."""
    if local:
        p.add_argument("--local", action="store_true", help=local)
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local instance)")
    return p


def add_discover_ray_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Where ``discover`` runs (after ``ncd.cli.add_discover_arguments``)."""
    add_ray_arguments(p, local="run every stage in this process (no Ray)")
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (and inference actors)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="also show Ray's logs and full tracebacks")
    return p


def add_detect_ray_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Where ``detect`` runs (after ``ncd.cli.add_detect_arguments``)."""
    add_ray_arguments(p, local="run in this process (no Ray)")
    p.add_argument("--num-actors", type=int, default=1, help="feature actors")
    p.add_argument("--use-gpu", action="store_true")
    return p


def add_job_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--config``, ``--set``, ``--address`` and ``-v`` of a ``python -m ray_jobs.<stage>`` launcher."""
    p.add_argument("--config", default=None, help="YAML file or packaged config name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_ray_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="also show Ray's logs")
    return p


def start_job(args: argparse.Namespace, overrides: Sequence[str] | None = None) -> ExperimentConfig:
    """A launcher's start: console logging, the validated config of ``--config`` and
    ``--set`` (or ``overrides``), then Ray at ``--address`` with its credentials."""
    setup_logging(args.verbose)
    cfg = checked_config(args.config, args.overrides if overrides is None else overrides)
    start_ray(args.address, cfg.s3, args.verbose)
    return cfg
