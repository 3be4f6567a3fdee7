"""Box maths: encode / decode offsets, clipping, size filtering, padding and batched IoU.

Shapes: ``N`` boxes, ``B`` images, ``G`` (padded) ground-truth boxes per image. Boxes are float
``x1, y1, x2, y2`` in input-image pixels (see :mod:`detector`). Everything here runs in float32,
whatever the autocast state: offsets and IoUs lose too much in bf16 (8 mantissa bits cannot tell
pixel 600 from 602).

Box offsets (the regression targets) are the standard parameterisation of R-CNN::

    dx = wx * (gx - ax) / aw        dw = ww * log(gw / aw)
    dy = wy * (gy - ay) / ah        dh = wh * log(gh / ah)

with ``(ax, ay, aw, ah)`` the centre and size of the reference box (anchor or proposal),
``(gx, gy, gw, gh)`` those of the target box, and weights ``(wx, wy, ww, wh)``: ``(1, 1, 1, 1)``
for the RPN and ``(10, 10, 5, 5)`` for the RoI head (torchvision's and Detectron's choice; it
scales the small offsets of already-good proposals up to unit size). Sizes are ``x2 - x1`` (no
``+ 1``), the same convention as torchvision's ``BoxCoder``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou, clip_boxes_to_image

__all__ = [
    "DEFAULT_DELTA_CLAMP",
    "batched_box_iou",
    "clip",
    "decode",
    "encode",
    "large_enough",
    "pad_boxes",
]

#: Upper clamp of ``dw``, ``dh`` before ``exp()`` in :func:`decode`: a box may grow at most
#: 1000 / 16 = 62.5 times its reference size, and ``exp`` can never overflow.
DEFAULT_DELTA_CLAMP = math.log(1000.0 / 16)

Weights = Sequence[float]


def _centres_sizes(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(..., 4)`` x1y1x2y2 -> centre x, centre y, width, height, each ``(...)``."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode(reference: Tensor, boxes: Tensor, weights: Weights = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Offsets that turn ``reference`` boxes into ``boxes`` (the regression targets).

    Args:
        reference: ``(..., 4)`` anchors or proposals, positive width and height.
        boxes: ``(..., 4)`` target boxes, broadcastable against ``reference``, positive sizes.
        weights: ``(wx, wy, ww, wh)`` multiplying ``(dx, dy, dw, dh)``.

    Returns:
        ``(..., 4)`` float32 ``(dx, dy, dw, dh)`` (the broadcast shape).
    """
    ax, ay, aw, ah = _centres_sizes(reference.float())
    gx, gy, gw, gh = _centres_sizes(boxes.float())
    wx, wy, ww, wh = weights
    return torch.stack(
        (wx * (gx - ax) / aw, wy * (gy - ay) / ah, ww * torch.log(gw / aw), wh * torch.log(gh / ah)),
        dim=-1,
    )


def decode(
    reference: Tensor,
    deltas: Tensor,
    weights: Weights = (1.0, 1.0, 1.0, 1.0),
    clamp: float = DEFAULT_DELTA_CLAMP,
) -> Tensor:
    """Boxes obtained by applying offsets ``deltas`` to ``reference`` boxes (inverse of :func:`encode`).

    Args:
        reference: ``(..., 4)`` anchors or proposals.
        deltas: ``(..., 4)`` ``(dx, dy, dw, dh)``, broadcastable against ``reference`` (e.g.
            reference ``(R, 1, 4)`` and per-class deltas ``(R, K, 4)``).
        weights: the weights used by :func:`encode`.
        clamp: ``dw / ww`` and ``dh / wh`` are clamped to at most this before ``exp()``, so a wild
            prediction gives a large but finite box (no inf / NaN).

    Returns:
        ``(..., 4)`` float32 x1y1x2y2 boxes (the broadcast shape); not clipped to the image.
    """
    ax, ay, aw, ah = _centres_sizes(reference.float())
    deltas = deltas.float()
    wx, wy, ww, wh = weights
    cx = deltas[..., 0] / wx * aw + ax
    cy = deltas[..., 1] / wy * ah + ay
    # Clamp the log-sizes: exp(clamp) is the largest growth; exp() of anything bigger could overflow.
    half_w = 0.5 * torch.exp((deltas[..., 2] / ww).clamp(max=clamp)) * aw
    half_h = 0.5 * torch.exp((deltas[..., 3] / wh).clamp(max=clamp)) * ah
    return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)


