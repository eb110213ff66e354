"""The one training loop (METHOD.md section 5), written against a run context.

``LocalContext`` runs it in one process (tests, laptop); ``ray_jobs/train.py`` wraps
it in a Ray Train context for DDP over workers. Everything else is identical.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from ncd.config import ConfigError, ExperimentConfig, S3Config, public_dict
from ncd.infer.forward import forward_regions
from ncd.model.precision import autocast
from ncd.methods import Objective, build_model, eval_view, guide_columns, kmeans_init, make_objective, trains
from ncd.model.heads import select_head
from ncd.model.ncd_model import NCDModel
from ncd.train import checkpoint as ckpt
from ncd.train import dist
from ncd.train.augment import ViewSpec
from ncd.train.batch_augment import augment_batch
from ncd.train.datasets import base_classes, build_training_set, eval_set, training_loader
from ncd.train.schedules import cosine_lr
from ncd.validation import validate

log = logging.getLogger(__name__)


class RunContext(Protocol):
    """Where the loop runs: rank, world size, device, how it reports and checkpoints."""

    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None) -> None: ...

    def latest_checkpoint(self) -> ckpt.Found | None:
        """The newest readable checkpoint of this run (``ncd.train.checkpoint.newest_readable``)."""

    def set_aside(self, found: ckpt.Found) -> None:
        """Get the run's checkpoints out of the way of a fresh run (``found`` is stale)."""


class LocalContext:
    """One process; checkpoints in ``<checkpoint_root>/epoch_NNNN/checkpoint.pt`` (local or s3://),
    the newest ``keep`` kept."""

    rank = 0
    world_size = 1

    def __init__(self, checkpoint_root: str | None = None, device: str | torch.device | None = None,
                 s3: S3Config | None = None, keep: int = 2) -> None:
        self.folder = ckpt.CheckpointFolder(checkpoint_root, s3, keep) if checkpoint_root else None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.history: list[dict[str, Any]] = []

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        self.history.append(metrics)
        log.info("epoch %d: %s", metrics["epoch"], {k: round(v, 4) for k, v in metrics.items()
                                                    if isinstance(v, float)})
        if checkpoint is not None and self.folder:
            self.folder.save(checkpoint, metrics["epoch"])

    def latest_checkpoint(self) -> ckpt.Found | None:
        return self.folder.latest() if self.folder else None

    def set_aside(self, found: ckpt.Found) -> None:
        if self.folder:
            log.warning("checkpoints of the earlier run moved to %s", self.folder.set_aside())


@dataclass
class TrainResult:
    model: NCDModel
    head_losses: list[float]
    selected_head: int
    class_map: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def num_novel_classes(cfg: ExperimentConfig) -> int:
    """K, a number: ``auto`` and ``gt`` are resolved before training (``ncd.pipeline.choose_k``),
    so that every rank of a run trains with the same K and the entry point reports how it was chosen."""
    k = cfg.train.num_novel
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"train.num_novel={k!r} reached training unresolved: resolve K first "
                          "(ncd.pipeline.choose_k) or set train.num_novel to a positive number")
    return k


class TrainingError(RuntimeError):
    """Training cannot produce a usable model (a non-finite loss, no usable batch)."""


def check_finite(step_finite: list[torch.Tensor], epoch: int, loss: float) -> None:
    """Raise naming the epoch and first step whose loss was NaN or infinite (``step_finite``:
    one bool tensor per step, gathered once per epoch so that steps never wait on the device)."""
    if math.isfinite(loss) and (not step_finite or bool(torch.stack(step_finite).all())):
        return
    bad = (~torch.stack(step_finite).cpu()).nonzero().flatten().tolist() if step_finite else []
    where = f"step {bad[0]} of {len(step_finite)}" if bad else "a step of another rank"
    raise TrainingError(f"the training loss became non-finite (NaN or inf) in epoch {epoch}, {where}; "
                        "lower train.lr, check the loss weights and temperatures, or the input crops")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters; no weight decay on biases and 1-D parameters (norms)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def view_spec(cfg: ExperimentConfig) -> ViewSpec:
    return ViewSpec(size=cfg.model.image_size, crop_pct=cfg.model.crop_pct, whole=eval_view(cfg) == "resize")


