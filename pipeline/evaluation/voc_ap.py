"""Detection average precision as PASCAL VOC computes it (VOC 2010+ all-point interpolation).

Shapes: D detections and G ground-truth boxes of one image; K classes, labels 1..K (0 is
background and never scored). Boxes are ``(N, 4)`` float ``x1, y1, x2, y2`` in pixels.

The rules (those of the VOC devkit, ``VOCevaldet.m`` / py-faster-rcnn's ``voc_eval.py``):
- Per class, detections of all images are ranked by score, highest first (ties: image order,
  then the order within the image).
- Each detection is compared with the ground-truth boxes of its class in its image and takes the
  one of highest IoU (``ovmax``). If ``ovmax >= iou_threshold``:
  - that box is ``difficult``: the detection is ignored (neither true nor false positive);
  - that box is not yet matched: true positive, and the box is now matched;
  - that box is already matched by a higher-ranked detection: false positive (VOC does not fall
    back to the next-best box; COCO / torchmetrics do, which differs only when boxes of one
    class overlap by >= the threshold).
  Otherwise: false positive.
- recall = cumulative TP / number of non-difficult ground-truth boxes of the class;
  precision = cumulative TP / cumulative (TP + FP).
- AP = area under the precision envelope (precision made non-increasing from the right),
  summed over the recall steps: all-point interpolation, not the 11-point (VOC2007) or
  101-point (COCO) sampling.
- A class with no non-difficult ground truth has no AP (NaN) and is left out of the mean.
- IoU is continuous (``torchvision.ops.box_iou``), without the devkit's ``+ 1`` pixel.

The matching is vectorised per image: a detection is a TP iff it is the highest-ranked
detection whose ``ovmax`` box is that (non-difficult) box, found with a scatter-min of ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou


def voc_ap(recall: np.ndarray | Sequence[float], precision: np.ndarray | Sequence[float]) -> float:
    """All-point interpolated AP of a precision/recall curve (VOC 2010+).

    Args:
        recall: R non-decreasing values in [0, 1] (one per ranked detection).
        precision: R values in [0, 1].

    Returns:
        The area under the precision envelope; 0 for an empty curve.
    """
    rec = np.concatenate(([0.0], np.asarray(recall, dtype=np.float64), [1.0]))
    pre = np.concatenate(([0.0], np.asarray(precision, dtype=np.float64), [0.0]))
    # Envelope: precision at recall r = the best precision at any recall >= r.
    pre = np.maximum.accumulate(pre[::-1])[::-1]
    steps = np.nonzero(rec[1:] != rec[:-1])[0]          # where recall changes
    return float(np.sum((rec[steps + 1] - rec[steps]) * pre[steps + 1]))


@dataclass(frozen=True)
class ClassResult:
    """Per-class outcome: AP (NaN without ground truth), its curve and counts."""

    ap: float
    num_gt: int            # non-difficult ground-truth boxes
    num_detections: int    # scored detections (ignored ones left out)
    recall: np.ndarray
    precision: np.ndarray


def match_image(det_boxes: Tensor, det_labels: Tensor, det_rank: Tensor, gt_boxes: Tensor,
                gt_labels: Tensor, gt_difficult: Tensor, iou_threshold: float = 0.5
                ) -> tuple[Tensor, Tensor]:
    """VOC matching of one image's detections (all classes at once).

    Args:
        det_boxes: ``Tensor[D, 4]``; det_labels ``Tensor[D]`` int; det_rank ``Tensor[D]`` int,
            the detection's global rank (lower = higher score), consistent across images.
        gt_boxes: ``Tensor[G, 4]``; gt_labels ``Tensor[G]`` int; gt_difficult ``Tensor[G]`` bool.

    Returns:
        ``(tp, ignored)``: two ``Tensor[D]`` bool. A detection neither TP nor ignored is a FP.
    """
    num_det, num_gt = det_boxes.shape[0], gt_boxes.shape[0]
    tp = torch.zeros(num_det, dtype=torch.bool, device=det_boxes.device)
    ignored = torch.zeros_like(tp)
    if num_det == 0 or num_gt == 0:
        return tp, ignored
    iou = box_iou(det_boxes.float(), gt_boxes.float().to(det_boxes.device))          # (D, G)
    same_class = det_labels[:, None] == gt_labels.to(det_labels.device)[None, :]    # (D, G)
    iou = torch.where(same_class, iou, torch.full_like(iou, -1.0))
    ovmax, jmax = iou.max(dim=1)                                                     # (D,)
    hit = ovmax >= iou_threshold
    difficult = gt_difficult.to(det_boxes.device).bool()[jmax]
    ignored = hit & difficult
    candidate = hit & ~difficult
    # First (best-ranked) candidate per ground-truth box: scatter-min of ranks over jmax.
    big = torch.iinfo(torch.int64).max
    first = torch.full((num_gt,), big, dtype=torch.int64, device=det_boxes.device)
    ranks = torch.where(candidate, det_rank.long(), torch.full_like(det_rank.long(), big))
    first = first.scatter_reduce(0, jmax, ranks, reduce="amin")
    tp = candidate & (det_rank.long() == first[jmax])
    return tp, ignored


def evaluate_detections(detections: Sequence[Mapping[str, Tensor]],
                        ground_truths: Sequence[Mapping[str, Tensor]], num_classes: int,
                        iou_threshold: float = 0.5) -> dict[int, ClassResult]:
    """Per-class VOC AP over a set of images.

    Args:
        detections: one mapping per image: ``boxes`` ``Tensor[D, 4]``, ``scores`` ``Tensor[D]``,
            ``labels`` ``Tensor[D]`` (1..K).
        ground_truths: one mapping per image (same order): ``boxes`` ``Tensor[G, 4]``,
            ``labels`` ``Tensor[G]``, optional ``difficult`` ``Tensor[G]`` bool (default all
            False).
        num_classes: K.

    Returns:
        ``{label: ClassResult}`` for labels 1..K.
    """
    if len(detections) != len(ground_truths):
        raise ValueError(f"{len(detections)} detection entries but {len(ground_truths)} "
                         f"ground-truth entries: one of each per image")
    # Global rank of every detection: by score, highest first; ties keep image, then list order.
    scores = [torch.as_tensor(d["scores"], dtype=torch.float64).reshape(-1).cpu()
              for d in detections]
    all_scores = torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)
    order = torch.sort(all_scores, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    label_parts, tp_parts, ignored_parts = [], [], []
    num_gt = np.zeros(num_classes + 1, dtype=np.int64)
    start = 0
    for det, gt, sc in zip(detections, ground_truths, scores):
        n = sc.numel()
        det_boxes = torch.as_tensor(det["boxes"], dtype=torch.float32).reshape(-1, 4).cpu()
        det_labels = torch.as_tensor(det["labels"], dtype=torch.int64).reshape(-1).cpu()
        gt_boxes = torch.as_tensor(gt["boxes"], dtype=torch.float32).reshape(-1, 4).cpu()
        gt_labels = torch.as_tensor(gt["labels"], dtype=torch.int64).reshape(-1).cpu()
        gt_difficult = (torch.as_tensor(gt["difficult"], dtype=torch.bool).reshape(-1).cpu()
                        if "difficult" in gt else torch.zeros(gt_labels.shape, dtype=torch.bool))
        if gt_labels.numel() and (gt_labels.min() < 1 or gt_labels.max() > num_classes):
            raise ValueError(f"image {len(label_parts)}: ground-truth labels must be in "
                             f"1..{num_classes}, got {sorted(set(gt_labels.tolist()))}")
        if not (det_boxes.shape[0] == det_labels.shape[0] == n):
            raise ValueError(f"image {len(label_parts)}: {det_boxes.shape[0]} boxes, "
                             f"{n} scores, {det_labels.shape[0]} labels")
        tp, ignored = match_image(det_boxes, det_labels, rank[start:start + n], gt_boxes,
                                  gt_labels, gt_difficult, iou_threshold)
        label_parts.append(det_labels)
        tp_parts.append(tp)
        ignored_parts.append(ignored)
        counted = gt_labels[~gt_difficult]
        num_gt += np.bincount(counted.numpy(), minlength=num_classes + 1)
        start += n
    labels = torch.cat(label_parts).numpy() if label_parts else np.zeros(0, dtype=np.int64)
    tps = torch.cat(tp_parts).numpy() if tp_parts else np.zeros(0, dtype=bool)
    ignored = torch.cat(ignored_parts).numpy() if ignored_parts else np.zeros(0, dtype=bool)
    ranks = rank.numpy()

    results = {}
    for k in range(1, num_classes + 1):
        keep = (labels == k) & ~ignored
        tp = tps[keep][np.argsort(ranks[keep], kind="stable")]
        ctp = np.cumsum(tp)
        cfp = np.cumsum(~tp)
        npos = int(num_gt[k])
        precision = ctp / np.maximum(ctp + cfp, 1)
        recall = ctp / npos if npos else np.full(tp.shape, np.nan)
        ap = voc_ap(recall, precision) if npos else math.nan
        results[k] = ClassResult(ap=ap, num_gt=npos, num_detections=int(tp.size),
                                 recall=recall, precision=precision)
    return results


def mean_ap(results: Mapping[int, ClassResult]) -> float:
    """Mean of the per-class APs that are defined (classes with ground truth); NaN if none."""
    aps = [r.ap for r in results.values() if not math.isnan(r.ap)]
    return float(np.mean(aps)) if aps else math.nan
