"""The one place where the typed config becomes the detector's plain keyword arguments."""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.config import Config


def model_kwargs(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of :class:`detector.FasterRCNN` (besides ``num_classes``).

    ``anchors.x`` -> ``anchor_x``, ``rpn.x`` -> ``rpn_x``, ``roi.x`` -> ``roi_x``; plus
    ``image_size`` and ``backbone_weights``. Tuples stay tuples; everything is a plain value, so
    the dict can be stored in a checkpoint and loaded with ``weights_only=True``.
    """
    kwargs: dict[str, Any] = {
        "image_size": cfg.data.image_size,
        "backbone_weights": cfg.backbone.weights,
    }
    for prefix, section in (("anchor", cfg.anchors), ("rpn", cfg.rpn), ("roi", cfg.roi)):
        for f in dataclasses.fields(section):
            kwargs[f"{prefix}_{f.name}"] = getattr(section, f.name)
    return kwargs
