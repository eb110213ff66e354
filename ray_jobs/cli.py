"""The ``ncd`` command line.

Pure stages (``catalog``, ``preprocess --local``, ``evaluate``, ``demo-data``) run in this
process without Ray; the Ray-backed stages import their ``ray_jobs`` module lazily.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from pathlib import Path

from ncd import io
from ncd.config import ConfigError, ExperimentConfig, load_config
from ncd.health import CollapseError
from ncd.io import DataError, StorageError

log = logging.getLogger("ncd")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "ncd" / "configs"


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


def _load(args: argparse.Namespace) -> ExperimentConfig:
    from ncd.validation import validate

    return validate(load_config(config_path(args.config), args.overrides))


def cmd_demo_data(args: argparse.Namespace) -> int:
    from ncd.synthetic import SyntheticSpec, write_dataset

    spec = SyntheticSpec(seed=args.seed, image_size=args.size, images_per_family=args.per_family)
    root = write_dataset(args.out, spec)
    print(f"demo data written to {root}")
    return 0


def cmd_catalog(args: argparse.Namespace) -> int:
    from ncd.catalog import build_manifest

    cfg = _load(args)
    table = build_manifest(cfg.data, cfg.s3)
    out = args.out or io.join(cfg.output, "manifest.parquet")
    io.write_table(table, out, cfg.s3)
    print(f"{table.num_rows} images -> {out}")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.local:
        from ncd.catalog import build_manifest
        from ncd.region_table import update_regions

        t0 = time.perf_counter()
        manifest = build_manifest(cfg.data, cfg.s3)
        stats = update_regions(manifest, cfg.preprocess.output, cfg.mebin, cfg.crop, cfg.data, cfg.s3, cfg.proto,
                               progress=Progress())
        print(f"{stats.images} images -> {stats.regions} regions in {time.perf_counter() - t0:.1f}s -> {stats.uri}"
              + (f" ({len(stats.skipped)} categories already complete: {', '.join(stats.skipped)})"
                 if stats.skipped else ""))
        return 0
    from ray_jobs.preprocess import run_preprocess
    from ray_jobs.session import start_ray

    start_ray(args.address, cfg.s3, args.verbose)
    print(run_preprocess(cfg))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ncd.evaluate import evaluate_predictions, metrics_markdown

    table = io.read_table(args.predictions)
    result = evaluate_predictions(table, truth_column=args.truth_column, pred_column=args.pred_column)
    text = json.dumps(result, indent=2)
    if args.out:
        io.write_bytes(io.join(args.out, "metrics.json"), text.encode())
        io.write_bytes(io.join(args.out, "metrics.md"), metrics_markdown(result).encode())
    print(metrics_markdown(result))
    return 0


def add_discover_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments shared by ``ncd discover``, ``ncd demo`` and ``python -m ray_jobs.discover``."""
    p.add_argument("--config", default=None, help="YAML file or packaged config name (e.g. mtd)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--images", default=None, help="dataset root (sets data.root)")
    p.add_argument("--maps", default=None, help="anomaly maps root (sets data.maps)")
    p.add_argument("--layout", default=None, help="generic | mvtec | mtd | manifest (sets data.layout)")
    p.add_argument("--out", default=None, help="output folder or s3:// prefix (sets output and preprocess.output)")
    p.add_argument("--k", default=None, help="number of novel classes K: a number, 'auto' (estimated without labels) or 'gt' "
                   "(the oracle ground-truth count); sets train.num_novel")
    p.add_argument("--method", default=None, help="anomalyncd | protoanomalyncd")
    p.add_argument("--local", action="store_true", help="run every stage in this process (no Ray)")
    p.add_argument("--address", default=None, help="Ray address (default: a local instance)")
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (and inference actors)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="also show Ray's logs and full tracebacks")
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
    from ncd.validation import validate

    return validate(load_config(config_path(args.config), sets))


