"""Training-step cost against the bare model, in one run.

A full step (``ncd.train.engine.train_step``: mask-guided forward of both views, every loss
of METHOD.md 5.4, backward, SGD step) is timed on one collated batch from the real
data pipeline, and compared with the bare forward + backward of the same network
(same weights and frozen blocks, no mask guidance, no heads' losses, no optimiser) on
the same batch. The data pipeline's own throughput is printed beside them.

CPU (default here): ``vit_small_patch16_224`` at 224 px, batch 8 x 2 views.
CUDA: the paper's ``vit_base_patch8_224`` at batch 32 x 2 views, bf16 autocast, with
images per second and peak memory.

Last line: JSON with ``step_ratio`` and ``samples_per_s``.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ncd.data.catalog import build_manifest  # noqa: E402
from ncd.config import apply_overrides, load_config  # noqa: E402
from ncd.train.datasets import build_training_set, training_loader  # noqa: E402
from ncd.train.engine import parameter_groups, train_step, view_spec  # noqa: E402
from ncd.model.precision import autocast  # noqa: E402
from ncd.methods import make_objective  # noqa: E402
from ncd.model.ncd_model import build_ncd_model  # noqa: E402
from ncd.preprocess.regions import preprocess_manifest  # noqa: E402
from ncd.data.synthetic import BASE_SPEC, SyntheticSpec, write_base_set, write_dataset  # noqa: E402


def _regions(root, cfg):
    c = apply_overrides(cfg, [f"data.root={root}"])
    return preprocess_manifest(build_manifest(c.data), c.mebin, c.crop, c.data)


def _timed(fn, device: torch.device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    warnings.filterwarnings("ignore")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    backbone, batch, repeats = ("vit_base_patch8_224", 32, 10) if cuda else ("vit_small_patch16_224", 8, 5)
    cfg = load_config(None, [f"model.backbone={backbone}", "model.weights=random", f"train.batch_size={batch}",
                             "model.n_head=4"])
    tmp = tempfile.mkdtemp()
    novel = _regions(write_dataset(f"{tmp}/novel", SyntheticSpec(image_size=160)), cfg)
    import dataclasses

    base = _regions(write_base_set(f"{tmp}/base", dataclasses.replace(BASE_SPEC, images_per_family=6)), cfg)
    regions = build_training_set(novel, base)
    loader = training_loader(regions, view_spec(cfg), seed=0, batch_size=batch, workers=0)
    t0 = time.perf_counter()
    batches = [b for _, b in zip(range(3), loader)]
    loader_samples_per_s = 3 * batch / (time.perf_counter() - t0)
    collated = next(b for b in batches if (b["label"] >= 0).any() and (b["label"] < 0).any())

    # as a prefetching loader delivers it: images and masks already on the device for both arms
    collated = {k: v.to(device) if k in ("images", "masks") else v for k, v in collated.items()}
    model = build_ncd_model(cfg.model, 4, 6).to(device)
    optimizer = torch.optim.SGD(parameter_groups(model, 5e-5), lr=1e-4, momentum=0.9)
    images = torch.cat([collated["images"][:, 0], collated["images"][:, 1]]).to(device)

    objective = make_objective(cfg, 4)

    def full() -> None:
        train_step(model, collated, optimizer, objective, 0, device=device, amp=cuda)

    def bare() -> None:
        with autocast(device, cuda):
            feat = model.encoder(images, None)
        feat.float().mean().backward()
        model.zero_grad(set_to_none=True)

    for fn in (full, bare):  # warm-up
        fn()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_full, t_bare = [], []
    for _ in range(repeats):  # interleave so load changes hit both alike
        t_full += _timed(full, device, 1)
        t_bare += _timed(bare, device, 1)
    step, base_t = statistics.median(t_full), statistics.median(t_bare)
    result = {
        "step_ratio": round(step / base_t, 3),
        "samples_per_s": round(batch / step, 2),
        "images_per_s": round(2 * batch / step, 2),
        "bare_samples_per_s": round(batch / base_t, 2),
        "loader_samples_per_s": round(loader_samples_per_s, 2),
        "backbone": backbone, "batch": f"{batch}x2", "device": torch.cuda.get_device_name() if cuda else "cpu",
        "amp": "bf16" if cuda else "fp32",
    }
    if cuda:
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(f"full step {step * 1e3:.1f} ms, bare forward+backward {base_t * 1e3:.1f} ms "
          f"({result['step_ratio']}x); data pipeline {loader_samples_per_s:.1f} samples/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
