"""Proposal recall: the per-box table, recall at IoU thresholds, average recall (AR).

Shapes: G ground-truth boxes of one image, P proposals (best first), B budgets, T IoU thresholds.
Boxes are ``(N, 4)`` float ``x1, y1, x2, y2`` in resized-image pixels (the prepared frame).

Definitions (SPEC "Proposal recall"):
- ``best_iou`` of a ground-truth box at budget N: the highest IoU of any of the top-N proposals
  with it; 0 when there are no proposals. A budget larger than the number of proposals uses all
  of them (so the table says what the model *could* offer at that budget).
- recall(t) = fraction of ground-truth boxes with ``best_iou >= t``.
- AR@N = mean of recall(t) over t = 0.50, 0.55, ..., 0.95 (:data:`IOU_THRESHOLDS`, 10 values,
  built from integers so no float ``arange`` drift puts 0.95 in or out by accident).

Choices, stated once:
- ``difficult`` boxes **count** for recall (the COCO / RPN-paper convention: a proposal stage
  should find every object). The table keeps the ``difficult`` flag, so a reader can filter them
  out; detection mAP (:mod:`pipeline.evaluation.voc_ap`) ignores them as PASCAL VOC does.
- The anchor baseline has no ranking: its ``best_iou`` is over **all** anchors of the image, and
  its rows carry ``budget = -1`` (:data:`ANCHOR_BUDGET`); the summary labels them
  ``proposals = "anchors"`` and records the anchor count in ``num_proposals``. The stride's
  ceiling (the best one anchor of any shape could do, :mod:`pipeline.anchor_coverage`) has
  ``budget = -2`` (:data:`CEILING_BUDGET`), ``proposals = "ceiling"``.
- Size buckets follow COCO: small ``area < 32**2``, large ``area >= 96**2``, medium in between,
  where ``area`` is measured in a 640 x 640 frame (:data:`REFERENCE_SIZE`): at another
  ``image_size`` S the table's ``area`` (in S x S pixels) is scaled by ``(640 / S)**2`` before
  bucketing, so "small" means the same object at every training resolution.

Tables (pandas, one row each):
- :func:`recall_table` -> per (image, ground-truth box, budget) :data:`TABLE_COLUMNS`.
- :func:`summarize` -> per (split, proposals, budget, size, class, metric, iou_threshold)
  :data:`SUMMARY_COLUMNS`; ``metric`` is ``"recall"`` (``iou_threshold`` set) or ``"AR"``
  (``iou_threshold`` NaN). Rows of every size bucket over all classes (``class_name = "all"``)
  and of every class over all sizes (``size = "all"``).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torchvision.ops import box_iou

IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.50 + 0.05 * i, 2) for i in range(10))
ANCHOR_BUDGET = -1
CEILING_BUDGET = -2
#: the summary's ``proposals`` of the budgets that are no proposals
COVERAGE = {ANCHOR_BUDGET: "anchors", CEILING_BUDGET: "ceiling"}
REFERENCE_SIZE = 640
SMALL_AREA = 32 ** 2
LARGE_AREA = 96 ** 2
ALL = "all"
SIZES = (ALL, "small", "medium", "large")

TABLE_COLUMNS = ("image_id", "gt_index", "label", "difficult", "x1", "y1", "x2", "y2", "area",
                 "budget", "best_iou", "split")
SUMMARY_COLUMNS = ("split", "proposals", "budget", "num_proposals", "size", "class_name", "num_gt",
                   "metric", "iou_threshold", "value")


# --------------------------------------------------------------------------------------------
# Tensors: best IoU per ground-truth box


def check_budgets(budgets: Sequence[int]) -> tuple[int, ...]:
    """Validate proposal budgets: a non-empty sequence of distinct positive integers, returned
    sorted ascending.

    Raises:
        ValueError: naming the offending value.
    """
    out = tuple(int(b) for b in budgets)
    if not out:
        raise ValueError("proposal budgets: expected at least one budget, got none")
    bad = [b for b in out if b < 1]
    if bad:
        raise ValueError(f"proposal budgets must be >= 1, got {bad}")
    if len(set(out)) != len(out):
        raise ValueError(f"proposal budgets must be distinct, got {list(out)}")
    return tuple(sorted(out))


def best_iou_at_budgets(gt_boxes: Tensor, proposals: Tensor, budgets: Sequence[int]) -> Tensor:
    """Best IoU of the top-N proposals with each ground-truth box, for every budget N.

    One ``box_iou(gt, proposals[:max(budgets)])`` then a running maximum along the proposal axis
    (``cummax``), read at column ``min(N, P) - 1``: no loop over boxes or budgets.

    Args:
        gt_boxes: ``Tensor[G, 4]`` ground truth, x1y1x2y2.
        proposals: ``Tensor[P, 4]`` proposals, best first (P may be 0).
        budgets: B positive integers (any order; the output follows it).

    Returns:
        ``Tensor[G, B]`` float32 on ``gt_boxes``' device; 0 where there are no proposals.
    """
    budgets = [int(b) for b in budgets]
    if any(b < 1 for b in budgets):
        raise ValueError(f"proposal budgets must be >= 1, got {budgets}")
    gt = gt_boxes.float()
    props = proposals.to(device=gt.device, dtype=torch.float32)
    num_gt, num_props = gt.shape[0], props.shape[0]
    if num_gt == 0 or num_props == 0 or not budgets:
        return gt.new_zeros((num_gt, len(budgets)))
    n = min(max(budgets), num_props)
    iou = box_iou(gt, props[:n])                          # (G, n)
    running = iou.cummax(dim=1).values                     # (G, n): best of the first k+1
    cols = torch.tensor([min(b, n) - 1 for b in budgets], device=gt.device)
    return running[:, cols]                                # (G, B)


# --------------------------------------------------------------------------------------------
# The per-box table


def image_recall_rows(*, image_id: str, split: str, gt_boxes: Tensor, labels: Tensor,
                      difficult: Tensor, best_iou: Tensor, budgets: Sequence[int],
                      gt_index: Tensor | None = None) -> dict:
    """Columns (as NumPy arrays) of one image's rows of the recall table.

    Rows are ground-truth-major: box 0 at every budget, then box 1, ...

    Args:
        gt_boxes: ``Tensor[G, 4]``; labels ``Tensor[G]`` int; difficult ``Tensor[G]`` bool.
        best_iou: ``Tensor[G, B]`` from :func:`best_iou_at_budgets` (or ``[G, 1]`` for anchors).
        budgets: the B budgets of ``best_iou``'s columns (``[ANCHOR_BUDGET]`` for anchors).
        gt_index: ``Tensor[G]`` each box's index in its image (default ``0 .. G-1``; given when
            some boxes, crowd regions, are left out).
    """
    num_gt, num_b = best_iou.shape
    if gt_boxes.shape[0] != num_gt or len(budgets) != num_b:
        raise ValueError(f"image {image_id}: best_iou is {tuple(best_iou.shape)} but there are "
                         f"{gt_boxes.shape[0]} boxes and {len(budgets)} budgets")
    boxes = gt_boxes.detach().float().cpu().numpy().reshape(num_gt, 4)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])

    def per_box(values: np.ndarray) -> np.ndarray:      # (G,) -> (G*B,), each repeated B times
        return np.repeat(values, num_b)

    return {
        "image_id": np.full(num_gt * num_b, str(image_id), dtype=object),
        "gt_index": per_box(np.arange(num_gt, dtype=np.int32) if gt_index is None
                            else gt_index.cpu().numpy().astype(np.int32).reshape(num_gt)),
        "label": per_box(labels.detach().cpu().numpy().astype(np.int32).reshape(num_gt)),
        "difficult": per_box(difficult.detach().cpu().numpy().astype(bool).reshape(num_gt)),
        "x1": per_box(boxes[:, 0]), "y1": per_box(boxes[:, 1]),
        "x2": per_box(boxes[:, 2]), "y2": per_box(boxes[:, 3]),
        "area": per_box(area),
        "budget": np.tile(np.asarray(budgets, dtype=np.int32), num_gt),
        "best_iou": best_iou.detach().float().cpu().numpy().reshape(-1),   # (G, B) row-major
        "split": np.full(num_gt * num_b, str(split), dtype=object),
    }


def recall_table(rows: Iterable[dict]) -> pd.DataFrame:
    """Concatenate :func:`image_recall_rows` outputs into the :data:`TABLE_COLUMNS` frame."""
    parts = [r for r in rows if len(r["budget"])]
    if not parts:
        return empty_recall_table()
    frame = pd.DataFrame({c: np.concatenate([p[c] for p in parts]) for c in TABLE_COLUMNS})
    return _table_dtypes(frame)


def empty_recall_table() -> pd.DataFrame:
    """A recall table with no rows and the documented columns and dtypes."""
    return _table_dtypes(pd.DataFrame({c: [] for c in TABLE_COLUMNS}))


def _table_dtypes(frame: pd.DataFrame) -> pd.DataFrame:
    types = {"image_id": "string", "gt_index": "int32", "label": "int32", "difficult": "bool",
             "x1": "float32", "y1": "float32", "x2": "float32", "y2": "float32",
             "area": "float32", "budget": "int32", "best_iou": "float32", "split": "string"}
    return frame.astype(types)[list(TABLE_COLUMNS)]


# --------------------------------------------------------------------------------------------
# Summaries


def recall_at(best_iou: np.ndarray | Sequence[float] | Tensor,
              thresholds: Sequence[float] = IOU_THRESHOLDS) -> np.ndarray:
    """Recall at each threshold: the fraction of boxes with ``best_iou >= t``.

    Args:
        best_iou: G values. thresholds: T values.

    Returns:
        ``float64[T]``; NaN everywhere when G is 0 (no boxes: recall undefined).
    """
    ious = np.asarray(best_iou.cpu() if isinstance(best_iou, Tensor) else best_iou,
                      dtype=np.float64).reshape(-1)
    t = np.asarray(thresholds, dtype=np.float64)
    if ious.size == 0:
        return np.full(t.shape, np.nan)
    # Compare in float32 like the stored table, so a best IoU of exactly 0.7 counts at t = 0.7.
    hit = ious.astype(np.float32)[:, None] >= t.astype(np.float32)[None, :]   # (G, T)
    return hit.mean(axis=0)


def average_recall(best_iou: np.ndarray | Sequence[float] | Tensor,
                   thresholds: Sequence[float] = IOU_THRESHOLDS) -> float:
    """AR: mean of :func:`recall_at` over ``thresholds`` (default 0.50:0.05:0.95)."""
    return float(np.mean(recall_at(best_iou, thresholds)))


def size_bucket(area: np.ndarray | Sequence[float], image_size: int = REFERENCE_SIZE) -> np.ndarray:
    """``"small" | "medium" | "large"`` for each area (in ``image_size`` x ``image_size`` pixels),
    judged in the 640 x 640 frame (see the module docstring)."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    ref = np.asarray(area, dtype=np.float64) * (REFERENCE_SIZE / image_size) ** 2
    return np.where(ref < SMALL_AREA, "small", np.where(ref >= LARGE_AREA, "large", "medium"))


