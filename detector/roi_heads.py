"""Fast R-CNN head: RoI sampling, RoI pooling, fc6 / fc7, classifier and per-class box regression.

Shapes: ``B`` images, ``N`` proposals per image (padded), ``G`` padded ground-truth boxes,
``S`` sampled RoIs per image, ``C`` feature channels, ``p`` pooled size (7), ``D`` hidden width
(4096), ``K`` classes without background (the classifier has ``K + 1`` outputs, 0 background).

fc6 and fc7 are each followed by a ReLU and, in training mode, dropout (0.5 by default, as
py-faster-rcnn's VGG-16 head).

Box offsets use weights ``(10, 10, 5, 5)`` (torchvision / Detectron), regression is per class
(``4 (K + 1)`` outputs, the background's unused). Losses: cross-entropy over the sampled RoIs and
smooth L1 with ``beta = 1`` (the original Fast R-CNN) on the foreground RoIs' true-class
offsets, both divided by the number of sampled RoIs (as the original and torchvision), the
regression term times ``reg_weight``. RoI align uses ``sampling_ratio=2`` and ``aligned=True``
(Detectron2's choice): it maps image ``x`` to feature ``x / 16 - 0.5``, so feature cell ``j``
is read at the centre of its 16-pixel patch, ``16 j + 8``, where the anchors sit
(:mod:`detector.anchors`); torchvision's ``aligned=False`` reads half a cell (8 px) away.
``pool="pool"`` uses ``roi_pool`` (the original's RoI max pooling, which rounds to whole cells).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms, roi_align, roi_pool

from detector.boxes import batched_box_iou, clip, decode, encode, large_enough
from detector.matcher import best_match
from detector.sampler import sample_labels

__all__ = ["DetectionSettings", "RoIHeads", "RoISampling", "SampledRoIs", "nms_by_group",
           "sample_rois"]

ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
ROI_SMOOTH_L1_BETA = 1.0
#: Detections narrower or shorter than this (pixels) are dropped (degenerate after clipping).
MIN_DETECTION_SIZE = 1e-2
#: Up to this many candidate detections in a batch, one NMS call does them all (one host sync);
#: above, one call per image keeps the NMS mask (quadratic in the boxes) small.
ONE_NMS_CALL_MAX_BOXES = 4096


@dataclass(frozen=True)
class RoISampling:
    """Which RoIs train the head (see :func:`sample_rois`)."""

    num_samples: int = 128
    fg_fraction: float = 0.25
    fg_iou: float = 0.5
    bg_iou_low: float = 0.0
    bg_iou_high: float = 0.5


@dataclass(frozen=True)
class DetectionSettings:
    """Inference post-processing (see :meth:`RoIHeads.postprocess`)."""

    score_thresh: float = 0.05
    nms_iou: float = 0.3
    detections_per_image: int = 100


class SampledRoIs(NamedTuple):
    """RoIs chosen for the head's loss, ``S`` slots per image.

    ``boxes (B, S, 4)`` float32; ``labels (B, S)`` int64: class ``1..K`` foreground, ``0``
    background, ``-1`` an empty slot (when an image has fewer candidates than ``S``);
    ``matched (B, S, 4)`` float32 the ground-truth box of each slot (meaningful for foreground).
    """

    boxes: Tensor
    labels: Tensor
    matched: Tensor


def sample_rois(
    proposals: Tensor,
    proposal_valid: Tensor,
    gt_boxes: Tensor,
    gt_valid: Tensor,
    gt_labels: Tensor,
    *,
    num_samples: int,
    fg_fraction: float,
    fg_iou: float,
    bg_iou_low: float,
    bg_iou_high: float,
    generator: torch.Generator | None = None,
) -> SampledRoIs:
    """Sample the head's training RoIs from the proposals plus the ground-truth boxes.

    Foreground: best IoU ``>= fg_iou`` with a ground-truth box (labelled with that box's class);
    background: best IoU in ``[bg_iou_low, bg_iou_high)`` (an image without ground truth has
    best IoU 0 everywhere). At most ``int(num_samples * fg_fraction)`` foreground, random; the
    rest of ``num_samples`` background, random (:func:`detector.sampler.sample_labels`).

    Args:
        proposals: ``(B, N, 4)``; ``proposal_valid``: ``(B, N)`` bool.
        gt_boxes: ``(B, G, 4)``; ``gt_valid``: ``(B, G)`` bool; ``gt_labels``: ``(B, G)`` int64.

    Returns:
        :class:`SampledRoIs` with ``S = min(num_samples, N + G)``.
    """
    # Candidates: proposals then ground truth, (B, N, 4) + (B, G, 4) -> (B, N+G, 4)
    cand = torch.cat((proposals.float(), gt_boxes.float()), dim=1)
    cand_valid = torch.cat((proposal_valid, gt_valid), dim=1)
    max_iou, matched = best_match(batched_box_iou(cand, gt_boxes), gt_valid)  # (B, N+G) each
    fg = cand_valid & (max_iou >= fg_iou)
    bg = cand_valid & (max_iou >= bg_iou_low) & (max_iou < bg_iou_high) & ~fg
    labels = torch.full_like(matched, -1).masked_fill(bg, 0).masked_fill(fg, 1)
    labels = sample_labels(labels, num_samples, fg_fraction, generator)  # (B, N+G)
    # Gather the sampled candidates into S slots: (B, N+G) -> (B, S) indices, sampled ones first.
    s = min(num_samples, cand.shape[1])
    _, slot = (labels >= 0).to(torch.float32).topk(s, dim=1)
    slot_labels = labels.gather(1, slot)  # (B, S) in {-1, 0, 1}
    slot_matched = matched.gather(1, slot)  # (B, S) index into G
    classes = gt_labels.gather(1, slot_matched)
    classes = torch.where(slot_labels == 1, classes, slot_labels)  # class, 0 or -1
    # (B, S) -> (B, S, 4) indices for the box gathers
    boxes = cand.gather(1, slot[..., None].expand(-1, -1, 4))
    matched_boxes = gt_boxes.float().gather(1, slot_matched[..., None].expand(-1, -1, 4))
    return SampledRoIs(boxes, classes, matched_boxes)


class RoIHeads(nn.Module):
    """RoI pooling + fc6 / fc7 + classifier + per-class box regression; losses and inference.

    Args:
        in_channels: ``C``.
        num_classes: ``K`` (without background).
        pool: ``"align"`` (``roi_align``) or ``"pool"`` (``roi_pool``).
        pool_size: ``p``.
        hidden_dim: ``D``, width of fc6 and fc7.
        spatial_scale: feature cells per input pixel (1/16).
        reg_weight: weight of the regression loss.
        sampling: training RoI sampling; detection: inference post-processing.
        dropout: probability of zeroing an fc6 / fc7 activation (after its ReLU), in training
            mode only; 0 disables.
    """

    def __init__(self, *, in_channels: int, num_classes: int, pool: str, pool_size: int,
                 hidden_dim: int, spatial_scale: float, reg_weight: float,
                 sampling: RoISampling, detection: DetectionSettings,
                 dropout: float = 0.5) -> None:
        super().__init__()
        if pool not in ("align", "pool"):
            raise ValueError(f"roi_head.pool must be 'align' or 'pool', got {pool!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"roi_head.dropout must be in [0, 1), got {dropout}")
        self.dropout = float(dropout)
        self.num_classes = int(num_classes)
        self.pool = pool
        self.pool_size = int(pool_size)
        self.spatial_scale = float(spatial_scale)
        self.reg_weight = float(reg_weight)
        self.sampling = sampling
        self.detection = detection
        self.fc6 = nn.Linear(in_channels * pool_size * pool_size, hidden_dim)
        self.fc7 = nn.Linear(hidden_dim, hidden_dim)
        self.cls_score = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(hidden_dim, 4 * (num_classes + 1))
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def pool_features(self, features: Tensor, boxes: Tensor) -> Tensor:
        """``(B, C, H, W)`` features, ``(B, S, 4)`` RoIs -> ``(B*S, C, p, p)`` float32 pooled features.

        Pooling runs in float32 (RoI coordinates in bf16 would be off by pixels).
        """
        b, s, _ = boxes.shape
        image_idx = torch.arange(b, device=boxes.device, dtype=torch.float32).repeat_interleave(s)
        # (B, S, 4) -> (B*S, 4) -> (B*S, 5) rows (image index, x1, y1, x2, y2)
        rois = torch.cat((image_idx[:, None], boxes.reshape(b * s, 4).float()), dim=1)
        features = features.float()
        if self.pool == "align":
            return roi_align(features, rois, self.pool_size, self.spatial_scale,
                             sampling_ratio=2, aligned=True)
        return roi_pool(features, rois, self.pool_size, self.spatial_scale)

    def _drop(self, x: Tensor) -> Tensor:
        """Dropout of ``self.dropout`` in training mode; the identity otherwise."""
        if not self.training or self.dropout == 0.0:
            return x
        return F.dropout(x, self.dropout, training=True)

    def predict(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """``(R, C, p, p)`` -> ``(class logits (R, K+1), offsets (R, K+1, 4))`` via fc6 / fc7
        (each with ReLU and, in training, dropout)."""
        x = self._drop(F.relu(self.fc6(pooled.flatten(1))))  # (R, C*p*p) -> (R, D)
        x = self._drop(F.relu(self.fc7(x)))
        # (R, 4(K+1)) -> (R, K+1, 4): offsets of class c in row c
        return self.cls_score(x), self.bbox_pred(x).view(x.shape[0], -1, 4)

    def forward(
        self,
        features: Tensor,
        proposals: Tensor,
        proposal_valid: Tensor,
        image_size: tuple[int, int],
        gt_boxes: Tensor | None = None,
        gt_valid: Tensor | None = None,
        gt_labels: Tensor | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training (ground truth given): ``{"roi_cls", "roi_reg"}``; else detections.

        Args:
            features: ``(B, C, H, W)``.
            proposals: ``(B, N, 4)``; ``proposal_valid``: ``(B, N)`` bool.
            image_size: ``(height, width)``.
            gt_boxes, gt_valid, gt_labels: ``(B, G, 4)``, ``(B, G)``, ``(B, G)``.

        Returns:
            the losses, or per image ``{"boxes" (n, 4), "scores" (n,), "labels" (n,) int64}``
            (see :meth:`postprocess`).
        """
        if gt_boxes is None:
            logits, deltas = self.predict(self.pool_features(features, proposals))
            return self.postprocess(logits, deltas, proposals, proposal_valid, image_size)
        s = self.sampling
        with torch.no_grad():
            rois = sample_rois(proposals, proposal_valid, gt_boxes, gt_valid, gt_labels,
                               num_samples=s.num_samples, fg_fraction=s.fg_fraction,
                               fg_iou=s.fg_iou, bg_iou_low=s.bg_iou_low,
                               bg_iou_high=s.bg_iou_high)
            reg_targets = encode(rois.boxes, rois.matched, ROI_BOX_WEIGHTS)  # (B, S, 4)
        logits, deltas = self.predict(self.pool_features(features, rois.boxes))
        return self.loss(logits, deltas, rois.labels.reshape(-1), reg_targets.reshape(-1, 4))

    def loss(self, logits: Tensor, deltas: Tensor, labels: Tensor,
             reg_targets: Tensor) -> dict[str, Tensor]:
        """Head losses.

        Args:
            logits: ``(R, K+1)``; deltas: ``(R, K+1, 4)``.
            labels: ``(R,)`` int64, class or 0 background, ``-1`` empty slot.
            reg_targets: ``(R, 4)`` offsets of each RoI's matched box (used for foreground).

        Returns:
            ``{"roi_cls", "roi_reg"}`` float32 scalars, divided by the number of sampled RoIs.
            Values the loss does not use (empty slots; for the regression, background RoIs and
            other classes' offsets) do not count even when inf or NaN, and get a zero gradient.
        """
        sampled = labels >= 0
        fg = labels > 0
        num_sampled = sampled.sum().clamp(min=1)
        # Masked by torch.where before and after the loss, never by multiplying: inf * 0 = NaN
        # (as in :func:`detector.rpn.rpn_loss`).
        logits = torch.where(sampled[:, None], logits.float(), 0.0)
        ce = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
        cls_loss = torch.where(sampled, ce, 0.0).sum() / num_sampled
        # (R, K+1, 4) -> (R, 1, 4) -> (R, 4): the offsets predicted for the true class
        index = labels.clamp(min=0)[:, None, None].expand(-1, 1, 4)
        pred = torch.where(fg[:, None], deltas.float().gather(1, index).squeeze(1), 0.0)
        targets = torch.where(fg[:, None], reg_targets, 0.0)
        reg = F.smooth_l1_loss(pred, targets, beta=ROI_SMOOTH_L1_BETA, reduction="none").sum(-1)
        reg_loss = torch.where(fg, reg, 0.0).sum() / num_sampled
        return {"roi_cls": cls_loss, "roi_reg": self.reg_weight * reg_loss}

    def postprocess(self, logits: Tensor, deltas: Tensor, proposals: Tensor,
                    proposal_valid: Tensor, image_size: tuple[int, int]) -> list[dict[str, Tensor]]:
        """Detections of the batch: per-class boxes, score threshold, per-class NMS, top per image.

        Args:
            logits: ``(B*N, K+1)``; deltas: ``(B*N, K+1, 4)``.
            proposals: ``(B, N, 4)``; proposal_valid: ``(B, N)``.
            image_size: ``(height, width)``.

        Returns:
            per image ``{"boxes" (n, 4) float32 clipped, "scores" (n,) float32, "labels" (n,)
            int64 in 1..K}``, best first, ``n <= detections_per_image``.
        """
        b, n, _ = proposals.shape
        k = self.num_classes
        d = self.detection
        scores = logits.float().softmax(dim=-1)[:, 1:]  # (B*N, K), background dropped
        # (B*N, 1, 4) proposals with (B*N, K, 4) class offsets -> (B*N, K, 4) boxes
        boxes = clip(decode(proposals.reshape(b * n, 1, 4), deltas[:, 1:], ROI_BOX_WEIGHTS),
                     image_size)
        keep = ((scores > d.score_thresh) & proposal_valid.reshape(b * n, 1)
                & large_enough(boxes, MIN_DETECTION_SIZE))  # (B*N, K)
        row, col = keep.nonzero(as_tuple=True)  # (M,) each, by image: one host sync
        boxes, scores = boxes[row, col], scores[row, col]
        labels, image = col + 1, torch.div(row, n, rounding_mode="floor")
        group = image * (k + 1) + labels  # NMS per (image, class)
        span = max(image_size) + 1  # boxes are clipped: groups this far apart never overlap
        top = d.detections_per_image
        if boxes.shape[0] <= ONE_NMS_CALL_MAX_BOXES:
            kept = nms_by_group(boxes, scores, group, d.nms_iou, span)  # best first, all images
            kept_image = image[kept]
            kept = kept[torch.argsort(kept_image, stable=True)]  # by image, best first in each
            sizes = torch.bincount(kept_image, minlength=b).tolist()  # host sync
        else:  # image by image: the NMS mask grows with the square of the boxes of a call
            counts = torch.bincount(image, minlength=b).tolist()  # host sync
            starts = itertools.accumulate(counts[:-1], initial=0)
            per_image = [start + nms_by_group(bx, sc, gr, d.nms_iou, span)
                         for start, bx, sc, gr in zip(starts, boxes.split(counts),
                                                      scores.split(counts), group.split(counts))]
            kept = torch.cat(per_image)
            sizes = [x.shape[0] for x in per_image]
        boxes, scores, labels = boxes[kept], scores[kept], labels[kept]
        return [{"boxes": bx[:top], "scores": sc[:top], "labels": lb[:top]}
                for bx, sc, lb in zip(boxes.split(sizes), scores.split(sizes), labels.split(sizes))]


def nms_by_group(boxes: Tensor, scores: Tensor, group: Tensor, iou: float, span: float) -> Tensor:
    """NMS within each group in one ``torchvision.ops.nms`` call (``batched_nms``'s coordinate
    trick, without its fall-back to a loop over the groups, a host sync each).

    Args:
        boxes: ``(M, 4)`` with coordinates in ``[0, span)``; scores: ``(M,)``; group: ``(M,)``
            int64.
        iou: NMS threshold.
        span: boxes of group ``g`` are shifted by ``g * span`` so that groups never overlap.

    Returns:
        ``(m,)`` int64 indices of the kept boxes, best first.
    """
    return nms(boxes + (group.to(boxes.dtype) * span)[:, None], scores, iou)
