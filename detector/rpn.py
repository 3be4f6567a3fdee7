"""Region proposal network: head, anchor targets, loss and proposal layer.

Shapes: ``B`` images, ``C`` feature channels (512), ``H x W`` feature map, ``a`` anchors per cell
(9), ``A = H * W * a`` anchors per image (14,400 at 640 x 640), ``G`` padded ground-truth boxes,
``N`` proposals kept per image.

Head output layout: the classification conv has ``2a`` channels, channel ``j * 2 + c`` being
class ``c`` (0 background, 1 object) of the cell's anchor ``j``; the regression conv has ``4a``,
channel ``j * 4 + d`` being offset ``d`` (dx, dy, dw, dh) of anchor ``j``.
:func:`flatten_head_output` turns ``(B, a*k, H, W)`` into ``(B, H*W*a, k)`` so that row ``i``
belongs to anchor ``i`` of :func:`detector.anchors.generate_anchors` (cell row-major, the ``a``
anchors of a cell together, ratio-major within the cell).

Regression offsets use weights ``(1, 1, 1, 1)`` (:mod:`detector.boxes`). The loss follows the
original implementation: cross-entropy over the sampled anchors, smooth L1 with
``beta = 1/9`` (its ``sigma = 3``) over the positives, both divided by the number of sampled
anchors of the batch; the regression term is multiplied by ``reg_weight`` (lambda).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, nms

from detector.anchors import AnchorGenerator, inside_image
from detector.boxes import clip, decode, encode, large_enough, pad_boxes
from detector.matcher import label_anchors
from detector.sampler import sample_labels

__all__ = [
    "AnchorMatching",
    "ProposalSettings",
    "Proposals",
    "RPNHead",
    "RegionProposalNetwork",
    "assign_targets",
    "flatten_head_output",
    "proposal_layer",
    "rpn_loss",
]

RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
RPN_SMOOTH_L1_BETA = 1.0 / 9.0


@dataclass(frozen=True)
class AnchorMatching:
    """How anchors are labelled and sampled for the RPN loss (see :func:`assign_targets`).

    ``allow_border``: anchors crossing the image border by more than this many pixels are
    ignored; negative (the default, as torchvision and detectron2) keeps every anchor, so every
    anchor type trains whatever its size (see :func:`detector.anchors.untrained_anchor_types`).
    """

    pos_iou: float = 0.7
    neg_iou: float = 0.3
    num_samples: int = 256
    pos_fraction: float = 0.5
    allow_border: float = -1.0


@dataclass(frozen=True)
class ProposalSettings:
    """Proposal-layer settings (see :func:`proposal_layer`); top-N differ in train and eval."""

    min_size: float = 16.0
    nms_iou: float = 0.7
    pre_nms_top_n_train: int = 12000
    post_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 6000
    post_nms_top_n_test: int = 300


class Proposals(NamedTuple):
    """Proposals of a batch, padded to ``N`` per image and sorted best first within each image.

    ``boxes (B, N, 4)`` float32, ``scores (B, N)`` float32 objectness probabilities, ``valid
    (B, N)`` bool: the first ``n_b`` entries of row ``b`` are real, the rest padding (zero boxes,
    score 0); ``anchor_index (B, N)`` int64: the anchor each proposal was decoded from (a row of
    the ``(A, 4)`` anchors, so its type is ``anchor_index % a``), ``-1`` in padding.
    """

    boxes: Tensor
    scores: Tensor
    valid: Tensor
    anchor_index: Tensor

    def unpad(self) -> list[tuple[Tensor, Tensor]]:
        """Per image ``(boxes (n_b, 4), scores (n_b,))``, best first (one host sync)."""
        counts = self.valid.sum(dim=1).tolist()
        return [(b[:n], s[:n]) for b, s, n in zip(self.boxes, self.scores, counts)]


def flatten_head_output(x: Tensor, k: int) -> Tensor:
    """``(B, a*k, H, W)`` head output -> ``(B, H*W*a, k)``, row ``i`` for anchor ``i``.

    Channel ``j * k + c`` is value ``c`` of the cell's anchor ``j`` (see the module docstring).
    """
    b, ak, h, w = x.shape
    a = ak // k
    # (B, a*k, H, W) -> (B, a, k, H, W) -> (B, H, W, a, k) -> (B, H*W*a, k)
    return x.view(b, a, k, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * a, k)


class RPNHead(nn.Module):
    """3x3 conv (``C`` -> ``mid_channels``) + ReLU, then 1x1 convs to ``2a`` scores and ``4a`` offsets.

    Weights start as N(0, 0.01), biases 0, as in the original.
    """

    def __init__(self, in_channels: int, num_anchors: int, mid_channels: int = 512) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, mid_channels, 3, padding=1)
        self.cls = nn.Conv2d(mid_channels, 2 * num_anchors, 1)
        self.reg = nn.Conv2d(mid_channels, 4 * num_anchors, 1)
        for layer in (self.conv, self.cls, self.reg):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, C, H, W)`` -> ``(scores (B, 2a, H, W), offsets (B, 4a, H, W))``, float32 under any
        autocast: bf16 scores tie often, and CUDA's top-k / NMS break ties in no fixed order."""
        x = F.relu(self.conv(features))
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            return self.cls(x), self.reg(x)


