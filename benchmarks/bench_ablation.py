"""Ablations on MTD: what helps AnomalyNCD mode, and which guidance helps ProtoAnomalyNCD.

    python benchmarks/bench_ablation.py ../shared/datasets/mtd [--study ncd|proto|all]

Every arm runs ``ncd discover`` on the same six-class crops with the MTD benchmark's
settings (``mtd_bench``) and fewer epochs (4 by default, so a study fits in one CPU run),
changing one thing:

- ``ncd`` study (AnomalyNCD mode): the benchmark's settings (random prototype init, as
  the paper); with the k-means prototype initialisation; without the labelled synthetic
  base set; with all 12 DINOv2 blocks (the saliency-tuned top kept, the last one
  trained) instead of 0-8;
- ``proto`` study (ProtoAnomalyNCD mode, k-means prototype init), the CLS attention guidance: ``hard`` (the
  binary region mask), ``soft`` (the anomaly map, no region guidance factor), ``rgf``
  (the map with the learned region guidance factor) and ``rgf+object`` (the same with
  the built-in label-free object prior).

Last line: JSON with each study's arms, each with ``nmi``, ``ari``, ``f1``.
"""
from __future__ import annotations

import json
import logging
import time
import warnings

from mtd_common import bench_parser, prepare_args, run_arm, work_dir

STUDIES = {
    "ncd": (["method=anomalyncd"], {
        "mtd_bench": [],
        "kmeans_init": ["train.kmeans_init=true"],
        "no_base_set": ["train.base_table="],
        "all_12_blocks": ["model.keep_blocks=0", "model.grad_from_block=11"],
    }),
    "proto": (["method=protoanomalyncd", "train.kmeans_init=true"], {
        "hard": ["proto.guidance=hard"],
        "soft": ["proto.guidance=soft"],
        "rgf": ["proto.guidance=rgf", "proto.object_prior=none"],
        "rgf+object": ["proto.guidance=rgf", "proto.object_prior=auto"],
    }),
}
DEFAULTS = ["train.epochs=4", "loss.warmup_teacher_temp_epochs=3", "loss.repeat_times=1"]


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--study", choices=[*STUDIES, "all"], default="all")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    work = work_dir(args, "bench_ablation_")
    t0 = time.perf_counter()
    cfg, manifest = prepare_args(args, work, [*DEFAULTS, *args.overrides])
    seconds: dict[str, float] = {}
    results: dict[str, dict] = {}
    for study, (method, arms) in STUDIES.items():
        if args.study not in (study, "all"):
            continue
        results[study] = {name: run_arm(cfg, manifest, work, f"{study}_{name.replace('+', '_')}",
                                        [*method, *extra], seconds)[0] for name, extra in arms.items()}
        print(f"\n| {study}: arm | NMI | ARI | F1 |\n| --- | --- | --- | --- |")
        for name, r in results[study].items():
            print(f"| {name} | {r['nmi']:.3f} | {r['ari']:.3f} | {r['f1']:.3f} |")
    print(json.dumps({**results, "epochs": cfg.train.epochs, "image_size": cfg.model.image_size,
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