def clip(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Clip ``(..., 4)`` boxes to an image of ``(height, width)`` pixels (``torchvision.ops``)."""
    return clip_boxes_to_image(boxes, image_size)


def large_enough(boxes: Tensor, min_size: float) -> Tensor:
    """``(..., 4)`` boxes -> ``(...)`` bool: width and height both at least ``min_size``.

    The mask form of ``torchvision.ops.remove_small_boxes`` (which returns indices, a host sync,
    and only for a flat ``(N, 4)``): it keeps a padded batch rectangular.
    """
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return (w >= min_size) & (h >= min_size)


def pad_boxes(
    boxes: Sequence[Tensor], *extras: Sequence[Tensor], fill_box: float = 1.0
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """Stack per-image boxes of different counts into one padded batch.

    Args:
        boxes: ``B`` tensors ``(G_i, 4)``.
        *extras: further per-image tensors ``(G_i, ...)`` padded the same way with zeros (e.g.
            the class labels).
        fill_box: padding rows are the box ``(0, 0, fill_box, fill_box)``, a valid box, so that
            code reading them (e.g. :func:`encode`) stays finite; the mask says they are padding.

    Returns:
        ``(padded (B, G, 4) float32, valid (B, G) bool, padded extras (B, G, ...))`` with
        ``G = max(1, max G_i)`` (at least one column, so images without boxes keep the shape).
    """
    batch = len(boxes)
    if batch == 0:
        raise ValueError("pad_boxes needs at least one image")
    device = boxes[0].device
    counts = [int(b.shape[0]) for b in boxes]
    g = max(1, max(counts))
    padded = torch.zeros(batch, g, 4, device=device)
    padded[..., 2:] = fill_box
    valid = torch.zeros(batch, g, dtype=torch.bool, device=device)
    out_extras = []
    for extra in extras:
        first = extra[0]
        out_extras.append(torch.zeros((batch, g, *first.shape[1:]), dtype=first.dtype, device=device))
    # Per-image copies of whole tensors (B of them), not a loop over boxes.
    for i, n in enumerate(counts):
        padded[i, :n] = boxes[i].float()
        valid[i, :n] = True
        for out, extra in zip(out_extras, extras):
            out[i, :n] = extra[i]
    return padded, valid, tuple(out_extras)


def batched_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of every box of ``boxes1[b]`` with every box of ``boxes2[b]``, for each image ``b``.

    One ``torchvision.ops.box_iou`` call on the flattened batch, ``(B*N, B*M)``, of which the
    ``B`` diagonal blocks are kept: ``B`` times more IoUs than needed, cheap next to a per-image
    loop for the sizes here (``B <= 16``, ``N <= ~2,000``, ``M`` tens of boxes).

    Args:
        boxes1: ``(B, N, 4)``.
        boxes2: ``(B, M, 4)``.

    Returns:
        ``(B, N, M)`` float32 IoU in ``[0, 1]`` (0 for degenerate boxes, never NaN).
    """
    b, n, _ = boxes1.shape
    m = boxes2.shape[1]
    iou = box_iou(boxes1.reshape(b * n, 4).float(), boxes2.reshape(b * m, 4).float())
    # (B*N, B*M) -> (B, N, B, M) -> diagonal over the two image axes -> (N, M, B) -> (B, N, M)
    iou = torch.diagonal(iou.view(b, n, b, m), dim1=0, dim2=2).permute(2, 0, 1)
    # box_iou divides by the union: 0 / 0 for two degenerate boxes (e.g. padding); make it 0.
    return torch.nan_to_num(iou, nan=0.0)