def _as_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def assign_targets(
    anchors: Tensor,
    gt_boxes: Tensor | Sequence[Tensor],
    image_size: int | Sequence[int],
    *,
    pos_iou: float = 0.7,
    neg_iou: float = 0.3,
    num_samples: int = 256,
    pos_fraction: float = 0.5,
    allow_border: float = -1.0,
    generator: torch.Generator | None = None,
    gt_valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Label and sample anchors for the RPN loss, for one image or a whole batch at once.

    Labels before sampling are those of :func:`detector.matcher.label_anchors` (best anchor per
    box and IoU ``>= pos_iou`` positive, IoU ``< neg_iou`` negative, anchors crossing the border
    by more than ``allow_border`` pixels ignored); then :func:`detector.sampler.sample_labels`
    keeps at most ``int(num_samples * pos_fraction)`` positives and fills up to ``num_samples``
    with negatives, both random subsets.

    Args:
        anchors: ``(A, 4)`` anchors of one image (shared by the batch).
        gt_boxes: ``(G, 4)`` boxes of one image; or ``(B, G, 4)`` padded boxes of a batch (with
            ``gt_valid``); or a list of ``B`` tensors ``(G_i, 4)``. ``G`` may be 0.
        image_size: ``(height, width)`` or one int for a square image.
        pos_iou, neg_iou, num_samples, pos_fraction, allow_border: see above (``allow_border``
            negative, the default, keeps border-crossing anchors: they are matched by the IoU
            of the whole, unclipped anchor, as in torchvision).
        generator: random source of the sampling (default: the global RNG).
        gt_valid: ``(B, G)`` bool, for a padded batch: which boxes are real (default: all).

    Returns:
        ``(labels, matched_gt)``, int64, ``(A,)`` each for a single ``(G, 4)`` input, else
        ``(B, A)``: labels in ``{1, 0, -1}`` (positive, negative, ignored) and the index of each
        anchor's best ground-truth box (meaningful where the label is 1).
    """
    single = isinstance(gt_boxes, Tensor) and gt_boxes.dim() == 2
    if isinstance(gt_boxes, Tensor):
        boxes = gt_boxes[None] if single else gt_boxes
        if gt_valid is None:
            gt_valid = torch.ones(boxes.shape[:2], dtype=torch.bool, device=boxes.device)
    else:
        boxes, gt_valid, _ = pad_boxes(list(gt_boxes))
    if boxes.shape[1] == 0:  # no box in any image: one invalid padding column keeps shapes
        boxes = boxes.new_zeros(boxes.shape[0], 1, 4)
        gt_valid = torch.zeros(boxes.shape[:2], dtype=torch.bool, device=boxes.device)
    b, g, _ = boxes.shape
    anchors = anchors.float()
    # One IoU call for the batch: anchors are shared. (A, B*G) -> (A, B, G) -> (B, A, G)
    iou = box_iou(anchors, boxes.reshape(b * g, 4).float()).view(-1, b, g).permute(1, 0, 2)
    inside = inside_image(anchors, _as_hw(image_size), allow_border)
    labels, matched = label_anchors(iou, gt_valid, inside, pos_iou=pos_iou, neg_iou=neg_iou)
    labels = sample_labels(labels, num_samples, pos_fraction, generator)
    if single:
        return labels[0], matched[0]
    return labels, matched


def proposal_layer(
    anchors: Tensor,
    logits: Tensor,
    deltas: Tensor,
    image_size: int | Sequence[int],
    *,
    min_size: float,
    nms_iou: float,
    pre_nms_top_n: int,
    post_nms_top_n: int,
) -> Proposals:
    """RPN outputs -> proposals, for the whole batch (the spec's order of steps).

    1. decode every anchor's offsets into a box; 2. clip it to the image; 3. drop boxes with
    width or height below ``min_size``; 4. keep the ``pre_nms_top_n`` best by objectness per
    image; 5. NMS at ``nms_iou`` within each image; 6. keep the ``post_nms_top_n`` best per
    image. A box whose score or coordinates are not finite (a diverged model) is dropped like a
    small one: it ranks after every real proposal and comes back as padding.

    Args:
        anchors: ``(A, 4)``.
        logits: ``(B, A, 2)`` background / object scores (any float dtype).
        deltas: ``(B, A, 4)`` offsets (weights 1, 1, 1, 1).
        image_size: ``(height, width)`` or an int.

    Returns:
        :class:`Proposals` padded to ``N = min(post_nms_top_n, pre_nms_top_n, A)`` per image,
        float32; scores are softmax object probabilities.
    """
    b, a, _ = logits.shape
    hw = _as_hw(image_size)
    scores = logits.float().softmax(dim=-1)[..., 1]  # (B, A) object probability
    # (A, 4) anchors broadcast over the batch: (1, A, 4) with (B, A, 4) -> (B, A, 4)
    boxes = clip(decode(anchors[None], deltas, RPN_BOX_WEIGHTS), hw)
    usable = (large_enough(boxes, min_size) & torch.isfinite(scores)
              & torch.isfinite(boxes).all(dim=-1))  # (B, A)
    # Dropped boxes get score -1 (probabilities are >= 0), so top-k and NMS take them last; a
    # NaN score would rank first in topk. Their boxes become 0 so no NaN reaches NMS.
    scores = torch.where(usable, scores, -1.0)
    boxes = torch.where(usable[..., None], boxes, 0.0)
    k = min(pre_nms_top_n, a)
    top_scores, top_idx = scores.topk(k, dim=1)  # (B, k), best first
    # (B, k) -> (B, k, 4) index to gather the boxes
    top_boxes = boxes.gather(1, top_idx[..., None].expand(b, k, 4))
    n = min(post_nms_top_n, k)
    keep = _nms_per_image(top_boxes, top_scores, nms_iou, n)  # (B, n) into k, best first
    kept_boxes = top_boxes.gather(1, keep.index[..., None].expand(b, n, 4))
    kept_scores = top_scores.gather(1, keep.index)
    # A dropped box can survive NMS (it suppresses nothing: it comes after every kept box);
    # it is padding like the empty slots.
    valid = keep.valid & (kept_scores >= 0)
    anchor_index = top_idx.gather(1, keep.index)  # (B, n) into A
    return Proposals(kept_boxes.masked_fill(~valid[..., None], 0.0),
                     kept_scores.masked_fill(~valid, 0.0), valid,
                     anchor_index.masked_fill(~valid, -1))


class _Kept(NamedTuple):
    index: Tensor  # (B, n) int64
    valid: Tensor  # (B, n) bool


def _nms_per_image(boxes: Tensor, scores: Tensor, iou: float, n: int) -> _Kept:
    """NMS of each image's boxes, the best ``n`` survivors of each as padded indices.

    One ``torchvision.ops.nms`` call per image: NMS is inherently per image, and its output size
    (one host sync per call) depends on the data. ``batched_nms`` of the whole batch would do
    the same loop itself at this size (``unique`` and a ``where`` per image on top), or, with
    its coordinate trick, one NMS over ``B * k`` boxes (quadratic in ``B``).

    Args:
        boxes: ``(B, k, 4)``; scores: ``(B, k)``, each row sorted best first.
        iou: NMS threshold.
        n: slots per image.

    Returns:
        ``index (B, n)`` int64 into ``k`` (best first; 0 in empty slots) and ``valid (B, n)``.
    """
    b = boxes.shape[0]
    index = torch.zeros(b, n, dtype=torch.int64, device=boxes.device)
    counts = []
    for i in range(b):
        kept = nms(boxes[i], scores[i], iou)[:n]  # (m,) best first
        index[i, :kept.shape[0]] = kept
        counts.append(kept.shape[0])
    # The counts are host ints already (the NMS calls synced): one small host -> device copy.
    count = torch.tensor(counts, device=boxes.device)
    valid = torch.arange(n, device=boxes.device)[None, :] < count[:, None]
    return _Kept(index, valid)


def rpn_loss(
    logits: Tensor,
    deltas: Tensor,
    labels: Tensor,
    reg_targets: Tensor,
    *,
    reg_weight: float = 1.0,
    beta: float = RPN_SMOOTH_L1_BETA,
) -> tuple[Tensor, Tensor]:
    """RPN classification and regression losses over the sampled anchors.

    Args:
        logits: ``(B, A, 2)``.
        deltas: ``(B, A, 4)`` predicted offsets.
        labels: ``(B, A)`` int64 in ``{-1, 0, 1}`` from :func:`assign_targets`.
        reg_targets: ``(B, A, 4)`` float32 offsets of each anchor's matched box (used where
            ``labels == 1`` only; must be finite).
        reg_weight: lambda, the weight of the regression term.
        beta: smooth L1 transition point.

    Returns:
        ``(cls_loss, reg_loss)`` float32 scalars, both divided by the number of sampled anchors
        (at least 1). Values the loss does not use (unsampled anchors; for the regression,
        all but the positives) do not count even when inf or NaN, and get a zero gradient.
    """
    sampled = labels >= 0
    positive = labels == 1
    num_sampled = sampled.sum().clamp(min=1)
    # Masked by torch.where, never by multiplying (inf * 0 = NaN), and before the loss as well
    # as after it (the backward of an inf logit's cross-entropy is NaN, even times 0). No
    # boolean indexing: that would sync with the host.
    logits = torch.where(sampled[..., None], logits.float(), 0.0)
    # (B, A, 2) -> (B*A, 2): cross-entropy of every anchor, then masked.
    ce = F.cross_entropy(logits.reshape(-1, 2), labels.clamp(min=0).reshape(-1), reduction="none")
    cls_loss = torch.where(sampled.reshape(-1), ce, 0.0).sum() / num_sampled
    deltas = torch.where(positive[..., None], deltas.float(), 0.0)
    targets = torch.where(positive[..., None], reg_targets, 0.0)
    reg = F.smooth_l1_loss(deltas, targets, beta=beta, reduction="none").sum(dim=-1)
    reg_loss = torch.where(positive, reg, 0.0).sum() / num_sampled
    return cls_loss, reg_weight * reg_loss


class RegionProposalNetwork(nn.Module):
    """Head + anchors + targets + loss + proposal layer.

    Args:
        anchor_generator: the anchors of a feature map.
        in_channels: feature channels ``C``.
        matching: anchor labelling and sampling settings.
        proposals: proposal-layer settings.
        reg_weight: lambda of the regression loss.
    """

    def __init__(self, *, anchor_generator: AnchorGenerator, in_channels: int,
                 matching: AnchorMatching, proposals: ProposalSettings,
                 reg_weight: float = 1.0) -> None:
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = RPNHead(in_channels, anchor_generator.num_per_cell)
        self.matching = matching
        self.proposal_settings = proposals
        self.reg_weight = float(reg_weight)

    def forward(
        self,
        features: Tensor,
        image_size: tuple[int, int],
        gt_boxes: Tensor | None = None,
        gt_valid: Tensor | None = None,
        *,
        need_proposals: bool = True,
    ) -> tuple[Proposals | None, dict[str, Tensor]]:
        """Proposals (detached) and, when ground truth is given, the losses.

        Args:
            features: ``(B, C, H, W)``.
            image_size: ``(height, width)`` of the input images.
            gt_boxes: ``(B, G, 4)`` padded ground-truth boxes, or None (no losses).
            gt_valid: ``(B, G)`` bool, which boxes are real.
            need_proposals: run the proposal layer (top-N of the current train / eval mode).

        Returns:
            ``(proposals or None, {"rpn_cls", "rpn_reg"} or {})``.
        """
        cls_map, reg_map = self.head(features)
        logits = flatten_head_output(cls_map, 2)  # (B, A, 2)
        deltas = flatten_head_output(reg_map, 4)  # (B, A, 4)
        anchors = self.anchor_generator(features.shape[-2:], features.device)  # (A, 4)
        losses: dict[str, Tensor] = {}
        if gt_boxes is not None:
            with torch.no_grad():
                labels, matched = assign_targets(anchors, gt_boxes, image_size, gt_valid=gt_valid,
                                                 **asdict(self.matching))
                # (B, G, 4) gathered by (B, A) -> (B, A, 4): each anchor's matched box
                matched_boxes = gt_boxes.gather(1, matched[..., None].expand(-1, -1, 4))
                reg_targets = encode(anchors[None], matched_boxes, RPN_BOX_WEIGHTS)
            cls_loss, reg_loss = rpn_loss(logits, deltas, labels, reg_targets,
                                          reg_weight=self.reg_weight)
            losses = {"rpn_cls": cls_loss, "rpn_reg": reg_loss}
        proposals = None
        if need_proposals:
            s = self.proposal_settings
            with torch.no_grad():
                proposals = proposal_layer(
                    anchors, logits.detach(), deltas.detach(), image_size,
                    min_size=s.min_size, nms_iou=s.nms_iou,
                    pre_nms_top_n=s.pre_nms_top_n_train if self.training else s.pre_nms_top_n_test,
                    post_nms_top_n=s.post_nms_top_n_train if self.training else s.post_nms_top_n_test,
                )
        return proposals, losses
