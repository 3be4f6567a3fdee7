"""The Faster R-CNN model: VGG-16 backbone, RPN and Fast R-CNN head, built from settings objects.

Shapes: ``B`` images of ``3 x S x S`` (``S = image_size``), ``G_i`` ground-truth boxes in image
``i``, ``K = num_classes`` classes without background.

Images are float RGB in ``[0, 1]``; the model normalises them with the ImageNet mean and standard
deviation itself (the statistics that torchvision's VGG-16 weights expect).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from detector.anchors import AnchorGenerator, describe_anchor_types, untrained_anchor_types
from detector.backbone import (IMAGENET_MEAN, IMAGENET_STD, VGG16Backbone, apply_vgg16_weights,
                               load_vgg16_state_dict, vgg16_blocks)
from detector.boxes import pad_boxes
from detector.roi_heads import DetectionSettings, RoIHeads, RoISampling
from detector.rpn import AnchorMatching, ProposalSettings, RegionProposalNetwork
from detector.settings import (SETTINGS, AnchorSettings, BackboneSettings, LossWeights,
                               RoIHeadSettings, as_tuples, build, complete_config)

__all__ = ["FasterRCNN", "NonFiniteLossError", "UntrainedAnchorWarning"]

Target = dict[str, Tensor]


class NonFiniteLossError(FloatingPointError):
    """A training loss is NaN or infinite (its name and value are in the message).

    Raised by the training loop (:mod:`pipeline`), which reads the losses back for logging
    anyway; the model itself does not check them (a second host sync per step)."""


class FasterRCNN(nn.Module):
    """Faster R-CNN with a VGG-16 backbone (SPEC.md, "The detector").

    Built from settings objects, one per concern (as detectron2's configurable constructors):

    Args:
        num_classes: ``K`` dataset classes, without background; target labels are ``1..K``.
        image_size: side ``S`` of the square input images the model is built for; inputs of
            another size are refused.
        rpn_only: training returns only the RPN losses and skips the proposal layer and the RoI
            head (the RPN stage); nothing more is frozen, and eval / :meth:`propose` still run
            everything.
        backbone: :class:`BackboneSettings` (initial weights, frozen blocks).
        anchors: :class:`AnchorSettings`; the RPN head's channels follow the anchor count.
        matching: :class:`detector.rpn.AnchorMatching`; ``allow_border=-1`` (the default)
            trains border-crossing anchors too. An anchor type that never lies inside the image
            (with ``allow_border >= 0``) is never trained: an :class:`UntrainedAnchorWarning`
            names such types, and :attr:`untrained_anchor_types` lists them.
        proposals: :class:`detector.rpn.ProposalSettings` (the proposal layer).
        roi_sampling: :class:`detector.roi_heads.RoISampling`.
        roi_head: :class:`RoIHeadSettings`.
        detection: :class:`detector.roi_heads.DetectionSettings`.
        loss_weights: :class:`LossWeights`.

    ``model.config`` keeps ``num_classes``, ``image_size``, ``rpn_only`` and every settings
    object as a plain dict (what a model file stores), so ``FasterRCNN.from_config(model.config)``
    rebuilds the same architecture (see :mod:`detector.serialization`).

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

    def __init__(self, num_classes: int, *, image_size: int = 640, rpn_only: bool = False,
                 backbone: BackboneSettings = BackboneSettings(),
                 anchors: AnchorSettings = AnchorSettings(),
                 matching: AnchorMatching = AnchorMatching(),
                 proposals: ProposalSettings = ProposalSettings(),
                 roi_sampling: RoISampling = RoISampling(),
                 roi_head: RoIHeadSettings = RoIHeadSettings(),
                 detection: DetectionSettings = DetectionSettings(),
                 loss_weights: LossWeights = LossWeights()) -> None:
        super().__init__()
        given = dict(backbone=backbone, anchors=anchors, matching=matching, proposals=proposals,
                     roi_sampling=roi_sampling, roi_head=roi_head, detection=detection,
                     loss_weights=loss_weights)
        for name, value in given.items():
            if not isinstance(value, SETTINGS[name]):
                raise TypeError(f"{name} must be a {SETTINGS[name].__name__}, got "
                                f"{type(value).__name__}")
        self.config: dict[str, Any] = {
            "num_classes": int(num_classes), "image_size": int(image_size),
            "rpn_only": bool(rpn_only),
            **{name: as_tuples(dataclasses.asdict(value)) for name, value in given.items()}}
        _check_config(num_classes, image_size, anchors)
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.rpn_only = bool(rpn_only)

        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
                             persistent=False)
        self.backbone = VGG16Backbone()
        self.rpn = _build_rpn(anchors, matching, proposals, loss_weights)
        self.roi_heads = _build_roi_heads(num_classes, roi_sampling, roi_head, detection,
                                          loss_weights)
        self._init_backbone(backbone.weights, backbone.freeze_blocks)
        _warn_if_untrained_anchor_types(self.untrained_anchor_types, self.rpn.anchor_generator,
                                        image_size, matching.allow_border)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "FasterRCNN":
        """The model of a ``model.config`` (settings as plain dicts; a missing setting takes its
        default). A flat config of keywords, as model files of earlier versions hold
        (``anchor_scales``, ``rpn_pos_iou``, ...), is read too
        (:func:`detector.settings.complete_config`).

        Raises:
            TypeError: an unknown setting.
            ValueError: a value a sub-module refuses.
        """
        config = complete_config(config)
        return cls(config["num_classes"], image_size=config["image_size"],
                   rpn_only=config["rpn_only"],
                   **{name: build(name, config[name]) for name in SETTINGS})

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
        Empty when every type trains (always with ``matching.allow_border=-1``). See
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


