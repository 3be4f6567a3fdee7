"""Anchor coverage: which anchor types train, which objects the anchors reach, and the best any
anchors could do at this stride; anchor shapes fitted to a dataset.

All of it follows from the settings and the boxes alone (no model, no training), so it is known
before any training result. Shapes: ``N`` boxes ``(N, 4)`` x1y1x2y2 in the ``image_size`` frame,
``a`` anchor shapes ``(a, 2)`` as ``(width, height)`` pixels, ``K`` candidate shapes. One owner
per formula:

- Trainable types: with ``rpn.allow_border >= 0`` an anchor type that never lies inside the
  image is never labelled, so its head channels get no gradient
  (:func:`detector.anchors.trainable_anchor_counts`; the config's types, their warning and
  MLflow tag: :mod:`pipeline.modeling`, which the training stages use without this module).
- :func:`grid_iou`, the best IoU of each box with each anchor shape over every position of the
  stride grid. Along x the overlap of two intervals only shrinks as their centres move apart
  (along y likewise), and IoU grows with the overlap, so the best position is the cell centre
  nearest to the box's centre along each axis: one anchor per (box, shape) gives exactly what
  all ``H * W * a`` anchors give.
- The anchor-only baseline (``anchors/...``): per box the best :func:`grid_iou` over the
  setting's shapes. The RPN rarely finds an object that no anchor overlaps well.
- The stride's ceiling (``ceiling/...``, :func:`ceiling_iou`): per box the best IoU that one
  anchor of *any* width and height centred on a cell centre can reach. No choice of anchors
  beats it at this stride and image size; a class far below it wants other anchors, a class
  whose ceiling is low wants a larger image (or a finer stride).
- :func:`fit_shapes`: the shapes that maximise the class-balanced coverage (every class
  weighs the same, so a rare small class is not traded away for a frequent one), searched
  over the same :func:`grid_iou`; :func:`kmeans_shapes` is the shape-only k-means of YOLO's
  autoanchor, kept as the reference it is compared with.

``frcnn anchors [--split S] [--fit --out FILE --num K]`` (:func:`run`) prints all of it.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from pipeline.config import Config, ConfigError
from pipeline.evaluation.recall import IOU_THRESHOLDS
from pipeline.modeling import anchor_generator, describe_types, warn_untrained

#: a fit ranks shape sets by class-balanced AR, ties (AR moves in steps of 1/(10 boxes)) broken
#: by the class-balanced mean best IoU with this weight
MEAN_IOU_WEIGHT = 0.1


# --------------------------------------------------------------------------------------------
# Best IoU on the stride grid


def _nearest_centres(boxes: Tensor, stride: int, image_size: int
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """``(N, 4)`` boxes -> ``(nearest cell centre, box centre, box size)``, ``(N, 2)`` float64
    each, as ``(x, y)``.

    The grid has ``image_size // stride`` cells a side (VGG-16's four floor-halving poolings);
    cell ``j``'s centre is ``(j + 0.5) * stride``: the nearest to a coordinate is the centre of
    the cell that holds it (clamped to the grid)."""
    boxes = boxes.double().reshape(-1, 4)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    cell = torch.clamp(torch.floor(centre / stride), 0, image_size // stride - 1)
    return (cell + 0.5) * stride, centre, boxes[:, 2:] - boxes[:, :2]


def _centred_iou(boxes: Tensor, centres: Tensor, wh: Tensor) -> Tensor:
    """IoU of ``boxes (N, 4)`` with anchors of sizes ``wh (N, k, 2)`` centred at ``centres
    (N, 2)`` -> ``(N, k)`` float64."""
    boxes = boxes.double().reshape(-1, 1, 4)
    half = wh.double() / 2
    lo, hi = centres[:, None] - half, centres[:, None] + half               # (N, k, 2)
    inter = (torch.minimum(hi, boxes[..., 2:]) - torch.maximum(lo, boxes[..., :2])).clamp(min=0)
    inter = inter.prod(dim=-1)
    area = (boxes[..., 2:] - boxes[..., :2]).prod(dim=-1) + wh.double().prod(dim=-1)
    return inter / (area - inter).clamp(min=1e-12)


def grid_iou(boxes: Tensor, sizes: Tensor | Sequence[Sequence[float]], *, stride: int,
             image_size: int) -> Tensor:
    """Best IoU of each box with each anchor shape over all positions of the stride grid.

    Args:
        boxes: ``(N, 4)`` x1y1x2y2 pixels in the ``image_size`` frame.
        sizes: ``(a, 2)`` anchor ``(width, height)`` pixels.
        stride: pixels per feature-map cell; the grid has ``image_size // stride`` cells a side.

    Returns:
        ``(N, a)`` float64: what the best of all ``H * W * a`` anchors of that shape gives (see
        the module docstring for why the nearest cell centre is the best position).
    """
    centres, _, _ = _nearest_centres(boxes, stride, image_size)
    sizes = torch.as_tensor(sizes, dtype=torch.float64).reshape(1, -1, 2)
    return _centred_iou(boxes, centres, sizes.expand(centres.shape[0], -1, -1))


def ceiling_iou(boxes: Tensor, *, stride: int, image_size: int) -> Tensor:
    """Per box, the best IoU of one anchor of any width and height centred on a cell centre.

    With the box ``w x h`` and its centre ``(dx, dy)`` from the nearest cell centre, an anchor
    of width ``aw`` overlaps the box along x by ``(aw + w) / 2 - dx`` for ``aw`` in ``[|w - 2 dx|,
    w + 2 dx]``; outside that range a wider anchor only adds area, a narrower one only loses
    overlap. Inside it, for a fixed height the IoU is monotone in ``aw`` (the overlap and the
    union are both linear in it), and likewise in ``ah``, so the best anchor is one of four: its
    width ``w - 2 dx`` (inside the box) or ``w + 2 dx`` (around it), its height likewise.

    Args:
        boxes: ``(N, 4)`` x1y1x2y2 pixels in the ``image_size`` frame.

    Returns:
        ``(N,)`` float64 in ``[0, 1]``; 1 exactly for a box centred on a cell centre.
    """
    centres, centre, wh = _nearest_centres(boxes, stride, image_size)
    if wh.shape[0] == 0:
        return wh.new_zeros(0)
    twice = 2 * (centre - centres).abs()                                    # (N, 2): 2 dx, 2 dy
    inner, outer = (wh - twice).clamp(min=1e-9), wh + twice                 # (N, 2) each
    corners = torch.stack([torch.stack([w[:, 0], h[:, 1]], dim=-1)
                           for w in (inner, outer) for h in (inner, outer)], dim=1)  # (N, 4, 2)
    return _centred_iou(boxes, centres, corners).max(dim=1).values


# --------------------------------------------------------------------------------------------
# Coverage of a split, as recall rows and metrics


def coverage_rows(split: Any, sizes: Sequence[Sequence[float]], *, stride: int,
                  image_size: int) -> list[dict]:
    """Recall-table rows (:func:`pipeline.evaluation.recall.image_recall_rows`) of a split's
    boxes, crowd regions left out: the anchor-only baseline for the anchor ``sizes`` (``budget``
    ``ANCHOR_BUDGET``) and the stride's ceiling (``CEILING_BUDGET``). Computed for every box of
    the split at once, then cut per image."""
    from pipeline.evaluation import recall as R

    counted = [~crowd for crowd in split.crowd]                  # crowd regions: nothing to cover
    boxes = torch.cat([b[keep] for b, keep in zip(split.boxes, counted)]).reshape(-1, 4)
    best = grid_iou(boxes, sizes, stride=stride, image_size=image_size).max(dim=1).values
    ceiling = ceiling_iou(boxes, stride=stride, image_size=image_size)
    per_image = [int(keep.sum()) for keep in counted]
    rows = []
    for i, (b_best, b_ceiling) in enumerate(zip(best.split(per_image), ceiling.split(per_image))):
        if per_image[i] == 0:
            continue
        keep = counted[i]
        common = dict(image_id=split.image_ids[i], split=split.name, gt_boxes=split.boxes[i][keep],
                      labels=split.labels[i][keep], difficult=split.difficult[i][keep],
                      gt_index=torch.nonzero(keep).flatten())
        rows.append(R.image_recall_rows(**common, budgets=[R.ANCHOR_BUDGET],
                                        best_iou=b_best.float()[:, None]))
        rows.append(R.image_recall_rows(**common, budgets=[R.CEILING_BUDGET],
                                        best_iou=b_ceiling.float()[:, None]))
    return rows


def coverage_metrics(cfg: Config, split: Any, *, class_names: Sequence[str] = ()
                     ) -> dict[str, float]:
    """The ``anchors/...`` and ``ceiling/...`` metrics of ``split`` (boxes in the
    ``data.image_size`` frame) for ``cfg``'s anchors: the names of
    :func:`pipeline.evaluation.metrics.split_metrics`."""
    from pipeline.evaluation import recall as R
    from pipeline.evaluation.metrics import split_metrics

    gen = anchor_generator(cfg)
    rows = coverage_rows(split, gen.sizes, stride=gen.stride, image_size=cfg.data.image_size)
    summary = R.summarize(R.recall_table(rows), image_size=cfg.data.image_size,
                          class_names=class_names)
    values = split_metrics(summary, split.name, [], None, class_names)
    return {k: v for k, v in values.items() if k.startswith(("anchors/", "ceiling/"))}


# --------------------------------------------------------------------------------------------
# Fitting anchor shapes


def balanced_score(best: Tensor, classes: Tensor, num_classes: int) -> Tensor:
    """The fit's objective for one or many shape sets.

    Args:
        best: ``(N,)`` or ``(N, K)``: each box's best IoU under one (or each of K) shape sets.
        classes: ``(N,)`` int64 class index ``0 .. num_classes - 1`` of each box.

    Returns:
        ``()`` or ``(K,)``: the mean over classes (those with boxes) of the class's anchor-only
        AR, plus :data:`MEAN_IOU_WEIGHT` x its mean best IoU.
    """
    squeeze = best.dim() == 1
    best = best.reshape(best.shape[0], -1).double()
    per_box = MEAN_IOU_WEIGHT * best
    for t in IOU_THRESHOLDS:  # a loop, not a (N, K, 10) tensor
        per_box += (best >= t).double() / len(IOU_THRESHOLDS)
    sums = torch.zeros(num_classes, best.shape[1], dtype=torch.float64)
    sums.index_add_(0, classes, per_box)
    counts = torch.bincount(classes, minlength=num_classes).double()
    present = counts > 0
    score = (sums[present] / counts[present, None]).mean(dim=0)
    return score[0] if squeeze else score


def _candidates(wh: Tensor, current: Tensor, classes: Tensor, num: int) -> Tensor:
    """``(K, 2)`` candidate shapes: a log grid over the boxes' widths and heights, each class's
    k-means shapes and the current setting's."""
    lo, hi = wh.min(dim=0).values.clamp(min=1.0) * 0.7, wh.max(dim=0).values * 1.3
    steps = 24
    ws = torch.logspace(math.log10(lo[0]), math.log10(hi[0]), steps, dtype=torch.float64)
    hs = torch.logspace(math.log10(lo[1]), math.log10(hi[1]), steps, dtype=torch.float64)
    grid = torch.cartesian_prod(ws, hs)
    per_class = [kmeans_shapes(wh[classes == c], min(num, int((classes == c).sum())))
                 for c in classes.unique().tolist()]
    return torch.cat([grid, current.double(), *per_class], dim=0)


