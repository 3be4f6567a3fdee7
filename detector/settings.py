"""The settings a :class:`detector.FasterRCNN` is built from: one frozen dataclass per concern
(backbone, anchors, matching, proposals, RoI sampling, RoI head, detection, loss weights), and
how a model's ``config`` holds them (plain dicts, what a model file stores), including the flat
keywords of earlier versions."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from detector.roi_heads import DetectionSettings, RoISampling
from detector.rpn import AnchorMatching, ProposalSettings

__all__ = ["AnchorSettings", "BackboneSettings", "FLAT_KEYWORDS", "LossWeights", "RoIHeadSettings",
           "SETTINGS", "complete_config", "flat_config"]


@dataclass(frozen=True)
class BackboneSettings:
    """``weights``: ``"none"``, ``"imagenet"`` or a path (:mod:`detector.backbone`);
    ``freeze_blocks``: how many VGG-16 conv blocks (0..5) are frozen when starting from
    pretrained weights (2: conv1 and conv2, as py-faster-rcnn); no effect with ``"none"``."""

    weights: str = "none"
    freeze_blocks: int = 2


@dataclass(frozen=True)
class AnchorSettings:
    """The anchors of a feature-map cell (:class:`detector.anchors.AnchorGenerator`): every
    ``ratio`` x ``scale`` (sides ``scale * stride`` at ratio 1), or ``shapes``, ``(width,
    height)`` pixels per anchor, instead. ``stride`` must be the backbone's, 16."""

    stride: int = 16
    scales: tuple[float, ...] = (8.0, 16.0, 32.0)
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    shapes: tuple[tuple[float, float], ...] | None = None


@dataclass(frozen=True)
class RoIHeadSettings:
    """The Fast R-CNN head (:class:`detector.roi_heads.RoIHeads`): ``pool`` ``"align"`` or
    ``"pool"`` to ``pool_size`` squared, fc6 / fc7 ``hidden_dim`` wide, ``dropout`` after each
    in training mode (0 disables)."""

    pool: str = "align"
    pool_size: int = 7
    hidden_dim: int = 4096
    dropout: float = 0.5


@dataclass(frozen=True)
class LossWeights:
    """Lambda of the RPN's and of the head's box-regression loss."""

    rpn_reg: float = 1.0
    roi_reg: float = 1.0


#: The settings objects of a :class:`FasterRCNN`, by the name of its keyword
SETTINGS: dict[str, type] = {
    "backbone": BackboneSettings, "anchors": AnchorSettings, "matching": AnchorMatching,
    "proposals": ProposalSettings, "roi_sampling": RoISampling, "roi_head": RoIHeadSettings,
    "detection": DetectionSettings, "loss_weights": LossWeights}


def as_tuples(value: Any) -> Any:
    """Lists (nested too) as tuples: the config compares equal however it was given."""
    if isinstance(value, (list, tuple)):
        return tuple(as_tuples(v) for v in value)
    return value


#: The flat keywords of earlier versions (and of tools that name settings flat, as torchvision's
#: constructor does): keyword -> (settings, field)
FLAT_KEYWORDS = {
    "backbone_weights": ("backbone", "weights"), "backbone_freeze_blocks": ("backbone",
                                                                           "freeze_blocks"),
    **{f"anchor_{k}": ("anchors", k) for k in ("stride", "scales", "ratios", "shapes")},
    **{f"rpn_{k}": ("matching", k) for k in ("pos_iou", "neg_iou", "num_samples",
                                             "pos_fraction", "allow_border")},
    **{f"rpn_{k}": ("proposals", k) for k in ("min_size", "nms_iou", "pre_nms_top_n_train",
                                              "post_nms_top_n_train", "pre_nms_top_n_test",
                                              "post_nms_top_n_test")},
    **{f"roi_{k}": ("roi_sampling", k) for k in ("num_samples", "fg_fraction", "fg_iou",
                                                 "bg_iou_low", "bg_iou_high")},
    **{f"roi_{k}": ("roi_head", k) for k in ("pool", "pool_size", "hidden_dim", "dropout")},
    "roi_score_thresh": ("detection", "score_thresh"), "roi_nms_iou": ("detection", "nms_iou"),
    "roi_detections_per_image": ("detection", "detections_per_image"),
    "rpn_reg_weight": ("loss_weights", "rpn_reg"), "roi_reg_weight": ("loss_weights", "roi_reg"),
}


def nested(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with the keywords of a flat (earlier) config moved into their settings."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key in FLAT_KEYWORDS:
            name, field = FLAT_KEYWORDS[key]
            out.setdefault(name, {})[field] = value
        elif key in SETTINGS:
            out.setdefault(key, {}).update(value or {})
        elif key in ("num_classes", "image_size", "rpn_only"):
            out[key] = value
        else:
            raise TypeError(f"unknown setting {key!r}; allowed: num_classes, image_size, "
                            f"rpn_only, {', '.join(SETTINGS)} (or the flat keywords of earlier "
                            f"versions)")
    return out


def flat_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A ``model.config`` with its settings as flat keywords (``anchor_scales``, ``rpn_pos_iou``,
    ... :data:`FLAT_KEYWORDS`), besides ``num_classes``, ``image_size`` and ``rpn_only``."""
    tree = nested(config)
    out = {k: v for k, v in tree.items() if k not in SETTINGS}
    out.update({key: tree[name][field] for key, (name, field) in FLAT_KEYWORDS.items()
                if field in tree.get(name, {})})
    return out


def complete_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` (nested or flat) as ``model.config`` would hold it, every setting present
    (defaults for those it lacks), without building a model (nothing is loaded).

    Raises:
        TypeError: an unknown setting.
    """
    config = nested(config)
    return {"num_classes": config.get("num_classes"),
            "image_size": config.get("image_size", 640),
            "rpn_only": config.get("rpn_only", False),
            **{name: as_tuples(dataclasses.asdict(build(name, config.get(name))))
               for name in SETTINGS}}


def build(name: str, values: Mapping[str, Any] | None) -> Any:
    """The settings object ``name`` (a key of :data:`SETTINGS`) of a config's plain dict."""
    return SETTINGS[name](**{k: as_tuples(v) for k, v in (values or {}).items()})
