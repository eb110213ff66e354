"""Which rows of a view-major two-view batch are labelled, as device index tensors.

Indices are computed on the host and copied without blocking, so the losses select rows
with ``index_select`` instead of boolean masks (a boolean mask on a GPU tensor forces a
device synchronisation per use, which serialises the step's kernel launches).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RowSplit:
    """Row indices for B samples x 2 views (rows i and i + B are sample i)."""

    lab_rows: Tensor  # (2 n_lab,) labelled rows, view-major, on the device
    unl_rows: Tensor  # (2 n_unl,) unlabelled rows
    lab_samples: Tensor  # (n_lab,) labelled sample indices in [0, B)
    n_lab: int
    n_unl: int
    labelled: Tensor  # (B,) bool on the host


def split_rows(labelled: Tensor, device: torch.device) -> RowSplit:
    """Split a batch by ``labelled`` (B,) bool (host or device; read once on the host)."""
    host = labelled.detach().to("cpu", torch.bool)
    b = host.shape[0]
    lab = torch.nonzero(host).squeeze(1)
    unl = torch.nonzero(~host).squeeze(1)

    def put(t: Tensor) -> Tensor:
        return t.to(device, non_blocking=True)

    return RowSplit(put(torch.cat([lab, lab + b])), put(torch.cat([unl, unl + b])), put(lab),
                    int(lab.numel()), int(unl.numel()), host)


def per_row(values: Tensor, split: RowSplit, device: torch.device, labelled_rows: bool) -> Tensor:
    """Per-sample ``values`` (B,) repeated for both views and restricted to one group, on ``device``."""
    host = values.detach().cpu() if values.is_cuda else values
    mask = split.labelled if labelled_rows else ~split.labelled
    return host[mask].repeat(2).to(device, non_blocking=True)
