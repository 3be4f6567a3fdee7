"""The typed configuration: one frozen dataclass per concern, ``Config`` holding them all.

Each field's default, numeric bounds and one-line description are declared with :func:`_p`;
:mod:`pipeline.config.load` builds a :class:`Config` from ``params.yaml`` and overrides, and
:mod:`pipeline.config.validate` checks every value against these declarations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from pipeline.config.tree import flatten, plain, set_dotted
from pipeline.config.validate import (SWEEP_DISTRIBUTIONS, build_section, check_no_credentials,
                                      check_sweep_space)
from pipeline.errors import ConfigError

__all__ = ["AnchorConfig", "BackboneConfig", "Config", "ConfigError", "DataConfig", "EvalConfig",
           "RPNConfig", "RoIConfig", "SWEEP_DISTRIBUTIONS", "SweepConfig", "TrackingConfig",
           "TrainConfig"]


def _p(default: Any, *, ge: float | None = None, le: float | None = None,
       gt: float | None = None, lt: float | None = None, doc: str = "",
       operational: bool = False, stage: str | None = None) -> Any:
    """A dataclass field with a default, numeric bounds and a one-line description.

    ``operational``: the parameter says where or with what resources work runs (paths,
    addresses, CPUs, logging cadence, retries), not what is computed: it is left out of the
    training stages' resume keys, the sweep's key and ``dvc.yaml``'s params (paths enter
    ``dvc.yaml`` as templated deps and outs). ``stage``: a training parameter of that stage
    alone (``rpn`` or ``frcnn``). :func:`operational_keys` and :func:`stage_keys` read them.
    """
    meta = {"ge": ge, "le": le, "gt": gt, "lt": lt, "doc": doc, "operational": operational,
            "stage": stage}
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
    num_workers: int = _p(2, ge=1, operational=True)
    out_dir: str = _p("data/prepared", operational=True)

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
    freeze_blocks: int = _p(2, ge=0, le=5, doc="VGG-16 conv blocks frozen when starting from "
                                               "pretrained weights (2: conv1-conv2, as the "
                                               "original); no effect with weights: none")


@dataclass(frozen=True)
class AnchorConfig:
    # the stride of VGG-16's conv5_3 feature map, on whose cells anchors are centred: the one
    # value the model takes (detector.backbone.VGG16Backbone.stride; a test ties the two)
    stride: Literal[16] = _p(16, doc="VGG-16's feature stride, the only value")
    scales: tuple[float, ...] = _p((8.0, 16.0, 32.0), gt=0)
    ratios: tuple[float, ...] = _p((0.5, 1.0, 2.0), gt=0)
    shapes: tuple[tuple[float, float], ...] | None = _p(
        None, gt=0, doc="[width, height] pixels at data.image_size per anchor of a cell, "
                        "used instead of scales x ratios (frcnn anchors --fit writes them)")

    @property
    def num_anchors(self) -> int:
        """Anchors per feature-map cell."""
        return len(self.shapes) if self.shapes else len(self.scales) * len(self.ratios)


@dataclass(frozen=True)
class RPNConfig:
    pos_iou: float = _p(0.7, gt=0.0, le=1.0)
    neg_iou: float = _p(0.3, ge=0.0, lt=1.0)
    num_samples: int = _p(256, ge=1)
    pos_fraction: float = _p(0.5, gt=0.0, le=1.0)
    allow_border: float = _p(-1.0, ge=-1.0, doc="anchors crossing the border by more than this "
                                                 "many pixels are not trained; -1 trains all")
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
    dropout: float = _p(0.5, ge=0.0, lt=1.0, doc="after fc6 and fc7 (training only); 0 disables")
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
    use_gpu: Literal["auto", "true", "false"] = _p("auto", operational=True)
    cpus_per_worker: float = _p(0.5, gt=0.0, operational=True)
    gpus_per_worker: float = _p(1.0, gt=0.0, operational=True)
    batch_size: int = _p(1, ge=1)
    rpn_epochs: int = _p(1, ge=1, stage="rpn")
    frcnn_epochs: int = _p(1, ge=1, stage="frcnn")
    max_steps: int = _p(0, ge=0)
    lr: float = _p(0.001, gt=0.0)
    momentum: float = _p(0.9, ge=0.0, lt=1.0)
    weight_decay: float = _p(0.0005, ge=0.0)
    bias_decay: bool = _p(False, doc="weight decay on biases too (the original: none)")
    warmup_steps: int = _p(4, ge=0)
    lr_schedule: Literal["cosine", "step", "constant"] = _p("cosine")
    lr_step_epochs: tuple[int, ...] = _p((8, 11), ge=1)
    lr_gamma: float = _p(0.1, gt=0.0, le=1.0)
    amp: Literal["auto", "bf16", "fp16", "off"] = _p("auto")
    hflip: float = _p(0.5, ge=0.0, le=1.0)
    use_difficult: bool = _p(False, doc="train on boxes marked difficult (VOC)")
    grad_clip: float = _p(10.0, ge=0.0)
    loader_workers: int = _p(1, ge=0, doc="decoding processes (the plain reader) or threads "
                                           "(Ray Data input) per worker", operational=True)
    shuffle_buffer: int = _p(256, ge=0, doc="rows of each Ray Train worker's local shuffle "
                                            "buffer over its Ray Data shard (0: none)")
    checkpoint_every: int = _p(0, ge=0, operational=True)
    log_every: int = _p(1, ge=1, doc="log step metrics every N optimiser steps", operational=True)
    max_failures: int = _p(2, ge=0, operational=True)
    keep_checkpoints: bool = _p(False,
                                doc="keep a finished run's checkpoints (a rerun then reuses it)",
                                operational=True)
    storage_path: str = _p("checkpoints", operational=True)
    ray_address: str | None = _p(None, operational=True)
    worker_resources: Mapping[str, float] = field(default_factory=dict, metadata={
        "doc": "extra Ray resources per worker, e.g. {gpu_node: 1}: custom node resources "
               "place workers (also the sweep's trial workers)", "operational": True})
    seed: int = _p(0, ge=0, le=2**32 - 1, doc="torch generators take at most 64 bits")
    rpn_model: str = _p("models/rpn.pt", operational=True)
    frcnn_model: str = _p("models/frcnn.pt", operational=True)
    metrics_dir: str = _p("metrics", doc="train_<stage>.json and train_<stage>_epochs.csv", operational=True)

    def __post_init__(self) -> None:
        for name, amount in self.worker_resources.items():
            if not isinstance(name, str) or isinstance(amount, bool) \
                    or not isinstance(amount, (int, float)) or amount < 0:
                raise ConfigError(f"train.worker_resources: {name!r}: {amount!r} must be a "
                                  f"resource name and an amount >= 0")


@dataclass(frozen=True)
class EvalConfig:
    splits: tuple[Literal["train", "val", "test"], ...] = _p(("test", "val"))
    proposal_budgets: tuple[int, ...] = _p((50, 100, 300, 1000, 2000), ge=1)
    batch_size: int = _p(2, ge=1, doc="images per forward; changes no result", operational=True)
    num_pictures: int = _p(4, ge=0)
    reports_dir: str = _p("reports", operational=True)
    metrics_path: str = _p("metrics/evaluate.json", operational=True)




@dataclass(frozen=True)
class SweepConfig:
    num_samples: int = _p(2, ge=1, doc="trials")
    max_concurrent_trials: int = _p(1, ge=1)
    epochs: int = _p(1, ge=1, doc="RPN epochs per trial")
    image_size: int = _p(0, ge=0, doc="trials train and score at this size (0: data.image_size; "
                                      "another size biases the sweep: it warns)")
    max_train_images: int = _p(8, ge=0, doc="first N training images per trial (0: all)")
    metric: str = _p("AR@300/mean_class", doc="AR@<N> (N in eval.proposal_budgets) | "
                                              "recall@0.5/300 | recall@0.7/300, or any of them "
                                              "/mean_class (the mean over classes)")
    mode: Literal["max", "min"] = _p("max")
    split: Literal["train", "val", "test"] = _p("val", doc="split the metric is measured on")
    search: Literal["random", "optuna"] = _p("random", doc="optuna: pip install 'frcnn[optuna]'")
    seed: int = _p(0, ge=0, le=2**32 - 1, doc="seed of the search algorithm")
    grace_period: int = _p(1, ge=1, doc="ASHA: epochs before a trial may be stopped")
    reduction_factor: int = _p(2, ge=2, doc="ASHA: keep the best 1/reduction_factor per rung")
    workers_per_trial: int = _p(1, ge=1, doc="Ray Train workers (DDP) of each trial")
    cpus_per_trial: float = _p(1.0, ge=0.0, doc="split over the trial's workers", operational=True)
    gpus_per_trial: float = _p(0.0, ge=0.0, doc="split over the trial's workers; fractions allowed",
                               operational=True)
    storage_path: str = _p("ray_results", doc="folder or bucket URI (s3://, gs://) of the sweep",
                           operational=True)
    name: str = _p("anchor_sweep", doc="the sweep's folder under storage_path")
    table_path: str = _p("reports/sweep.parquet", doc="one row per trial", operational=True)
    best_params_path: str = _p("sweeps/best_params.yaml", doc="the best trial as a params overlay",
                               operational=True)
    plot_path: str = _p("reports/sweep.png", doc="the metric per trial over epochs", operational=True)
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
    uri: str = _p("sqlite:///mlflow.db", operational=True)
    experiment: str = _p("frcnn", operational=True)
    register_models: bool = _p(True, doc="register the trained models in the model registry",
                               operational=True)
    rpn_model_name: str = _p("frcnn-rpn", doc="registered name of the RPN stage's model", operational=True)
    frcnn_model_name: str = _p("frcnn", doc="registered name of the detector", operational=True)
    system_metrics: bool = _p(True, doc="CPU / memory / GPU of every training worker", operational=True)
    system_metrics_interval: float = _p(10.0, gt=0.0, doc="seconds between system samples", operational=True)


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
        check_sweep_space(self)
        check_no_credentials(self.flat())

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), the shape of ``params.yaml``."""
        return plain(dataclasses.asdict(self))

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
            set_dotted(tree, key, value, origin="override")
        return from_dict(tree)


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
        kwargs[name] = build_section(factory, name, value)  # type: ignore[misc]
    return Config(**kwargs)


def _flagged(test: Any) -> list[str]:
    out = []
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory):  # type: ignore[arg-type]
            if test(f.metadata):
                out.append(f"{section.name}.{f.name}")
    return out


def operational_keys() -> tuple[str, ...]:
    """``section.key`` of every operational parameter (see :func:`_p`): the one list the resume
    keys, the sweep's key and ``dvc.yaml``'s params are derived from."""
    return tuple(_flagged(lambda meta: meta.get("operational")))


def stage_keys(stage: str) -> tuple[str, ...]:
    """``section.key`` of the training parameters of ``stage`` alone (``train.rpn_epochs``)."""
    return tuple(_flagged(lambda meta: meta.get("stage") == stage))
