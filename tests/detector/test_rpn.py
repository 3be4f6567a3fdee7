"""RPN: head shapes and layout, anchor targets (as properties), proposal layer, loss."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou, clip_boxes_to_image, nms, remove_small_boxes

from detector.anchors import AnchorGenerator, generate_anchors
from detector.matcher import label_anchors
from detector.rpn import (AnchorMatching, ProposalSettings, RegionProposalNetwork, RPNHead,
                          assign_targets, flatten_head_output, proposal_layer, rpn_loss)
from detector.sampler import sample_labels


# -- head -------------------------------------------------------------------------------------

def test_head_shapes_at_640() -> None:
    head = RPNHead(512, 9)
    scores, offsets = head(torch.randn(1, 512, 40, 40))
    assert scores.shape == (1, 18, 40, 40)
    assert offsets.shape == (1, 36, 40, 40)
    assert flatten_head_output(scores, 2).shape == (1, 14_400, 2)
    assert flatten_head_output(offsets, 4).shape == (1, 14_400, 4)


@pytest.mark.parametrize("b,y,x,j,c", [(0, 0, 0, 0, 0), (1, 2, 3, 4, 1), (0, 3, 1, 8, 3), (1, 0, 4, 5, 2)])
def test_flatten_puts_planted_value_on_its_anchor(b: int, y: int, x: int, j: int, c: int) -> None:
    a, k, h, w = 9, 4, 4, 5
    maps = torch.zeros(2, a * k, h, w)
    maps[b, j * k + c, y, x] = 7.0  # channel j*k + c: value c of the cell's anchor j
    flat = flatten_head_output(maps, k)
    i = (y * w + x) * a + j  # anchor index in generate_anchors' order
    assert flat[b, i, c] == 7.0
    assert flat.count_nonzero() == 1


def test_planted_objectness_selects_its_anchor_end_to_end() -> None:
    """A score planted in the head's maps comes out as that anchor's box from the RPN."""
    h, w, a = 4, 5, 9
    rpn = RegionProposalNetwork(
        anchor_generator=AnchorGenerator(stride=16, scales=(1, 2, 3), ratios=(0.5, 1.0, 2.0)),
        in_channels=8, matching=AnchorMatching(), reg_weight=1.0,
        proposals=ProposalSettings(min_size=0.0, post_nms_top_n_test=1)).eval()
    y, x, j = 2, 3, 7
    cls_map = torch.zeros(1, 2 * a, h, w)
    cls_map[0, j * 2 + 1, y, x] = 10.0  # object score of anchor j in cell (y, x)
    reg_map = torch.zeros(1, 4 * a, h, w)
    rpn.head.forward = lambda features: (cls_map, reg_map)
    proposals, _ = rpn(torch.zeros(1, 8, h, w), (64, 80))
    anchor = generate_anchors((h, w), 16, (1, 2, 3), (0.5, 1.0, 2.0))[(y * w + x) * a + j]
    torch.testing.assert_close(proposals.boxes[0, 0], clip_boxes_to_image(anchor, (64, 80)))


# -- matcher and sampler ----------------------------------------------------------------------

def test_label_anchors_on_a_hand_written_iou_matrix() -> None:
    # 6 anchors x 2 boxes; anchor 5 is outside the image.
    iou = torch.tensor([[[0.80, 0.00],   # >= 0.7: positive
                         [0.10, 0.40],   # best anchor of box 1 (0.4 < 0.7): positive
                         [0.35, 0.10],   # between thresholds: ignored
                         [0.05, 0.20],   # < 0.3: negative
                         [0.29, 0.00],   # < 0.3: negative
                         [0.95, 0.90]]]) # outside: ignored, and not box 1's best anchor
    valid = torch.tensor([[True, True]])
    inside = torch.tensor([True, True, True, True, True, False])
    labels, matched = label_anchors(iou, valid, inside, pos_iou=0.7, neg_iou=0.3)
    assert labels.tolist() == [[1, 1, -1, 0, 0, -1]]
    assert matched[0, :5].tolist() == [0, 1, 0, 1, 0]
    # The padding column never matches, and a box overlapping nothing has no "best anchor".
    labels, _ = label_anchors(iou, torch.tensor([[True, False]]), inside, pos_iou=0.7, neg_iou=0.3)
    assert labels.tolist() == [[1, 0, -1, 0, 0, -1]]
    zero = torch.zeros(1, 6, 1)
    labels, _ = label_anchors(zero, torch.tensor([[True]]), inside, pos_iou=0.7, neg_iou=0.3)
    assert labels.tolist() == [[0, 0, 0, 0, 0, -1]]


@settings(max_examples=40, deadline=None)
@given(pos=st.integers(0, 300), neg=st.integers(0, 300), num=st.integers(1, 300),
       frac=st.floats(0.05, 1.0), seed=st.integers(0, 1000))
def test_sample_labels_counts(pos: int, neg: int, num: int, frac: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((2, 700), -1)
    labels[0, torch.randperm(700, generator=g)[:pos]] = 1
    rest = (labels[0] == -1).nonzero().squeeze(1)
    labels[0, rest[torch.randperm(rest.numel(), generator=g)[:neg]]] = 0
    out = sample_labels(labels, num, frac, g)
    max_pos = int(num * frac)
    n_pos = min(pos, max_pos)
    assert (out[0] == 1).sum() == n_pos
    assert (out[0] == 0).sum() == min(neg, num - n_pos)
    assert ((out[0] == 1) <= (labels[0] == 1)).all() and ((out[0] == 0) <= (labels[0] == 0)).all()
    assert (out[1] == -1).all()  # a row with nothing labelled stays empty


# -- assign_targets ---------------------------------------------------------------------------

IMAGE = 128
ANCHORS = generate_anchors((8, 8), 16, (1, 2, 4), (0.5, 1.0, 2.0))  # 576 anchors, 16..64 px


def inside_mask(anchors: torch.Tensor, size: int, border: float) -> torch.Tensor:
    if border < 0:
        return torch.ones(anchors.shape[0], dtype=torch.bool)
    return ((anchors[:, :2] >= -border).all(1) & (anchors[:, 2:] <= size + border).all(1))


def reference_candidates(anchors: torch.Tensor, gt: torch.Tensor, size: int, border: float,
                         pos_iou: float, neg_iou: float) -> torch.Tensor:
    """Labels before sampling, written plainly, anchor by anchor and box by box."""
    inside = inside_mask(anchors, size, border)
    labels = torch.full((anchors.shape[0],), -1)
    if gt.shape[0] == 0:
        labels[inside] = 0
        return labels
    iou = box_iou(anchors, gt)
    best = iou.max(dim=1).values
    for i in range(anchors.shape[0]):
        if inside[i] and best[i] < neg_iou:
            labels[i] = 0
    for g in range(gt.shape[0]):
        col = iou[:, g].masked_fill(~inside, -1.0)
        if col.max() > 0:
            labels[(col == col.max()) & inside] = 1
    labels[(best >= pos_iou) & inside] = 1
    return labels


def random_gt(seed: int, n: int, size: int = IMAGE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size * 0.7
    wh = 6 + torch.rand(n, 2, generator=g) * size * 0.5
    return torch.cat((xy, (xy + wh).clamp(max=size)), dim=1)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(0, 12), border=st.sampled_from([0.0, 8.0, -1.0]),
       num=st.sampled_from([16, 64, 256]), frac=st.sampled_from([0.25, 0.5, 1.0]),
       pos_iou=st.sampled_from([0.5, 0.7]), neg_iou=st.sampled_from([0.1, 0.3]))
def test_assign_targets_follows_the_rules(seed: int, n: int, border: float, num: int, frac: float,
                                          pos_iou: float, neg_iou: float) -> None:
    gt = random_gt(seed, n)
    labels, matched = assign_targets(
        ANCHORS, gt, IMAGE, pos_iou=pos_iou, neg_iou=neg_iou, num_samples=num, pos_fraction=frac,
        allow_border=border, generator=torch.Generator().manual_seed(seed))
    assert labels.shape == matched.shape == (ANCHORS.shape[0],)
    assert labels.dtype == matched.dtype == torch.int64
    cand = reference_candidates(ANCHORS, gt, IMAGE, border, pos_iou, neg_iou)
    pos, neg = labels == 1, labels == 0
    assert (pos <= (cand == 1)).all() and (neg <= (cand == 0)).all()  # sampled from the rules
    n_pos = min(int((cand == 1).sum()), int(num * frac))
    assert pos.sum() == n_pos
    assert neg.sum() == min(int((cand == 0).sum()), num - n_pos)
    assert not (labels[~inside_mask(ANCHORS, IMAGE, border)] != -1).any()  # border: ignored
    if n:
        iou = box_iou(ANCHORS, gt)
        assert (iou[torch.arange(len(ANCHORS)), matched] == iou.max(dim=1).values).all()


def test_box_equal_to_an_anchor_makes_it_positive() -> None:
    i = 300
    gt = ANCHORS[i : i + 1].clone()
    assert inside_mask(ANCHORS, IMAGE, 0.0)[i]
    labels, matched = assign_targets(ANCHORS, gt, IMAGE, generator=torch.Generator().manual_seed(0))
    assert labels[i] == 1 and matched[i] == 0


def test_box_below_pos_iou_still_gets_its_best_anchor() -> None:
    gt = torch.tensor([[40.0, 40.0, 52.0, 47.0]])  # small: IoU with every anchor < 0.7
    iou = box_iou(ANCHORS, gt)[:, 0].masked_fill(~inside_mask(ANCHORS, IMAGE, 0.0), -1)
    assert iou.max() < 0.7
    labels, _ = assign_targets(ANCHORS, gt, IMAGE, allow_border=0.0,
                               generator=torch.Generator().manual_seed(0))
    assert (labels == 1).nonzero().squeeze(1).tolist() == (iou == iou.max()).nonzero().squeeze(1).tolist()


def test_image_without_boxes_is_all_background() -> None:
    labels, _ = assign_targets(ANCHORS, torch.zeros(0, 4), IMAGE)
    assert (labels == 1).sum() == 0
    assert (labels == 0).sum() == 256


def test_more_positives_than_allowed_keeps_a_random_128() -> None:
    anchors = generate_anchors((20, 20), 16, (1, 2, 4), (0.5, 1.0, 2.0))  # 320 x 320 image
    inside = inside_mask(anchors, 320, 0.0).nonzero().squeeze(1)
    gt = anchors[inside[:200]]  # 200 boxes, each equal to an anchor: >= 200 positives
    labels, _ = assign_targets(anchors, gt, 320, generator=torch.Generator().manual_seed(0))
    assert (labels == 1).sum() == 128 and (labels == 0).sum() == 128
    assert (labels[inside[:200]] == 1).sum() == 128  # ... drawn from those 200
    again, _ = assign_targets(anchors, gt, 320, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(labels, again)  # a random subset, from the generator
    same, _ = assign_targets(anchors, gt, 320, generator=torch.Generator().manual_seed(0))
    assert torch.equal(labels, same)


def test_border_anchors_are_kept_by_default_and_dropped_with_allow_border_zero() -> None:
    outside = (~inside_mask(ANCHORS, IMAGE, 0.0)).nonzero().squeeze(1)
    i = int(outside[0])
    gt = ANCHORS[i : i + 1].clamp(0, IMAGE)
    dropped, _ = assign_targets(ANCHORS, gt, IMAGE, allow_border=0.0)
    kept, _ = assign_targets(ANCHORS, gt, IMAGE)  # default: allow_border=-1, as AnchorMatching
    assert AnchorMatching().allow_border == -1.0
    assert dropped[i] == -1 and (dropped[outside] == -1).all()
    assert kept[i] == 1  # its own clipped box: the best anchor of that box
    assert (kept[outside] != -1).any()


def test_batch_equals_images_one_by_one() -> None:
    gts = [random_gt(1, 3), torch.zeros(0, 4), random_gt(2, 7)]
    # No subsampling (every candidate kept), so the result is deterministic.
    kw = dict(num_samples=ANCHORS.shape[0], pos_fraction=1.0)
    labels, matched = assign_targets(ANCHORS, gts, IMAGE, **kw)
    assert labels.shape == (3, ANCHORS.shape[0])
    for b, gt in enumerate(gts):
        one, one_matched = assign_targets(ANCHORS, gt, IMAGE, **kw)
        assert torch.equal(labels[b], one)
        if gt.shape[0]:
            assert torch.equal(matched[b][one == 1], one_matched[one == 1])


# -- proposal layer ---------------------------------------------------------------------------

def reference_proposals(anchors, logits, deltas, size, min_size, nms_iou, pre_n, post_n):
    """One image at a time with torchvision's own ops, in the spec's order."""
    out = []
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    for lg, dl in zip(logits, deltas):
        scores = lg.softmax(-1)[:, 1]
        boxes = clip_boxes_to_image(coder.decode_single(dl, anchors), (size, size))
        keep = remove_small_boxes(boxes, min_size)
        boxes, scores = boxes[keep], scores[keep]
        order = scores.argsort(descending=True)[:pre_n]
        boxes, scores = boxes[order], scores[order]
        keep = nms(boxes, scores, nms_iou)[:post_n]
        out.append((boxes[keep], scores[keep]))
    return out


@pytest.mark.parametrize("min_size,nms_iou,pre_n,post_n", [
    (16.0, 0.7, 12_000, 2_000), (16.0, 0.7, 6_000, 300), (4.0, 0.5, 200, 50), (30.0, 0.9, 50, 100),
    (0.0, 0.7, 1, 5)])
def test_proposal_layer_matches_per_image_reference(min_size, nms_iou, pre_n, post_n) -> None:
    g = torch.Generator().manual_seed(0)
    anchors = generate_anchors((10, 10), 16, (1, 2, 4), (0.5, 1.0, 2.0))  # 900 anchors
    logits = torch.randn(3, 900, 2, generator=g)
    deltas = torch.randn(3, 900, 4, generator=g) * 0.3
    props = proposal_layer(anchors, logits, deltas, 160, min_size=min_size, nms_iou=nms_iou,
                           pre_nms_top_n=pre_n, post_nms_top_n=post_n)
    ref = reference_proposals(anchors, logits, deltas, 160, min_size, nms_iou, pre_n, post_n)
    for (boxes, scores), (rb, rs) in zip(props.unpad(), ref):
        torch.testing.assert_close(boxes, rb)
        torch.testing.assert_close(scores, rs)


def test_proposal_layer_properties() -> None:
    g = torch.Generator().manual_seed(1)
    anchors = generate_anchors((10, 10), 16, (1, 2, 4, 8), (0.5, 1.0, 2.0))
    logits = torch.randn(2, anchors.shape[0], 2, generator=g)
    deltas = torch.randn(2, anchors.shape[0], 4, generator=g) * 0.5
    props = proposal_layer(anchors, logits, deltas, 160, min_size=16.0, nms_iou=0.6,
                           pre_nms_top_n=500, post_nms_top_n=40)
    assert props.boxes.shape == (2, 40, 4) and props.valid.shape == (2, 40)
    for boxes, scores in props.unpad():
        assert 0 < boxes.shape[0] <= 40
        assert (boxes >= 0).all() and (boxes <= 160).all()  # clipped
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 16).all()  # min size
        assert (scores[:-1] >= scores[1:]).all()  # best first
        iou = box_iou(boxes, boxes).fill_diagonal_(0)
        assert iou.max() <= 0.6 + 1e-6  # NMS
    assert (props.boxes[~props.valid] == 0).all() and (props.scores[~props.valid] == 0).all()
    # Each proposal is its anchor's decoded, clipped box with its score; padding has index -1.
    assert props.anchor_index.dtype == torch.int64 and (props.anchor_index[~props.valid] == -1).all()
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    for b in range(2):
        idx = props.anchor_index[b][props.valid[b]]
        assert idx.unique().numel() == idx.numel()
        boxes = clip_boxes_to_image(coder.decode_single(deltas[b, idx], anchors[idx]), (160, 160))
        torch.testing.assert_close(props.boxes[b][props.valid[b]], boxes)
        torch.testing.assert_close(props.scores[b][props.valid[b]], logits[b, idx].softmax(-1)[:, 1])


def test_proposal_layer_boxes_below_min_size_never_fill_a_slot() -> None:
    # Most boxes are below min_size: they survive NMS (nothing outranks them there) but must
    # come back as padding, and the slots stay packed, real proposals first.
    g = torch.Generator().manual_seed(2)
    anchors = generate_anchors((10, 10), 16, (1, 2, 4), (0.5, 1.0, 2.0))
    logits = torch.randn(2, anchors.shape[0], 2, generator=g)
    deltas = torch.randn(2, anchors.shape[0], 4, generator=g) * 0.3
    props = proposal_layer(anchors, logits, deltas, 160, min_size=56.0, nms_iou=0.5,
                           pre_nms_top_n=900, post_nms_top_n=300)
    ref = reference_proposals(anchors, logits, deltas, 160, 56.0, 0.5, 900, 300)
    for row, valid, (rb, _) in zip(props.boxes, props.valid, ref):
        n = int(valid.sum())
        assert 0 < n == rb.shape[0] < 300
        assert valid[:n].all() and not valid[n:].any()
        assert ((row[:n, 2:] - row[:n, :2]) >= 56).all() and (row[n:] == 0).all()


@pytest.mark.parametrize("planted", ["nan logit", "inf logit", "nan delta", "inf delta"])
def test_non_finite_anchor_is_dropped_and_real_proposals_stay_first(planted: str) -> None:
    """A NaN / inf objectness logit (or offset) at image 0's best anchor: that anchor is dropped
    (a NaN score would rank first in topk and take a slot as padding), the proposals are exactly
    the reference's without that anchor, and unpad() returns only real ones."""
    g = torch.Generator().manual_seed(3)
    anchors = generate_anchors((10, 10), 16, (1, 2, 4), (0.5, 1.0, 2.0))  # 900 anchors
    logits = torch.randn(2, 900, 2, generator=g)
    deltas = torch.randn(2, 900, 4, generator=g) * 0.3
    kw = dict(min_size=16.0, nms_iou=0.7, pre_nms_top_n=900, post_nms_top_n=900)
    i = int(proposal_layer(anchors, logits, deltas, 160, **kw).anchor_index[0, 0])  # the best
    value = float("nan") if planted.startswith("nan") else float("inf")
    bad_logits, bad_deltas = logits.clone(), deltas.clone()
    if planted.endswith("logit"):
        bad_logits[0, i, 1] = value
    else:
        bad_deltas[0, i, 0] = value
    props = proposal_layer(anchors, bad_logits, bad_deltas, 160, **kw)
    others = torch.arange(900) != i
    ref = [*reference_proposals(anchors[others], logits[:1, others], deltas[:1, others], 160,
                                16.0, 0.7, 900, 900),
           *reference_proposals(anchors, logits[1:], deltas[1:], 160, 16.0, 0.7, 900, 900)]
    for (boxes, scores), (rb, rs), valid in zip(props.unpad(), ref, props.valid):
        n = int(valid.sum())
        assert valid[:n].all() and not valid[n:].any() and n < 900  # packed, with padding
        assert boxes.shape[0] == n and torch.isfinite(boxes).all() and (scores > 0).all()
        torch.testing.assert_close(boxes, rb)
        torch.testing.assert_close(scores, rs)
    assert not (props.anchor_index[0] == i).any()


