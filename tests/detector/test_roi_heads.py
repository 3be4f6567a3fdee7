"""Fast R-CNN head: RoI sampling properties, pooling shapes, losses and inference post-processing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import batched_nms, box_iou

from detector.boxes import pad_boxes
from detector import roi_heads
from detector.boxes import clip, decode
from detector.roi_heads import DetectionSettings, RoIHeads, RoISampling, sample_rois

SAMPLING = dict(num_samples=32, fg_fraction=0.25, fg_iou=0.5, bg_iou_low=0.0, bg_iou_high=0.5)


def random_boxes(g: torch.Generator, n: int, size: float = 200.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * size * 0.7
    wh = 4 + torch.rand(n, 2, generator=g) * size * 0.3
    return torch.cat((xy, xy + wh), dim=1)


def make_head(num_classes: int = 3, **detection) -> RoIHeads:
    return RoIHeads(in_channels=8, num_classes=num_classes, pool="align", pool_size=7,
                    hidden_dim=16, spatial_scale=1 / 16, reg_weight=1.0,
                    sampling=RoISampling(**SAMPLING), detection=DetectionSettings(**detection))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n_gt=st.lists(st.integers(0, 5), min_size=1, max_size=3),
       n_prop=st.integers(0, 60))
def test_sample_rois_properties(seed: int, n_gt: list[int], n_prop: int) -> None:
    g = torch.Generator().manual_seed(seed)
    b = len(n_gt)
    gts = [random_boxes(g, n) for n in n_gt]
    gt_boxes, gt_valid, (gt_labels,) = pad_boxes(gts, [torch.randint(1, 4, (n,), generator=g) for n in n_gt])
    proposals = torch.stack([random_boxes(g, max(n_prop, 1)) for _ in range(b)])
    valid = torch.rand(b, proposals.shape[1], generator=g) < 0.8
    valid &= n_prop > 0
    rois = sample_rois(proposals, valid, gt_boxes, gt_valid, gt_labels, generator=g, **SAMPLING)
    s = min(32, proposals.shape[1] + gt_boxes.shape[1])
    assert rois.boxes.shape == (b, s, 4) and rois.labels.shape == (b, s)
    for i in range(b):
        lab = rois.labels[i]
        fg, bg = lab > 0, lab == 0
        assert fg.sum() <= int(32 * 0.25)
        if n_gt[i]:
            iou = box_iou(rois.boxes[i], gts[i]).max(dim=1).values
            assert (iou[fg] >= 0.5).all() and (iou[bg] < 0.5).all()
            # foreground: the matched box is its best box and gives the class
            m_iou = box_iou(rois.boxes[i][fg], rois.matched[i][fg]).diagonal()
            torch.testing.assert_close(m_iou, iou[fg])
            assert fg.sum() >= min(n_gt[i], 8)  # the ground-truth boxes themselves are candidates
        else:
            assert fg.sum() == 0
        n_cand = int(valid[i].sum()) + n_gt[i]
        assert (lab >= 0).sum() == min(32, n_cand)  # enough background here to fill up


def test_sample_rois_labels_are_classes() -> None:
    gt = torch.tensor([[[10.0, 10.0, 60.0, 60.0], [100.0, 100.0, 150.0, 170.0]]])
    labels = torch.tensor([[3, 2]])
    proposals = torch.tensor([[[12.0, 11.0, 60.0, 62.0], [100.0, 100.0, 150.0, 160.0], [0, 0, 5.0, 5.0]]])
    rois = sample_rois(proposals, torch.ones(1, 3, dtype=torch.bool), gt, torch.ones(1, 2, dtype=torch.bool),
                       labels, **SAMPLING)
    got = {tuple(b.tolist()): int(c) for b, c in zip(rois.boxes[0], rois.labels[0]) if c >= 0}
    assert got == {(12.0, 11.0, 60.0, 62.0): 3, (100.0, 100.0, 150.0, 160.0): 2, (0.0, 0.0, 5.0, 5.0): 0,
                   (10.0, 10.0, 60.0, 60.0): 3, (100.0, 100.0, 150.0, 170.0): 2}


@pytest.mark.parametrize("pool", ["align", "pool"])
def test_pooling_and_prediction_shapes(pool: str) -> None:
    head = RoIHeads(in_channels=8, num_classes=4, pool=pool, pool_size=7, hidden_dim=16,
                    spatial_scale=1 / 16, reg_weight=1.0, sampling=RoISampling(),
                    detection=DetectionSettings())
    feats = torch.randn(2, 8, 10, 10)
    boxes = torch.tensor([[[0.0, 0.0, 50.0, 50.0]] * 3, [[10.0, 20.0, 150.0, 90.0]] * 3])
    pooled = head.pool_features(feats, boxes)
    assert pooled.shape == (6, 8, 7, 7)
    # rows of image 1 pool image 1's features
    assert torch.equal(pooled[3:], head.pool_features(feats[1:], boxes[1:]))
    logits, deltas = head.predict(pooled)
    assert logits.shape == (6, 5) and deltas.shape == (6, 5, 4)


def ones_head(dropout: float) -> RoIHeads:
    """A head whose fc6 and fc7 output exactly 1 everywhere (zero weights, bias 1), so what
    follows each is its dropout mask scaled by ``1 / (1 - p)``."""
    head = RoIHeads(in_channels=8, num_classes=3, pool="align", pool_size=7, hidden_dim=64,
                    spatial_scale=1 / 16, reg_weight=1.0, sampling=RoISampling(**SAMPLING),
                    detection=DetectionSettings(), dropout=dropout)
    for layer in (head.fc6, head.fc7):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.ones_(layer.bias)
    return head


def fc_outputs(head: RoIHeads, pooled: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(fc6 output as fc7 receives it, fc7 output as cls_score / bbox_pred receive it,
    logits)`` of ``head.predict(pooled)``."""
    seen: list[torch.Tensor] = []
    hooks = [layer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
             for layer in (head.fc7, head.cls_score, head.bbox_pred)]
    logits, _ = head.predict(pooled)
    for hook in hooks:
        hook.remove()
    assert torch.equal(seen[1], seen[2])  # one mask for both predictors
    return seen[0], seen[1], logits


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_dropout_after_fc6_and_fc7_in_training_only(p: float) -> None:
    torch.manual_seed(0)
    head = ones_head(p)
    pooled = torch.randn(300, 8, 7, 7)
    after_fc6, after_fc7, logits = fc_outputs(head.train(), pooled)
    for x in (after_fc6, after_fc7):  # 300 x 64 values each: the rate to within ~6 sigma
        assert (x == 0).float().mean().item() == pytest.approx(p, abs=0.02)
        assert torch.allclose(x[x != 0], torch.tensor(1 / (1 - p)))  # the rest scaled up
    assert not torch.equal(after_fc6 == 0, after_fc7 == 0)  # two independent masks
    assert not torch.equal(fc_outputs(head, pooled)[2], logits)  # random in training
    # Eval mode: no dropout, deterministic.
    after_fc6, after_fc7, logits = fc_outputs(head.eval(), pooled)
    assert (after_fc6 == 1).all() and (after_fc7 == 1).all()
    assert torch.equal(fc_outputs(head, pooled)[2], logits)


