"""Driver memory and time per image against dataset size: ``discover`` on local Ray.

Run with no arguments (2 CPU cores: about ten minutes; ``--sizes 500,2000`` for a quick look):

    python benchmarks/bench_bigdata.py [--sizes 1000,4000,16000] [--s3]

A pool of seeded synthetic images (one category, 64 px, five defect types and normal
images, with anomaly maps) is linked into datasets of each size (file names differ;
the images repeat). Each size runs in a fresh process (its own ``ray.init``, 2 CPUs):
``ncd.pipeline.discover`` with ``ray_jobs.discover.ray_stages`` (preprocess on Ray Data,
one training epoch on Ray Train, inference on Ray Data actors; tiny ViT at 32 px, K = 6),
and reports the driver's peak RSS (``ru_maxrss``; workers are other processes) and the
seconds per image of preprocess + train + infer (report and evaluation excluded: the
report's embedding map switches from t-SNE to PCA above 3000 regions).

``--s3``: the data and every output live in S3 instead of a local folder. A loopback
S3-compatible server (moto's standalone server on 127.0.0.1, ``tests/loopback_s3.py``,
the one the S3 tests use) runs for the whole benchmark and is always stopped; each
dataset is uploaded to ``s3://<bucket>/data_<size>`` (boto3, a thread pool; the upload
is printed, not timed) and ``data.root``, ``output`` and ``preprocess.output`` name the
bucket, ``s3.*`` the server (the keys reach the Ray workers in the runtime env, as with
``ncd discover``). The server shares the 2 cores with the run.

``rss_growth`` = peak RSS at the largest size over the smallest (goal <= 1.2);
``time_per_image_growth`` likewise (goal <= 1.2); fixed costs weigh most at the
smallest size, so ``marginal_ms_per_image`` (between consecutive sizes) is printed too.
Last line: one JSON object (``storage``: ``local`` or ``s3``; ``upload_s`` with ``--s3``).
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OPENCV_FOR_THREADS_NUM"):
    os.environ[_var] = "1"
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.loopback_s3 import AWS_ENV, S3Server, serve  # noqa: E402  # the S3 tests' loopback server

POOL_PER_TYPE = 24  # distinct images per defect type (and normal ones)
IMAGE_SIZE = 64
NUM_CPUS = 2
UPLOAD_THREADS = 8  # boto3's default connection pool holds 10
TIMED_STAGES = ("preprocess", "train", "infer")
SETTINGS = ["train.epochs=1", "train.kmeans_init=false", "train.num_novel=6", "train.per_category=false",
            "train.batch_size=64", "train.checkpoint_every=0", "infer.batch_size=256", "preprocess.batch_size=512"]


def make_pool(root: Path) -> list[Path]:
    """Seeded synthetic images with maps and masks; returns their paths relative to images/."""
    from ncd.data.synthetic import SyntheticSpec, write_dataset

    write_dataset(root, SyntheticSpec(categories=("plate",), images_per_family=POOL_PER_TYPE,
                                      normal_images=POOL_PER_TYPE, image_size=IMAGE_SIZE, seed=11), workers=1)
    return sorted(p.relative_to(root / "images") for p in (root / "images").rglob("*.png"))


def dataset_files(pool_root: Path, pool: list[Path], size: int) -> Iterator[tuple[Path, str]]:
    """(pool file, path in the dataset) of ``size`` images and their maps and masks, round robin."""
    for k in range(size):
        rel = pool[k % len(pool)]
        new = (rel.parent / f"{rel.stem}_{k:06d}.png").as_posix()
        for kind in ("images", "maps", "masks"):
            yield pool_root / kind / rel, f"{kind}/{new}"


def link_dataset(pool_root: Path, pool: list[Path], root: Path, size: int) -> None:
    """``size`` images (and their maps and masks) hard-linked from the pool, round robin."""
    for src, rel in dataset_files(pool_root, pool, size):
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, dst)


def upload_dataset(server: S3Server, pool_root: Path, pool: list[Path], prefix: str, size: int) -> str:
    """The files of ``link_dataset`` put to ``s3://<bucket>/<prefix>/`` by a thread pool; returns that URI."""
    client = server.client()  # boto3 clients are thread-safe

    def put(item: tuple[Path, str]) -> None:
        client.put_object(Bucket=server.bucket, Key=f"{prefix}/{item[1]}", Body=item[0].read_bytes())

    with ThreadPoolExecutor(UPLOAD_THREADS) as executor:
        list(executor.map(put, dataset_files(pool_root, pool, size)))
    return server.uri(prefix)


def s3_settings(server: S3Server) -> list[str]:
    """The ``s3.*`` overrides that reach ``server``."""
    c = server.config
    return [f"s3.endpoint_override={c.endpoint_override}", f"s3.scheme={c.scheme}", f"s3.region={c.region}",
            f"s3.access_key={c.access_key}", f"s3.secret_key={c.secret_key}"]


