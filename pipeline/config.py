"""One typed, validated configuration for every stage.

``params.yaml`` (plus any overlay files, later ones winning) plus ``--set section.key=value``
overrides are merged into a plain nested dict, then turned into frozen dataclasses, one per
concern. Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the
key, what was given, and what is allowed, before any work starts. Modules further down take plain
keyword arguments; nothing reads the config with ``.get(key, default)``.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml


class ConfigError(ValueError):
    """A parameter is unknown, of the wrong type, or out of range."""


def _p(default: Any, *, ge: float | None = None, le: float | None = None,
       gt: float | None = None, lt: float | None = None, doc: str = "") -> Any:
    """A dataclass field with a default, numeric bounds and a one-line description."""
    meta = {"ge": ge, "le": le, "gt": gt, "lt": lt, "doc": doc}
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples / mappings via default_factory for mutable defaults")
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    source: str = _p("synthetic", doc="synthetic | voc:PATH | coco:PATH_TO_JSON")
    image_root: str | None = _p(None, doc="COCO image folder (default: images/ beside the JSON)")
    classes: tuple[str, ...] | None = _p(None, doc="explicit class list (default: found in data)")
    image_size: int = _p(640, ge=32, le=4096)
    resize: Literal["stretch", "letterbox"] = _p("stretch")
    on_invalid: Literal["error", "skip"] = _p("error")
    val_fraction: float = _p(0.15, ge=0.0, lt=1.0)
    test_fraction: float = _p(0.15, ge=0.0, lt=1.0)
    split: Literal["random", "imagesets"] = _p(
        "random", doc="random: seeded, by the fractions; imagesets: VOC ImageSets/Main/*.txt")
    seed: int = _p(0, ge=0)
    synthetic_images: int = _p(40, ge=1)
    synthetic_classes: int = _p(4, ge=1, le=12)
    image_format: Literal["png", "jpeg"] = _p("png")
    num_workers: int = _p(2, ge=1)
    out_dir: str = _p("data/prepared")

    def __post_init__(self) -> None:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                f"data.val_fraction + data.test_fraction must be < 1 (got "
                f"{self.val_fraction} + {self.test_fraction}): nothing would be left to train on")
        kind = self.source.split(":", 1)[0]
        if kind not in ("synthetic", "voc", "coco") or (kind != "synthetic"
                                                        and ":" not in self.source):
            raise ConfigError(f"data.source: {self.source!r} is not one of synthetic | voc:PATH | "
                              f"coco:PATH_TO_JSON")
        if self.split == "imagesets" and kind != "voc":
            raise ConfigError(f"data.split: imagesets needs data.source=voc:PATH, "
                              f"got {self.source!r}")
        if self.image_root is not None and kind != "coco":
            raise ConfigError(f"data.image_root: only used with data.source=coco:PATH_TO_JSON, "
                              f"got {self.source!r}")
        if self.classes is not None and kind == "synthetic":
            raise ConfigError("data.classes: not used with data.source=synthetic "
                              "(its classes are set by data.synthetic_classes)")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"data.classes: names must be distinct, got {list(self.classes)}")


@dataclass(frozen=True)
class BackboneConfig:
    weights: str = _p("none", doc="none | imagenet | path to a VGG-16 state dict")


@dataclass(frozen=True)
class AnchorConfig:
    stride: int = _p(16, ge=1)
    scales: tuple[float, ...] = _p((8.0, 16.0, 32.0), gt=0)
    ratios: tuple[float, ...] = _p((0.5, 1.0, 2.0), gt=0)

    @property
    def num_anchors(self) -> int:
        """Anchors per feature-map cell."""
        return len(self.scales) * len(self.ratios)


@dataclass(frozen=True)
class RPNConfig:
    pos_iou: float = _p(0.7, gt=0.0, le=1.0)
    neg_iou: float = _p(0.3, ge=0.0, lt=1.0)
    num_samples: int = _p(256, ge=1)
    pos_fraction: float = _p(0.5, gt=0.0, le=1.0)
    allow_border: float = _p(0.0, ge=-1.0)
    reg_weight: float = _p(1.0, ge=0.0)
    min_size: float = _p(16.0, ge=0.0)
    nms_iou: float = _p(0.7, gt=0.0, le=1.0)
    pre_nms_top_n_train: int = _p(12000, ge=1)
    post_nms_top_n_train: int = _p(2000, ge=1)
    pre_nms_top_n_test: int = _p(6000, ge=1)
    post_nms_top_n_test: int = _p(300, ge=1)

    def __post_init__(self) -> None:
        if self.neg_iou > self.pos_iou:
            raise ConfigError(f"rpn.neg_iou ({self.neg_iou}) must be <= rpn.pos_iou "
                              f"({self.pos_iou})")


@dataclass(frozen=True)
class RoIConfig:
    num_samples: int = _p(128, ge=1)
    fg_fraction: float = _p(0.25, gt=0.0, le=1.0)
    fg_iou: float = _p(0.5, gt=0.0, le=1.0)
    bg_iou_low: float = _p(0.0, ge=0.0, lt=1.0)
    bg_iou_high: float = _p(0.5, gt=0.0, le=1.0)
    pool: Literal["align", "pool"] = _p("align")
    pool_size: int = _p(7, ge=1)
    hidden_dim: int = _p(4096, ge=1)
    reg_weight: float = _p(1.0, ge=0.0)
    score_thresh: float = _p(0.05, ge=0.0, lt=1.0)
    nms_iou: float = _p(0.3, gt=0.0, le=1.0)
    detections_per_image: int = _p(100, ge=1)

    def __post_init__(self) -> None:
        if not self.bg_iou_low < self.bg_iou_high:
            raise ConfigError(f"roi.bg_iou_low ({self.bg_iou_low}) must be < roi.bg_iou_high "
                              f"({self.bg_iou_high})")


@dataclass(frozen=True)
class TrainConfig:
    num_workers: int = _p(2, ge=1)
    use_gpu: Literal["auto", "true", "false"] = _p("auto")
    cpus_per_worker: float = _p(0.5, gt=0.0)
    gpus_per_worker: float = _p(1.0, gt=0.0)
    batch_size: int = _p(1, ge=1)
    rpn_epochs: int = _p(1, ge=1)
    frcnn_epochs: int = _p(1, ge=1)
    max_steps: int = _p(0, ge=0)
    lr: float = _p(0.001, gt=0.0)
    momentum: float = _p(0.9, ge=0.0, lt=1.0)
    weight_decay: float = _p(0.0005, ge=0.0)
    warmup_steps: int = _p(4, ge=0)
    lr_schedule: Literal["cosine", "step", "constant"] = _p("cosine")
    lr_step_epochs: tuple[int, ...] = _p((8, 11), ge=1)
    lr_gamma: float = _p(0.1, gt=0.0, le=1.0)
    amp: Literal["auto", "bf16", "fp16", "off"] = _p("auto")
    hflip: float = _p(0.5, ge=0.0, le=1.0)
    use_difficult: bool = _p(False, doc="train on boxes marked difficult (VOC)")
    grad_clip: float = _p(10.0, ge=0.0)
    loader_workers: int = _p(1, ge=0)
    checkpoint_every: int = _p(0, ge=0)
    log_every: int = _p(1, ge=1, doc="log step metrics every N optimiser steps")
    max_failures: int = _p(2, ge=0)
    keep_checkpoints: bool = _p(False,
                                doc="keep a finished run's checkpoints (a rerun then reuses it)")
    storage_path: str = _p("checkpoints")
    ray_address: str | None = _p(None)
    seed: int = _p(0, ge=0, le=2**32 - 1, doc="torch generators take at most 64 bits")
    rpn_model: str = _p("models/rpn.pt")
    frcnn_model: str = _p("models/frcnn.pt")
    metrics_dir: str = _p("metrics", doc="train_<stage>.json and train_<stage>_epochs.csv")


@dataclass(frozen=True)
class EvalConfig:
    splits: tuple[Literal["train", "val", "test"], ...] = _p(("test", "val"))
    proposal_budgets: tuple[int, ...] = _p((50, 100, 300, 1000, 2000), ge=1)
    batch_size: int = _p(2, ge=1)
    num_pictures: int = _p(4, ge=0)
    reports_dir: str = _p("reports")
    metrics_path: str = _p("metrics/evaluate.json")


SWEEP_DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")


@dataclass(frozen=True)
class SweepConfig:
    num_samples: int = _p(2, ge=1, doc="trials")
    max_concurrent_trials: int = _p(1, ge=1)
    epochs: int = _p(1, ge=1, doc="RPN epochs per trial")
    image_size: int = _p(320, ge=0, doc="trials train at this size (0: data.image_size)")
    max_train_images: int = _p(8, ge=0, doc="first N training images per trial (0: all)")
    metric: str = _p("AR@300", doc="AR@<N> (N in eval.proposal_budgets) | recall@0.5/300 | "
                                   "recall@0.7/300")
    mode: Literal["max", "min"] = _p("max")
    split: Literal["train", "val", "test"] = _p("val", doc="split the metric is measured on")
    search: Literal["random", "optuna"] = _p("random", doc="optuna: pip install 'frcnn[optuna]'")
    seed: int = _p(0, ge=0, le=2**32 - 1, doc="seed of the search algorithm")
    grace_period: int = _p(1, ge=1, doc="ASHA: epochs before a trial may be stopped")
    reduction_factor: int = _p(2, ge=2, doc="ASHA: keep the best 1/reduction_factor per rung")
    workers_per_trial: int = _p(1, ge=1, doc="Ray Train workers (DDP) of each trial")
    cpus_per_trial: float = _p(1.0, ge=0.0, doc="split over the trial's workers")
    gpus_per_trial: float = _p(0.0, ge=0.0, doc="split over the trial's workers; fractions allowed")
    storage_path: str = _p("ray_results", doc="folder or bucket URI (s3://, gs://) of the sweep")
    name: str = _p("anchor_sweep", doc="the sweep's folder under storage_path")
    table_path: str = _p("reports/sweep.parquet", doc="one row per trial")
    best_params_path: str = _p("sweeps/best_params.yaml", doc="the best trial as a params overlay")
    plot_path: str = _p("reports/sweep.png", doc="the metric per trial over epochs")
    space: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if 0 < self.image_size < 32:
            raise ConfigError(f"sweep.image_size: {self.image_size} is out of range; allowed: 0 "
                              f"(data.image_size) or >= 32")
        if self.cpus_per_trial == 0 and self.gpus_per_trial == 0:
            raise ConfigError("sweep.cpus_per_trial and sweep.gpus_per_trial are both 0: a trial "
                              "needs some CPU or GPU")
        if not self.name or self.name.strip(".") == "" or "/" in self.name or "\\" in self.name:
            raise ConfigError(f"sweep.name: {self.name!r} must be a plain folder name")


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = _p("sqlite:///mlflow.db")
    experiment: str = _p("frcnn")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi: RoIConfig = field(default_factory=RoIConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        _check_sweep_space(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), the shape of ``params.yaml``."""
        return _plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}`` for every parameter; ``sweep.space.<section.key>`` entries
        keep their distribution mapping as the value (round-trips through :meth:`replace`)."""
        tree = self.to_dict()
        space = tree["sweep"].pop("space")
        return flatten(tree) | {f"sweep.space.{key}": spec for key, spec in space.items()}

    def replace(self, overrides: Mapping[str, Any]) -> "Config":
        """A new config with ``{"section.key": value}`` applied, validated like the original."""
        tree = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(tree, key, value, origin="override")
        return from_dict(tree)


# --------------------------------------------------------------------------------------------
# Loading


def load_config(params: Sequence[str | Path] = ("params.yaml",),
                overrides: Sequence[str] = ()) -> Config:
    """Read YAML files (later ones win, merged key by key), apply ``section.key=value`` strings.

    Raises:
        ConfigError: a file is missing or not a mapping, or any key/value is invalid.
    """
    tree: dict[str, Any] = {}
    for path in params:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: parameter file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, ValueError, RecursionError) as exc:
            # ValueError: not UTF-8, or an integer beyond Python's 4300-digit limit;
            # RecursionError: nesting too deep
            raise ConfigError(f"{path}: not valid YAML: {str(exc)[:300]}") from None
        if loaded is None:
            continue
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, "
                              f"got {type(loaded).__name__}")
        _deep_merge(tree, loaded, origin=str(path))
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value, origin=f"--set {item}")
    return from_dict(tree)


def parse_override(item: str) -> tuple[str, Any]:
    """``"rpn.pos_iou=0.6"`` -> ``("rpn.pos_iou", 0.6)``; the value is parsed as YAML."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    parts = key.split(".", 1)
    if key.count(".") < 1 or not all(part.isidentifier() or "." in part for part in parts):
        raise ConfigError(f"--set {item!r}: expected section.key=value, got key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):
        value = raw  # not YAML: keep the literal string, validation decides
    return key, value


def from_dict(tree: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a nested mapping (missing keys: defaults)."""
    if not isinstance(tree, Mapping):
        raise ConfigError(f"parameters must be a mapping, got {type(tree).__name__}")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    kwargs = {}
    for name, value in tree.items():
        if name not in sections:
            raise ConfigError(f"unknown section {name!r}; allowed: {', '.join(sections)}")
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(f"section {name!r} must be a mapping, got {type(value).__name__}")
        factory = sections[name].default_factory
        kwargs[name] = _build_section(factory, name, value)  # type: ignore[misc]
    return Config(**kwargs)


def _build_section(cls: type, section: str, values: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, raw in values.items():
        if key not in fields:
            raise ConfigError(f"unknown key {section}.{key}; allowed: {', '.join(fields)}")
        name = f"{section}.{key}"
        value = _coerce(raw, hints[key], name)
        _check_bounds(value, fields[key].metadata, name)
        kwargs[key] = value
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if (isinstance(value, str) and value.lower() in ("null", "none", "~")
                and type(None) in args and str not in args):
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for candidate in inner:
            try:
                return _coerce(value, candidate, name)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] + " (or null)")
    if origin is Literal:
        if isinstance(value, bool):  # YAML reads true/false as bools; literals are strings
            value = str(value).lower()
        if value not in args:
            allowed = ", ".join(map(str, args))
            raise ConfigError(f"{name}: {value!r} is not allowed; allowed: {allowed}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) == 0:
            raise ConfigError(f"{name}: expected a non-empty list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
    if origin in (collections.abc.Mapping, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        if abs(value) > 1e300 or not math.isfinite(value):  # abs() first: isfinite(10**400) raises
            raise ConfigError(f"{name}: expected a finite number, got {str(value)[:40]}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"{name}: unsupported annotation {tp!r}")  # programming error


def _check_bounds(value: Any, meta: Mapping[str, Any], name: str) -> None:
    items = value if isinstance(value, tuple) else (value,)
    for v in items:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        for op, bound, ok in (("ge", meta.get("ge"), lambda a, b: a >= b),
                              ("le", meta.get("le"), lambda a, b: a <= b),
                              ("gt", meta.get("gt"), lambda a, b: a > b),
                              ("lt", meta.get("lt"), lambda a, b: a < b)):
            if bound is not None and not ok(v, bound):
                raise ConfigError(f"{name}: {value!r} is out of range; "
                                  f"allowed: {_range_text(meta)}")


def _range_text(meta: Mapping[str, Any]) -> str:
    parts = []
    for op, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if meta.get(op) is not None:
            parts.append(f"{sym} {meta[op]}")
    return " and ".join(parts)


TUNABLE_SECTIONS = ("backbone", "anchors", "rpn", "roi", "train")


def _check_sweep_space(cfg: Config) -> None:
    """Each ``sweep.space`` entry names a real ``section.key`` and a valid distribution."""
    for key, spec in cfg.sweep.space.items():
        where = f"sweep.space.{key}"
        section, _, leaf = key.partition(".")
        fields = ({f.name for f in dataclasses.fields(getattr(cfg, section))}
                  if section in TUNABLE_SECTIONS else set())
        if leaf not in fields:
            raise ConfigError(f"{where}: not a tunable parameter; use section.key with section one "
                              f"of {', '.join(TUNABLE_SECTIONS)}")
        if not isinstance(spec, Mapping) or len(spec) != 1:
            kinds = " | ".join(SWEEP_DISTRIBUTIONS)
            raise ConfigError(f"{where}: expected one of {{{kinds}: ...}}")
        (kind, arg), = spec.items()
        if kind not in SWEEP_DISTRIBUTIONS:
            raise ConfigError(f"{where}: unknown distribution {kind!r}; allowed: "
                              f"{', '.join(SWEEP_DISTRIBUTIONS)}")
        if not isinstance(arg, (list, tuple)) or not arg:
            raise ConfigError(f"{where}.{kind}: expected a non-empty list, got {arg!r}")
        if kind != "choice" and len(arg) != 2:
            raise ConfigError(f"{where}.{kind}: expected [low, high], got {arg!r}")
        for value in (arg if kind == "choice" else arg):  # every choice / both ends must be valid
            _validate_value(cfg, key, value, where)


def _validate_value(cfg: Config, key: str, value: Any, where: str) -> None:
    section, leaf = key.split(".", 1)
    cls = type(getattr(cfg, section))
    hints = typing.get_type_hints(cls)
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}[leaf]
    try:
        _check_bounds(_coerce(value, hints[leaf], key), meta, key)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


# --------------------------------------------------------------------------------------------
# Dict helpers


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _deep_merge(base: dict[str, Any], new: Mapping[str, Any], origin: str) -> None:
    for key, value in new.items():
        if not isinstance(key, str):
            raise ConfigError(f"{origin}: keys must be strings, got {key!r}")
        if key == "space":  # a sweep space is replaced whole, not merged
            base[key] = value
        elif isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value, origin)
        else:
            base[key] = dict(value) if isinstance(value, Mapping) else value


def _set_dotted(tree: dict[str, Any], key: str, value: Any, origin: str) -> None:
    section, _, leaf = key.partition(".")
    if not leaf:
        raise ConfigError(f"{origin}: expected section.key, got {key!r}")
    node = tree.setdefault(section, {})
    if not isinstance(node, dict):
        raise ConfigError(f"{origin}: section {section!r} is not a mapping")
    if section == "sweep" and leaf.startswith("space."):
        node.setdefault("space", {})
        node["space"] = dict(node["space"] or {})
        node["space"][leaf[len("space."):]] = value
        return
    node[leaf] = value


def describe() -> str:
    """Every parameter with its default and allowed values: the text of ``--help``'s epilog."""
    lines = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory  # type: ignore[misc]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else "{}"
            allowed = _range_text(f.metadata) if f.metadata else ""
            tp = hints[f.name]
            if typing.get_origin(tp) is Literal:
                allowed = " | ".join(map(str, typing.get_args(tp)))
            doc = f.metadata.get("doc", "") if f.metadata else ""
            extra = "; ".join(x for x in (allowed, doc) if x)
            lines.append(f"  {section.name}.{f.name} = {_plain(default)!r}"
                         + (f"  ({extra})" if extra else ""))
    return "\n".join(lines)
