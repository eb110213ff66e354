"""Label-free model selection: one score, computed the same way for every candidate.

``cluster_score`` is the method's ``trained_k_score`` (``ncd.methods``) over a fixed sample of the regions:
the mean cosine silhouette of a model's region features under its own partition (the
argmax of the selected head), or in ProtoAnomalyNCD mode the prototype score of its
trained prototypes. It reads only the model's outputs and prototypes, so it does not depend on the loss weights,
temperatures or learning rate a search varies (a training loss such as
``distill + memax_weight * L_me`` does, and favours small weights by construction),
and it is comparable across K.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ncd.evaluate.k_estimation import MAX_SILHOUETTE_POINTS
from ncd.infer.outputs import region_outputs
from ncd.infer.predict import TrainedModel
from ncd.methods import get_method

SAMPLE_SEED = 0  # fixed: every candidate is scored on the same regions, whatever its train.seed


def score_sample(regions: pa.Table, limit: int = MAX_SILHOUETTE_POINTS) -> pa.Table:
    """The regions a selection score is computed on: all, or a fixed random ``limit`` of them."""
    if regions.num_rows <= limit:
        return regions
    rows = np.sort(np.random.default_rng(SAMPLE_SEED).choice(regions.num_rows, limit, replace=False))
    return regions.take(pa.array(rows))


def cluster_score(trained: TrainedModel, regions: pa.Table) -> float:
    """Label-free score of ``trained`` on ``regions``, higher is better (the silhouette is -1
    when everything falls in one cluster)."""
    cfg = trained.cfg
    device = next(trained.model.parameters()).device
    outputs = region_outputs(trained.model, cfg, regions, device)
    num_base = trained.class_map["num_base"]
    novel_logits = outputs.logits[trained.head][:, num_base:]  # its argmax is the model's partition
    prototypes = trained.model.heads.prototypes()[trained.head, num_base:].detach().float().cpu().numpy()
    return get_method(cfg.method).trained_k_score(outputs.feat, novel_logits, prototypes)