def add_detect_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``ncd detect`` and ``python -m ray_jobs.detect``."""
    p.add_argument("--config", default=None, help="YAML file or packaged config name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. --set detect.mode=zero_shot --set detect.image_size=518 (repeatable)")
    p.add_argument("--images", default=None, help="dataset root (sets data.root)")
    p.add_argument("--layout", default=None, help="generic | mvtec | mtd (sets data.layout)")
    p.add_argument("--out", default=None, help="maps folder or s3:// prefix (sets detect.output)")
    p.add_argument("--normal", default=None, help="folder of normal images: few-shot memory bank (sets detect.normal)")
    p.add_argument("--local", action="store_true", help="run in this process (no Ray)")
    p.add_argument("--address", default=None, help="Ray address (default: a local instance)")
    p.add_argument("--num-actors", type=int, default=1, help="feature actors")
    p.add_argument("--use-gpu", action="store_true")
    return p


def detect_config(args: argparse.Namespace) -> ExperimentConfig:
    sets = list(args.overrides)
    for flag, key in (("images", "data.root"), ("layout", "data.layout"), ("out", "detect.output"),
                      ("normal", "detect.normal")):
        if getattr(args, flag):
            sets.append(f"{key}={getattr(args, flag)}")
    return load_config(config_path(args.config), sets)


def cmd_detect(args: argparse.Namespace) -> int:
    from ncd.detect import detect_local, maps_root

    cfg = detect_config(args)
    if args.local:
        table = detect_local(cfg, progress=Progress())
    else:
        from ray_jobs.detect import run_detect
        from ray_jobs.session import start_ray

        start_ray(args.address, cfg.s3, args.verbose)
        table = run_detect(cfg, num_actors=args.num_actors, use_gpu=args.use_gpu, progress=Progress())
    modes = sorted(set(table.column("mode").to_pylist()))
    print(f"{table.num_rows} maps ({', '.join(modes)}) -> {maps_root(cfg)} (image scores: image_scores.parquet)")
    return 0


def cmd_discover(args: argparse.Namespace) -> int:
    from ray_jobs.discover import main as discover_main

    return discover_main(args.argv)


def cmd_demo(args: argparse.Namespace) -> int:
    from ray_jobs.demo import run_demo

    return run_demo(args)


def cmd_train(args: argparse.Namespace) -> int:
    from ncd.pipeline import LOCAL_STAGES, base_set, choose_k, k_label, local_train
    from ncd.predict import save_model
    from ncd.region_table import read_regions

    cfg = _load(args)
    regions = read_regions(args.regions or io.join(cfg.preprocess.output, "regions"), cfg.s3)
    cfg, k_info = choose_k(cfg, regions)
    trained = local_train(cfg, regions, base_set(cfg, LOCAL_STAGES))
    out = io.join(cfg.output, "model.pt")
    save_model(trained, out, cfg.s3)
    print(f"model -> {out} (head {trained.head}, {k_label(k_info)})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ncd", description="Discover and classify new kinds of industrial defects.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", default=None, help="YAML file or packaged config name (e.g. demo_smoke)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set mebin.min_interval_len=5 (repeatable)")
        return p

    p = sub.add_parser("demo-data", help="write the embedded synthetic dataset (generic layout)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--per-family", type=int, default=8)
    p.set_defaults(func=cmd_demo_data)

    p = with_config(sub.add_parser("catalog", help="build the manifest table of a dataset"))
    p.add_argument("--out", default=None, help="manifest path (.parquet or .csv); default <output>/manifest.parquet")
    p.set_defaults(func=cmd_catalog)

    p = with_config(sub.add_parser("preprocess", help="MEBin + crops -> region table"))
    p.add_argument("--local", action="store_true", help="run in this process instead of on Ray Data")
    p.add_argument("--address", default=None, help="Ray address (default: a local instance)")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("evaluate", help="NMI / ARI / F1 from a predictions table")
    p.add_argument("predictions", help="Parquet or CSV with category, truth and predicted cluster columns")
    p.add_argument("--truth-column", default="gt_type")
    p.add_argument("--pred-column", default="cluster")
    p.add_argument("--out", default=None, help="folder for metrics.json and metrics.md")
    p.set_defaults(func=cmd_evaluate)

    p = with_config(sub.add_parser("train", help="train in this process (Ray Train: python -m ray_jobs.train)"))
    p.add_argument("--regions", default=None, help="region table (default <preprocess.output>/regions)")
    p.set_defaults(func=cmd_train)

    p = add_detect_arguments(sub.add_parser("detect", help="anomaly maps from raw images (zero-shot or few-shot)"))
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("discover", help="catalog -> preprocess -> train -> infer -> evaluate", add_help=False)
    p.set_defaults(func=cmd_discover)

    p = add_discover_arguments(sub.add_parser("demo", help="run the main job on the embedded demo data"))
    p.set_defaults(func=cmd_demo)
    return parser


def _training_error() -> type[Exception]:
    """``ncd.engine.TrainingError`` once training code is loaded (the CLI does not import torch up front)."""
    engine = sys.modules.get("ncd.engine")
    return engine.TrainingError if engine else ConfigError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, rest = build_parser().parse_known_args(argv)
    if args.command == "discover":
        args.argv = rest + (["--verbose"] if args.verbose else [])
    elif rest:
        build_parser().parse_args(argv)  # reports the unknown arguments
    from ray_jobs.session import setup_logging

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
