"""Input pipeline rates: what the host must do per sample to feed the training device.

Run with no arguments (CPU: about a minute):

    python benchmarks/bench_loader.py [--step]

A seeded synthetic dataset is preprocessed into real crops (PNG bytes, as in a region
table) and fed to 224 px two-view batches, one process, one thread:

- ``loader_samples_per_s_per_core``: today's path (``train.augment_on=loader``): decode,
  resize and augment both views on the CPU;
- ``host_samples_per_s_per_core``: the host's share of ``train.augment_on=device``: the
  views' parameters drawn from the per-draw seeds and their uint8 windows sliced from
  the decoded-crop cache and collated, ready for the device (goal >= 400);
- ``cache_decodes_per_s_per_core``: building that cache (once per training run);
- ``device_augment_samples_per_s``: the batched augmentation itself on this run's
  device (on a CPU only a reference: on a GPU it runs beside the model);
- ``loader_step_ratio`` (CUDA only, else null; ``--step`` runs it on the CPU with a tiny
  ViT to check the code): a training step fed by the real loader (``augment_on=device``,
  2 workers, pinned memory) over one on a device-resident batch; goal <= 1.1.

Last line: one JSON object.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ncd.train.batch_augment import augment_batch  # noqa: E402
from ncd.data.catalog import build_manifest  # noqa: E402
from ncd.config import apply_overrides, load_config  # noqa: E402
from ncd.train.crop_cache import CachedTwoViewDataset, CropCache  # noqa: E402
from ncd.train.datasets import HalfHalfSampler, RegionSet, TwoViewDataset, build_training_set, training_loader  # noqa: E402
from ncd.train.engine import parameter_groups, train_step, view_spec  # noqa: E402
from ncd.methods import make_objective  # noqa: E402
from ncd.model.ncd_model import build_ncd_model  # noqa: E402
from ncd.preprocess.regions import preprocess_manifest  # noqa: E402
from ncd.data.synthetic import SyntheticSpec, write_dataset  # noqa: E402

BATCH = 32
LOADER_SAMPLES = 96  # today's path is slow: a few batches suffice
HOST_EPOCHS = 3


def _rate(fn, samples: int) -> float:
    t0 = time.perf_counter()
    fn()
    return samples / (time.perf_counter() - t0)


def _drain(loader: DataLoader, limit: int | None = None) -> int:
    n = 0
    for batch in loader:
        n += len(batch["index"])
        if limit is not None and n >= limit:
            break
    return n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_ratio(cfg, regions: RegionSet, device: torch.device, steps: int) -> dict[str, float]:
    """Seconds per training step fed by the real device-path loader, and on a resident batch."""
    spec = view_spec(cfg)
    amp = device.type == "cuda"
    model = build_ncd_model(cfg.model, 0, 6).to(device)
    optimizer = torch.optim.SGD(parameter_groups(model, 5e-5), lr=1e-4, momentum=0.9)
    objective = make_objective(cfg, 0)
    loader = training_loader(regions, spec, seed=0, batch_size=cfg.train.batch_size, workers=2,
                             pin_memory=device.type == "cuda", augment_on="device")
    resident = augment_batch(next(iter(loader)), spec, device)

    def fed(n: int) -> float:
        done, epoch = 0, 0
        _sync(device)
        t0 = time.perf_counter()
        while done < n:
            loader.sampler.set_epoch(epoch)
            for batch in loader:
                if len(batch["index"]) < cfg.train.batch_size:
                    continue
                train_step(model, augment_batch(batch, spec, device), optimizer, objective, 0, device=device, amp=amp)
                done += 1
                if done == n:
                    break
            epoch += 1
        _sync(device)
        return (time.perf_counter() - t0) / n

    def still(n: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            train_step(model, resident, optimizer, objective, 0, device=device, amp=amp)
        _sync(device)
        return (time.perf_counter() - t0) / n

    fed(2), still(2)  # warm-up (workers start, kernels compile)
    t_still, t_fed = still(steps), fed(steps)
    return {"loader_step_ratio": round(t_fed / t_still, 3), "step_s_loader": round(t_fed, 4),
            "step_s_resident": round(t_still, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", action="store_true", help="time the loader-fed step on the CPU too (tiny ViT)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    with tempfile.TemporaryDirectory(prefix="ncd_bench_loader_") as tmp:
        root = write_dataset(f"{tmp}/data", SyntheticSpec(categories=("plate", "fabric"), images_per_family=8,
                                                           normal_images=0, image_size=320, seed=5), workers=1)
        cfg = load_config(None, [f"data.root={root}", "model.weights=random", f"train.batch_size={BATCH}"])
        table = preprocess_manifest(build_manifest(cfg.data), cfg.mebin, cfg.crop, cfg.data)
    regions = build_training_set(table)
    spec = view_spec(cfg)
    sides = sorted(min(cv2.imdecode(np.frombuffer(b, np.uint8), 1).shape[:2])
                   for b in regions.crop_png)
    print(f"{len(regions)} crops (shorter side median {sides[len(sides) // 2]} px), views {spec.size} px, "
          f"batch {BATCH} x 2 views, 1 thread")
    sampler = HalfHalfSampler(regions.labelled, seed=0)

    today = DataLoader(TwoViewDataset(regions, spec), batch_size=BATCH, sampler=sampler, num_workers=0)
    loader_rate = _rate(lambda: _drain(today, LOADER_SAMPLES), LOADER_SAMPLES)
    print(f"today's loader (decode + augment on the CPU): {loader_rate:.1f} samples/s per core")

    t0 = time.perf_counter()
    cache = CropCache(regions, spec, threads=1)
    decode_rate = len(regions) / (time.perf_counter() - t0)
    print(f"crop cache: {decode_rate:.1f} crops decoded/s per core, {cache.nbytes / 2**20:.1f} MiB")
    host = DataLoader(CachedTwoViewDataset(regions, cache, spec), batch_size=BATCH, sampler=sampler, num_workers=0)
    _drain(host)  # warm-up
    samples = HOST_EPOCHS * len(regions)

    def epochs() -> None:
        for epoch in range(HOST_EPOCHS):
            sampler.set_epoch(epoch)
            _drain(host)

    host_rate = _rate(epochs, samples)
    print(f"device path, host side (params + uint8 windows + collate): {host_rate:.1f} samples/s per core")
    batches = [b for _, b in zip(range(4), host)]
    augment_batch(batches[0], spec, device)
    _sync(device)
    t0 = time.perf_counter()
    for b in batches:
        augment_batch(b, spec, device)
    _sync(device)
    augment_rate = sum(len(b["index"]) for b in batches) / (time.perf_counter() - t0)
    print(f"batched augmentation on {device}: {augment_rate:.1f} samples/s")

    step = None
    if cuda or args.step:
        step_cfg = cfg if cuda else apply_overrides(cfg, ["model.backbone=vit_tiny_patch16_224", "model.image_size=64",
                                                          "train.batch_size=8"])
        step = step_ratio(step_cfg, regions, device, steps=20 if cuda else 4)
        print(f"training step fed by the loader over one on a resident batch: {step}")
    result = {
        "host_samples_per_s_per_core": round(host_rate, 1),
        "loader_samples_per_s_per_core": round(loader_rate, 1),
        "host_speedup": round(host_rate / loader_rate, 1),
        "cache_decodes_per_s_per_core": round(decode_rate, 1),
        "cache_mib": round(cache.nbytes / 2**20, 1),
        "device_augment_samples_per_s": round(augment_rate, 1),
        "augment_device": torch.cuda.get_device_name() if cuda else "cpu",
        "loader_step_ratio": step["loader_step_ratio"] if step and cuda else None,
        "step_check_cpu": step if step and not cuda else None,
        "crops": len(regions), "view_size": spec.size, "batch": f"{BATCH}x2",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
