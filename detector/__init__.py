"""Faster R-CNN with a VGG-16 backbone, in pure PyTorch and torchvision.

Conventions, stated once for the whole package:

- Boxes are ``(N, 4)`` float tensors, ``x1, y1, x2, y2`` in pixels of the resized input image
  (x right, y down); a box is valid when ``x2 > x1`` and ``y2 > y1``.
- Anchor / RoI labels: ``1`` object (foreground), ``0`` background, ``-1`` ignored by the loss.
- Class ids for the detector: ``0`` is background, ``1..K`` the dataset's classes.
- Shape shorthand in docstrings: ``B`` images, ``A`` anchors per image (``H*W*a``, ``a`` per
  cell), ``G`` ground-truth boxes, ``R`` proposals / RoIs, ``K`` classes without background.
- Everything runs on the device of its inputs and under ``torch.autocast``; box maths that
  needs precision (IoU, encode / decode) runs in float32.

No Ray, MLflow or DVC here: :mod:`pipeline` owns orchestration.
"""

from detector import anchors, backbone, boxes, matcher, roi_heads, rpn, sampler, settings
from detector.anchors import generate_anchors, trainable_anchor_counts, untrained_anchor_types
from detector.serialization import load_model, save_model
from detector.model import FasterRCNN, NonFiniteLossError, UntrainedAnchorWarning
from detector.settings import AnchorSettings, BackboneSettings, LossWeights, RoIHeadSettings
from detector.roi_heads import DetectionSettings, RoISampling
from detector.rpn import AnchorMatching, ProposalSettings, assign_targets

__all__ = [
    "AnchorMatching",
    "AnchorSettings",
    "BackboneSettings",
    "DetectionSettings",
    "FasterRCNN",
    "LossWeights",
    "ProposalSettings",
    "RoIHeadSettings",
    "RoISampling",
    "NonFiniteLossError",
    "UntrainedAnchorWarning",
    "anchors",
    "assign_targets",
    "backbone",
    "boxes",
    "generate_anchors",
    "load_model",
    "matcher",
    "roi_heads",
    "rpn",
    "sampler",
    "save_model",
    "settings",
    "trainable_anchor_counts",
    "untrained_anchor_types",
]
