"""Matching candidates (anchors, proposals) to ground-truth boxes by IoU.

Shapes: ``B`` images, ``N`` candidates per image (``A`` anchors or ``R`` proposals), ``G``
ground-truth boxes per image, padded: a ``(B, G)`` bool ``gt_valid`` mask marks the real ones.
An image without ground truth (all of its row invalid) matches nothing: every candidate's best
IoU is 0, so it is all background rather than an error.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["best_match", "label_anchors"]


def best_match(iou: Tensor, gt_valid: Tensor) -> tuple[Tensor, Tensor]:
    """Each candidate's best ground-truth box.

    Args:
        iou: ``(B, N, G)`` float32 IoU of candidates with the (padded) ground-truth boxes.
        gt_valid: ``(B, G)`` bool, real boxes.

    Returns:
        ``(max_iou (B, N) float32, matched (B, N) int64)``: the best IoU over the real boxes (0
        when the image has none) and the index of that box (an arbitrary index, 0, when the best
        IoU is 0, so always check the IoU or the label before using it).
    """
    # Padding columns count as IoU 0, never above a real box's IoU.
    iou = iou.masked_fill(~gt_valid[:, None, :], 0.0)
    return iou.max(dim=2)


def label_anchors(
    iou: Tensor,
    gt_valid: Tensor,
    inside: Tensor,
    *,
    pos_iou: float,
    neg_iou: float,
) -> tuple[Tensor, Tensor]:
    """The RPN's anchor labels, before sampling (Faster R-CNN, section 3.1.2).

    - ``1``: for each ground-truth box, the anchor(s) of highest IoU with it (ties all count;
      a box that overlaps no anchor at all gives none); and every anchor with IoU
      ``>= pos_iou`` with some box.
    - ``0``: best IoU ``< neg_iou`` and not positive by the rule above.
    - ``-1``: the rest, and every anchor outside the image (``inside`` false) whatever its IoU;
      outside anchors are also not candidates for "best anchor of a box".

    Args:
        iou: ``(B, A, G)`` float32.
        gt_valid: ``(B, G)`` bool.
        inside: ``(A,)`` or ``(B, A)`` bool, anchors eligible for training.
        pos_iou: positive threshold (0.7).
        neg_iou: negative threshold (0.3).

    Returns:
        ``(labels (B, A) int64 in {-1, 0, 1}, matched (B, A) int64)``, ``matched`` the index of
        each anchor's best ground-truth box (by IoU, so for an anchor made positive as a box's
        best anchor it is still the box it overlaps most).
    """
    if inside.dim() == 1:
        inside = inside[None].expand(iou.shape[0], -1)
    max_iou, matched = best_match(iou, gt_valid)
    # Best anchor of each real box, among the inside anchors: (B, G).
    eligible = iou.masked_fill(~inside[..., None], -1.0)
    gt_best = eligible.max(dim=1).values
    gt_ok = gt_valid & (gt_best > 0)
    # (B, A, G) -> any over G -> (B, A)
    is_best = ((eligible == gt_best[:, None, :]) & gt_ok[:, None, :]).any(dim=2)
    labels = torch.full_like(matched, -1)
    labels = labels.masked_fill(max_iou < neg_iou, 0)
    labels = labels.masked_fill(is_best | (max_iou >= pos_iou), 1)
    labels = labels.masked_fill(~inside, -1)
    return labels, matched
