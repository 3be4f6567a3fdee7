"""Box maths: encode / decode against torchvision's BoxCoder, clamping, clipping, padding, IoU."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou

from detector.boxes import (DEFAULT_DELTA_CLAMP, batched_box_iou, clip, decode, encode,
                            large_enough, pad_boxes)


def random_boxes(n: int, seed: int, size: float = 640.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size * 0.8
    wh = 8.0 + torch.rand(n, 2, generator=g) * size * 0.5  # at most ~40x apart: within the clamp
    return torch.cat((xy, xy + wh), dim=1)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 50))
def test_round_trip(seed: int, n: int) -> None:
    anchors, boxes = random_boxes(n, seed), random_boxes(n, seed + 1)
    for weights in ((1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)):
        back = decode(anchors, encode(anchors, boxes, weights), weights)
        torch.testing.assert_close(back, boxes, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_agrees_with_torchvision_box_coder(weights: tuple[float, ...]) -> None:
    anchors, boxes = random_boxes(200, 0), random_boxes(200, 1)
    coder = BoxCoder(weights)
    torch.testing.assert_close(encode(anchors, boxes, weights), coder.encode_single(boxes, anchors))
    deltas = torch.randn(200, 4)
    torch.testing.assert_close(decode(anchors, deltas, weights),
                               coder.decode_single(deltas, anchors), atol=1e-3, rtol=1e-5)


def test_decode_clamps_sizes_so_exp_cannot_overflow() -> None:
    anchors = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    deltas = torch.tensor([[0.0, 0.0, 1e4, 1e30]])
    out = decode(anchors, deltas)
    assert torch.isfinite(out).all()
    side = 16 * math.exp(DEFAULT_DELTA_CLAMP)  # 1000 pixels
    torch.testing.assert_close(out, torch.tensor([[8 - side / 2, 8 - side / 2, 8 + side / 2, 8 + side / 2]]))


def test_decode_broadcasts_per_class() -> None:
    proposals = random_boxes(7, 3)
    deltas = torch.randn(7, 5, 4)
    out = decode(proposals[:, None], deltas, (10.0, 10.0, 5.0, 5.0))
    assert out.shape == (7, 5, 4)
    for k in range(5):
        torch.testing.assert_close(out[:, k], decode(proposals, deltas[:, k], (10.0, 10.0, 5.0, 5.0)))


def test_float32_even_for_low_precision_inputs() -> None:
    anchors = random_boxes(10, 0).bfloat16()
    assert encode(anchors, anchors).dtype == torch.float32
    assert decode(anchors, torch.zeros(10, 4, dtype=torch.float16)).dtype == torch.float32


def test_clip_and_large_enough() -> None:
    boxes = torch.tensor([[-5.0, -5.0, 700.0, 20.0], [10.0, 10.0, 30.0, 20.0]])
    clipped = clip(boxes, (640, 600))
    torch.testing.assert_close(clipped, torch.tensor([[0.0, 0.0, 600.0, 20.0], [10.0, 10.0, 30.0, 20.0]]))
    assert large_enough(clipped, 16.0).tolist() == [True, False]
    assert large_enough(clipped, 10.0).tolist() == [True, True]


def test_pad_boxes() -> None:
    boxes = [torch.ones(2, 4), torch.zeros(0, 4), torch.full((3, 4), 2.0)]
    labels = [torch.tensor([1, 2]), torch.zeros(0, dtype=torch.int64), torch.tensor([3, 3, 1])]
    padded, valid, (padded_labels,) = pad_boxes(boxes, labels)
    assert padded.shape == (3, 3, 4) and valid.shape == (3, 3)
    assert valid.tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    assert padded_labels.tolist() == [[1, 2, 0], [0, 0, 0], [3, 3, 1]]
    torch.testing.assert_close(padded[0, 2], torch.tensor([0.0, 0.0, 1.0, 1.0]))  # valid filler
    empty, empty_valid, _ = pad_boxes([torch.zeros(0, 4)])
    assert empty.shape == (1, 1, 4) and not empty_valid.any()


def test_batched_box_iou_is_per_image_box_iou() -> None:
    a = torch.stack([random_boxes(11, s) for s in range(3)])
    b = torch.stack([random_boxes(4, s + 10) for s in range(3)])
    out = batched_box_iou(a, b)
    assert out.shape == (3, 11, 4)
    for i in range(3):
        torch.testing.assert_close(out[i], box_iou(a[i], b[i]))
    degenerate = torch.zeros(1, 2, 4)
    assert batched_box_iou(degenerate, degenerate).eq(0).all()  # 0 / 0 -> 0, not NaN