def fit_shapes(boxes: Tensor, labels: Tensor, *, num: int, stride: int, image_size: int,
               current: Sequence[Sequence[float]] = (), max_boxes: int = 4000,
               seed: int = 0) -> list[tuple[float, float]]:
    """``num`` anchor shapes for ``boxes``: the set with the best :func:`balanced_score`.

    Searched over the exact :func:`grid_iou` of every box with K candidate shapes
    (:func:`_candidates`): greedy additions, then swaps of one shape for another until none
    helps, then each shape refined by factors of its width and height.

    Args:
        boxes: ``(N, 4)`` training boxes in the ``image_size`` frame; labels ``(N,)``.
        num: shapes to fit.
        current: the setting's shapes: among the candidates, and returned instead when the
            search ends worse than them (it is local) with as many shapes.
        max_boxes: at most this many boxes per class are used (drawn with ``seed``).

    Returns:
        ``num`` ``(width, height)`` pairs in pixels, by increasing area.
    """
    boxes, labels = boxes.double().reshape(-1, 4), labels.reshape(-1)
    if boxes.shape[0] == 0:
        raise ValueError("no boxes to fit anchors to")
    gen = torch.Generator().manual_seed(seed)
    keep = torch.cat([idx[torch.randperm(len(idx), generator=gen)[:max_boxes]]
                      for idx in (torch.nonzero(labels == c).flatten()
                                  for c in labels.unique())])
    boxes, labels = boxes[keep], labels[keep]
    classes = torch.unique(labels, return_inverse=True)[1]
    nc = int(classes.max()) + 1
    wh = boxes[:, 2:] - boxes[:, :2]
    cand = _candidates(wh, torch.as_tensor(current, dtype=torch.float64).reshape(-1, 2),
                       classes, num)
    iou = grid_iou(boxes, cand, stride=stride, image_size=image_size)     # (N, K)

    def score_of_shapes(found: Tensor) -> float:
        best = grid_iou(boxes, found, stride=stride, image_size=image_size).max(dim=1).values
        return float(balanced_score(best, classes, nc))

    def score_of(chosen: list[int]) -> float:
        best = iou[:, chosen].max(dim=1).values if chosen else iou.new_zeros(iou.shape[0])
        return float(balanced_score(best, classes, nc))

    chosen: list[int] = []
    for _ in range(num):  # greedy: add the candidate that helps most
        base = iou[:, chosen].max(dim=1).values if chosen else iou.new_zeros(iou.shape[0])
        scores = balanced_score(torch.maximum(base[:, None], iou), classes, nc)
        chosen.append(int(scores.argmax()))
    for _ in range(4):  # swaps: replace one shape by the best candidate while it helps
        improved = False
        for i in range(num):
            others = chosen[:i] + chosen[i + 1:]
            base = iou[:, others].max(dim=1).values if others else iou.new_zeros(iou.shape[0])
            scores = balanced_score(torch.maximum(base[:, None], iou), classes, nc)
            j = int(scores.argmax())
            if float(scores[j]) > score_of(chosen) + 1e-12:
                chosen[i], improved = j, True
        if not improved:
            break
    shapes = cand[chosen].clone()
    factors = torch.tensor([0.85, 0.92, 0.96, 1.0, 1.04, 1.09, 1.18], dtype=torch.float64)
    steps = torch.cartesian_prod(factors, factors)                          # (49, 2)
    for _ in range(3):  # refine each shape by factors of its width and height
        for i in range(num):
            others = torch.cat([shapes[:i], shapes[i + 1:]])
            base = (grid_iou(boxes, others, stride=stride, image_size=image_size).max(dim=1).values
                    if len(others) else boxes.new_zeros(boxes.shape[0]))
            trial = shapes[i] * steps                                       # (49, 2)
            scores = balanced_score(torch.maximum(base[:, None], grid_iou(
                boxes, trial, stride=stride, image_size=image_size)), classes, nc)
            shapes[i] = trial[int(scores.argmax())]
    shapes = torch.tensor([[round(float(w), 1), round(float(h), 1)] for w, h in shapes],
                          dtype=torch.float64)
    start = torch.as_tensor(current, dtype=torch.float64).reshape(-1, 2)
    if len(start) == num and score_of_shapes(start) > score_of_shapes(shapes):
        shapes = start  # the search is local: it never hands back worse than it started from
    order = shapes.prod(dim=1).argsort()
    return [(float(w), float(h)) for w, h in shapes[order]]


