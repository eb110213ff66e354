"""The command line without Ray: every command that runs in this process.

``python -m ncd.cli`` offers ``demo-data``, ``catalog``, ``preprocess``, ``evaluate``,
``train``, ``detect`` and ``discover``, all in this process. The ``ncd`` console command
(``ray_jobs/cli.py``) offers the same commands, names and flags, plus the Ray-backed
runs (``--local`` there selects what this module does) and ``demo``. This module never
imports Ray, and the argument helpers here (``config_path``, ``discover_config``, ...)
are what the Ray launchers use too.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ncd.config import ConfigError, ExperimentConfig, load_config
from ncd.data import io
from ncd.data.io import DataError, StorageError
from ncd.evaluate.health import CollapseError

log = logging.getLogger("ncd")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class Progress:
    """A one-line progress display on stderr (a line per update when not a terminal)."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr  # looked up now, so redirections made after import apply
        self.tty = self.stream.isatty()
        self.last = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < (0.1 if self.tty else 5.0):
            return
        self.last = now
        text = f"[{stage}] {done}/{total} ({100.0 * done / max(total, 1):.0f}%)"
        if self.tty:
            self.stream.write("\r" + text + ("\n" if done >= total else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


class PlainFormatter(logging.Formatter):
    """The message alone; warnings and errors say so first."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def console_logging(verbose: bool, loggers: Sequence[str] = ("ncd",)) -> None:
    """``loggers``' own lines (INFO) as plain text; other libraries' at WARNING; everything,
    with timestamps, under ``verbose``."""
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
        return
    logging.basicConfig(level=logging.WARNING, format="%(message)s", force=True)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(PlainFormatter())
    for name in loggers:
        logging.getLogger(name).setLevel(logging.INFO)


# --- configs -----------------------------------------------------------------------------

def config_path(name_or_path: str | None) -> str | None:
    """A config file path; bare names resolve to the packaged ``ncd/configs/<name>.yaml``."""
    if not name_or_path:
        return None
    p = Path(name_or_path)
    if p.exists() or p.suffix in (".yaml", ".yml"):
        return str(p)
    packaged = CONFIG_DIR / f"{name_or_path}.yaml"
    if packaged.exists():
        return str(packaged)
    known = ", ".join(sorted(x.stem for x in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {name_or_path!r} not found (packaged configs: {known})")


def checked_config(name_or_path: str | None, overrides: Sequence[str]) -> ExperimentConfig:
    """The validated config of ``--config`` and ``--set`` (every bad value in one error)."""
    from ncd.validation import validate

    return validate(load_config(config_path(name_or_path), overrides))


def add_config_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--config`` and ``--set``."""
    p.add_argument("--config", default=None, help="YAML file or packaged config name (e.g. demo_smoke)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set mebin.min_interval_len=5 (repeatable)")
    return p


def add_discover_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """What ``discover`` runs on (the Ray launchers add where it runs: ``ray_jobs.session``)."""
    p.add_argument("--config", default=None, help="YAML file or packaged config name (e.g. mtd)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--images", default=None, help="dataset root (sets data.root)")
    p.add_argument("--maps", default=None, help="anomaly maps root (sets data.maps)")
    p.add_argument("--layout", default=None, help="generic | mvtec | mtd | manifest (sets data.layout)")
    p.add_argument("--out", default=None, help="output folder or s3:// prefix (sets output and preprocess.output)")
    p.add_argument("--k", default=None, help="number of novel classes K: a number, 'auto' (estimated without labels) or 'gt' "
                   "(the oracle ground-truth count); sets train.num_novel")
    p.add_argument("--method", default=None, help="anomalyncd | protoanomalyncd | frozen")
    return p


def discover_config(args: argparse.Namespace) -> ExperimentConfig:
    """The config that ``discover`` arguments describe."""
    sets = list(args.overrides)
    if args.images:
        sets.append(f"data.root={args.images}")
    if args.maps:
        sets.append(f"data.maps={args.maps}")
    if args.layout:
        sets.append(f"data.layout={args.layout}")
    if args.out:
        sets += [f"output={args.out}", f"preprocess.output={args.out}"]
    if args.k:
        sets.append(f"train.num_novel={args.k}")
    if args.method:
        sets.append(f"method={args.method}")
    return checked_config(args.config, sets)


def add_detect_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """What ``detect`` runs on (the Ray launchers add where it runs: ``ray_jobs.session``)."""
    p.add_argument("--config", default=None, help="YAML file or packaged config name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. --set detect.mode=zero_shot --set detect.image_size=518 (repeatable)")
    p.add_argument("--images", default=None, help="dataset root (sets data.root)")
    p.add_argument("--layout", default=None, help="generic | mvtec | mtd (sets data.layout)")
    p.add_argument("--out", default=None, help="maps folder or s3:// prefix (sets detect.output)")
    p.add_argument("--normal", default=None, help="folder of normal images: few-shot memory bank (sets detect.normal)")
    return p


def detect_config(args: argparse.Namespace) -> ExperimentConfig:
    sets = list(args.overrides)
    for flag, key in (("images", "data.root"), ("layout", "data.layout"), ("out", "detect.output"),
                      ("normal", "detect.normal")):
        if getattr(args, flag):
            sets.append(f"{key}={getattr(args, flag)}")
    return load_config(config_path(args.config), sets)


# --- commands ----------------------------------------------------------------------------

def cmd_demo_data(args: argparse.Namespace) -> int:
    from ncd.data.synthetic import SyntheticSpec, write_dataset

    spec = SyntheticSpec(seed=args.seed, image_size=args.size, images_per_family=args.per_family)
    root = write_dataset(args.out, spec)
    print(f"demo data written to {root}")
    return 0


def demo_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--per-family", type=int, default=8)


def cmd_catalog(args: argparse.Namespace) -> int:
    from ncd.data.catalog import build_manifest

    cfg = checked_config(args.config, args.overrides)
    table = build_manifest(cfg.data, cfg.s3)
    out = args.out or io.join(cfg.output, "manifest.parquet")
    io.write_table(table, out, cfg.s3)
    print(f"{table.num_rows} images -> {out}")
    return 0


def catalog_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--out", default=None, help="manifest path (.parquet or .csv); default <output>/manifest.parquet")


def cmd_preprocess(args: argparse.Namespace) -> int:
    from ncd.data.catalog import build_manifest
    from ncd.data.region_table import update_regions

    cfg = checked_config(args.config, args.overrides)
    t0 = time.perf_counter()
    manifest = build_manifest(cfg.data, cfg.s3)
    stats = update_regions(manifest, cfg.preprocess.output, cfg.mebin, cfg.crop, cfg.data, cfg.s3, cfg.proto,
                           progress=Progress())
    print(f"{stats.images} images -> {stats.regions} regions in {time.perf_counter() - t0:.1f}s -> {stats.uri}"
          + (f" ({len(stats.skipped)} categories already complete: {', '.join(stats.skipped)})"
             if stats.skipped else ""))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ncd.evaluate.predictions import evaluate_predictions, metrics_markdown

    table = io.read_table(args.predictions)
    result = evaluate_predictions(table, truth_column=args.truth_column, pred_column=args.pred_column)
    text = json.dumps(result, indent=2)
    if args.out:
        io.write_bytes(io.join(args.out, "metrics.json"), text.encode())
        io.write_bytes(io.join(args.out, "metrics.md"), metrics_markdown(result).encode())
    print(metrics_markdown(result))
    return 0


def evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("predictions", help="Parquet or CSV with category, truth and predicted cluster columns")
    p.add_argument("--truth-column", default="gt_type")
    p.add_argument("--pred-column", default="cluster")
    p.add_argument("--out", default=None, help="folder for metrics.json and metrics.md")


def cmd_train(args: argparse.Namespace) -> int:
    from ncd.data.region_table import read_regions
    from ncd.infer.predict import save_model
    from ncd.pipeline import LOCAL_STAGES, base_set, choose_k, finish_model, k_label, local_infer, local_train

    cfg = checked_config(args.config, args.overrides)
    regions = read_regions(args.regions or io.join(cfg.preprocess.output, "regions"), cfg.s3)
    cfg, k_info = choose_k(cfg, regions)
    trained = local_train(cfg, regions, base_set(cfg, LOCAL_STAGES))
    outputs = local_infer(trained, regions)
    trained = finish_model(trained, outputs, regions.column("image_id").to_pylist())[0]
    out = io.join(cfg.output, "model.pt")
    save_model(trained, out, cfg.s3)
    print(f"model -> {out} (head {trained.head}, {k_label(k_info)})")
    return 0


def train_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--regions", default=None, help="region table (default <preprocess.output>/regions)")


def print_detected(cfg: ExperimentConfig, table) -> int:
    """The one-line result of ``detect``."""
    from ncd.detect import maps_root

    modes = sorted(set(table.column("mode").to_pylist()))
    print(f"{table.num_rows} maps ({', '.join(modes)}) -> {maps_root(cfg)} (image scores: image_scores.parquet)")
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from ncd.detect import detect_local

    cfg = detect_config(args)
    return print_detected(cfg, detect_local(cfg, progress=Progress()))


def discover_here(cfg: ExperimentConfig) -> int:
    """``discover`` with every stage in this process, printing its summary."""
    from ncd.pipeline import LOCAL_STAGES, discover, summary_text

    summary = discover(cfg, LOCAL_STAGES, progress=print)
    print(summary_text(summary))
    return 0


def cmd_discover(args: argparse.Namespace) -> int:
    return discover_here(discover_config(args))


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, help line, arguments and what it runs (``run(args) -> exit code``)."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], object]
    run: Callable[[argparse.Namespace], int]
    own_parser: bool = False  # parses its own arguments (``args.argv``), e.g. discover on Ray


COMMANDS: tuple[Command, ...] = (
    Command("demo-data", "write the embedded synthetic dataset (generic layout)", demo_data_arguments, cmd_demo_data),
    Command("catalog", "build the manifest table of a dataset", catalog_arguments, cmd_catalog),
    Command("preprocess", "MEBin + crops -> region table", add_config_arguments, cmd_preprocess),
    Command("evaluate", "NMI / ARI / F1 from a predictions table", evaluate_arguments, cmd_evaluate),
    Command("train", "train in this process (Ray Train: python -m ray_jobs.train)", train_arguments, cmd_train),
    Command("detect", "anomaly maps from raw images (zero-shot or few-shot)", add_detect_arguments, cmd_detect),
    Command("discover", "catalog -> preprocess -> train -> infer -> evaluate", add_discover_arguments, cmd_discover),
)


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ncd", description="Discover and classify new kinds of industrial defects.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in commands:
        p = sub.add_parser(command.name, help=command.help, add_help=not command.own_parser)
        command.arguments(p)
        p.set_defaults(func=command.run, own_parser=command.own_parser)
    return parser


def _training_error() -> type[Exception]:
    """``ncd.train.engine.TrainingError`` once training code is loaded (the CLI does not import torch up front)."""
    engine = sys.modules.get("ncd.train.engine")
    return engine.TrainingError if engine else ConfigError


def main(argv: list[str] | None = None, commands: Sequence[Command] = COMMANDS,
         setup_logging: Callable[[bool], None] = console_logging) -> int:
    """Run one command; a known fault is one line on stderr (the traceback too under ``-v``) and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    args, rest = build_parser(commands).parse_known_args(argv)
    if args.own_parser:
        args.argv = rest + (["--verbose"] if args.verbose else [])
    elif rest:
        build_parser(commands).parse_args(argv)  # reports the unknown arguments
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except (ConfigError, DataError, StorageError, FileNotFoundError, CollapseError, _training_error()) as err:
        if args.verbose:
            traceback.print_exc()
        cause = getattr(err, "cause", None) or err  # an error raised in a Ray worker: its own message
        print(f"ncd {args.command}: error: {str(cause).strip().splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