def _check_config(num_classes: int, image_size: int, anchors: AnchorSettings) -> None:
    """Raise ValueError for a constructor value that no sub-module checks itself."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (dataset classes without background), "
                         f"got {num_classes}")
    if image_size < VGG16Backbone.stride:
        raise ValueError(f"image_size must be >= {VGG16Backbone.stride}, got {image_size}")
    if anchors.stride != VGG16Backbone.stride:
        raise ValueError(
            f"anchors.stride={anchors.stride}: anchors are centred on the cells of the VGG-16 "
            f"feature map, whose stride is {VGG16Backbone.stride}; change anchors.scales to "
            f"change the anchor sizes")


def _build_rpn(anchors: AnchorSettings, matching: AnchorMatching, proposals: ProposalSettings,
               loss_weights: LossWeights) -> RegionProposalNetwork:
    """The RPN of a :class:`FasterRCNN`."""
    return RegionProposalNetwork(
        anchor_generator=AnchorGenerator(stride=anchors.stride, scales=anchors.scales,
                                         ratios=anchors.ratios, shapes=anchors.shapes),
        in_channels=VGG16Backbone.out_channels, matching=matching, proposals=proposals,
        reg_weight=loss_weights.rpn_reg)


def _build_roi_heads(num_classes: int, sampling: RoISampling, head: RoIHeadSettings,
                     detection: DetectionSettings, loss_weights: LossWeights) -> RoIHeads:
    """The Fast R-CNN head of a :class:`FasterRCNN`."""
    return RoIHeads(
        in_channels=VGG16Backbone.out_channels, num_classes=num_classes, pool=head.pool,
        pool_size=head.pool_size, hidden_dim=head.hidden_dim, dropout=head.dropout,
        spatial_scale=1.0 / VGG16Backbone.stride, reg_weight=loss_weights.roi_reg,
        sampling=sampling, detection=detection)


class UntrainedAnchorWarning(UserWarning):
    """Some anchor types never lie inside the image: the RPN never trains them. (A caller that
    reports this itself, as the pipeline's stages do, filters this category.)"""


def _warn_if_untrained_anchor_types(types: list[tuple[float, float]], generator: AnchorGenerator,
                                    size: int, allow_border: float) -> None:
    """Warn, naming them, when some anchor types never lie inside the image: the RPN never
    labels them, so their head channels get no gradient, and at inference their proposals keep
    untrained scores that can outrank every trained proposal (trained background falls)."""
    if not types:
        return
    warnings.warn(
        f"{len(types)} anchor type(s) never lie inside a {size}x{size} image with "
        f"matching.allow_border={allow_border}, so the RPN never trains them: "
        f"{describe_anchor_types(generator, types)}. Use allow_border=-1 (keep "
        f"border-crossing anchors), a larger allow_border or smaller anchors",
        UntrainedAnchorWarning, stacklevel=3)