def fit_to_split(cfg: Config, split: Any, *, num: int) -> list[tuple[float, float]]:
    """:func:`fit_shapes` on the boxes of ``split`` (in the ``data.image_size`` frame) that train
    (crowd regions left out), with ``cfg``'s anchors among the candidates."""
    gen = anchor_generator(cfg)
    keep = torch.cat([~c for c in split.crowd])
    return fit_shapes(torch.cat(split.boxes)[keep], torch.cat(split.labels)[keep], num=num,
                      stride=gen.stride, image_size=cfg.data.image_size, current=gen.sizes)


def kmeans_shapes(wh: Tensor, num: int, iterations: int = 50) -> Tensor:
    """YOLO's autoanchor k-means: ``num`` ``(width, height)`` centres of ``wh (N, 2)`` under the
    distance ``1 - IoU`` of boxes sharing a centre; deterministic (started at area quantiles).
    Shape only: where anchors sit on the stride grid plays no part. ``(num, 2)`` float64."""
    wh = wh.double().reshape(-1, 2)
    if num <= 0 or wh.shape[0] == 0:
        return wh.new_zeros(0, 2)
    order = wh.prod(dim=1).argsort()
    centres = wh[order[((torch.arange(num) + 0.5) * wh.shape[0] / num).long()]].clone()
    for _ in range(iterations):
        inter = torch.minimum(wh[:, None], centres[None]).prod(dim=-1)      # (N, k)
        iou = inter / (wh.prod(dim=1)[:, None] + centres.prod(dim=1)[None] - inter)
        nearest = iou.argmax(dim=1)
        new = centres.clone()
        for k in range(num):
            members = wh[nearest == k]
            if len(members):
                new[k] = members.median(dim=0).values
        if torch.allclose(new, centres):
            break
        centres = new
    return centres


