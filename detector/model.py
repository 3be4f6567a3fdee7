"""The Faster R-CNN model: VGG-16 backbone, RPN and Fast R-CNN head, built from plain keywords.

Shapes: ``B`` images of ``3 x S x S`` (``S = image_size``), ``G_i`` ground-truth boxes in image
``i``, ``K = num_classes`` classes without background.

Images are float RGB in ``[0, 1]``; the model normalises them with the ImageNet mean and standard
deviation itself (the statistics that torchvision's VGG-16 weights expect).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from detector.anchors import AnchorGenerator, describe_anchor_types, untrained_anchor_types
from detector.backbone import (IMAGENET_MEAN, IMAGENET_STD, VGG16Backbone, apply_vgg16_weights,
                               load_vgg16_state_dict, vgg16_blocks)
from detector.boxes import pad_boxes
from detector.roi_heads import DetectionSettings, RoIHeads, RoISampling
from detector.rpn import AnchorMatching, ProposalSettings, RegionProposalNetwork

__all__ = ["FasterRCNN", "NonFiniteLossError"]

Target = dict[str, Tensor]


class NonFiniteLossError(FloatingPointError):
    """A training loss is NaN or infinite (its name and value are in the message).

    Raised by the training loop (:mod:`pipeline`), which reads the losses back for logging
    anyway; the model itself does not check them (a second host sync per step)."""


class FasterRCNN(nn.Module):
    """Faster R-CNN with a VGG-16 backbone (SPEC.md, "The detector").

    Args:
        num_classes: ``K`` dataset classes, without background; target labels are ``1..K``.
        image_size: side ``S`` of the square input images the model is built for; inputs of
            another size are refused.
        backbone_weights: ``"none"``, ``"imagenet"`` or a path (:mod:`detector.backbone`).
        backbone_freeze_blocks: how many VGG-16 conv blocks (0..5) are frozen
            (``requires_grad=False``) when starting from pretrained weights: 2, conv1 and conv2
            (``features[:10]``), as py-faster-rcnn. No effect with ``backbone_weights="none"``:
            random weights all train.
        rpn_only: training returns only the RPN losses and skips the proposal layer and the RoI
            head (the RPN stage); nothing more is frozen, and eval / :meth:`propose` still run
            everything.
        anchor_*: :class:`detector.anchors.AnchorGenerator` (the stride must be the
            backbone's, 16); ``anchor_shapes``, ``(width, height)`` pixels per anchor of a cell,
            replaces ``anchor_scales`` x ``anchor_ratios`` when given (the RPN head's channels
            follow the count).
        rpn_pos_iou .. rpn_allow_border: :class:`detector.rpn.AnchorMatching`;
            ``rpn_allow_border=-1`` (the default) trains border-crossing anchors too. An anchor
            type that never lies inside the image (with ``allow_border >= 0``) is never trained:
            a warning names such types, and :attr:`untrained_anchor_types` lists them.
        rpn_reg_weight: lambda of the RPN regression loss.
        rpn_min_size .. rpn_post_nms_top_n_test: :class:`detector.rpn.ProposalSettings`.
        roi_num_samples .. roi_bg_iou_high: :class:`detector.roi_heads.RoISampling`.
        roi_pool, roi_pool_size, roi_hidden_dim, roi_dropout, roi_reg_weight: the head
            (:class:`detector.roi_heads.RoIHeads`); ``roi_dropout`` after fc6 and fc7, training
            mode only, 0 disables.
        roi_score_thresh, roi_nms_iou, roi_detections_per_image:
            :class:`detector.roi_heads.DetectionSettings`.

    ``model.config`` keeps ``num_classes`` and every keyword, so
    ``FasterRCNN(**model.config)`` rebuilds the same architecture (see
    :mod:`detector.serialization`).

    Calling it:

    - training mode, ``model(images, targets)`` -> ``{"rpn_cls", "rpn_reg", "roi_cls",
      "roi_reg"}`` float32 scalar losses (only the RPN's with ``rpn_only``), not checked for
      NaN / inf here (the training loop reads them anyway; it raises
      :class:`NonFiniteLossError`);
    - eval mode, ``model(images)`` -> per image ``{"boxes" (n, 4), "scores" (n,), "labels" (n,)}``;
    - :meth:`propose` -> per image the RPN proposals ``(boxes (N, 4), scores (N,))``.

    ``images``: ``(B, 3, S, S)`` float in ``[0, 1]``; ``targets``: ``B`` dicts with ``boxes``
    ``(G_i, 4)`` x1y1x2y2 pixels and ``labels`` ``(G_i,)`` int64 in ``1..K`` (``G_i`` may be 0).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        image_size: int = 640,
        backbone_weights: str = "none",
        backbone_freeze_blocks: int = 2,
        rpn_only: bool = False,
        anchor_stride: int = 16,
        anchor_scales: Sequence[float] = (8.0, 16.0, 32.0),
        anchor_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        anchor_shapes: Sequence[Sequence[float]] | None = None,
        rpn_pos_iou: float = 0.7,
        rpn_neg_iou: float = 0.3,
        rpn_num_samples: int = 256,
        rpn_pos_fraction: float = 0.5,
        rpn_allow_border: float = -1.0,
        rpn_reg_weight: float = 1.0,
        rpn_min_size: float = 16.0,
        rpn_nms_iou: float = 0.7,
        rpn_pre_nms_top_n_train: int = 12000,
        rpn_post_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 6000,
        rpn_post_nms_top_n_test: int = 300,
        roi_num_samples: int = 128,
        roi_fg_fraction: float = 0.25,
        roi_fg_iou: float = 0.5,
        roi_bg_iou_low: float = 0.0,
        roi_bg_iou_high: float = 0.5,
        roi_pool: str = "align",
        roi_pool_size: int = 7,
        roi_hidden_dim: int = 4096,
        roi_dropout: float = 0.5,
        roi_reg_weight: float = 1.0,
        roi_score_thresh: float = 0.05,
        roi_nms_iou: float = 0.3,
        roi_detections_per_image: int = 100,
    ) -> None:
        super().__init__()
        config = dict(locals())
        for name in ("self", "__class__"):
            config.pop(name, None)
        self.config: dict[str, Any] = {k: _as_tuples(v) for k, v in config.items()}
        _check_config(self.config)
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.rpn_only = bool(rpn_only)

        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
                             persistent=False)
        self.backbone = VGG16Backbone()
        self.rpn = _build_rpn(self.config)
        self.roi_heads = _build_roi_heads(self.config)
        self._init_backbone(backbone_weights, backbone_freeze_blocks)
        _warn_if_untrained_anchor_types(self.untrained_anchor_types, self.rpn.anchor_generator,
                                        self.config)

    def _init_backbone(self, weights: str, freeze_blocks: int) -> None:
        """Load pretrained ``weights`` (backbone, fc6 / fc7), then freeze the first
        ``freeze_blocks`` conv blocks; with ``"none"`` nothing is loaded or frozen."""
        frozen = vgg16_blocks(self.backbone.features, freeze_blocks)  # checks the range
        state = load_vgg16_state_dict(weights)
        if state is not None:
            apply_vgg16_weights(state, weights, self.backbone.features,
                                self.roi_heads.fc6, self.roi_heads.fc7)
            frozen.requires_grad_(False)

    @property
    def untrained_anchor_types(self) -> list[tuple[float, float]]:
        """The ``(ratio, scale)`` anchor types that never lie inside the image, with the RPN's
        ``allow_border``: the RPN never trains them (their head channels get no gradient).
        Empty when every type trains (always with ``rpn_allow_border=-1``). See
        :func:`detector.anchors.untrained_anchor_types`."""
        return untrained_anchor_types(self.rpn.anchor_generator, self.image_size,
                                      self.rpn.matching.allow_border)

    # -- inputs ------------------------------------------------------------------------------

    def _features(self, images: Tensor) -> Tensor:
        """Check ``(B, 3, S, S)`` images, normalise them, run the backbone -> ``(B, 512, h, w)``."""
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, 3, H, W) float tensor, got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [0, 1], got dtype {images.dtype}")
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"images are {tuple(images.shape[-2:])} but the model was built for "
                             f"image_size={self.image_size}")
        x = (images - self.pixel_mean) / self.pixel_std
        if x.is_cuda:
            # NHWC lets cuDNN use its fastest (tensor-core) convolutions, bf16 / fp16 above all;
            # every conv of the backbone and RPN head follows the input's layout.
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def _pad_targets(self, targets: Sequence[Target], batch: int,
                     device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """``B`` target dicts -> ``(boxes (B, G, 4) float32, valid (B, G), labels (B, G) int64)``
        on ``device``.

        Checked and padded where the targets are, then moved: targets on the CPU (as a data
        loader gives them) cost the GPU no host sync. Raises ValueError for a wrong count, shape,
        or label / box value.
        """
        if targets is None or len(targets) != batch:
            got = None if targets is None else len(targets)
            raise ValueError(f"training needs one target dict per image: {batch} images, "
                             f"got {got} targets")
        home = targets[0]["boxes"].device
        boxes, labels = [], []
        for i, t in enumerate(targets):
            b, lab = t["boxes"], t["labels"]
            if b.dim() != 2 or b.shape[-1] != 4 or lab.shape != b.shape[:1]:
                raise ValueError(f"target {i}: boxes must be (G, 4) and labels (G,), got "
                                 f"{tuple(b.shape)} and {tuple(lab.shape)}")
            boxes.append(b.to(home))
            labels.append(lab.to(device=home, dtype=torch.int64))
        gt_boxes, gt_valid, (gt_labels,) = pad_boxes(boxes, labels)
        bad_label = gt_valid & ((gt_labels < 1) | (gt_labels > self.num_classes))
        bad_box = gt_valid & ((gt_boxes[..., 2] <= gt_boxes[..., 0])
                              | (gt_boxes[..., 3] <= gt_boxes[..., 1])
                              | ~torch.isfinite(gt_boxes).all(dim=-1))
        if bool((bad_label | bad_box).any()):
            img, box = torch.nonzero(bad_label | bad_box)[0].tolist()
            raise ValueError(
                f"target {img}, box {box}: label {int(gt_labels[img, box])} (allowed 1.."
                f"{self.num_classes}) / box {gt_boxes[img, box].tolist()} (needs x2 > x1, y2 > y1)")
        return tuple(t.to(device, non_blocking=True) for t in (gt_boxes, gt_valid, gt_labels))

    # -- entry points ------------------------------------------------------------------------

    def forward(self, images: Tensor,
                targets: Sequence[Target] | None = None) -> dict[str, Tensor] | list[Target]:
        """Losses in training mode (not checked for NaN / inf), detections in eval mode (see
        the class docstring)."""
        features = self._features(images)
        image_size = (self.image_size, self.image_size)
        if not self.training:
            proposals, _ = self.rpn(features, image_size)
            return self.roi_heads(features, proposals.boxes, proposals.valid, image_size)
        gt_boxes, gt_valid, gt_labels = self._pad_targets(targets, images.shape[0], images.device)
        proposals, losses = self.rpn(features, image_size, gt_boxes, gt_valid,
                                     need_proposals=not self.rpn_only)
        if not self.rpn_only:
            losses.update(self.roi_heads(features, proposals.boxes, proposals.valid, image_size,
                                         gt_boxes, gt_valid, gt_labels))
        return losses

    @torch.no_grad()
    def propose(self, images: Tensor) -> list[tuple[Tensor, Tensor]]:
        """RPN proposals per image after the proposal layer, ``(boxes (N, 4), scores (N,))``,
        best first; top-N of the current mode (train / eval). Runs without gradients."""
        features = self._features(images)
        proposals, _ = self.rpn(features, (self.image_size, self.image_size))
        return proposals.unpad()


def _as_tuples(value: Any) -> Any:
    """Lists (nested too) as tuples: the config compares equal however it was given."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value


def _check_config(c: dict[str, Any]) -> None:
    """Raise ValueError for a constructor value that no sub-module checks itself."""
    if c["num_classes"] < 1:
        raise ValueError(f"num_classes must be >= 1 (dataset classes without background), "
                         f"got {c['num_classes']}")
    if c["image_size"] < VGG16Backbone.stride:
        raise ValueError(f"image_size must be >= {VGG16Backbone.stride}, got {c['image_size']}")
    if c["anchor_stride"] != VGG16Backbone.stride:
        raise ValueError(
            f"anchor_stride={c['anchor_stride']}: anchors are centred on the cells of the VGG-16 "
            f"feature map, whose stride is {VGG16Backbone.stride}; change anchor_scales to "
            f"change the anchor sizes")


def _build_rpn(c: dict[str, Any]) -> RegionProposalNetwork:
    """The RPN of a :class:`FasterRCNN` config (its ``anchor_*`` and ``rpn_*`` keywords)."""
    return RegionProposalNetwork(
        anchor_generator=AnchorGenerator(stride=c["anchor_stride"], scales=c["anchor_scales"],
                                         ratios=c["anchor_ratios"], shapes=c["anchor_shapes"]),
        in_channels=VGG16Backbone.out_channels,
        matching=AnchorMatching(pos_iou=c["rpn_pos_iou"], neg_iou=c["rpn_neg_iou"],
                                num_samples=c["rpn_num_samples"],
                                pos_fraction=c["rpn_pos_fraction"],
                                allow_border=c["rpn_allow_border"]),
        proposals=ProposalSettings(
            min_size=c["rpn_min_size"], nms_iou=c["rpn_nms_iou"],
            pre_nms_top_n_train=c["rpn_pre_nms_top_n_train"],
            post_nms_top_n_train=c["rpn_post_nms_top_n_train"],
            pre_nms_top_n_test=c["rpn_pre_nms_top_n_test"],
            post_nms_top_n_test=c["rpn_post_nms_top_n_test"]),
        reg_weight=c["rpn_reg_weight"],
    )


def _build_roi_heads(c: dict[str, Any]) -> RoIHeads:
    """The Fast R-CNN head of a :class:`FasterRCNN` config (its ``roi_*`` keywords)."""
    return RoIHeads(
        in_channels=VGG16Backbone.out_channels, num_classes=c["num_classes"],
        pool=c["roi_pool"], pool_size=c["roi_pool_size"], hidden_dim=c["roi_hidden_dim"],
        dropout=c["roi_dropout"], spatial_scale=1.0 / VGG16Backbone.stride,
        reg_weight=c["roi_reg_weight"],
        sampling=RoISampling(num_samples=c["roi_num_samples"], fg_fraction=c["roi_fg_fraction"],
                             fg_iou=c["roi_fg_iou"], bg_iou_low=c["roi_bg_iou_low"],
                             bg_iou_high=c["roi_bg_iou_high"]),
        detection=DetectionSettings(score_thresh=c["roi_score_thresh"],
                                    nms_iou=c["roi_nms_iou"],
                                    detections_per_image=c["roi_detections_per_image"]),
    )


def _warn_if_untrained_anchor_types(types: list[tuple[float, float]], generator: AnchorGenerator,
                                    c: dict[str, Any]) -> None:
    """Warn, naming them, when some anchor types never lie inside the image: the RPN never
    labels them, so their head channels get no gradient, and at inference their proposals keep
    untrained scores that can outrank every trained proposal (trained background falls)."""
    if not types:
        return
    size = c["image_size"]
    warnings.warn(
        f"{len(types)} anchor type(s) never lie inside a {size}x{size} image with "
        f"rpn_allow_border={c['rpn_allow_border']}, so the RPN never trains them: "
        f"{describe_anchor_types(generator, types)}. Use rpn_allow_border=-1 (keep "
        f"border-crossing anchors), a larger rpn_allow_border or smaller anchors", stacklevel=3)
