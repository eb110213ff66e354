"""Which rows of a view-major two-view batch are labelled, as device tensors.

Indices are computed on the host so the losses select rows with ``index_select``
instead of boolean masks (a boolean mask on a GPU tensor forces a device
synchronisation per use). Everything a step needs from the host (row indices, the
labelled rows' labels, the unlabelled rows' scores) travels in one pinned buffer with
one non-blocking copy: a copy from pageable memory may wait for the stream, which
would stall the kernel launches behind the forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RowSplit:
    """Row indices and per-row values for B samples x 2 views (rows i and i + B are sample i)."""

    lab_rows: Tensor  # (2 n_lab,) labelled rows, view-major, on the device
    unl_rows: Tensor  # (2 n_unl,) unlabelled rows
    lab_samples: Tensor  # (n_lab,) labelled sample indices in [0, B)
    lab_labels: Tensor  # (2 n_lab,) long, the labels of ``lab_rows``
    unl_scores: Tensor  # (2 n_unl,) float32, the crop scores of ``unl_rows``
    n_lab: int
    n_unl: int


def split_rows(labelled: Tensor, labels: Tensor, scores: Tensor, device: torch.device) -> RowSplit:
    """Split a batch by ``labelled`` (B,) bool; ``labels`` and ``scores`` are (B,) (host or
    device; read once on the host)."""
    mask = labelled.detach().to("cpu", torch.bool)
    b = mask.shape[0]
    lab = torch.nonzero(mask).squeeze(1)
    unl = torch.nonzero(~mask).squeeze(1)
    pieces = [torch.cat([lab, lab + b]), torch.cat([unl, unl + b]), lab,
              labels.detach().cpu().long()[mask].repeat(2), scores.detach().cpu().float()[~mask].repeat(2)]
    host = torch.cat([p.double() for p in pieces])  # float64 holds these indices, labels and float32 scores exactly
    if device.type == "cuda":
        host = host.pin_memory()
    lab_rows, unl_rows, lab_samples, lab_labels, unl_scores = host.to(device, non_blocking=True).split(
        [p.numel() for p in pieces])
    return RowSplit(lab_rows.long(), unl_rows.long(), lab_samples.long(), lab_labels.long(), unl_scores.float(),
                    int(lab.numel()), int(unl.numel()))