def init_prototypes_from_kmeans(model: NCDModel, novel: pa.Table, k: int, cfg: ExperimentConfig,
                                device: torch.device) -> None:
    """Novel prototypes from FAISS k-means of the frozen features of the unlabelled crops.

    Each head gets its own k-means seed, so heads still start from different partitions.
    """
    from ncd.cluster.kmeans import kmeans  # FAISS is loaded only when needed
    out = forward_regions(model, eval_set(novel, guide_columns(cfg)), view_spec(cfg), cfg.train.batch_size, device,
                          cfg.train.amp)
    feats = out.feat / np.maximum(np.linalg.norm(out.feat, axis=1, keepdims=True), 1e-12)
    heads = model.heads
    cents = [kmeans(feats.astype(np.float32), k, seed=cfg.train.seed + h, spherical=True).centroids
             for h in range(heads.n_head)]
    heads.init_novel_prototypes(torch.from_numpy(np.stack(cents)))


def _gather_ok(ok: bool, device: torch.device) -> bool:
    """True when every rank's batch is usable (skipping must be collective under DDP)."""
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    return bool(dist.all_reduce_sum(flag).item() >= dist.world_size())


def train_step(net: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               objective: Objective, epoch: int, *, device: torch.device, amp: bool = False,
               gather: bool = False) -> dict[str, torch.Tensor]:
    """One optimiser step on a collated two-view batch (``images`` (B,2,3,S,S), ``masks``
    (B,2,c,S,S), ``label`` (B,) with -1 for unlabelled, ``score`` (B,)); returns the loss parts."""
    # (B,2,...) -> (2B,...) view-major (rows i and i+B are the two views of sample i), on the device
    images = batch["images"].to(device, non_blocking=True).transpose(0, 1).flatten(0, 1)
    masks = batch["masks"].to(device, non_blocking=True).transpose(0, 1).flatten(0, 1)
    with autocast(device, amp):
        out = net(images, masks)
    parts = objective(out, batch, epoch, gather)
    optimizer.zero_grad(set_to_none=True)
    parts["loss"].backward()
    optimizer.step()
    return parts


def untrained_result(cfg: ExperimentConfig, model: NCDModel, novel: pa.Table, k: int, class_map: dict[str, Any],
                     ctx: RunContext) -> TrainResult:
    """A method that trains nothing (``method=frozen``): the novel prototypes are k-means
    centroids of its frozen features, reported once as a finished run (epoch 0, no step), so
    that every way of running it (local, Ray Train, Tune) saves and selects it as a trained one."""
    init_prototypes_from_kmeans(model.to(ctx.device), novel, k, cfg, ctx.device)
    head_losses = [0.0] * cfg.model.n_head
    metrics = {"epoch": 0, "loss": 0.0, "steps": 0, **{f"cluster_head{h}": 0.0 for h in range(cfg.model.n_head)}}
    checkpoint = None
    if ctx.rank == 0:
        checkpoint = {"model": model.state_dict(), "epoch": 0, "config": public_dict(cfg), "class_map": class_map,
                      "head_losses": head_losses, "history": [metrics],
                      "fingerprint": ckpt.fingerprint(cfg, novel, None, class_map)}
    ctx.report(metrics, checkpoint)
    return TrainResult(model=model, head_losses=head_losses, selected_head=0, class_map=class_map, history=[metrics])