# --------------------------------------------------------------------------------------------
# frcnn anchors


def overlay_text(shapes: Sequence[Sequence[float]], source: str) -> str:
    """A params overlay setting ``anchors.shapes`` (``--params params.yaml --params FILE``)."""
    import yaml

    body = yaml.safe_dump({"anchors": {"shapes": [[float(w), float(h)] for w, h in shapes]}},
                          default_flow_style=None, sort_keys=False)
    return (f"# anchors.shapes fitted by `frcnn anchors --fit` on {source}\n"
            f"# use: frcnn <command> --params params.yaml --params <this file>\n{body}")


def run(cfg: Config, args: argparse.Namespace) -> int:
    """``frcnn anchors [--split NAME] [--fit --out FILE --num K]``: trainable positions per
    anchor type, then per class the anchor-only coverage of the configured anchors and the
    stride's ceiling on a split; with ``--fit``, shapes fitted on the train split, written as a
    params overlay, and their coverage beside the others."""
    from detector.anchors import trainable_anchor_counts

    from pipeline import files
    from pipeline.prepared_table import read_classes, split_path
    from pipeline.annotations import read_ground_truth

    if args.fit and args.num < 1:
        raise ConfigError(f"--num {args.num}: fit at least one anchor shape")
    gen = anchor_generator(cfg)
    counts = trainable_anchor_counts(gen, cfg.data.image_size, cfg.rpn.allow_border)
    print(f"anchors at {cfg.data.image_size}x{cfg.data.image_size}, stride {gen.stride}, "
          f"rpn.allow_border {cfg.rpn.allow_border:g}: trainable positions per type")
    for t, count in zip(gen.types, counts.tolist()):
        print(f"  {describe_types(cfg, [t]):<34} {count}")
    warn_untrained(cfg, "frcnn anchors")
    prepared = Path(cfg.data.out_dir)
    names = [str(c) for c in read_classes(prepared, image_size=cfg.data.image_size)["classes"]]
    split = read_ground_truth(split_path(prepared, args.split), args.split)
    columns = {"current": coverage_metrics(cfg, split, class_names=names)}
    if args.fit:
        train = read_ground_truth(split_path(prepared, "train"), "train")
        boxes = torch.cat(train.boxes)[torch.cat([~c for c in train.crowd])]
        shapes = fit_to_split(cfg, train, num=args.num)
        kmeans = kmeans_shapes(boxes[:, 2:] - boxes[:, :2], args.num).tolist()
        for name, found in (("k-means", kmeans), ("fitted", shapes)):
            columns[name] = coverage_metrics(
                cfg.replace({"anchors.shapes": [list(s) for s in found]}), split, class_names=names)
        files.write_text(Path(args.out), overlay_text(
            shapes, f"{split_path(prepared, 'train')} at {cfg.data.image_size} px"))
        print(f"fitted {args.num} shapes on train ({len(boxes)} boxes): "
              + ", ".join(f"{w:g}x{h:g}" for w, h in shapes) + f"; wrote {args.out}")
    print(f"anchor coverage on {args.split} ({sum(len(b) for b in split.boxes)} boxes), and the "
          f"stride's ceiling:")
    keys = [k for k in columns["current"] if k.startswith("anchors/")]
    print(f"  {'':<34}" + "".join(f"{name:>10}" for name in columns))
    for key in keys:
        print(f"  {key:<34}" + "".join(f"{col.get(key, math.nan):>10.3f}"
                                         for col in columns.values()))
    for key in (k for k in columns["current"] if k.startswith("ceiling/")):
        print(f"  {key:<34}{columns['current'][key]:>10.3f}")
    return 0