def test_rpn_uses_train_and_test_top_n() -> None:
    rpn = RegionProposalNetwork(
        anchor_generator=AnchorGenerator(stride=16, scales=(1, 2), ratios=(1.0,)), in_channels=8,
        matching=AnchorMatching(), reg_weight=1.0,
        proposals=ProposalSettings(min_size=0.0, nms_iou=1.0, pre_nms_top_n_train=100,
                                   post_nms_top_n_train=30, pre_nms_top_n_test=10,
                                   post_nms_top_n_test=20))
    feats = torch.randn(2, 8, 8, 8)
    assert rpn.train()(feats, (128, 128))[0].boxes.shape == (2, 30, 4)
    assert rpn.eval()(feats, (128, 128))[0].boxes.shape == (2, 10, 4)  # min(pre, post)


# -- loss -------------------------------------------------------------------------------------

def test_rpn_loss_normalisation() -> None:
    logits = torch.randn(2, 6, 2)
    deltas = torch.randn(2, 6, 4)
    targets = torch.randn(2, 6, 4)
    labels = torch.tensor([[1, 0, -1, -1, 0, 0], [-1, -1, 1, 0, -1, -1]])
    cls, reg = rpn_loss(logits, deltas, labels, targets, reg_weight=2.0, beta=1 / 9)
    m = labels >= 0
    expected_cls = torch.nn.functional.cross_entropy(logits[m], labels[m], reduction="sum") / m.sum()
    p = labels == 1
    expected_reg = 2.0 * torch.nn.functional.smooth_l1_loss(
        deltas[p], targets[p], beta=1 / 9, reduction="sum") / m.sum()
    torch.testing.assert_close(cls, expected_cls)
    torch.testing.assert_close(reg, expected_reg)
    # no positives: zero regression loss, even with non-finite targets elsewhere
    targets[...] = float("inf")
    _, reg = rpn_loss(logits, deltas, labels.clamp(max=0), targets)
    assert reg == 0


