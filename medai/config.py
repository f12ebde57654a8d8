"""Typed experiment configuration: YAML in, dataclasses out, every key and type checked.

``load_config(path, overrides=["train.lr=3e-4"])`` reads a YAML file, applies ``key=value`` overrides
(values parsed as YAML) and builds an :class:`ExperimentConfig`. Unknown keys and wrong types raise
:class:`~medai.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from medai.errors import ConfigError


@dataclass
class ExtraTrainConfig:
    """Films of another labelled set added to training only (medai/data/mixing.py), e.g. adults from another
    hospital beside a one-site set, so that the model cannot tell the classes apart by the site's cues."""

    root: str = ""  # any set load_records reads; relative paths are taken under MEDAI_DATA_DIR
    labels: dict[str, list[str]] = field(default_factory=dict)  # task label -> that set's labels that make it
    # ("No Finding" is a label of an NIH set here); a film must match exactly one class of a multi-class task
    per_label: int | None = None  # at most this many films per task label, a seeded draw; None = all
    seed: int = 0
    split: str = "train"  # that set's split to draw from ("all": every film); its other films stay unseen
    patient_regex: str | None = None


@dataclass
class DataConfig:
    """Where the images and labels are, and how to split them."""

    format: Literal["auto", "nih", "folder", "csv", "npz"] = "auto"
    root: str = ""  # relative paths are resolved against MEDAI_DATA_DIR
    csv: str | None = None  # label table (NIH / generic CSV); found automatically when None
    labels: list[str] | None = None  # label subset and order; None = all found
    include_no_finding: bool = False  # NIH: add "No Finding" as a label
    train_split: str = "train"
    val_split: str = "val"
    test_split: str | None = None
    val_fraction: float = 0.1  # used only when the layout has no val split
    test_fraction: float = 0.0
    split_seed: int = 42
    patient_regex: str | None = None  # file-name pattern whose first group is the patient id
    max_samples: int | None = None  # cap per split (quick experiments); None = all
    eval_root: str | None = None  # an extra labelled set evaluated after training (e.g. NIH sample)
    extra_train: list[ExtraTrainConfig] = field(default_factory=list)  # more training films from other sets
    body_part: str | None = None  # what the images show (chest, brain, ...); the dashboard warns when an
    # upload to a chest model does not look like a frontal chest X-ray


@dataclass
class PreprocessConfig:
    image_size: int = 224
    mean: float = 0.5
    std: float = 0.25


@dataclass
class AugmentConfig:
    """Radiograph-safe augmentation: small affine, brightness/contrast; no flip unless asked."""

    enabled: bool = True
    rotate_degrees: float = 7.0
    translate: float = 0.05
    scale: float = 0.08
    brightness: float = 0.15
    contrast: float = 0.15
    hflip: bool = False
    # Against shortcuts at the film's edge (borders, side markers, text, collimation): a random crop keeping
    # at least this share of the area (0: none), and blanking a random band along each edge with this
    # probability per edge (0: never), to a random grey.
    crop_min_area: float = 0.0
    erase_border: float = 0.0