def summarize(table: pd.DataFrame, *, image_size: int = REFERENCE_SIZE,
              thresholds: Sequence[float] = IOU_THRESHOLDS,
              num_proposals: dict[tuple[str, int], int] | None = None,
              class_names: Sequence[str] = ()) -> pd.DataFrame:
    """Recall per threshold and AR per (split, budget, size bucket) and per (split, budget,
    class) of a :func:`recall_table`.

    Args:
        table: rows of :data:`TABLE_COLUMNS`; ``budget == ANCHOR_BUDGET`` rows are the anchor
            baseline.
        image_size: the frame of the table's ``area`` (for the size buckets).
        num_proposals: optional ``{(split, budget): count}``; the mean number of proposals (or
            anchors) actually available, stored in ``num_proposals`` (NaN when not given).
        class_names: names of labels 1..K (a label without a name is written as its number).

    Returns:
        :data:`SUMMARY_COLUMNS` rows: for each (split, budget), each size in :data:`SIZES` over
        all classes (``class_name = "all"``) and each class present over all sizes
        (``size = "all"``); groups with no boxes are left out. Each group has T
        ``metric="recall"`` rows and one ``metric="AR"`` row. ``proposals`` is ``"rpn"`` or
        ``"anchors"``.
    """
    thresholds = tuple(float(t) for t in thresholds)
    if table.empty:
        return _summary_frame([])
    sizes = size_bucket(table["area"].to_numpy(), image_size)
    labels = table["label"].to_numpy()
    records = []
    for (split, budget), index in table.groupby(["split", "budget"], sort=True).indices.items():
        ious = table["best_iou"].to_numpy()[index]
        count = (num_proposals or {}).get((str(split), int(budget)), math.nan)
        base = {"split": str(split), "budget": int(budget), "num_proposals": float(count),
                "proposals": COVERAGE.get(int(budget), "rpn")}
        groups = [(size, ALL, ious if size == ALL else ious[sizes[index] == size])
                  for size in SIZES]
        groups += [(ALL, _class_name(label, class_names), ious[labels[index] == label])
                   for label in sorted(set(labels[index].tolist()))]
        for size, name, sel in groups:
            if sel.size:
                records += _group_records(base | {"size": size, "class_name": name,
                                                  "num_gt": int(sel.size)}, sel, thresholds)
    return _summary_frame(records)


