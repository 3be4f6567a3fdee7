"""Anchor coverage: which anchor types can train, and which objects the anchors can reach.

Both are properties of the settings and the data alone (no model, no training), so they are
known before any training result:

- :func:`untrained_types`: anchor types (ratio, scale) with no trainable position at
  ``data.image_size`` under ``rpn.allow_border`` (with ``allow_border >= 0`` an anchor wider or
  taller than the image never lies inside it: its classifier and regressor channels get no
  gradient, and at inference its untrained boxes crowd the top proposals).
  :func:`warn_untrained` prints the warning the training stages and the sweep give, and returns
  the text they tag their MLflow runs with.
- the anchor-only baseline of a split, which needs the evaluation's maths:
  :func:`pipeline.evaluation.anchors.anchor_recall`; ``frcnn anchors [--split test]``
  (:mod:`pipeline.evaluation.anchors`) prints both for the configured settings and data.
"""

from __future__ import annotations

import sys
from typing import Sequence

from pipeline.config import Config

TAG = "untrained_anchor_types"  # the MLflow tag of a run whose settings leave types untrained


def generator(cfg: Config):
    """The detector's anchor generator for the configured anchors."""
    from detector.anchors import AnchorGenerator

    return AnchorGenerator(stride=cfg.anchors.stride, scales=cfg.anchors.scales,
                           ratios=cfg.anchors.ratios)


def untrained_types(cfg: Config) -> list[tuple[float, float]]:
    """``(ratio, scale)`` of each anchor type with no trainable position (see the module)."""
    from detector.anchors import untrained_anchor_types

    return untrained_anchor_types(generator(cfg), cfg.data.image_size, cfg.rpn.allow_border)


def describe_types(cfg: Config, types: Sequence[tuple[float, float]]) -> str:
    """``"ratio 0.5 x scale 32 (724x362 px), ..."``: anchor types with their sizes in pixels."""
    parts = []
    for ratio, scale in types:
        side = scale * cfg.anchors.stride
        width, height = side / ratio ** 0.5, side * ratio ** 0.5
        parts.append(f"ratio {ratio:g} x scale {scale:g} ({width:.0f}x{height:.0f} px)")
    return ", ".join(parts)


def warn_untrained(cfg: Config, who: str) -> str | None:
    """Print a warning naming the anchor types ``cfg`` leaves untrained; returns its text (the
    value of the :data:`TAG` tag), or None when every type can train."""
    types = untrained_types(cfg)
    if not types:
        return None
    text = describe_types(cfg, types)
    print(f"{who}: warning: {len(types)} anchor type(s) never lie inside the "
          f"{cfg.data.image_size}x{cfg.data.image_size} image with rpn.allow_border="
          f"{cfg.rpn.allow_border:g} and are never trained: {text}; use rpn.allow_border=-1 or "
          f"smaller anchors.scales", file=sys.stderr, flush=True)
    return text