@dataclass
class ModelConfig:
    name: str = "hybrid_cnn_transformer"
    kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None  # path to a local state dict; hub names fail with a clear message
    # the heatmap method the model explains with unless the reader picks another (medai.explain.cam.CAM_METHODS);
    # None: the architecture's measured best, or Grad-CAM with train.attention_loss. With the attention loss
    # only gradcam or hirescam: the term trains that map
    cam_method: str | None = None


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32  # per process; the effective batch is batch_size x processes (see nproc_per_node)
    lr: float = 3e-4  # base rate; scaled by lr_scaling when several processes train together
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    grad_clip: float | None = 1.0
    label_smoothing: float = 0.0
    # anatomy-guided training: add this weight x the share of each class's Grad-CAM outside the learned lungs
    # and heart (medai/training/attention.py); 0 = off. Chest films only; others add nothing
    attention_loss: float = 0.0
    ema_decay: float = 0.0  # average the weights over steps (e.g. 0.998); 0 = off. The average is validated and kept
    # how fast the average's window, 1 / (1 - ema_decay) steps, is reached: after n updates it spans about
    # 1 + n / ema_ramp steps. 9 is TensorFlow's (1 + n) / (10 + n) warm-up, which takes 4,490 updates to reach
    # 0.998; 1 is the running mean of every update so far until the window is reached (498 updates for 0.998)
    ema_ramp: float = 9.0
    # also keep every epoch's weights (epochs/epoch-NNN.safetensors in the run folder), so that `medai ship
    # --epoch N` can ship one other than the best by validation AUROC (e.g. where anatomy-guided training
    # moves the heatmaps further in later epochs than the AUROC rewards)
    keep_epochs: bool = False
    # draw each training film with probability ~ n ** -patient_balance, n = its patient's film count in the split:
    # 0 = every film equally (plain shuffling), 1 = every patient equally (medai/training/sampling.py)
    patient_balance: float = 0.0
    class_weighting: bool = True  # pos_weight (multi-label) / class weights (multi-class)
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    channels_last: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 2
    cache: bool = True  # cache decoded, resized images on disk
    early_stopping_patience: int | None = 5  # epochs without val macro-AUROC gain; None = off
    early_stopping_min_delta: float = 0.0  # a gain must exceed this to count
    head_epochs: int = 0  # two-stage fine-tuning: train only the head for this many epochs first
    finetune_lr_factor: float = 0.1  # stage 2 learning rate = lr * factor (only when head_epochs > 0)
    seed: int = 0
    deterministic: bool = False
    max_steps_per_epoch: int | None = None  # cap for smoke tests
    log_every: int = 10  # steps between progress lines
    bootstrap: int = 500  # bootstrap resamples for AUROC confidence intervals in the final evaluation
    threshold_method: Literal["youden", "f1", "sensitivity"] = "youden"
    target_sensitivity: float = 0.95
    # distributed data parallel (torchrun): processes on this machine when launched by `medai train`
    # (one per GPU; >1 re-launches under torchrun), the learning-rate rule for the effective batch, and
    # BatchNorm statistics synchronised across processes (CUDA only)
    nproc_per_node: int = 1
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    sync_batchnorm: bool = False


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and ("off" if not value else "on") in typing.get_args(tp):
            value = "off" if not value else "on"  # YAML 1.1 reads a bare off/on as a boolean
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(c) for c in typing.get_args(tp))
            raise ConfigError(f"config key '{key}': {value!r} is not one of {choices}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"config key '{key}': expected {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"config key '{key}': expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{prefix or '<root>'}': expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key '{where}' (known under '{prefix or '<root>'}': "
                          f"{', '.join(sorted(known))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in values.items()}
    return cls(**kwargs)


def _apply_override(tree: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key=value (e.g. train.lr=1e-4)")
    key, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {override!r}: value is not valid YAML ({exc})") from None
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: '{part}' is not a section")
    node[parts[-1]] = value


def config_from_dict(tree: dict[str, Any], overrides: list[str] | None = None) -> ExperimentConfig:
    try:
        tree = yaml.safe_load(yaml.safe_dump(tree or {}))  # deep copy
    except (yaml.YAMLError, RecursionError) as exc:
        raise ConfigError(f"config holds values that are not plain YAML data, or nests too deeply ({type(exc).__name__})"
                          ) from None
    for override in overrides or []:
        _apply_override(tree, override)
    cfg = _build(ExperimentConfig, tree, "")
    validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config {path} nests lists or mappings too deeply to be a MedAI config") from None
    return config_from_dict(tree, overrides)


# the heatmap methods (medai.explain.cam.CAM_METHODS has the same keys), and those train.attention_loss
# can train (medai.training.attention)
CAM_METHOD_NAMES = ("gradcam", "gradcam++", "hirescam", "eigencam", "layercam", "scorecam")
ATTENTION_CAM_METHODS = ("gradcam", "hirescam")

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate(cfg: ExperimentConfig) -> None:
    """Value checks that types alone cannot express."""
    t, p = cfg.train, cfg.preprocess
    checks = [
        (t.epochs >= 1, "train.epochs", "must be >= 1"),
        (t.batch_size >= 1, "train.batch_size", "must be >= 1"),
        (t.lr > 0, "train.lr", "must be > 0"),
        (t.weight_decay >= 0, "train.weight_decay", "must be >= 0"),
        (0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]"),
        (t.warmup_epochs >= 0, "train.warmup_epochs", "must be >= 0"),
        (t.head_epochs < t.epochs or t.head_epochs == 0, "train.head_epochs", "must be < train.epochs"),
        (t.finetune_lr_factor > 0, "train.finetune_lr_factor", "must be > 0"),
        (t.num_workers >= 0, "train.num_workers", "must be >= 0"),
        (t.early_stopping_patience is None or t.early_stopping_patience >= 1,
         "train.early_stopping_patience", "must be >= 1 or null"),
        (0 < t.target_sensitivity < 1, "train.target_sensitivity", "must be in (0, 1)"),
        (t.bootstrap >= 0, "train.bootstrap", "must be >= 0"),
        (0 <= t.ema_decay < 1, "train.ema_decay", "must be in [0, 1) (0 = off)"),
        (t.ema_ramp > 0, "train.ema_ramp", "must be > 0 (1 = a running mean until the window is reached)"),
        (0 <= t.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)"),
        (0 <= t.patient_balance <= 1, "train.patient_balance",
         "must be in [0, 1] (0 = off, 1 = every patient equally)"),
        (t.nproc_per_node >= 1, "train.nproc_per_node", "must be >= 1"),
        (t.attention_loss >= 0, "train.attention_loss", "must be >= 0 (0 = off)"),
        (not (t.attention_loss and t.nproc_per_node > 1), "train.attention_loss",
         "is not supported with train.nproc_per_node > 1 (its second-order gradients are untested under DDP)"),
        (16 <= p.image_size <= 2048, "preprocess.image_size", "must be between 16 and 2048"),
        (p.std > 0, "preprocess.std", "must be > 0"),
        (0 <= cfg.data.val_fraction < 1, "data.val_fraction", "must be in [0, 1)"),
        (0 <= cfg.data.test_fraction < 1, "data.test_fraction", "must be in [0, 1)"),
        (bool(cfg.data.root), "data.root", "must name a dataset folder or file"),
        (cfg.augment.crop_min_area == 0 or 0.2 <= cfg.augment.crop_min_area <= 1, "augment.crop_min_area",
         "must be 0 (no crop) or in [0.2, 1]"),
        (0 <= cfg.augment.erase_border <= 1, "augment.erase_border", "must be in [0, 1]"),
    ]
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' {message}")
    _validate_cam_method(cfg.model.cam_method, t.attention_loss)
    _validate_extra_train(cfg.data.extra_train)
    if not RUN_NAME.fullmatch(cfg.name):  # it names the run's folder: nothing may climb out of results/runs
        raise ConfigError(f"config key 'name' {cfg.name[:80]!r} must be 1-64 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")
    for value, key in ((t.lr, "train.lr"), (t.weight_decay, "train.weight_decay"), (p.std, "preprocess.std"),
                       (p.mean, "preprocess.mean")):
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be a finite number, not {value}")


def _validate_extra_train(extras: list[ExtraTrainConfig]) -> None:
    for i, extra in enumerate(extras):
        key = f"data.extra_train[{i}]"
        if not extra.root:
            raise ConfigError(f"config key '{key}.root' must name a dataset folder or file")
        if not extra.labels or not all(isinstance(v, list) and v and all(isinstance(s, str) for s in v)
                                       for v in extra.labels.values()):
            raise ConfigError(f"config key '{key}.labels' must map each task label to a list of that set's labels, "
                              "e.g. {PNEUMONIA: [Pneumonia, Consolidation], NORMAL: [No Finding]}")
        if extra.per_label is not None and extra.per_label < 1:
            raise ConfigError(f"config key '{key}.per_label' must be >= 1 or null (every film)")


def _validate_cam_method(method: str | None, attention_loss: float) -> None:
    if method is None:
        return
    allowed = ATTENTION_CAM_METHODS if attention_loss else CAM_METHOD_NAMES
    if method not in allowed:
        why = " with train.attention_loss (the map it trains)" if attention_loss else ""
        raise ConfigError(f"config key 'model.cam_method' {method!r} must be one of {', '.join(allowed)}{why}")


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
