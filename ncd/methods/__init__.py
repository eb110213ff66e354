"""The methods, one module each behind one interface (``base.Method``), chosen by the
config's ``method`` name: ``anomalyncd`` (the paper), ``protoanomalyncd`` (PROTO.md) or
``frozen`` (k-means and refinement on frozen features, nothing trained).

The functions here take a config and ask its method; callers never branch on the name.
"""
from __future__ import annotations

from ncd.config import AUTO, ConfigError, ExperimentConfig
from ncd.methods import anomalyncd, frozen, protoanomalyncd
from ncd.methods.base import Method, Objective, make_method_objective
from ncd.model.ncd_model import NCDModel

REGISTRY: dict[str, Method] = {m.name: m for m in (anomalyncd.METHOD, protoanomalyncd.METHOD, frozen.METHOD)}
METHODS = tuple(REGISTRY)

__all__ = ["METHODS", "Method", "Objective", "build_model", "eval_view", "get_method", "guide_columns", "kmeans_init",
           "make_objective", "prediction_temperature", "trains"]


def get_method(name: str) -> Method:
    """The method called ``name``; an unknown name is a ConfigError listing the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}") from None


def build_model(cfg: ExperimentConfig, num_base: int, num_novel: int) -> NCDModel:
    return get_method(cfg.method).build_model(cfg, num_base, num_novel)


def make_objective(cfg: ExperimentConfig, num_base: int) -> Objective:
    """``objective(model_out, batch, epoch, gather) -> loss parts`` for the config's method."""
    return make_method_objective(get_method(cfg.method), cfg, num_base)


def guide_columns(cfg: ExperimentConfig) -> tuple[str, ...]:
    """Region-table columns that become extra mask channels (anomaly map, object prior)."""
    return get_method(cfg.method).guide_columns(cfg)


def prediction_temperature(cfg: ExperimentConfig) -> float:
    """The softmax temperature of region probabilities: ``loss.student_temp`` (METHOD.md 6.1),
    or ``1 / proto.kappa`` in ProtoAnomalyNCD mode (the vMF posterior the model was trained with)."""
    return get_method(cfg.method).temperature(cfg)


def trains(cfg: ExperimentConfig) -> bool:
    """Whether the config's method trains its model (``frozen`` does not)."""
    return get_method(cfg.method).trains


def eval_view(cfg: ExperimentConfig) -> str:
    """The test view, ``crop`` or ``resize``: ``model.eval_view``, where ``auto`` is the method's."""
    return get_method(cfg.method).eval_view if cfg.model.eval_view == AUTO else cfg.model.eval_view


def kmeans_init(cfg: ExperimentConfig) -> bool:
    """Whether the novel prototypes start from k-means: ``train.kmeans_init``, where ``auto``
    is the method's default (on in ProtoAnomalyNCD mode, off in AnomalyNCD mode)."""
    if not trains(cfg):
        return True  # its prototypes can only come from k-means
    if cfg.train.kmeans_init == AUTO:
        return get_method(cfg.method).kmeans_init
    return bool(cfg.train.kmeans_init)
