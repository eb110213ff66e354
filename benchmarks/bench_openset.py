"""Open-set rejection on MTD: hold each defect type out of training in turn, then score
how well the rejection score (the merged best prototype posterior) separates the
held-out type's images from the seen types' images.

    python benchmarks/bench_openset.py ../shared/datasets/mtd

ProtoAnomalyNCD mode, the MTD benchmark's setting (``ncd/configs/mtd_bench.yaml``,
gt-derived maps, six-class split) with fewer epochs by default; each held-out type is
one training of K = 5 seen classes in its own folder (``<work>/openset/openset/<type>``,
so no split resumes another's model), and inference covers every image.

Last line: JSON with ``auroc`` (mean over the five held-out defect types) and ``per_type``
for the posterior score, ``auroc_similarity`` / ``per_type_similarity`` for the best
prototype similarity, ``auroc_nearest`` / ``per_type_nearest`` for the similarity to the
nearest training region of another image, and ``auroc_nearest_half`` / ``per_type_nearest_half``
for it with a bank of half the seen images, the other half scored as new images
(``ncd.evaluate.openset_eval``).
"""
from __future__ import annotations

import json
import logging
import time
import warnings

from mtd_common import arm, bench_parser, prepare_args, work_dir

from ncd.pipeline import LOCAL_STAGES, base_set
from ncd.evaluate.openset_eval import open_set_protocol
from ncd.data.splits import is_normal_type

DEFAULTS = ["method=protoanomalyncd", "train.epochs=4", "loss.warmup_teacher_temp_epochs=3", "loss.repeat_times=1"]


def main() -> None:
    parser = bench_parser(__doc__)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("ncd.model.backbone", "ncd.train.engine"):
        logging.getLogger(name).setLevel(logging.WARNING)
    work = work_dir(args, "bench_openset_")
    t0 = time.perf_counter()
    cfg, manifest = prepare_args(args, work, [*DEFAULTS, *args.overrides])
    cfg = arm(cfg, work, "openset", [])
    regions = LOCAL_STAGES.preprocess(cfg, manifest)
    types = sorted(t for t in set(regions.column("gt_type").to_pylist()) if not is_normal_type(t))
    result = open_set_protocol(cfg, regions, LOCAL_STAGES, types, base_set(cfg, LOCAL_STAGES))
    print("\n| held-out type | AUROC (posterior) | AUROC (similarity) | AUROC (nearest) | AUROC (nearest, half bank) "
          "| mean posterior seen | mean posterior held out |\n| --- | --- | --- | --- | --- | --- | --- |")
    for t, d in result["details"].items():
        print(f"| {t} | {d['auroc']:.3f} | {d['auroc_similarity']:.3f} | {d['auroc_nearest']:.3f} "
              f"| {d['auroc_nearest_half']:.3f} | {d['mean_score_seen']:.3f} "
              f"| {d['mean_score_held_out']:.3f} |")
    print(json.dumps({"auroc": round(result["auroc"], 4),
                      "per_type": {t: round(v, 4) for t, v in result["per_type"].items()},
                      "auroc_similarity": round(result["auroc_similarity"], 4),
                      "per_type_similarity": {t: round(v, 4) for t, v in result["per_type_similarity"].items()},
                      "auroc_nearest": round(result["auroc_nearest"], 4),
                      "per_type_nearest": {t: round(v, 4) for t, v in result["per_type_nearest"].items()},
                      "auroc_nearest_half": round(result["auroc_nearest_half"], 4),
                      "per_type_nearest_half": {t: round(v, 4) for t, v in result["per_type_nearest_half"].items()},
                      "method": cfg.method, "epochs": cfg.train.epochs,
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
