"""``ncd demo``: the main job on the embedded default (synthetic data, local Ray)."""
from __future__ import annotations

import argparse
import logging
import time

from ncd import io
from ncd.config import apply_overrides

log = logging.getLogger(__name__)


def run_demo(args: argparse.Namespace) -> int:
    import ray

    from ncd.synthetic import SyntheticSpec, write_dataset
    from ray_jobs.cli import _load
    from ray_jobs.discover import run_discover

    if args.config is None:
        args.config = "demo"
    cfg = _load(args)
    cfg = apply_overrides(cfg, [f"output={args.out}", f"data.root={io.join(args.out, 'data')}",
                                f"preprocess.output={args.out}", "data.layout=generic"])
    t0 = time.perf_counter()
    root = write_dataset(cfg.data.root, SyntheticSpec(seed=cfg.train.seed % 1000))
    print(f"[demo] synthetic dataset written to {root} in {time.perf_counter() - t0:.1f}s")
    ray.init(address=args.address, ignore_reinit_error=True, log_to_driver=False)
    return run_discover(cfg)
