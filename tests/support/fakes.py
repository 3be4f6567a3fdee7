"""Scripted stand-ins for the detector, for the evaluation tests.

:class:`FakeModel` offers what :mod:`pipeline.evaluation.core` uses of a model: ``propose``
(honouring the eval top-N of ``rpn.proposal_settings``, which the evaluation raises to its
largest budget), ``rpn.anchor_generator`` and, as a detector, ``forward``.
"""

from __future__ import annotations

import types
from typing import Sequence

import torch
from torch import nn

from detector.anchors import AnchorGenerator
from detector.rpn import ProposalSettings
from pipeline.annotations import GroundTruth


class FakeModel(nn.Module):
    """Returns scripted proposals / detections image by image, honouring the eval top-N.

    Images are answered in the order they come: ``propose`` gives the next images' proposals
    (scored 1 down to 0), ``forward`` the detections of the batch that ``propose`` just saw.
    """

    def __init__(self, proposals: list[torch.Tensor], detections: list[dict] | None = None):
        super().__init__()
        self.rpn = types.SimpleNamespace(
            proposal_settings=ProposalSettings(post_nms_top_n_test=300),
            anchor_generator=AnchorGenerator(stride=16, scales=(1.0, 2.0), ratios=(0.5, 1.0)))
        self.proposals, self.detections, self.seen = proposals, detections, 0
        self.top_n_seen: set[int] = set()

    def propose(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        n = self.rpn.proposal_settings.post_nms_top_n_test
        self.top_n_seen.add(n)
        out = [(p[:n], torch.linspace(1, 0, p[:n].shape[0]))
               for p in self.proposals[self.seen:self.seen + images.shape[0]]]
        self.seen += images.shape[0]
        return out

    def forward(self, images: torch.Tensor) -> list[dict]:  # the batch propose() just saw
        return self.detections[self.seen - images.shape[0]:self.seen]


def perfect_model(splits: Sequence[GroundTruth]) -> FakeModel:
    """Proposals: each image's boxes first, then junk; detections: the boxes, labelled right.
    One object serves as RPN and detector (``forward`` answers the batch just proposed)."""
    props, dets = [], []
    for split in splits:
        for boxes, labels in zip(split.boxes, split.labels):
            props.append(torch.cat([boxes, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3)]))
            dets.append({"boxes": boxes.clone(), "scores": torch.full((boxes.shape[0],), 0.9),
                         "labels": labels.clone()})
    return FakeModel(props, dets)
