"""The ``ncd`` command line (the console entry point).

The commands of ``ncd.cli`` (``demo-data``, ``catalog``, ``evaluate``, ``train``) run in
this process without Ray, as there; ``preprocess``, ``detect`` and ``discover`` run on Ray
unless given ``--local`` (then ``ncd.cli`` runs them), and ``demo`` runs the main job on
the embedded data. The Ray launchers are imported only by the command that needs them.
"""
from __future__ import annotations

import argparse
import sys

from ncd import cli as library
from ncd.cli import Command, Progress, add_config_arguments, add_detect_arguments, add_discover_arguments
from ray_jobs.session import (add_detect_ray_arguments, add_discover_ray_arguments, add_ray_arguments, setup_logging,
                              start_ray)


def preprocess_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    add_ray_arguments(p, local="run in this process instead of on Ray Data")


def cmd_preprocess(args: argparse.Namespace) -> int:
    if args.local:
        return library.cmd_preprocess(args)
    from ray_jobs.preprocess import run_preprocess

    cfg = library.checked_config(args.config, args.overrides)
    start_ray(args.address, cfg.s3, args.verbose)
    print(run_preprocess(cfg))
    return 0


def detect_arguments(p: argparse.ArgumentParser) -> None:
    add_detect_arguments(p)
    add_detect_ray_arguments(p)


def cmd_detect(args: argparse.Namespace) -> int:
    if args.local:
        return library.cmd_detect(args)
    from ray_jobs.detect import run_detect

    cfg = library.detect_config(args)
    start_ray(args.address, cfg.s3, args.verbose)
    return library.print_detected(cfg, run_detect(cfg, num_actors=args.num_actors, use_gpu=args.use_gpu,
                                                  progress=Progress()))


def cmd_discover(args: argparse.Namespace) -> int:
    from ray_jobs.discover import main as discover_main

    return discover_main(args.argv)


def demo_arguments(p: argparse.ArgumentParser) -> None:
    add_discover_arguments(p)
    add_discover_ray_arguments(p)


def cmd_demo(args: argparse.Namespace) -> int:
    from ray_jobs.demo import run_demo

    return run_demo(args)


_LIBRARY = {c.name: c for c in library.COMMANDS}
COMMANDS: tuple[Command, ...] = (
    _LIBRARY["demo-data"],
    _LIBRARY["catalog"],
    Command("preprocess", _LIBRARY["preprocess"].help, preprocess_arguments, cmd_preprocess),
    _LIBRARY["evaluate"],
    _LIBRARY["train"],
    Command("detect", _LIBRARY["detect"].help, detect_arguments, cmd_detect),
    Command("discover", _LIBRARY["discover"].help, lambda p: None, cmd_discover, own_parser=True),
    Command("demo", "run the main job on the embedded demo data", demo_arguments, cmd_demo),
)


def build_parser() -> argparse.ArgumentParser:
    return library.build_parser(COMMANDS)


def main(argv: list[str] | None = None) -> int:
    return library.main(argv, COMMANDS, setup_logging)


if __name__ == "__main__":
    sys.exit(main())
