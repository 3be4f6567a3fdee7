"""Anchor coverage: which anchor types can train, and which objects the anchors can reach.

Both are properties of the settings and the data alone (no model, no training), so they are
known before any training result:

- :func:`untrained_types`: anchor types (ratio, scale) with no trainable position at
  ``data.image_size`` under ``rpn.allow_border`` (with ``allow_border >= 0`` an anchor wider or
  taller than the image never lies inside it: its classifier and regressor channels get no
  gradient, and at inference its untrained boxes crowd the top proposals).
  :func:`warn_untrained` prints the warning the training stages and the sweep give, and returns
  the text they tag their MLflow runs with.
- :func:`anchor_recall`: the anchor-only baseline of a split: for every ground-truth box, the
  best IoU over *all* anchors of the image, summarised as ``anchors/AR``,
  ``anchors/recall@0.5`` / ``@0.7`` and per class ``anchors/recall@0.5/<class>``,
  ``anchors/AR/<class>`` (the maths and names of :mod:`pipeline.evaluation`). The RPN can
  rarely find an object that no anchor overlaps well.

``frcnn anchors [--split test]`` prints both for the configured settings and prepared data.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from pipeline.config import Config
from pipeline.prepared import GroundTruth

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


def anchor_recall(cfg: Config, split: GroundTruth, class_names: Sequence[str] = ()
                  ) -> dict[str, float]:
    """The anchor-only baseline of ``split`` (boxes in the ``data.image_size`` frame): the
    ``anchors/...`` metrics of :func:`pipeline.evaluation.metrics.split_metrics`."""
    import torch

    from pipeline.evaluation import recall as R
    from pipeline.evaluation.metrics import split_metrics

    side = cfg.data.image_size // cfg.anchors.stride
    anchors = generator(cfg)((side, side), torch.device("cpu"))
    rows = [R.image_recall_rows(image_id=image_id, split=split.name, gt_boxes=boxes,
                                labels=labels, difficult=difficult,
                                best_iou=R.best_iou_all(boxes, anchors)[:, None],
                                budgets=[R.ANCHOR_BUDGET])
            for image_id, boxes, labels, difficult in zip(split.image_ids, split.boxes,
                                                          split.labels, split.difficult)]
    summary = R.summarize(R.recall_table(rows), image_size=cfg.data.image_size,
                          class_names=class_names)
    values = split_metrics(summary, split.name, [], None, class_names)
    return {k: v for k, v in values.items() if k.startswith("anchors/")}


def run(cfg: Config, args: argparse.Namespace) -> int:
    """``frcnn anchors [--split NAME]``: trainable positions per anchor type, the untrained ones,
    and the anchor-only recall per class on a prepared split."""
    from detector.anchors import trainable_anchor_counts

    from pipeline.prepared import read_classes, read_ground_truth, split_path

    gen = generator(cfg)
    counts = trainable_anchor_counts(gen, cfg.data.image_size, cfg.rpn.allow_border)
    print(f"anchors at {cfg.data.image_size}x{cfg.data.image_size}, stride {gen.stride}, "
          f"rpn.allow_border {cfg.rpn.allow_border:g}: trainable positions per type")
    for (ratio, scale), count in zip(gen.types, counts.tolist()):
        print(f"  {describe_types(cfg, [(ratio, scale)]):<34} {count}")
    warn_untrained(cfg, "frcnn anchors")
    prepared = Path(cfg.data.out_dir)
    names = [str(c) for c in read_classes(prepared, image_size=cfg.data.image_size)["classes"]]
    split = read_ground_truth(split_path(prepared, args.split), args.split)
    print(f"anchor-only recall on {args.split} ({sum(len(b) for b in split.boxes)} boxes):")
    for key, value in anchor_recall(cfg, split, names).items():
        print(f"  {key:<34} {value:.3f}")
    return 0
