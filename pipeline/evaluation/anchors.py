"""The anchor-only baseline of a split, and ``frcnn anchors``: anchor coverage without a model.

:func:`anchor_recall`: for every ground-truth box, the best IoU over *all* anchors of the image
(raw: unranked, neither clipped nor filtered), summarised as ``anchors/AR``,
``anchors/recall@0.5`` / ``@0.7`` and per class ``anchors/recall@0.5/<class>``,
``anchors/AR/<class>`` (the maths and names of the evaluate stage). The RPN can rarely find an
object that no anchor overlaps well, so a setting that cannot cover a class shows here before
any training. ``frcnn anchors`` adds the trainable positions per anchor type
(:mod:`pipeline.anchors`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from pipeline.anchors import describe_types, generator, warn_untrained
from pipeline.config import Config
from pipeline.prepared import GroundTruth


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
