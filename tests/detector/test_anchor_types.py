"""Every anchor type trains at the default settings; with ``allow_border = 0`` two never do.

At 640 x 640 with scales 8 / 16 / 32 and ratios 0.5 / 1 / 2, the 724 x 362 and 362 x 724 anchors
(ratio 0.5 and 2 at scale 32) never lie inside the image. With ``rpn_allow_border = 0`` they are
never labelled, so their RPN head channels get exactly zero gradient. The default (``-1``, as
torchvision and detectron2) trains them. Checked on ground truth drawn like the synthetic set's
(sides log-uniform in 24..560 pixels, aspect ratios in [1/2, 2]), with a narrow RPN head on random
features (the channel layout is what matters, not the width)."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Iterator

import pytest
import torch

from detector.anchors import AnchorGenerator, untrained_anchor_types
from detector.boxes import encode, pad_boxes
from detector.rpn import AnchorMatching, RPNHead, assign_targets, flatten_head_output, rpn_loss

LARGE_TYPES = [(0.5, 32.0), (2.0, 32.0)]  # (ratio, scale): 724 x 362 and 362 x 724 at 640


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def realistic_boxes(n_images: int, seed: int, size: int = 640) -> list[torch.Tensor]:
    """1 to 8 boxes per image, sides log-uniform in 24..560 px, width / height in [1/2, 2]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_images):
        n = int(torch.randint(1, 9, (1,), generator=g))
        side = torch.exp(math.log(24) + torch.rand(n, generator=g) * math.log(560 / 24))
        aspect = torch.exp((torch.rand(n, generator=g) * 2 - 1) * math.log(2))
        wh = torch.stack((side * aspect.sqrt(), side / aspect.sqrt()), dim=1).clamp(8, size)
        xy = torch.rand(n, 2, generator=g) * (size - wh)
        out.append(torch.cat((xy, xy + wh), dim=1))
    return out


@pytest.mark.parametrize("allow_border,untrained", [(None, []), (0.0, LARGE_TYPES)])
def test_which_anchor_types_get_labels_and_gradient_at_640(allow_border, untrained) -> None:
    """Default: every type is labelled and gets gradient in its 2 cls and 4 reg channels.
    ``allow_border = 0``: exactly the two large types get none, and exactly zero."""
    matching = AnchorMatching() if allow_border is None else AnchorMatching(allow_border=allow_border)
    gen = AnchorGenerator(stride=16, scales=(8, 16, 32), ratios=(0.5, 1.0, 2.0))
    anchors = gen((40, 40), torch.device("cpu"))  # (14400, 4)
    gt, gt_valid, _ = pad_boxes(realistic_boxes(16, seed=0))
    labels, matched = assign_targets(anchors, gt, 640, gt_valid=gt_valid,
                                     generator=torch.Generator().manual_seed(0), **asdict(matching))
    # (B, H*W*a) -> (B, H*W, a): one column per anchor type
    by_type = labels.view(16, 1600, 9)
    labelled = (by_type >= 0).any(dim=1).any(dim=0)  # (a,)
    positive = (by_type == 1).any(dim=1).any(dim=0)

    torch.manual_seed(0)
    head = RPNHead(16, 9, mid_channels=16)
    cls_map, reg_map = head(torch.randn(16, 16, 40, 40))
    matched_boxes = gt.gather(1, matched[..., None].expand(-1, -1, 4))
    cls_loss, reg_loss = rpn_loss(flatten_head_output(cls_map, 2), flatten_head_output(reg_map, 4),
                                  labels, encode(anchors[None], matched_boxes))
    (cls_loss + reg_loss).backward()
    # (2a, C, 1, 1) -> (a, 2 * C): channels j*2 + c belong to type j; (4a, ...) -> (a, 4 * C)
    cls_grad = torch.cat((head.cls.weight.grad.view(9, -1), head.cls.bias.grad.view(9, 2)), 1)
    reg_grad = torch.cat((head.reg.weight.grad.view(9, -1), head.reg.bias.grad.view(9, 4)), 1)

    types = list(gen.types)
    expected_dead = [types.index(t) for t in untrained]
    assert untrained_anchor_types(gen, 640, matching.allow_border) == untrained
    assert (~labelled).nonzero().flatten().tolist() == expected_dead
    assert (~positive).nonzero().flatten().tolist() == expected_dead
    assert (cls_grad.abs().sum(1) == 0).nonzero().flatten().tolist() == expected_dead
    assert (reg_grad.abs().sum(1) == 0).nonzero().flatten().tolist() == expected_dead
