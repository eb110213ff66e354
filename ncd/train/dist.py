"""Collectives for losses over a global batch (torch.distributed only, never Ray).

Every helper does nothing in a single process (no process group initialised), so
losses and the training loop are written once.

Gradient convention (the same as lightly's ``lightly/utils/dist.py``): under DDP the
parameter gradients are *averaged* over the ``W`` ranks. A loss that is a mean over
global rows, ``L = (1/N) sum_i l_i``, is reproduced exactly when

- every rank gathers the tensors it needs from all ranks with
  :func:`all_gather_with_grad`, whose backward sums the incoming gradients over
  ranks and keeps the local slice, and
- rank ``r`` returns ``L_r = W * (1/N) sum_{i in r} l_i`` (:func:`global_row_mean`),
  or, for a loss that is not a sum over rows (mean entropy), the same global value on
  every rank.

Then ``(1/W) sum_r grad L_r = grad L``, and :func:`all_reduce_mean` of the returned
values is the global loss. Different ranks may hold different numbers of rows.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a torch.distributed process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def gather_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """The row count ``n`` of every rank, in rank order (``[n]`` in one process)."""
    if world_size() == 1:
        return [int(n)]
    local = torch.tensor([int(n)], dtype=torch.long, device=device)
    out = [torch.zeros_like(local) for _ in range(world_size())]
    dist.all_gather(out, local)
    return [int(t.item()) for t in out]


def _gather_padded(t: Tensor, sizes: list[int]) -> Tensor:
    """Concatenate ``t`` of every rank along dim 0; ranks may differ in ``t.shape[0]``."""
    n_max = max(sizes)
    padded = t.new_zeros((n_max, *t.shape[1:]))
    padded[: t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[:n] for o, n in zip(out, sizes)], dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: all-gather along dim 0. Backward: sum the gradients over ranks, keep ours."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, sizes: tuple[int, ...]) -> Tensor:  # type: ignore[override]
        ctx.sizes = sizes
        ctx.rank = rank()
        return _gather_padded(t, list(sizes))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def all_gather_with_grad(t: Tensor) -> Tensor:
    """All ranks' ``t`` concatenated along dim 0, in rank order, differentiable.

    Args:
        t: (n_r, ...) on this rank; ``n_r`` may differ between ranks (also 0).

    Returns:
        (sum_r n_r, ...). Gradients of every rank's loss w.r.t. this rank's rows are
        summed back into ``t`` (see the module docstring). Identity in one process.
    """
    if world_size() == 1:
        return t
    sizes = gather_sizes(t.shape[0], t.device)
    if t.requires_grad:
        return _AllGatherWithGrad.apply(t, tuple(sizes))
    return _gather_padded(t, sizes)


def all_gather(t: Tensor) -> Tensor:
    """All ranks' ``t`` concatenated along dim 0, without gradient (labels, indices)."""
    if world_size() == 1:
        return t
    with torch.no_grad():
        return _gather_padded(t.detach(), gather_sizes(t.shape[0], t.device))


def row_offset(n: int, device: torch.device | str = "cpu") -> tuple[int, int]:
    """(index of this rank's first row, total rows) in the rank-ordered global batch."""
    sizes = gather_sizes(n, device)
    return sum(sizes[: rank()]), sum(sizes)


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over ranks (a detached copy; ``t`` itself in one process)."""
    if world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(t: Tensor) -> Tensor:
    """Mean of ``t`` over ranks (a detached copy; ``t`` itself in one process). For logging."""
    if world_size() == 1:
        return t
    return all_reduce_sum(t.float() if not t.is_floating_point() else t) / world_size()


def global_count(n: int, device: torch.device | str = "cpu") -> int:
    """Sum of ``n`` over ranks."""
    if world_size() == 1:
        return int(n)
    return int(all_reduce_sum(torch.tensor([int(n)], dtype=torch.long, device=device)).item())


def global_row_mean(values: Tensor, gather: bool) -> Tensor:
    """Mean of per-row losses over the global batch, in the DDP gradient convention.

    Args:
        values: (n_r,) per-row losses of this rank.
        gather: False: the plain local mean (NaN when ``n_r == 0``). True: ``W * sum / N``
            with ``N`` the global row count (0 when ``N == 0``, still attached to the graph).

    Returns:
        A scalar tensor.
    """
    if not gather:
        return values.mean()
    n_global = global_count(values.shape[0], values.device)
    if n_global == 0:
        return values.sum() * 0.0
    return values.sum() * (world_size() / n_global)
