"""It learns: overfit a few synthetic images, first the RPN alone, then the whole model.

The code path of 640 x 640, scaled down to run in about a minute of one core per seed:

- 64 x 64 images (a 4 x 4 feature map), three images with one flat-coloured rectangle each
  (colour = class) on dark noise, at overlapping places, so position alone cannot tell them
  apart; anchors of 16 / 32 / 64 pixels, minimum proposal size 4, a narrow fc6 / fc7 and 32 RoIs
  per image;
- border-crossing anchors kept (``rpn_allow_border=-1``: at 64 pixels most anchors cross the
  border) and ``rpn_pos_iou = rpn_neg_iou = 0.5``, so every anchor is trained;
- dropout off in the RoI head: this is a test of optimisation, not of regularisation (dropout
  itself: ``test_roi_heads.py``); with dropout 0.5 the 60-step run this test used to be left the
  planted objects at the edge of the two best detections, and a CPU with another vector unit
  missed one;
- one thread: on a shared 2-core machine, two threads cost three times the CPU for the same work.

What learning means here, asserted for every seed of :data:`SEEDS` (each seed draws other
images and other initial weights), with thresholds far from what any run reached:

- RPN stage, 30 Adam steps: the RPN loss falls below 25 % of its start, and the objectness
  separates the anchors the matcher labels positive from the negative ones: its ROC AUC is above
  0.9 in every image (untrained: 0.04 to 0.56). Not the proposals' recall at IoU 0.5: with one or
  two positive anchors per image the box regression is still rough after 30 steps, and whether a
  decoded anchor crosses IoU 0.5 went either way between machines and step counts.
- Whole model, 90 more Adam steps from the RPN's weights (as the frcnn stage): the RoI
  classification loss falls below 30 % of its start and the sum of all four below 50 %; the
  head gives every planted object's own box its class first (that class's probability minus the
  best other one, background included, > 0); and among each image's two best detections one has
  the object's class, at IoU >= 0.5 with it on average over the images and >= 0.3 in each (the
  worst image's box is the quantity that moved most between machines: 0.52 to 0.89 over the
  runs below and earlier variants of this test; a threshold of 0.5 on it was a coin toss).

Measured on 2026-12-04 (Intel Xeon with AVX-512, torch 2.14.1, one thread), ``python -m
tests.detector.test_learning``: asserted value (threshold) per seed 0 / 1 / 2, the same with
``ATEN_CPU_CAPABILITY`` unset (AVX-512) and ``avx2``, then ``default`` (no SIMD: every float sum
takes another path, and the joint stage another trajectory)::

    quantity (threshold)          unset = avx2          default
    rpn_loss_ratio (< 0.25)       0.040 0.051 0.061     0.040 0.051 0.061
    objectness_auc (> 0.9)        0.986 0.982 0.972     0.986 0.982 0.972
    roi_cls_ratio (< 0.3)         0.049 0.021 0.068     0.048 0.036 0.040
    loss_ratio (< 0.5)            0.081 0.079 0.091     0.135 0.062 0.064
    worst_class_margin (> 0)      0.962 0.881 0.979     0.960 0.662 0.683
    mean_top2_iou (>= 0.5)        0.816 0.840 0.811     0.819 0.842 0.892
    worst_top2_iou (>= 0.3)       0.746 0.813 0.770     0.745 0.791 0.884

Seeds 3 to 7, unset and default, also all pass; the worst of all 16 runs: 0.061, 0.972, 0.079,
0.135, 0.212, 0.723, 0.645. About a minute of one core per seed.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torchvision.ops import box_iou

from detector import (AnchorMatching, AnchorSettings, FasterRCNN, ProposalSettings,
                      RoIHeadSettings, RoISampling)
from detector.rpn import assign_targets, flatten_head_output

SIZE = 64
CONFIG = dict(image_size=SIZE, anchors=AnchorSettings(scales=(1.0, 2.0, 4.0)),
              matching=AnchorMatching(allow_border=-1.0, pos_iou=0.5, neg_iou=0.5),
              proposals=ProposalSettings(min_size=4.0),
              roi_head=RoIHeadSettings(hidden_dim=256, dropout=0.0),
              roi_sampling=RoISampling(num_samples=32, fg_fraction=0.5))
COLOURS = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0]])
SEEDS = (0, 1, 2)
RPN_STEPS, JOINT_STEPS = 30, 90
#: the asserted quantities and their thresholds ("<": must stay below, ">": must exceed)
THRESHOLDS = {"rpn_loss_ratio": ("<", 0.25), "objectness_auc": (">", 0.9),
              "roi_cls_ratio": ("<", 0.3), "loss_ratio": ("<", 0.5),
              "worst_class_margin": (">", 0.0), "mean_top2_iou": (">=", 0.5),
              "worst_top2_iou": (">=", 0.3)}

pytestmark = [pytest.mark.learning,
              pytest.mark.usefixtures("one_thread")]  # tests/conftest.py: torch on one thread


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


def train(model: FasterRCNN, optimiser: torch.optim.Optimizer, images: torch.Tensor,
          targets: list[dict], steps: int) -> list[dict[str, float]]:
    """``steps`` full-batch steps at a constant learning rate."""
    history = []
    for _ in range(steps):
        losses = model(images, targets)
        optimiser.zero_grad()
        sum(losses.values()).backward()
        optimiser.step()
        history.append({k: v.item() for k, v in losses.items()})
    return history


def loss_ratio(history: list[dict[str, float]], keys: tuple[str, ...]) -> float:
    """Mean of the last three steps' summed ``keys`` over the first three's."""
    def mean(part: list[dict[str, float]]) -> float:
        return sum(sum(h[k] for k in keys) for h in part) / len(part)
    return mean(history[-3:]) / mean(history[:3])


@torch.no_grad()
def objectness_auc(model: FasterRCNN, images: torch.Tensor, targets: list[dict]) -> float:
    """The smallest, over images, of the objectness's ROC AUC: the fraction of (positive,
    negative) anchor pairs, as the matcher labels them, that the RPN's object probability ranks
    the right way round (0.5: chance, 1: every positive above every negative)."""
    features = model._features(images)
    cls_map, _ = model.rpn.head(features)
    prob = flatten_head_output(cls_map, 2).softmax(dim=-1)[..., 1]  # (B, A)
    anchors = model.rpn.anchor_generator(features.shape[-2:], features.device)
    m = model.rpn.matching
    worst = 1.0
    for p, t in zip(prob, targets):
        # every anchor labelled: at most A positives, and negatives fill up to 2A
        labels, _ = assign_targets(anchors, t["boxes"], SIZE, pos_iou=m.pos_iou, neg_iou=m.neg_iou,
                                   num_samples=2 * anchors.shape[0], pos_fraction=0.5,
                                   generator=torch.Generator())  # leaves the global RNG alone
        pos, neg = p[labels == 1], p[labels == 0]
        # (P, 1) vs (1, N): ties count half
        pairs = (pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()
        worst = min(worst, float(pairs.mean()))
    return worst


@torch.no_grad()
def top2_ious(model: FasterRCNN, images: torch.Tensor, targets: list[dict]) -> list[float]:
    """Per image, the best IoU with the planted object of a detection of its class among the
    image's two best detections (0 when neither has the class)."""
    detections = model.eval()(images)
    out = []
    for det, target in zip(detections, targets):
        iou = box_iou(target["boxes"], det["boxes"][:2])[0]  # (<=2,)
        right = det["labels"][:2] == target["labels"][0]
        out.append(float((iou * right).max()) if len(iou) else 0.0)
    return out