def _class_name(label: int, class_names: Sequence[str]) -> str:
    return str(class_names[label - 1]) if 1 <= label <= len(class_names) else str(label)


def _group_records(base: dict, ious: np.ndarray, thresholds: tuple[float, ...]) -> list[dict]:
    """T recall rows and one AR row of one group of boxes."""
    rec = recall_at(ious, thresholds)
    return [base | {"metric": "recall", "iou_threshold": t, "value": float(r)}
            for t, r in zip(thresholds, rec)] + [
        base | {"metric": "AR", "iou_threshold": math.nan, "value": float(np.mean(rec))}]


def _summary_frame(records: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(records, columns=list(SUMMARY_COLUMNS))
    return frame.astype({"split": "string", "proposals": "string", "budget": "int32",
                         "num_proposals": "float64", "size": "string", "class_name": "string",
                         "num_gt": "int64", "metric": "string", "iou_threshold": "float64",
                         "value": "float64"})


def lookup(summary: pd.DataFrame, *, split: str, budget: int, metric: str,
           iou_threshold: float | None = None, size: str = ALL, class_name: str = ALL) -> float:
    """One value of a :func:`summarize` frame; NaN when absent."""
    sel = ((summary["split"] == split) & (summary["budget"] == budget)
           & (summary["size"] == size) & (summary["class_name"] == class_name)
           & (summary["metric"] == metric))
    if iou_threshold is None:
        sel &= summary["iou_threshold"].isna()
    else:
        sel &= np.isclose(summary["iou_threshold"].to_numpy(dtype=float), iou_threshold)
    values = summary.loc[sel, "value"]
    return float(values.iloc[0]) if len(values) else math.nan


# --------------------------------------------------------------------------------------------
# Plot data (CSV for DVC)


def recall_vs_iou(summary: pd.DataFrame, split: str) -> pd.DataFrame:
    """``budget, iou, recall`` rows of one split, all boxes (anchors: ``budget == -1``, the
    ceiling: ``-2``)."""
    sel = summary[(summary["split"] == split) & (summary["size"] == ALL)
                  & (summary["class_name"] == ALL) & (summary["metric"] == "recall")]
    out = sel[["budget", "iou_threshold", "value"]].rename(
        columns={"iou_threshold": "iou", "value": "recall"})
    return out.sort_values(["budget", "iou"]).reset_index(drop=True)


def iou_curve_columns(curve: pd.DataFrame) -> pd.DataFrame:
    """:func:`recall_vs_iou` rows -> one column per budget: ``iou, top<N>..., anchors``.

    The shape DVC's line template wants (one ``y`` column per line); ``anchors`` is the
    ``budget == -1`` baseline, ``ceiling`` the stride's ceiling (``budget == -2``).
    """
    wide = curve.pivot(index="iou", columns="budget", values="recall").sort_index()
    order = sorted(b for b in wide.columns if b > 0)
    order += [b for b in COVERAGE if b in wide.columns]
    wide = wide[order].rename(columns=lambda b: COVERAGE.get(b, f"top{b}"))
    wide.columns.name = None
    return wide.reset_index()


def recall_vs_proposals(summary: pd.DataFrame, split: str,
                        thresholds: Sequence[float] = (0.5, 0.7)) -> pd.DataFrame:
    """``budget, recall@0.5, recall@0.7`` rows of one split, RPN budgets only, all boxes."""
    sel = summary[(summary["split"] == split) & (summary["size"] == ALL)
                  & (summary["class_name"] == ALL) & (summary["metric"] == "recall")
                  & (summary["budget"] > 0)]
    budgets = sorted(int(b) for b in sel["budget"].unique())
    data: dict[str, list] = {"budget": budgets}
    for t in thresholds:
        data[f"recall@{t:g}"] = [lookup(sel, split=split, budget=b, metric="recall",
                                        iou_threshold=t) for b in budgets]
    return pd.DataFrame(data)
