"""ProtoAnomalyNCD ablation on MTD: which part of the guidance and the object prior helps.

    python benchmarks/bench_proto_ablation.py ../shared/datasets/mtd

Four ProtoAnomalyNCD arms on the same crops and the same settings (``mtd_bench``, fewer
epochs by default so the four fit in one CPU run), differing only in the CLS attention
guidance: ``hard`` (AnomalyNCD's binary region mask), ``soft`` (the anomaly map as a
soft bias, no region guidance factor), ``rgf`` (the map with the learned region guidance
factor, no object prior) and ``rgf+object`` (the same with the built-in label-free
object prior).

Last line: JSON with each arm's ``nmi``, ``ari``, ``f1``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
import warnings

from mtd_common import prepare, run_arm

ARMS = {
    "hard": ["proto.guidance=hard"],
    "soft": ["proto.guidance=soft"],
    "rgf": ["proto.guidance=rgf", "proto.object_prior=none"],
    "rgf+object": ["proto.guidance=rgf", "proto.object_prior=auto"],
}
DEFAULTS = ["method=protoanomalyncd", "train.epochs=4", "loss.warmup_teacher_temp_epochs=3", "loss.repeat_times=1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", default="../shared/datasets/mtd")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="bench_proto_ablation_"))
    t0 = time.perf_counter()
    cfg, manifest = prepare(args.dataset, work, [*DEFAULTS, *args.overrides])
    seconds: dict[str, float] = {}
    results = {name: run_arm(cfg, manifest, work, name.replace("+", "_"), extra, seconds)[0]
               for name, extra in ARMS.items()}
    print("\n| guidance | NMI | ARI | F1 |\n| --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['nmi']:.3f} | {r['ari']:.3f} | {r['f1']:.3f} |")
    print(json.dumps({**results, "epochs": cfg.train.epochs, "image_size": cfg.model.image_size,
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