def test_dropout_zero_disables_it_and_bad_rates_are_refused() -> None:
    head = ones_head(0.0).train()
    after_fc6, after_fc7, _ = fc_outputs(head, torch.randn(300, 8, 7, 7))
    assert (after_fc6 == 1).all() and (after_fc7 == 1).all()
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="dropout must be in"):
            ones_head(bad)


def test_head_loss_uses_foreground_true_class_only() -> None:
    head = make_head()
    logits = torch.randn(4, 4)
    deltas = torch.randn(4, 4, 4)
    labels = torch.tensor([2, 0, -1, 1])
    targets = torch.randn(4, 4)
    out = head.loss(logits, deltas, labels, targets)
    ce = torch.nn.functional.cross_entropy(logits[[0, 1, 3]], labels[[0, 1, 3]], reduction="sum") / 3
    reg = (torch.nn.functional.smooth_l1_loss(deltas[0, 2], targets[0], reduction="sum")
           + torch.nn.functional.smooth_l1_loss(deltas[3, 1], targets[3], reduction="sum")) / 3
    torch.testing.assert_close(out["roi_cls"], ce)
    torch.testing.assert_close(out["roi_reg"], reg)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_head_loss_ignores_non_finite_values_outside_the_sample(value: float) -> None:
    """An inf / NaN logit or offset in an empty slot, an offset of a background RoI or of a
    foreground RoI's other classes leaves both losses and every gradient exactly as without it
    (masking by multiplication would give NaN: inf * 0)."""
    head = make_head()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g)
    deltas = torch.randn(5, 4, 4, generator=g)
    labels = torch.tensor([2, 0, -1, 1, -1])
    targets = torch.randn(5, 4, generator=g)
    bad_logits, bad_deltas = logits.clone(), deltas.clone()
    bad_logits[2] = value  # empty slot
    bad_logits[4, 0] = value  # empty slot
    bad_deltas[2] = value  # empty slot
    bad_deltas[1, 0] = value  # background: no regression
    bad_deltas[0, 1] = value  # foreground of class 2: class 1's offsets unused

    def loss_and_grads(lg: torch.Tensor, dl: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lg, dl = lg.clone().requires_grad_(), dl.clone().requires_grad_()
        out = head.loss(lg, dl, labels, targets)
        (out["roi_cls"] + out["roi_reg"]).backward()
        return out["roi_cls"], out["roi_reg"], lg.grad, dl.grad

    for clean, dirty in zip(loss_and_grads(logits, deltas), loss_and_grads(bad_logits, bad_deltas)):
        assert torch.isfinite(dirty).all()
        torch.testing.assert_close(dirty, clean, rtol=0, atol=0)


def test_postprocess_threshold_nms_top_k_and_images() -> None:
    head = make_head(num_classes=2, score_thresh=0.3, nms_iou=0.3, detections_per_image=2)
    # image 0: three proposals, the first two overlapping heavily; image 1: one proposal + padding.
    proposals = torch.tensor([
        [[10.0, 10.0, 50.0, 50.0], [12.0, 10.0, 52.0, 50.0], [100.0, 100.0, 190.0, 220.0]],
        [[0.0, 0.0, 40.0, 40.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    valid = torch.tensor([[True, True, True], [True, False, False]])
    big = 10.0
    logits = torch.tensor([[0.0, big, 0.0],      # class 1, sure
                           [0.0, big - 1, 0.0],  # class 1, same place: suppressed by NMS
                           [0.0, 0.0, big],      # class 2, box beyond the image: clipped
                           [big, 0.0, 0.0],      # image 1, background: below threshold
                           [0.0, big, 0.0],      # padding: ignored
                           [0.0, big, 0.0]])
    deltas = torch.zeros(6, 3, 4)
    dets = head.postprocess(logits, deltas, proposals, valid, (200, 200))
    assert len(dets) == 2
    assert dets[0]["labels"].tolist() == [1, 2]
    torch.testing.assert_close(dets[0]["boxes"],
                               torch.tensor([[10.0, 10.0, 50.0, 50.0], [100.0, 100.0, 190.0, 200.0]]))
    assert (dets[0]["scores"][:-1] >= dets[0]["scores"][1:]).all()
    assert dets[1]["boxes"].shape == (0, 4) and dets[1]["labels"].dtype == torch.int64
    # the same box under two classes is kept for each class (per-class NMS)
    head = make_head(num_classes=2, score_thresh=0.1, nms_iou=0.3, detections_per_image=10)
    two = torch.tensor([[0.0, 5.0, 5.0]])
    dets = head.postprocess(two, torch.zeros(1, 3, 4), proposals[:1, :1], valid[:1, :1], (200, 200))
    assert sorted(dets[0]["labels"].tolist()) == [1, 2]


def reference_detections(head: RoIHeads, logits, deltas, proposals, valid, size):
    """Image by image with torchvision's ``batched_nms`` (classes as groups)."""
    d, k = head.detection, head.num_classes
    b, n, _ = proposals.shape
    out = []
    for i in range(b):
        rows = slice(i * n, (i + 1) * n)
        scores = logits[rows].softmax(-1)[:, 1:]
        boxes = clip(decode(proposals[i][:, None], deltas[rows, 1:], roi_heads.ROI_BOX_WEIGHTS), size)
        labels = torch.arange(1, k + 1).expand(n, k)
        wh = boxes[..., 2:] - boxes[..., :2]
        keep = (scores > d.score_thresh) & valid[i][:, None] & (wh >= roi_heads.MIN_DETECTION_SIZE).all(-1)
        bx, sc, lb = boxes[keep], scores[keep], labels[keep]
        kept = batched_nms(bx, sc, lb, d.nms_iou)[:d.detections_per_image]
        out.append((bx[kept], sc[kept], lb[kept]))
    return out


@pytest.mark.parametrize("one_call_max", [0, 10**6])  # image by image, and one call for all
def test_postprocess_matches_per_image_batched_nms(monkeypatch, one_call_max: int) -> None:
    monkeypatch.setattr(roi_heads, "ONE_NMS_CALL_MAX_BOXES", one_call_max)
    g = torch.Generator().manual_seed(3)
    b, n, k = 3, 40, 4
    head = make_head(num_classes=k, score_thresh=0.1, nms_iou=0.4, detections_per_image=15)
    proposals = torch.stack([random_boxes(g, n) for _ in range(b)])
    valid = torch.rand(b, n, generator=g) > 0.2
    valid[2] = False  # an image without a proposal
    logits = 2 * torch.randn(b * n, k + 1, generator=g)
    deltas = 0.5 * torch.randn(b * n, k + 1, 4, generator=g)
    dets = head.postprocess(logits, deltas, proposals, valid, (200, 200))
    ref = reference_detections(head, logits, deltas, proposals, valid, (200, 200))
    assert [len(x["boxes"]) for x in dets] == [len(r[0]) for r in ref]
    assert len(dets[0]["boxes"]) == 15 and len(dets[2]["boxes"]) == 0  # top-k bites; empty image
    for det, (bx, sc, lb) in zip(dets, ref):
        torch.testing.assert_close(det["boxes"], bx)
        torch.testing.assert_close(det["scores"], sc)
        assert det["labels"].tolist() == lb.tolist()
