"""Scaling on local Ray: preprocessing and inference with 1 and 2 workers, against one process.

Run with no arguments (2 CPU cores, about five minutes):

    python benchmarks/bench_scaling.py

A seeded synthetic dataset (2 categories, 384 px, 432 images) is preprocessed
(MEBin + crops, both passes: ``ncd.preprocess.regions.preprocess_manifest`` in this process,
``ray_jobs.preprocess.run_preprocess(concurrency=n)`` on Ray) and its region table is
labelled by a random-init ``vit_small_patch16_224`` at 112 px
(``ncd.infer.outputs.region_outputs`` in this process, ``ray_jobs.infer.run_inference`` on
Ray with ``n`` actors streaming the table from Parquet). Every process computes with
one thread (torch, OpenCV, BLAS), so "n workers" is n busy cores.

Ray is started once (``num_cpus=2``) and warmed up before any timing. Each Ray run
still pays a fixed cost (planning, actor start-up and model load, the pass-1 shuffle):
every Ray configuration runs on the full input and on a part of it (a third of the
images, a quarter of the regions), and its throughput is the marginal one,
(N_full - N_small) / (T_full - T_small), with the fixed cost reported beside it;
end-to-end throughputs (N / T) are reported too. Times are the best of ``REPEATS``.
Under load the two runs' times can differ by less than their noise; where the full run
is not at least ``MIN_MARGINAL_SHARE`` of its time longer, the end-to-end rate stands in
for the marginal one (``ray_overhead_basis`` says which was used; end to end is a lower
bound, as it includes the fixed cost).

``ray_overhead_ratio`` = 1-worker Ray throughput (marginal) / the same work in one
process, per stage and the lower of the two (goal >= 0.9): what Ray itself costs, which
a machine with fewer free cores than processes does not hide.
``*_scaling`` = 2-worker throughput / (2 x 1-worker throughput): 1.0 is linear; it is
meaningful only on a machine with more free cores than workers (on a shared 2-core
machine it measures contention; ``scaling_meaningful`` says which).
With CUDA, Ray Train's 1-worker training throughput (regions/s, 2 views each) is
measured the same way (1 epoch against 1 + ``TRAIN_EPOCHS``); it is skipped without.

Last line: one JSON object.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
             "OPENCV_FOR_THREADS_NUM"):
    os.environ[_var] = "1"  # inherited by the Ray workers started below
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import cv2  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ncd.data import io  # noqa: E402
from ncd.data.catalog import build_manifest  # noqa: E402
from ncd.config import ExperimentConfig, apply_overrides  # noqa: E402
from ncd.infer.outputs import region_outputs  # noqa: E402
from ncd.methods import build_model  # noqa: E402
from ncd.infer.predict import TrainedModel  # noqa: E402
from ncd.preprocess.regions import preprocess_manifest  # noqa: E402
from ncd.data.region_table import read_regions  # noqa: E402
from ncd.data.synthetic import SyntheticSpec, write_dataset  # noqa: E402

SPEC = SyntheticSpec(categories=("plate", "fabric"), images_per_family=40, normal_images=16, image_size=384, seed=7)
NUM_CPUS = 2
WORKERS = (1, 2)
REPEATS = 3
MIN_MARGINAL_SHARE = 0.2  # the full run must take this share of its time longer than the small one
# Ray Data notices a finished task within ~0.1 s (its scheduling loop waits on
# ``ray.wait(timeout=0.1)``), so a task should carry ~1 s of work; full and small runs
# are even numbers of tasks, so that 2 workers are as balanced on both as 1 worker.
PREPROCESS_BATCH = 72  # images per Ray Data task (~0.8 s at 384 px): 432 images = 6 tasks
SMALL_IMAGES = 2 * PREPROCESS_BATCH  # every third image: 2 tasks
INFER_BATCH = 36  # regions per actor call (~1 s here)
FULL_REGIONS, SMALL_REGIONS = 16 * INFER_BATCH, 4 * INFER_BATCH  # the region table's rows, repeated as needed
MODEL = ["model.backbone=vit_small_patch16_224", "model.weights=random", "model.image_size=112",
         "model.n_head=2", "model.proj_hidden_dim=512", "model.proj_dim=128", f"infer.batch_size={INFER_BATCH}"]
NUM_BASE, NUM_NOVEL = 0, 5
TRAIN_EPOCHS = 4  # extra epochs timed on CUDA
TRAIN = ["model.image_size=224", "train.batch_size=64", "train.loader_workers=4", "train.amp=true",
         "train.kmeans_init=false", "train.checkpoint_every=0", f"train.num_novel={NUM_NOVEL}"]


def _best(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _marginal(n_full: int, t_full: float, n_small: int, t_small: float) -> dict[str, float | str]:
    """Throughput past the fixed cost (``basis`` ``marginal``), the fixed cost, and the end-to-end
    throughput. When the full run is not clearly longer than the small one (under
    ``MIN_MARGINAL_SHARE`` of its time: load noise as large as the extra work), the
    marginal rate means nothing: ``per_s`` is then the end-to-end rate (``basis``
    ``end_to_end``, a lower bound) and no fixed cost is given."""
    out: dict[str, float | str] = {"end_to_end_per_s": n_full / t_full, "t_full_s": t_full, "t_small_s": t_small}
    if t_full - t_small < MIN_MARGINAL_SHARE * t_full:
        return {**out, "per_s": n_full / t_full, "basis": "end_to_end"}
    per_item = (t_full - t_small) / (n_full - n_small)
    return {**out, "per_s": 1.0 / per_item, "fixed_s": max(t_small - n_small * per_item, 0.0), "basis": "marginal"}


def preprocess_runs(cfg: ExperimentConfig, manifest: pa.Table, small: pa.Table,
                    work: Path) -> tuple[dict[str, dict[str, float]], str]:
    """Throughputs, and the URI of a region table of ``manifest`` written by Ray."""
    from ray_jobs.preprocess import run_preprocess

    written: list[str] = []

    def ray_run(table: pa.Table, n: int) -> None:  # a fresh output each time: the table is incremental
        written.append(run_preprocess(apply_overrides(cfg, [f"preprocess.output={work}/run{len(written)}"]), table,
                                      concurrency=n))

    out: dict[str, dict[str, float]] = {}
    t = _best(lambda: preprocess_manifest(manifest, cfg.mebin, cfg.crop, cfg.data), 2)
    out["in_process"] = {"per_s": manifest.num_rows / t, "t_full_s": t}
    ray_run(small, NUM_CPUS)  # warm-up: workers import ncd
    for n in WORKERS:
        t_small = _best(lambda: ray_run(small, n))
        t_full = _best(lambda: ray_run(manifest, n))
        out[f"ray_{n}"] = _marginal(manifest.num_rows, t_full, small.num_rows, t_small)
    return out, written[-1]


def inference_runs(trained: TrainedModel, full_uri: str, small_uri: str) -> dict[str, dict[str, float]]:
    from ray_jobs.infer import run_inference

    cfg = trained.cfg
    regions = read_regions(full_uri)
    n_full, n_small = regions.num_rows, read_regions(small_uri).num_rows
    out: dict[str, dict[str, float]] = {}
    t = _best(lambda: region_outputs(trained.model, cfg, regions, "cpu"), 2)  # as the actors: train.amp too
    out["in_process"] = {"per_s": n_full / t, "t_full_s": t}
    run_inference(trained, small_uri, num_actors=NUM_CPUS, batch_size=INFER_BATCH)  # warm-up
    for n in WORKERS:
        t_small = _best(lambda: run_inference(trained, small_uri, num_actors=n, batch_size=INFER_BATCH))
        t_full = _best(lambda: run_inference(trained, full_uri, num_actors=n, batch_size=INFER_BATCH))
        out[f"ray_{n}"] = _marginal(n_full, t_full, n_small, t_small)
    return out


def training_run(cfg: ExperimentConfig, regions_uri: str, n_regions: int) -> dict[str, float]:
    """Ray Train, 1 GPU worker: marginal regions/s over ``TRAIN_EPOCHS`` epochs."""
    import ray

    from ray_jobs.train import run_train

    cpus = min(os.cpu_count() or 1, 8)
    ray.shutdown()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    cfg = apply_overrides(cfg, TRAIN)
    times = {}
    for epochs in (1, 1 + TRAIN_EPOCHS):
        run_cfg = apply_overrides(cfg, [f"train.epochs={epochs}", f"name=bench_train_{epochs}"])
        t0 = time.perf_counter()
        result = run_train(run_cfg, regions_uri, 1, use_gpu=torch.cuda.is_available(), cpus_per_worker=max(1, cpus - 1))
        times[epochs] = time.perf_counter() - t0
        if result.error is not None:
            raise RuntimeError(f"training failed: {result.error}")
    t1, tn = times[1], times[1 + TRAIN_EPOCHS]
    return {"per_s": TRAIN_EPOCHS * n_regions / max(tn - t1, 1e-9), "fixed_s": max(t1 - (tn - t1) / TRAIN_EPOCHS, 0.0),
            "end_to_end_per_s": (1 + TRAIN_EPOCHS) * n_regions / tn}


def _table(name: str, unit: str, runs: dict[str, dict[str, float]]) -> str:
    lines = [f"{name} ({unit}/s)        marginal   end-to-end   fixed cost (s)   vs in-process"]
    base = runs["in_process"]["per_s"]
    for key, r in runs.items():
        e2e = f"{r['end_to_end_per_s']:10.1f}" if "end_to_end_per_s" in r else f"{r['per_s']:10.1f}"
        fixed = f"{r['fixed_s']:14.1f}" if "fixed_s" in r else f"{'-':>14}"
        lines.append(f"  {key:<18} {r['per_s']:10.1f}   {e2e}   {fixed}   {r['per_s'] / base:12.2f}x")
    one, two = runs["ray_1"], runs["ray_2"]
    lines.append(f"  Ray overhead (1 worker {one['basis']} / in process): {one['per_s'] / base:.2f} (1.0 = none)")
    lines.append(f"  scaling 2 vs 1 worker (meaningful with more free cores than workers): marginal {two['per_s'] / (2 * one['per_s']):.2f}, "
                 f"end-to-end {two['end_to_end_per_s'] / (2 * one['end_to_end_per_s']):.2f} (1.0 = linear)")
    return "\n".join(lines)


def main() -> None:
    import ray

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="ncd_bench_scaling_") as tmp:
        t0 = time.perf_counter()
        root = write_dataset(Path(tmp) / "data", SPEC, workers=NUM_CPUS)
        cfg = apply_overrides(ExperimentConfig(), [f"data.root={root}", f"output={tmp}/out",
                                                   f"preprocess.batch_size={PREPROCESS_BATCH}", *MODEL])
        manifest = build_manifest(cfg.data)
        step = manifest.num_rows // SMALL_IMAGES
        small = manifest.take(list(range(0, step * SMALL_IMAGES, step)))
        print(f"dataset: {manifest.num_rows} images of {SPEC.image_size} px in {time.perf_counter() - t0:.1f} s")

        t0 = time.perf_counter()
        ray.init(num_cpus=NUM_CPUS, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        ray_start = time.perf_counter() - t0
        print(f"ray.init(num_cpus={NUM_CPUS}): {ray_start:.1f} s (not in any timing)")

        pre, full_uri = preprocess_runs(cfg, manifest, small, Path(tmp) / "pre")
        print(_table("preprocess", "images", pre))

        regions = read_regions(full_uri)
        rows = pa.concat_tables([regions] * -(-FULL_REGIONS // regions.num_rows))
        full_uri, small_uri = io.join(tmp, "regions_full"), io.join(tmp, "regions_small")
        io.write_table(rows.slice(0, FULL_REGIONS), io.join(full_uri, "part-00000.parquet"))
        io.write_table(rows.slice(0, SMALL_REGIONS), io.join(small_uri, "part-00000.parquet"))
        model = build_model(cfg, NUM_BASE, NUM_NOVEL).eval()
        trained = TrainedModel(model, cfg, {"num_base": NUM_BASE, "num_novel": NUM_NOVEL}, 0)
        inf = inference_runs(trained, full_uri, small_uri)
        print(f"{FULL_REGIONS} regions ({regions.num_rows} distinct); model {cfg.model.backbone} at "
              f"{cfg.model.image_size} px (random init)")
        print(_table("inference", "regions", inf))

        train = None
        if torch.cuda.is_available():
            train = training_run(cfg, full_uri, FULL_REGIONS)
            print(f"training (Ray Train, 1 GPU worker): {train['per_s']:.1f} regions/s marginal, "
                  f"{train['end_to_end_per_s']:.1f} end to end, fixed {train['fixed_s']:.1f} s")
        else:
            print("training throughput: skipped (no CUDA)")
        ray.shutdown()

    def scaling(runs: dict[str, dict[str, float]], key: str) -> float:
        return round(runs["ray_2"][key] / (2 * runs["ray_1"][key]), 3)

    def overhead(runs: dict[str, dict[str, float]]) -> float:
        return round(runs["ray_1"]["per_s"] / runs["in_process"]["per_s"], 3)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    line = {
        "ray_overhead_ratio": min(overhead(pre), overhead(inf)),
        "ray_overhead_ratio_preprocess": overhead(pre),
        "ray_overhead_ratio_inference": overhead(inf),
        "ray_overhead_basis": {"preprocess": pre["ray_1"]["basis"], "inference": inf["ray_1"]["basis"]},
        "scaling_meaningful": cores - load >= max(WORKERS) + 1,
        "cores": cores, "load_average_1min": round(load, 2),
        "preprocess_scaling": scaling(pre, "per_s"),
        "inference_scaling": scaling(inf, "per_s"),
        "preprocess_scaling_end_to_end": scaling(pre, "end_to_end_per_s"),
        "inference_scaling_end_to_end": scaling(inf, "end_to_end_per_s"),
        "preprocess_images_per_s": {k: round(v["per_s"], 2) for k, v in pre.items()},
        "preprocess_end_to_end_images_per_s": {k: round(v["end_to_end_per_s"], 2) for k, v in pre.items()
                                               if "end_to_end_per_s" in v},
        "preprocess_fixed_s": {k: round(v["fixed_s"], 2) for k, v in pre.items() if "fixed_s" in v},
        "inference_regions_per_s": {k: round(v["per_s"], 2) for k, v in inf.items()},
        "inference_end_to_end_regions_per_s": {k: round(v["end_to_end_per_s"], 2) for k, v in inf.items()
                                               if "end_to_end_per_s" in v},
        "inference_fixed_s": {k: round(v["fixed_s"], 2) for k, v in inf.items() if "fixed_s" in v},
        "images": manifest.num_rows,
        "regions": FULL_REGIONS,
        "num_cpus": NUM_CPUS,
        "ray_init_s": round(ray_start, 2),
        "train_regions_per_s": round(train["per_s"], 2) if train else None,
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
