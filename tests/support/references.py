"""Reference maths written out with loops, to check the vectorised code against.

Boxes are ``x1, y1, x2, y2`` lists or ``(N, 4)`` tensors in pixels.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


def random_boxes(gen: torch.Generator, n: int, size: float = 200.0,
                 min_side: float = 1.0) -> torch.Tensor:
    """``(n, 4)`` float32 boxes: top-left corners uniform in ``[0, size)``, sides uniform in
    ``[min_side, min_side + size / 2)``."""
    xy = torch.rand(n, 2, generator=gen) * size
    wh = torch.rand(n, 2, generator=gen) * size / 2 + min_side
    return torch.cat([xy, xy + wh], dim=1)


def iou_loop(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two boxes, written out."""
    ix1, iy1 = max(a[0], b[0]), max(a[1], b[1])
    ix2, iy2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, ix2 - ix1) * max(0.0, iy2 - iy1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def best_iou_reference(gt: torch.Tensor, proposals: torch.Tensor,
                       budgets: Sequence[int]) -> torch.Tensor:
    """``(G, B)`` float64: for each box and budget, the max IoU over the first min(N, P)
    proposals, by loops (0 without proposals)."""
    gt, proposals = gt.tolist(), proposals.tolist()
    out = []
    for g in gt:
        row = []
        for n in budgets:
            best = 0.0
            for p in proposals[:n]:
                best = max(best, iou_loop(g, p))
            row.append(best)
        out.append(row)
    return torch.tensor(out, dtype=torch.float64).reshape(len(gt), len(budgets))


def voc_eval_reference(dets: Sequence[dict], gts: Sequence[dict], num_classes: int,
                       thresh: float = 0.5) -> dict[int, float]:
    """py-faster-rcnn's ``voc_eval``, by loops: per class, sort by score, take the best box;
    ``difficult`` boxes neither count nor penalise; all-point interpolated AP (NaN for a class
    without ground truth)."""
    out = {}
    for k in range(1, num_classes + 1):
        records, npos = {}, 0
        for i, g in enumerate(gts):
            boxes = [b for b, lab in zip(g["boxes"].tolist(), g["labels"].tolist()) if lab == k]
            diff = [bool(d) for d, lab in zip(g["difficult"].tolist(), g["labels"].tolist())
                    if lab == k]
            records[i] = {"boxes": boxes, "difficult": diff, "det": [False] * len(boxes)}
            npos += sum(not d for d in diff)
        items = []
        for i, d in enumerate(dets):
            for b, s, lab in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist()):
                if lab == k:
                    items.append((s, i, b))
        items.sort(key=lambda x: -x[0])
        tp, fp = [], []
        for _, i, b in items:
            rec = records[i]
            ovmax, jmax = -1.0, -1
            for j, g in enumerate(rec["boxes"]):
                o = iou_loop(b, g)
                if o > ovmax:
                    ovmax, jmax = o, j
            if ovmax >= thresh:
                if rec["difficult"][jmax]:
                    continue
                if not rec["det"][jmax]:
                    rec["det"][jmax] = True
                    tp.append(1), fp.append(0)
                else:
                    tp.append(0), fp.append(1)
            else:
                tp.append(0), fp.append(1)
        if npos == 0:
            out[k] = math.nan
            continue
        ctp, cfp = np.cumsum(tp), np.cumsum(fp)
        rec = ctp / npos
        prec = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
        mrec = np.concatenate(([0.0], rec, [1.0]))
        mpre = np.concatenate(([0.0], prec, [0.0]))
        for i in range(mpre.size - 1, 0, -1):
            mpre[i - 1] = max(mpre[i - 1], mpre[i])
        i = np.where(mrec[1:] != mrec[:-1])[0]
        out[k] = float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))
    return out