def train(cfg: ExperimentConfig, novel: pa.Table, base: pa.Table | None, ctx: RunContext) -> TrainResult:
    """Train the AnomalyNCD model on ``novel`` (unlabelled) and ``base`` (labelled, optional) regions."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    classes = base_classes(base)
    validate(cfg)
    k = num_novel_classes(cfg)
    class_map = {"base_classes": classes, "num_base": len(classes), "num_novel": k,
                 "categories": sorted(set(novel.column("category").to_pylist()))}
    model = build_model(cfg, len(classes), k)
    if not trains(cfg):
        return untrained_result(cfg, model, novel, k, class_map, ctx)
    objective = make_objective(cfg, len(classes))
    temps = objective.teacher_temps
    fingerprint = ckpt.fingerprint(cfg, novel, base, class_map)
    resume = ckpt.resume(ctx, fingerprint, tc.on_stale_checkpoint)
    if resume is None and kmeans_init(cfg):
        init_prototypes_from_kmeans(model.to(ctx.device), novel, k, cfg, ctx.device)
    model = model.to(ctx.device)
    optimizer = torch.optim.SGD(parameter_groups(model, tc.weight_decay), lr=tc.lr, momentum=tc.momentum)
    start_epoch, history = 0, []
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        start_epoch, history = resume["epoch"] + 1, list(resume.get("history", []))
        log.info("resumed from epoch %d", resume["epoch"])
    net = ctx.prepare_model(model)

    regions = build_training_set(novel, base, guide_columns(cfg))
    loader = training_loader(regions, view_spec(cfg), seed=tc.seed, batch_size=tc.batch_size,
                             workers=tc.loader_workers, rank=ctx.rank, world_size=ctx.world_size,
                             pin_memory=ctx.device.type == "cuda", augment_on=tc.augment_on)
    need_both = base is not None
    head_losses = [math.nan] * cfg.model.n_head
    gather = ctx.world_size > 1

    for epoch in range(start_epoch, tc.epochs):
        lr = cosine_lr(epoch, tc.lr, tc.epochs, tc.eta_min_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loader.sampler.set_epoch(epoch)
        net.train()
        sums: dict[str, Any] = {}
        head_sum: torch.Tensor | float = 0.0
        steps = skipped = 0
        step_finite: list[torch.Tensor] = []
        for batch in loader:
            labelled = batch["label"] >= 0
            ok = not need_both or (bool(labelled.any()) and bool((~labelled).any()))
            if gather:
                ok = _gather_ok(ok, ctx.device)
            if not ok:
                skipped += 1
                continue
            if tc.augment_on == "device":  # uint8 crops and view parameters -> augmented views, on the device
                batch = augment_batch(batch, loader.dataset.spec, ctx.device)
            parts = train_step(net, batch, optimizer, objective, epoch, device=ctx.device, amp=tc.amp, gather=gather)
            steps += 1
            step_finite.append(torch.isfinite(parts["loss"].detach()))
            for name, value in parts.items():
                if name != "cluster_per_head" and value.numel() == 1:
                    sums[name] = sums.get(name, 0.0) + value.detach()
            head_sum = head_sum + parts["cluster_per_head"].detach().float()
        sums = {name: float(value) for name, value in sums.items()}
        head_sum = head_sum.cpu() if torch.is_tensor(head_sum) else torch.zeros(cfg.model.n_head)
        if gather:  # report the mean over ranks, so every rank sees the same numbers
            names = sorted(sums)
            packed = dist.all_reduce_mean(torch.tensor([sums[n] for n in names] + head_sum.tolist(),
                                                       dtype=torch.float64, device=ctx.device)).cpu()
            sums = dict(zip(names, packed[: len(names)].tolist()))
            head_sum = packed[len(names):].float()
        if not steps:  # collective: under DDP every rank skipped the same batches
            raise TrainingError(
                f"epoch {epoch}: no usable batch ({skipped} skipped"
                + (", each lacking labelled or unlabelled rows: raise train.batch_size" if skipped else "")
                + f"; {len(regions)} training rows); nothing would be trained")
        head_losses = (head_sum / steps).tolist()
        metrics = {name: value / steps for name, value in sums.items()}
        check_finite(step_finite, epoch, metrics.get("loss", math.nan))
        metrics.update(epoch=epoch, lr=lr, teacher_temp=temps[epoch], steps=steps, skipped_batches=skipped,
                       **{f"cluster_head{h}": v for h, v in enumerate(head_losses)})
        history.append(metrics)
        last = epoch == tc.epochs - 1
        checkpoint = None
        if ctx.rank == 0 and (last or (tc.checkpoint_every > 0 and (epoch + 1) % tc.checkpoint_every == 0)):
            checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                          "config": public_dict(cfg), "class_map": class_map, "head_losses": head_losses,
                          "history": history, "fingerprint": fingerprint}
        ctx.report(metrics, checkpoint)

    if resume is not None and start_epoch >= tc.epochs:
        head_losses = list(resume.get("head_losses", head_losses))
    if all(math.isnan(v) for v in head_losses):
        raise TrainingError("no epoch was trained (every head's loss is NaN): nothing to report")
    selected = select_head(head_losses)
    return TrainResult(model=model, head_losses=head_losses, selected_head=selected, class_map=class_map,
                       history=history)
