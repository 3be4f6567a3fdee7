"""Anchors: count, hand-computed grids, order, agreement with torchvision's AnchorGenerator, and
how many positions of each anchor type lie inside the image."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from detector.anchors import (AnchorGenerator, generate_anchors, trainable_anchor_counts,
                              untrained_anchor_types)


def test_count_at_640() -> None:
    anchors = generate_anchors((40, 40))
    assert anchors.shape == (14_400, 4)
    assert anchors.dtype == torch.float32


def test_hand_computed_tiny_grid() -> None:
    # 1 x 2 cells, one anchor per cell of side 16: exactly the two 16-pixel patches.
    anchors = generate_anchors((1, 2), stride=16, scales=(1,), ratios=(1,))
    torch.testing.assert_close(anchors, torch.tensor([[0.0, 0.0, 16.0, 16.0], [16.0, 0.0, 32.0, 16.0]]))


def test_hand_computed_ratios_keep_area() -> None:
    # One cell, scale 2 (side 32 at ratio 1), ratios h/w = 0.5 and 2, centre (8, 8).
    anchors = generate_anchors((1, 1), stride=16, scales=(2,), ratios=(0.5, 2.0))
    w, h = 32 / math.sqrt(0.5), 32 * math.sqrt(0.5)
    expected = torch.tensor([[8 - w / 2, 8 - h / 2, 8 + w / 2, 8 + h / 2],
                             [8 - h / 2, 8 - w / 2, 8 + h / 2, 8 + w / 2]])
    torch.testing.assert_close(anchors, expected)


def test_sizes_areas_and_order() -> None:
    scales, ratios, stride, (hh, ww) = (8, 16, 32), (0.5, 1.0, 2.0), 16, (3, 5)
    anchors = generate_anchors((hh, ww), stride, scales, ratios)
    a = len(scales) * len(ratios)
    widths = anchors[:, 2] - anchors[:, 0]
    heights = anchors[:, 3] - anchors[:, 1]
    centres_x = (anchors[:, 0] + anchors[:, 2]) / 2
    centres_y = (anchors[:, 1] + anchors[:, 3]) / 2
    for i in range(anchors.shape[0]):
        y, x = divmod(i // a, ww)  # cell row-major, the a anchors of a cell together
        r, s = divmod(i % a, len(scales))  # ratio-major within the cell
        assert centres_x[i].item() == pytest.approx((x + 0.5) * stride)
        assert centres_y[i].item() == pytest.approx((y + 0.5) * stride)
        assert (widths[i] * heights[i]).item() == pytest.approx((scales[s] * stride) ** 2, rel=1e-5)
        assert (heights[i] / widths[i]).item() == pytest.approx(ratios[r], rel=1e-5)


def test_count_follows_parameters() -> None:
    assert generate_anchors((20, 30), 16, (2, 4, 8, 16, 32), (0.33, 0.5, 1, 2, 3)).shape == (20 * 30 * 25, 4)


def test_matches_torchvision_anchor_generator() -> None:
    ours = generate_anchors((40, 40), 16, (8, 16, 32), (0.5, 1.0, 2.0))
    tv = TVAnchorGenerator(((128, 256, 512),), ((0.5, 1.0, 2.0),))
    images = ImageList(torch.zeros(1, 3, 640, 640), [(640, 640)])
    theirs = tv(images, [torch.zeros(1, 512, 40, 40)])[0]
    # torchvision centres anchors on the cells' top-left corners, ours on the patch centres
    # (SPEC): half a stride apart. It also rounds the cell anchors to whole pixels.
    theirs = theirs + 8.0
    assert theirs.shape == ours.shape
    # As sets, to within one pixel: rounding ours gives exactly torchvision's set ...
    assert set(map(tuple, ours.round().int().tolist())) == set(map(tuple, theirs.int().tolist()))
    assert (ours - theirs).abs().max() <= 1.0  # ... and in the very same order.


def test_generator_caches_per_size_and_device() -> None:
    gen = AnchorGenerator(stride=16, scales=(8, 16, 32), ratios=(0.5, 1.0, 2.0))
    first = gen((4, 5), torch.device("cpu"))
    assert gen((4, 5), torch.device("cpu")) is first
    assert gen((5, 4), torch.device("cpu")).shape == (5 * 4 * 9, 4)
    torch.testing.assert_close(first, generate_anchors((4, 5), 16, (8, 16, 32), (0.5, 1.0, 2.0)))
    assert gen.num_per_cell == 9
    assert not list(gen.state_dict())


@pytest.mark.parametrize("bad", [dict(scales=()), dict(ratios=(0.0,)), dict(scales=(-1.0,))])
def test_bad_parameters_are_refused(bad: dict) -> None:
    kwargs = dict(stride=16, scales=(8,), ratios=(1.0,)) | bad
    with pytest.raises(ValueError):
        AnchorGenerator(**kwargs)


# -- trainable positions per anchor type ------------------------------------------------------

def positions_inside(cells: int, stride: int, extent: float, side: int, border: float) -> int:
    """Cell centres ``(i + 0.5) * stride`` along one axis at which an anchor of ``extent`` pixels
    fits in ``[-border, side + border]``, counted one by one."""
    if border < 0:
        return cells
    return sum(1 for i in range(cells)
               if (i + 0.5) * stride - extent / 2 >= -border
               and (i + 0.5) * stride + extent / 2 <= side + border)


def counts_by_hand(height: int, width: int, scales, ratios, border: float) -> list[int]:
    """Per type (ratio-major), inside positions = positions along x times positions along y."""
    out = []
    for r in ratios:
        for s in scales:
            w, h = s * 16 / math.sqrt(r), s * 16 * math.sqrt(r)
            out.append(positions_inside(width // 16, 16, w, width, border)
                       * positions_inside(height // 16, 16, h, height, border))
    return out


def test_trainable_counts_at_640_with_the_default_anchors() -> None:
    gen = AnchorGenerator(stride=16, scales=(8, 16, 32), ratios=(0.5, 1.0, 2.0))
    assert gen.types == ((0.5, 8.0), (0.5, 16.0), (0.5, 32.0), (1.0, 8.0), (1.0, 16.0),
                         (1.0, 32.0), (2.0, 8.0), (2.0, 16.0), (2.0, 32.0))
    counts = trainable_anchor_counts(gen, 640, 0.0)
    assert counts.dtype == torch.int64
    assert counts.tolist() == [952, 504, 0, 1024, 576, 64, 952, 504, 0]
    assert untrained_anchor_types(gen, 640, 0.0) == [(0.5, 32.0), (2.0, 32.0)]  # 724x362, 362x724
    assert trainable_anchor_counts(gen, 640, -1.0).tolist() == [1600] * 9
    assert untrained_anchor_types(gen, 640, -1.0) == []
    # 64 pixels of slack: the 512-pixel types fit at 2 x 26 centres.
    assert trainable_anchor_counts(gen, 640, 64.0).tolist() == [1440, 936, 52, 1600, 1024, 256,
                                                                1440, 936, 52]
    assert untrained_anchor_types(gen, 640, 64.0) == []


@pytest.mark.parametrize("size,scales,ratios,border", [
    ((640, 640), (8, 16, 32), (0.5, 1.0, 2.0), 0.0), ((640, 640), (8, 16, 32), (0.5, 1.0, 2.0), 50.0),
    ((480, 640), (8, 16, 32), (0.5, 1.0, 2.0), 0.0), ((160, 160), (2, 4, 8), (0.5, 1.0, 2.0), 0.0),
    ((64, 64), (1, 2, 4), (0.25, 1.0, 3.0), 8.0), ((200, 120), (3, 5), (0.5, 2.0), -1.0)])
def test_trainable_counts_match_a_count_by_hand(size, scales, ratios, border) -> None:
    gen = AnchorGenerator(stride=16, scales=scales, ratios=ratios)
    counts = trainable_anchor_counts(gen, size, border)
    assert counts.tolist() == counts_by_hand(*size, scales, ratios, border)
    assert untrained_anchor_types(gen, size, border) == [
        t for t, n in zip(gen.types, counts_by_hand(*size, scales, ratios, border)) if n == 0]