def loss_and_grads(loss_fn, logits: torch.Tensor, deltas: torch.Tensor):
    """``(loss values..., d/d logits, d/d deltas)`` of ``loss_fn(logits, deltas)``."""
    logits = logits.clone().requires_grad_()
    deltas = deltas.clone().requires_grad_()
    losses = loss_fn(logits, deltas)
    sum(losses).backward()
    return (*losses, logits.grad, deltas.grad)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_rpn_loss_ignores_non_finite_values_outside_the_sample(value: float) -> None:
    """An inf / NaN logit at an ignored anchor, or offset at an ignored or negative anchor (as an
    fp16 overflow would give), leaves both losses and every gradient exactly as without it;
    masking by multiplication would give NaN (inf * 0)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 2, generator=g)
    deltas = torch.randn(2, 6, 4, generator=g)
    targets = torch.randn(2, 6, 4, generator=g)
    labels = torch.tensor([[1, 0, -1, -1, 0, 0], [-1, -1, 1, 0, -1, -1]])
    bad_logits, bad_deltas = logits.clone(), deltas.clone()
    bad_logits[0, 2] = value  # ignored
    bad_logits[1, 5, 1] = value  # ignored
    bad_deltas[0, 3] = value  # ignored
    bad_deltas[1, 3, 2] = value  # negative: classified, not regressed
    loss = lambda lg, dl: rpn_loss(lg, dl, labels, targets, reg_weight=2.0)  # noqa: E731
    clean = loss_and_grads(loss, logits, deltas)
    dirty = loss_and_grads(loss, bad_logits, bad_deltas)
    for c, d in zip(clean, dirty):
        assert torch.isfinite(d).all()
        torch.testing.assert_close(d, c, rtol=0, atol=0)
