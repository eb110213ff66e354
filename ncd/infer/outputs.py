"""A model's outputs on a region table as inference computes them: guide columns, test view, batch."""
from __future__ import annotations

import pyarrow as pa
import torch

from ncd.config import ExperimentConfig
from ncd.infer.forward import RegionOutputs, forward_regions
from ncd.methods import guide_columns
from ncd.model.ncd_model import NCDModel
from ncd.train.datasets import eval_set
from ncd.train.engine import view_spec


def region_outputs(model: NCDModel, cfg: ExperimentConfig, regions: pa.Table,
                   device: torch.device | str) -> RegionOutputs:
    """Features and head logits of every region of ``regions`` (with crops), in table order, as
    inference computes them: the method's guide columns and test view, ``infer.batch_size``
    and ``train.amp``."""
    return forward_regions(model, eval_set(regions, guide_columns(cfg)), view_spec(cfg), cfg.infer.batch_size,
                           device, cfg.train.amp)