def child(data_root: str, out: str, sets: list[str]) -> None:
    """One size, in this process: prints a JSON line with peak RSS and stage seconds."""
    import logging
    import resource
    import warnings

    import ray

    from ncd.config import load_config
    from ncd.pipeline import discover
    from ray_jobs.discover import ray_stages
    from ray_jobs.session import credential_env

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR)
    cfg = load_config("ncd/configs/demo_smoke.yaml", [f"data.root={data_root}", f"output={out}",
                                                      f"preprocess.output={out}", *SETTINGS, *sets])
    env = credential_env(cfg.s3)  # S3 keys: to the workers in the runtime env, as ``ncd discover`` does
    ray.init(num_cpus=NUM_CPUS, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": env} if env else None)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray").setLevel(logging.ERROR)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = discover(cfg, ray_stages(num_workers=1, cpus_per_worker=1.0), progress=lambda s: None)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ray.shutdown()
    print(json.dumps({"images": summary["images"], "regions": summary["regions"], "peak_rss_mib": round(rss, 1),
                      "rss_after_start_mib": round(rss_start, 1), "seconds": summary["seconds"]}))


def stage_dataset(pool_root: Path, pool: list[Path], work: Path, size: int,
                  server: S3Server | None) -> tuple[str, str, float]:
    """The dataset of ``size`` images, local or uploaded: (data root, output, seconds taken)."""
    t0 = time.perf_counter()
    if server is None:
        link_dataset(pool_root, pool, work / f"data_{size}", size)
        data, out = str(work / f"data_{size}"), str(work / f"out_{size}")
    else:
        data, out = upload_dataset(server, pool_root, pool, f"data_{size}", size), server.uri(f"out_{size}")
    return data, out, time.perf_counter() - t0


def run_size(pool_root: Path, pool: list[Path], work: Path, size: int, server: S3Server | None) -> dict:
    """One size in a fresh process; its figures (with ``upload_s`` on S3)."""
    data, out, staged = stage_dataset(pool_root, pool, work, size, server)
    sets, env = ([], {}) if server is None else (s3_settings(server), AWS_ENV)
    if server is not None:
        print(f"{size:6d} images: {3 * size} files uploaded to {data} in {staged:.1f} s", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", data, out, *(f"--set={s}" for s in sets)],
                          cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    if proc.returncode != 0:
        raise RuntimeError(f"size {size} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    timed = sum(result["seconds"][s] for s in TIMED_STAGES)
    result.update(wall_s=round(time.perf_counter() - t0, 1), timed_s=round(timed, 2),
                  ms_per_image=round(1000 * timed / size, 3))
    if server is not None:
        result["upload_s"] = round(staged, 1)
    return result


def _exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit, so ``finally`` blocks run and stop the S3 server."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,4000,16000", help="comma-separated image counts")
    parser.add_argument("--s3", action="store_true", help="data and outputs in a loopback S3 server (moto)")
    parser.add_argument("--child", nargs=2, metavar=("DATA", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--set", dest="sets", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.sets)
        return
    _exit_on_sigterm()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    with tempfile.TemporaryDirectory(prefix="ncd_bench_bigdata_") as tmp:
        work = Path(tmp)
        pool = make_pool(work / "pool")
        print(f"pool: {len(pool)} distinct {IMAGE_SIZE} px images")
        runs = {}
        with serve(work / "moto.log") if args.s3 else nullcontext() as server:
            if server is not None:
                print(f"S3: moto server at {server.endpoint_url}, bucket {server.bucket}", flush=True)
            for size in sizes:
                runs[size] = r = run_size(work / "pool", pool, work, size, server)
                print(f"{size:6d} images, {r['regions']:6d} regions: driver peak RSS {r['peak_rss_mib']:.0f} MiB "
                      f"(after start {r['rss_after_start_mib']:.0f}), {r['ms_per_image']:.2f} ms/image "
                      f"(preprocess+train+infer {r['timed_s']:.1f} s; stages {r['seconds']})", flush=True)
    small, large = runs[sizes[0]], runs[sizes[-1]]
    # past the fixed costs (Ray start-up, model build): seconds per extra image between sizes
    marginal = {f"{a}-{b}": round(1000 * (runs[b]["timed_s"] - runs[a]["timed_s"]) / (b - a), 3)
                for a, b in zip(sizes, sizes[1:])}
    extra = {"upload_s": {s: r["upload_s"] for s, r in runs.items()}} if args.s3 else {}
    print(json.dumps({
        "rss_growth": round(large["peak_rss_mib"] / small["peak_rss_mib"], 3),
        "time_per_image_growth": round(large["ms_per_image"] / small["ms_per_image"], 3),
        "sizes": sizes,
        "peak_rss_mib": {s: r["peak_rss_mib"] for s, r in runs.items()},
        "ms_per_image": {s: r["ms_per_image"] for s, r in runs.items()},
        "marginal_ms_per_image": marginal,
        "regions": {s: r["regions"] for s, r in runs.items()},
        "stage_seconds": {s: {k: r["seconds"][k] for k in TIMED_STAGES} for s, r in runs.items()},
        "num_cpus": NUM_CPUS, "image_size": IMAGE_SIZE, "storage": "s3" if args.s3 else "local", **extra,
    }))


if __name__ == "__main__":
    main()
