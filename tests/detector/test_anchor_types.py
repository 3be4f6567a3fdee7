"""Every anchor type trains at the default settings; with ``allow_border = 0`` two never do.

At 640 x 640 with scales 8 / 16 / 32 and ratios 0.5 / 1 / 2, the 724 x 362 and 362 x 724 anchors
(ratio 0.5 and 2 at scale 32) never lie inside the image. With ``rpn_allow_border = 0`` they are
never labelled, so their RPN head channels get exactly zero gradient, and a trained model still
ranks their proposals above every trained one. The default (``-1``, as torchvision and
detectron2) trains them.

- the labels and gradients at 640, on ground truth drawn like the synthetic set's (sides
  log-uniform in 24..560 pixels, aspect ratios in [1/2, 2]), with a narrow RPN head on random
  features (the channel layout is what matters, not the width);
- a short RPN training at 160 x 160 with scales 2 / 4 / 8 (the same geometry as 640 with
  8 / 16 / 32: the large types are 181 x 90.5, wider than the image) on fixed backbone features,
  with the top-300 budget scaled to the image area (300 -> 19, pre-NMS 6,000 -> 375).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict

import pytest
import torch

from detector import AnchorSettings, FasterRCNN, ProposalSettings, RoIHeadSettings
from detector.anchors import AnchorGenerator, untrained_anchor_types
from detector.boxes import encode, pad_boxes
from detector.rpn import AnchorMatching, RPNHead, assign_targets, flatten_head_output, rpn_loss

LARGE_TYPES = [(0.5, 32.0), (2.0, 32.0)]  # (ratio, scale): 724 x 362 and 362 x 724 at 640


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: torch on one thread


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


# -- a briefly trained RPN's top proposals ------------------------------------------------------

SIZE = 160
SCALES = (2.0, 4.0, 8.0)  # x 16 px: 32 / 64 / 128 at ratio 1, 181 x 90.5 at ratio 0.5
TOP = round(300 * (SIZE / 640) ** 2)  # 19
SMALL_LARGE_TYPES = [(0.5, 8.0), (2.0, 8.0)]


def planted_images(n: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Dark noise with one bright rectangle of 24..72 px a side each (96..288 px at 640)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, SIZE, SIZE, generator=g) * 0.2
    boxes = []
    for i in range(n):
        w, h = (int(v) for v in torch.randint(24, 72, (2,), generator=g))
        x0 = int(torch.randint(0, SIZE - w, (1,), generator=g))
        y0 = int(torch.randint(0, SIZE - h, (1,), generator=g))
        images[i, :, y0 : y0 + h, x0 : x0 + w] = torch.rand(3, 1, 1, generator=g) * 0.8 + 0.2
        boxes.append(torch.tensor([[x0, y0, x0 + w, y0 + h]], dtype=torch.float32))
    return images, boxes


def type_channels(head: RPNHead, j: int) -> torch.Tensor:
    """The weights and biases of anchor type ``j``'s 2 cls and 4 reg channels, flattened."""
    return torch.cat([head.cls.weight[2 * j : 2 * j + 2].flatten(), head.cls.bias[2 * j : 2 * j + 2],
                      head.reg.weight[4 * j : 4 * j + 4].flatten(), head.reg.bias[4 * j : 4 * j + 4]])


@pytest.fixture(scope="module")
def untrained_model_and_features() -> tuple[FasterRCNN, torch.Tensor, torch.Tensor]:
    """A random model at 160 (allow_border 0), backbone features of two images, padded boxes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="2 anchor type"):
        model = FasterRCNN(1, image_size=SIZE, anchors=AnchorSettings(scales=SCALES),
                           matching=AnchorMatching(allow_border=0.0), rpn_only=True,
                           proposals=ProposalSettings(min_size=4.0, pre_nms_top_n_test=375,
                                                      post_nms_top_n_test=TOP),
                           roi_head=RoIHeadSettings(hidden_dim=8))
    images, boxes = planted_images(2, seed=0)
    with torch.no_grad():
        features = model._features(images)  # fixed: only the RPN trains below
    torch.set_num_threads(threads)
    return model, features, pad_boxes(boxes)[:2]


@pytest.mark.learning  # make test runs it again with ATEN_CPU_CAPABILITY=default
@pytest.mark.parametrize("allow_border", [0.0, -1.0])
def test_trained_rpn_top_proposals_hold_no_untrained_types(untrained_model_and_features,
                                                           allow_border: float) -> None:
    """20 Adam steps of the RPN; "untrained" types are those whose 6 head channels are still
    bit for bit their initial values. ``allow_border = 0``: the two large types, and their
    proposals lead every image's top 19 (the trained types' background scores fell, theirs did
    not). Default ``-1``: no type is untrained, and the large ones, trained as background (the
    objects are far smaller), lead no image's top 19. Measured (2026-12-04, ATEN_CPU_CAPABILITY
    unset, avx2 and default alike): allow_border 0: 19 of each image's top 19 from the two large
    types; -1: none of them, nor any untrained type."""
    base, features, (gt, gt_valid) = untrained_model_and_features
    model = copy.deepcopy(base)
    model.rpn.matching = AnchorMatching(allow_border=allow_border)
    head = model.rpn.head
    before = [type_channels(head, j).detach().clone() for j in range(9)]
    optimiser = torch.optim.Adam(model.rpn.parameters(), lr=1e-3)
    model.train()
    for _ in range(20):
        _, losses = model.rpn(features, (SIZE, SIZE), gt, gt_valid, need_proposals=False)
        optimiser.zero_grad()
        sum(losses.values()).backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        proposals, _ = model.rpn(features, (SIZE, SIZE))

    types = list(model.rpn.anchor_generator.types)
    large = torch.tensor([types.index(t) for t in SMALL_LARGE_TYPES])  # 2 and 8
    unchanged = [j for j in range(9) if torch.equal(type_channels(head, j), before[j])]
    assert [types.index(t) for t in model.untrained_anchor_types] == unchanged
    assert proposals.valid.sum(dim=1).tolist() == [TOP, TOP]
    top_types = proposals.anchor_index % 9  # (B, TOP) anchor type of each proposal, best first
    from_untrained = torch.isin(top_types, torch.tensor(unchanged, dtype=torch.int64)).sum(dim=1)
    led_by_large = torch.isin(top_types[:, 0], large)  # (B,)
    if allow_border == 0:
        assert unchanged == large.tolist()
        assert (from_untrained > 0).all() and led_by_large.all(), top_types
    else:
        assert unchanged == []
        assert (from_untrained == 0).all() and not led_by_large.any(), top_types
