"""SimGCD-style losses of AnomalyNCD (METHOD.md 5.4): one loss per module, pure functions."""
from ncd.losses.corrected_targets import corrected_targets
from ncd.losses.criterion import ncd_criterion
from ncd.losses.info_nce import info_nce, info_nce_logits
from ncd.losses.mean_entropy import mean_entropy
from ncd.losses.self_distillation import self_distillation
from ncd.losses.supcon import supcon
from ncd.losses.supervised_ce import supervised_ce

__all__ = [
    "corrected_targets",
    "info_nce",
    "info_nce_logits",
    "mean_entropy",
    "ncd_criterion",
    "self_distillation",
    "supcon",
    "supervised_ce",
]
