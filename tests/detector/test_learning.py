"""It learns: overfit a few synthetic images, first the RPN alone, then the whole model.

The code path of 640 x 640, scaled down to run in well under a minute of CPU:

- 64 x 64 images (a 4 x 4 feature map), three images with one flat-coloured rectangle each
  (colour = class) on dark noise, at overlapping places, so position alone cannot tell them
  apart; anchors of 16 / 32 / 64 pixels, minimum proposal size 4, a narrow fc6 / fc7;
- border-crossing anchors kept (``rpn_allow_border=-1``: at 64 pixels most anchors cross the
  border) and ``rpn_pos_iou = rpn_neg_iou = 0.5``, so every anchor is trained: with only ~144
  anchors, untrained "ignored" anchors would otherwise crowd the few top proposals;
- proposal recall at IoU 0.5 with the top-300 budget scaled to the image area (300 of 14,400
  anchors at 640 -> 3 of 144 here; the full top-300 holds every anchor at 64 pixels);
- one thread: on a shared 2-core machine, two threads cost three times the CPU for the same work.
"""

from __future__ import annotations


import pytest
import torch
from torchvision.ops import box_iou

from detector import FasterRCNN

SIZE = 64
CONFIG = dict(image_size=SIZE, anchor_scales=(1.0, 2.0, 4.0), rpn_allow_border=-1.0,
              rpn_pos_iou=0.5, rpn_neg_iou=0.5, rpn_min_size=4.0, roi_hidden_dim=256,
              roi_num_samples=64, roi_fg_fraction=0.5)
BUDGET = round(300 * (SIZE / 640) ** 2)  # 3
COLOURS = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0]])


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: torch on one thread


def planted_images(n: int, seed: int, sides: tuple[int, int] = (21, 40)) -> tuple[torch.Tensor, list[dict]]:
    """``n`` dark noisy images, each with one flat-coloured rectangle; the colour is the class."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, SIZE, SIZE, generator=g) * 0.2
    targets = []
    for i in range(n):
        w, h = (int(v) for v in torch.randint(*sides, (2,), generator=g))
        x0 = int(torch.randint(0, SIZE - w, (1,), generator=g))
        y0 = int(torch.randint(0, SIZE - h, (1,), generator=g))
        c = int(torch.randint(0, 3, (1,), generator=g))
        images[i, :, y0 : y0 + h, x0 : x0 + w] = COLOURS[c][:, None, None]
        targets.append({"boxes": torch.tensor([[x0, y0, x0 + w, y0 + h]], dtype=torch.float32),
                        "labels": torch.tensor([c + 1])})
    return images, targets


def recall(model: FasterRCNN, images: torch.Tensor, targets: list[dict], top: int) -> float:
    """Fraction of ground-truth boxes with a top-``top`` proposal of IoU >= 0.5."""
    was_training = model.training
    proposals = model.eval().propose(images)
    model.train(was_training)
    found = [box_iou(t["boxes"], boxes[:top]).max(dim=1).values >= 0.5
             for (boxes, _), t in zip(proposals, targets)]
    return torch.cat(found).float().mean().item()


def train(model: FasterRCNN, optimiser: torch.optim.Optimizer, images: torch.Tensor,
          targets: list[dict], steps: int) -> list[dict[str, float]]:
    history = []
    for _ in range(steps):
        losses = model(images, targets)
        optimiser.zero_grad()
        sum(losses.values()).backward()
        optimiser.step()
        history.append({k: v.item() for k, v in losses.items()})
    return history


def mean_of(history: list[dict[str, float]], keys: tuple[str, ...]) -> float:
    return sum(sum(h[k] for k in keys) for h in history) / len(history)


def test_overfits_rpn_then_whole_model() -> None:
    torch.manual_seed(0)
    images, targets = planted_images(3, seed=0)

    # Stage 1: the RPN alone (rpn_only, as the pipeline's RPN stage).
    rpn_model = FasterRCNN(3, rpn_only=True, **CONFIG).train()
    untrained = recall(rpn_model, images, targets, BUDGET)
    history = train(rpn_model, torch.optim.Adam(rpn_model.parameters(), lr=1e-4), images, targets, 30)
    rpn = ("rpn_cls", "rpn_reg")
    assert mean_of(history[-3:], rpn) < 0.25 * mean_of(history[:3], rpn)
    trained = recall(rpn_model, images, targets, BUDGET)
    assert trained >= 0.6 and trained >= untrained + 0.5, (untrained, trained)

    # Stage 2: the whole model, end to end, from stage 1's weights (as the frcnn stage).
    model = FasterRCNN(3, **CONFIG).train()
    model.load_state_dict(rpn_model.state_dict())
    head = list(model.roi_heads.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("roi_heads.")]
    optimiser = torch.optim.Adam([{"params": head, "lr": 3e-4}, {"params": rest, "lr": 1e-4}])
    history = train(model, optimiser, images, targets, 60)
    assert mean_of(history[-3:], ("roi_cls",)) < 0.3 * mean_of(history[:3], ("roi_cls",))
    everything = ("rpn_cls", "rpn_reg", "roi_cls", "roi_reg")
    assert mean_of(history[-3:], everything) < 0.5 * mean_of(history[:3], everything)

    # Every planted object is among its image's two best detections, with its class.
    model.eval()
    with torch.no_grad():
        detections = model(images)
    for det, target in zip(detections, targets):
        iou = box_iou(target["boxes"], det["boxes"][:2])  # (1, <=2)
        hit = (iou >= 0.5) & (target["labels"][:, None] == det["labels"][None, :2])
        assert hit.any(dim=1).all(), (target, det)