@torch.no_grad()
def worst_class_margin(model: FasterRCNN, images: torch.Tensor, targets: list[dict]) -> float:
    """The smallest, over images, of the head's probability of the planted object's class minus
    its highest other probability (background included), on the object's own box as the RoI."""
    model.eval()
    features = model._features(images)
    boxes = torch.stack([t["boxes"] for t in targets])                  # (B, 1, 4)
    logits, _ = model.roi_heads.predict(model.roi_heads.pool_features(features, boxes))
    prob = logits.softmax(dim=-1)                                       # (B, K + 1)
    labels = torch.cat([t["labels"] for t in targets])                  # (B,)
    right = prob.gather(1, labels[:, None])[:, 0]
    other = prob.scatter(1, labels[:, None], -1.0).max(dim=1).values
    return float((right - other).min())


def learn(seed: int) -> dict[str, float]:
    """The two stages from ``seed``; every quantity of :data:`THRESHOLDS`."""
    torch.manual_seed(seed)
    images, targets = planted_images(3, seed=seed)

    # Stage 1: the RPN alone (rpn_only, as the pipeline's RPN stage).
    rpn_model = FasterRCNN(3, rpn_only=True, **CONFIG).train()
    untrained_auc = objectness_auc(rpn_model, images, targets)
    history = train(rpn_model, torch.optim.Adam(rpn_model.parameters(), lr=1e-4), images,
                     targets, RPN_STEPS)
    out = {"rpn_loss_ratio": loss_ratio(history, ("rpn_cls", "rpn_reg")),
           "objectness_auc": objectness_auc(rpn_model, images, targets),
           "untrained_auc": untrained_auc}  # reported, not asserted

    # Stage 2: the whole model, end to end, from stage 1's weights (as the frcnn stage).
    model = FasterRCNN(3, **CONFIG).train()
    model.load_state_dict(rpn_model.state_dict())
    head = list(model.roi_heads.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("roi_heads.")]
    optimiser = torch.optim.Adam([{"params": head, "lr": 1e-3}, {"params": rest, "lr": 1e-4}])
    history = train(model, optimiser, images, targets, JOINT_STEPS)
    out["roi_cls_ratio"] = loss_ratio(history, ("roi_cls",))
    out["loss_ratio"] = loss_ratio(history, ("rpn_cls", "rpn_reg", "roi_cls", "roi_reg"))
    out["worst_class_margin"] = worst_class_margin(model, images, targets)
    ious = top2_ious(model, images, targets)
    out["mean_top2_iou"], out["worst_top2_iou"] = sum(ious) / len(ious), min(ious)
    return out


def _holds(value: float, op: str, threshold: float) -> bool:
    return {"<": value < threshold, ">": value > threshold, ">=": value >= threshold}[op]


@pytest.mark.parametrize("seed", SEEDS)
def test_overfits_rpn_then_whole_model(seed: int) -> None:
    got = learn(seed)
    failed = {k: (got[k], *t) for k, t in THRESHOLDS.items() if not _holds(got[k], *t)}
    assert not failed, f"seed {seed}: {failed} (all: {got})"


if __name__ == "__main__":
    # python -m tests.detector.test_learning [SEED ...]: the measured values and thresholds
    import json
    import os

    torch.set_num_threads(1)
    for s in [int(a) for a in sys.argv[1:]] or SEEDS:
        print(json.dumps({"seed": s, "cpu": os.environ.get("ATEN_CPU_CAPABILITY", "unset"),
                          **{k: round(v, 3) for k, v in learn(s).items()}}), flush=True)
