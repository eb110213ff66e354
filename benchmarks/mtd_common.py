"""Shared set-up of the discovery benchmarks: the dataset (an MTD-style folder or ncd's
synthetic demo set), its anomaly maps, the evaluation split, one ``ncd discover`` per arm,
and the image-level merge of region features."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ncd.data.catalog import build_manifest, catalog_mtd_images  # noqa: E402
from ncd.config import ExperimentConfig, apply_overrides, load_config  # noqa: E402
from ncd.data.gt_maps import write_gt_maps  # noqa: E402
from ncd.data.io import DataError  # noqa: E402
from ncd.infer.merge import merge_regions  # noqa: E402
from ncd.data.splits import MTD_NORMAL_IMAGES, evaluation_split  # noqa: E402

SPLIT_SEED = 0
DEMO = "demo"
DEMO_PER_FAMILY = 24  # defect images per (product, family) of the demo benchmark: 126 images per product
BENCH_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ncd", "configs",
                            "mtd_bench.yaml")
METRICS = ("nmi", "ari", "f1")
MAPS_GT = "gt"
MAPS_DETECTOR = "detector"  # ncd's own zero-shot detector (``ncd detect``), written into the work folder


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """The discovery benchmarks' command line: ``[dataset|demo] [--maps gt|DIR] [--max-per-type N]
    [--normal-images N] [--set KEY=VALUE ...] [--work DIR]``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", default="../shared/datasets/mtd",
                        help="a folder of <Type>/Imgs/<stem>.jpg with <stem>.png masks, or 'demo' "
                             "(ncd's synthetic set, generated into the work folder)")
    parser.add_argument("--maps", default=MAPS_GT,
                        help="'gt': detector-like maps made from the gt masks (ncd.data.gt_maps); 'detector': ncd's zero-shot "
                             "detector's maps (ncd detect, written once into the work folder); or a folder of a "
                             "detector's maps as the catalog reads them (MTD-style: <maps>/[MTD/]<Type>/<stem>.<ext>, "
                             "as `ncd detect` writes them; demo: <maps>/<product>/<type>/<stem>.<ext>)")
    parser.add_argument("--max-per-type", type=int, default=0,
                        help="seeded sample of at most N images per defect type (0: all)")
    parser.add_argument("--normal-images", type=int, default=MTD_NORMAL_IMAGES,
                        help="seeded sample of the normal class, if the dataset has one (MTD protocol: 191)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    return parser


def work_dir(args: argparse.Namespace, prefix: str) -> str:
    """``--work`` or a fresh temporary folder, absolute."""
    return os.path.abspath(args.work or tempfile.mkdtemp(prefix=prefix))


@dataclass(frozen=True)
class Dataset:
    """Where a benchmark's images and maps are: ``name``, ``layout`` and ``root`` of the images
    (``data.layout`` / ``data.root``), and the ``maps`` root."""

    name: str
    layout: str
    root: str
    maps: str


def _demo(work: str) -> tuple[str, list[dict]]:
    """ncd's synthetic demo set (generic layout, its own maps in ``maps/``) under ``work/demo_data``:
    root and catalog rows."""
    from ncd.data.catalog import catalog_generic
    from ncd.data.synthetic import SyntheticSpec, write_dataset

    root = f"{work}/demo_data"
    if not os.path.isdir(f"{root}/images"):
        write_dataset(root, SyntheticSpec(images_per_family=DEMO_PER_FAMILY))
    return root, catalog_generic(root)


def locate(dataset: str, work: str, maps: str, overrides: Sequence[str] = ()) -> Dataset:
    """The benchmark's dataset; ``maps='gt'`` writes gt-derived maps under ``work/maps`` once."""
    if dataset == DEMO:
        layout, name = "generic", DEMO
        root, rows = _demo(work)
    else:
        layout, root = "mtd", os.path.abspath(dataset)
        if not os.path.isdir(root):
            raise SystemExit(f"dataset {dataset}: no such folder (give a <Type>/Imgs/<stem>.jpg folder or 'demo')")
        name = os.path.basename(root.rstrip("/"))
        rows = catalog_mtd_images(root)
    if maps == MAPS_DETECTOR:
        out = f"{work}/detector_maps"
        if not os.path.isdir(out):  # ncd's zero-shot detector (settings: detect.* of the bench config)
            from ncd.detect import write_detector_maps

            detect = load_config(BENCH_CONFIG, list(overrides)).detect
            write_detector_maps(rows, out, dataclasses.replace(detect, mode="zero_shot"), progress=_detector_progress())
        maps = out
    if maps != MAPS_GT:
        if not os.path.isdir(maps):
            raise SystemExit(f"--maps {maps}: not supported (no such folder); use 'gt' (maps from the gt masks) or "
                             "the folder of a detector's maps (e.g. `ncd detect`'s output), laid out as "
                             "<maps>/[MTD/]<Type>/<stem>.<png|npy|tiff>")
        return Dataset(name, layout, root, os.path.abspath(maps))
    out = f"{work}/maps"
    if not os.path.isdir(out):
        if not any(r["gt_mask_uri"] for r in rows):
            raise DataError(f"{root}: no gt masks (<stem>.png beside each image), so --maps gt cannot make maps")
        if layout == "generic":  # maps/<category>/<type>/<stem>
            for category in sorted({r["category"] for r in rows}):
                write_gt_maps([r for r in rows if r["category"] == category], f"{out}/{category}", seed=SPLIT_SEED)
        else:
            write_gt_maps(rows, out, seed=SPLIT_SEED)
    return Dataset(name, layout, root, out)


def prepare(dataset: str, work: str, overrides: list[str], *, maps: str = MAPS_GT, max_per_type: int = 0,
            normal_images: int = MTD_NORMAL_IMAGES) -> tuple[ExperimentConfig, pa.Table]:
    """Config (``mtd_bench`` + ``overrides``) and the evaluation split's manifest."""
    data = locate(dataset, work, maps, overrides)
    cfg = load_config(BENCH_CONFIG, [f"name={data.name}", f"data.layout={data.layout}", f"data.root={data.root}",
                                     f"data.maps={data.maps}", f"output={work}/ncd", f"preprocess.output={work}/ncd",
                                     *overrides])
    split = evaluation_split(build_manifest(cfg.data), normal_images=normal_images, max_per_type=max_per_type,
                             seed=SPLIT_SEED)
    return cfg, split


def _detector_progress() -> Callable[[str, int, int], None]:
    """The detector's progress on the console: each stage at every further tenth."""
    shown: dict[str, int] = {}

    def progress(stage: str, done: int, total: int) -> None:
        tenth = done * 10 // max(1, total)
        if tenth > shown.get(stage, -1):
            shown[stage] = tenth
            print(f"detector maps: {stage} {done}/{total}", flush=True)

    return progress


def prepare_args(args: argparse.Namespace, work: str, overrides: list[str]) -> tuple[ExperimentConfig, pa.Table]:
    """:func:`prepare` with the dataset options of :func:`bench_parser`."""
    return prepare(args.dataset, work, overrides, maps=args.maps, max_per_type=args.max_per_type,
                   normal_images=args.normal_images)


def arm(cfg: ExperimentConfig, work: str, name: str, extra: list[str]) -> ExperimentConfig:
    return apply_overrides(cfg, [f"output={work}/{name}", f"preprocess.output={work}/{name}", *extra])


def run_arm(cfg: ExperimentConfig, manifest: pa.Table, work: str, name: str, extra: list[str],
            seconds: dict) -> tuple[dict, np.ndarray]:
    """``ncd discover`` of one arm in ``work/name``; image-level metrics and region features."""
    from ncd.pipeline import discover

    cfg = arm(cfg, work, name, extra)
    summary = discover(cfg, manifest=manifest, progress=lambda s: print(f"[{name}] {s}", flush=True))
    seconds.update({f"{name}_{k}": v for k, v in summary["seconds"].items()})
    m = summary["metrics"]["image"]["mean"]
    return {k: round(m[k], 4) for k in METRICS}, np.load(f"{work}/{name}/region_features.npy")


def image_level(regions: pa.Table, feats: np.ndarray, temperature: float) -> tuple[list[str], np.ndarray]:
    """Area-softmax weighted mean of each image's region features (as the region merge);
    returns each image's gt type and the pooled features, images in first-appearance order."""
    ids = regions.column("image_id").to_pylist()
    types = regions.column("gt_type").to_pylist()
    areas = np.asarray(regions.column("area").to_pylist(), np.float64)
    order, pooled = merge_regions(ids, feats, areas, temperature)
    first = {}
    for i, image_id in enumerate(ids):
        first.setdefault(image_id, i)
    return [types[first[i]] for i in order], pooled
