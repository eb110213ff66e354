"""A model's outputs on a region table as its config asks: test view, guidance, test-time averaging."""
from __future__ import annotations

import pyarrow as pa
import torch

from ncd.config import ExperimentConfig
from ncd.infer.forward import TTA_DIHEDRAL, RegionOutputs, forward_regions
from ncd.methods import guide_columns, trains
from ncd.model.ncd_model import NCDModel
from ncd.train.datasets import eval_set
from ncd.train.engine import view_spec



def dihedral_tta(cfg: ExperimentConfig) -> bool:
    """``infer.tta=d8`` for a method that trains (``method=frozen`` averages its features over
    the dihedral group already)."""
    return cfg.infer.tta == TTA_DIHEDRAL and trains(cfg)


def region_outputs(model: NCDModel, cfg: ExperimentConfig, regions: pa.Table,
                   device: torch.device | str) -> RegionOutputs:
    """Features and head logits of every region of ``regions`` (with crops), in table order, as
    inference computes them: the method's guide columns and test view, ``infer.batch_size``,
    ``train.amp`` and ``infer.tta``."""
    return forward_regions(model, eval_set(regions, guide_columns(cfg)), view_spec(cfg), cfg.infer.batch_size,
                           device, cfg.train.amp, dihedral=dihedral_tta(cfg))
