"""The two models ``benchmarks/bench_quality.py`` trains side by side from the same weights:
this detector and torchvision's ``FasterRCNN`` assembled alike
(:mod:`benchmarks.torchvision_model`), and the views that let the project's scoring read
torchvision's proposals and anchors."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.torchvision_model import (build_torchvision, compare_outputs, copy_weights,
                                          torchvision_rpn_outputs)
from detector import AnchorMatching, AnchorSettings, FasterRCNN
from detector.rpn import ProposalSettings

REFERENCE_SIZE = 640       # the frame of --scales and of the minimum proposal size
MIN_PROPOSAL_SIZE = 16.0   # pixels at 640 (one feature-map cell)
#: Largest relative output difference allowed between the two models at initialisation.
SAME_START_TOLERANCE = 1e-4


def model_settings(args: argparse.Namespace) -> dict[str, Any]:
    """This detector's settings for the benchmark (the rest are its defaults)."""
    factor = args.image_size / REFERENCE_SIZE
    return {"image_size": args.image_size,
            "anchors": AnchorSettings(scales=tuple(s * factor for s in args.scales),
                                      ratios=tuple(args.ratios)),
            "proposals": ProposalSettings(min_size=MIN_PROPOSAL_SIZE * factor),
            "matching": AnchorMatching(allow_border=args.allow_border)}


def build_models(args: argparse.Namespace, num_classes: int, device: torch.device,
                 check_images: Tensor) -> tuple[FasterRCNN, nn.Module, dict[str, Any]]:
    """This detector (from ``args.seed``), torchvision's with the same weights, and the check
    that they compute the same thing on ``check_images`` (RuntimeError when they do not)."""
    torch.manual_seed(args.seed)
    ours = FasterRCNN(num_classes, **model_settings(args))
    tv = build_torchvision(ours)
    copied = copy_weights(ours, tv)
    ours.to(device)
    tv.to(device)
    check = compare_outputs(ours, tv, check_images.to(device))
    check["tensors_copied"] = copied
    bad = {k: v for k, v in check.items()
           if isinstance(v, float) and k != "anchors" and v > SAME_START_TOLERANCE}
    if bad or check["anchors"] > 1e-3:
        raise RuntimeError(f"the two models differ at initialisation (relative differences "
                           f"above {SAME_START_TOLERANCE}, anchors in pixels): {check}")
    return ours, tv, check


class TorchvisionForEvaluation(nn.Module):
    """torchvision's model behind the interface ``pipeline.evaluate`` reads from this detector:
    ``propose(images)``, ``model(images)`` in eval mode, ``rpn.proposal_settings`` (its top-N is
    raised for scoring) and ``rpn.anchor_generator`` (for the anchor baseline)."""

    def __init__(self, tv: nn.Module, image_size: int) -> None:
        super().__init__()
        self.tv = tv
        self.rpn = _RPNView(tv, image_size)

    def forward(self, images: Tensor) -> list[dict[str, Tensor]]:
        return self.tv(list(images))

    @torch.no_grad()
    def propose(self, images: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per image ``(boxes (N, 4), scores (N,))`` of torchvision's proposal layer, best
        first, top-N of the current mode."""
        image_list, _, objectness, offsets, anchors = torchvision_rpn_outputs(self.tv, images)
        rpn = self.tv.rpn
        proposals = rpn.box_coder.decode(offsets.detach(), anchors).view(len(anchors), -1, 4)
        boxes, scores = rpn.filter_proposals(proposals, objectness, image_list.image_sizes,
                                             [proposals.shape[1]])
        return list(zip(boxes, scores))


class _RPNView:
    """``rpn.proposal_settings`` and ``rpn.anchor_generator`` of torchvision's RPN, in this
    detector's terms."""

    def __init__(self, tv: nn.Module, image_size: int) -> None:
        self._tv = tv
        self.anchor_generator = _AnchorView(tv, image_size)

    @property
    def proposal_settings(self) -> ProposalSettings:
        rpn = self._tv.rpn
        return ProposalSettings(min_size=rpn.min_size, nms_iou=rpn.nms_thresh,
                                pre_nms_top_n_train=rpn._pre_nms_top_n["training"],
                                post_nms_top_n_train=rpn._post_nms_top_n["training"],
                                pre_nms_top_n_test=rpn._pre_nms_top_n["testing"],
                                post_nms_top_n_test=rpn._post_nms_top_n["testing"])

    @proposal_settings.setter
    def proposal_settings(self, s: ProposalSettings) -> None:
        rpn = self._tv.rpn
        rpn.min_size, rpn.nms_thresh = s.min_size, s.nms_iou
        rpn._pre_nms_top_n = {"training": s.pre_nms_top_n_train, "testing": s.pre_nms_top_n_test}
        rpn._post_nms_top_n = {"training": s.post_nms_top_n_train,
                               "testing": s.post_nms_top_n_test}


class _AnchorView:
    """torchvision's anchors of one ``S x S`` image, called like
    :class:`detector.anchors.AnchorGenerator`: ``(feature_size, device) -> (A, 4)``."""

    stride = 16

    def __init__(self, tv: nn.Module, image_size: int) -> None:
        self._tv = tv
        self._size = image_size

    def __call__(self, feature_size: tuple[int, int], device: torch.device) -> Tensor:
        from torchvision.models.detection.image_list import ImageList
        images = ImageList(torch.zeros(1, 3, self._size, self._size, device=device),
                           [(self._size, self._size)])
        features = torch.zeros(1, 1, *feature_size, device=device)
        return self._tv.rpn.anchor_generator(images, [features])[0]


# -- data -------------------------------------------------------------------------------------
