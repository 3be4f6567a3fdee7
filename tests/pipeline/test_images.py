"""Resizing: stretch and letterbox geometry, boxes scaled exactly as the pixels, round trips."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from pipeline.datasets.resize import (PAD_COLOUR, ResizeInfo, resize_image, resize_info,
                                      scale_boxes, unscale_boxes)


def _white_box_image(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    """Black image with white pixels exactly covering the continuous box [x1, y1, x2, y2]."""
    image = Image.new("RGB", (width, height), (0, 0, 0))
    x1, y1, x2, y2 = box
    ImageDraw.Draw(image).rectangle([x1, y1, x2 - 1, y2 - 1], fill=(255, 255, 255))
    return image


def _bright_extent(image: Image.Image) -> tuple[int, int, int, int]:
    """Continuous extent of the pixels brighter than half: [x1, y1, x2, y2]."""
    mask = np.asarray(image.convert("L")) > 127
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_stretch_bccd_geometry():
    # BCCD: 640x480 -> 640x640 scales x by 1 and y by 4/3.
    info = resize_info(640, 480, 640, "stretch")
    assert (info.scale_x, info.scale_y, info.pad_x, info.pad_y) == (1.0, 4 / 3, 0.0, 0.0)
    boxes = scale_boxes(np.array([[453, 81, 555, 182]]), info)
    np.testing.assert_allclose(boxes, [[453, 108, 555, 242.6666667]], rtol=1e-7)


def test_letterbox_geometry_centred():
    info = resize_info(640, 480, 320, "letterbox")
    assert (info.scale_x, info.scale_y) == (0.5, 0.5)
    assert (info.pad_x, info.pad_y) == (0.0, 40.0)   # 240 rows pasted in the middle of 320
    tall = resize_info(100, 300, 60, "letterbox")
    assert (tall.scale_x, tall.scale_y, tall.pad_x, tall.pad_y) == (0.2, 0.2, 20.0, 0.0)


def test_letterbox_scales_are_the_exact_pixel_ratios():
    # 333 * (64 / 500) = 42.6 rounds to 43: the y scale is 43 / 333, not 64 / 500.
    info = resize_info(500, 333, 64, "letterbox")
    assert info.scale_x == 64 / 500 and info.scale_y == 43 / 333
    whole = scale_boxes(np.array([[0, 0, 500, 333]]), info)
    np.testing.assert_allclose(whole, [[0, info.pad_y, 64, info.pad_y + 43]])


@pytest.mark.parametrize("mode", ["stretch", "letterbox"])
def test_resize_image_size_and_padding(mode):
    image = Image.new("RGB", (640, 480), (10, 200, 30))
    resized, info = resize_image(image, 128, mode)
    assert resized.size == (128, 128) and resized.mode == "RGB"
    assert info == resize_info(640, 480, 128, mode)
    top_left = resized.getpixel((0, 0))
    centre = resized.getpixel((64, 64))
    assert centre == (10, 200, 30)
    assert top_left == ((10, 200, 30) if mode == "stretch" else PAD_COLOUR)


@pytest.mark.parametrize("mode", ["stretch", "letterbox"])
@pytest.mark.parametrize("size, box", [((640, 480), (100, 60, 300, 420)),
                                       ((200, 500), (20, 100, 180, 140)),
                                       ((97, 61), (3, 5, 90, 33))])
def test_boxes_follow_the_pixels(mode, size, box):
    """Resize an image whose only white pixels fill a box: the scaled box is where they land."""
    image = _white_box_image(*size, box)
    resized, info = resize_image(image, 96, mode)
    scaled = scale_boxes(np.array([box], dtype=float), info)[0]
    # Bilinear resampling blurs each edge by at most one output pixel.
    np.testing.assert_allclose(_bright_extent(resized), scaled, atol=1.0)


@settings(max_examples=100, deadline=None)
@given(width=st.integers(1, 3000), height=st.integers(1, 3000), size=st.integers(32, 1024),
       mode=st.sampled_from(["stretch", "letterbox"]),
       fractions=st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4))
def test_scale_unscale_round_trip(width, height, size, mode, fractions):
    info = resize_info(width, height, size, mode)
    a, b, c, d = fractions
    box = np.array([[min(a, c) * width, min(b, d) * height, max(a, c) * width, max(b, d) * height]])
    scaled = scale_boxes(box, info)
    assert (scaled >= -1e-9).all() and (scaled <= size + 1e-9).all()
    np.testing.assert_allclose(unscale_boxes(scaled, info), box, rtol=1e-9, atol=1e-7)


def test_unscale_clips_padding_to_the_image():
    info = resize_info(640, 480, 640, "letterbox")  # pad_y = 80
    boxes = unscale_boxes(np.array([[-5.0, 0.0, 700.0, 100.0]]), info)
    np.testing.assert_allclose(boxes, [[0.0, 0.0, 640.0, 20.0]])
    raw = unscale_boxes(np.array([[-5.0, 0.0, 700.0, 100.0]]), info, clip=False)
    np.testing.assert_allclose(raw, [[-5.0, -80.0, 700.0, 20.0]])


def test_empty_boxes_keep_their_shape():
    info = ResizeInfo(10, 10, 20, 2.0, 2.0, 0.0, 0.0)
    assert scale_boxes(np.zeros((0, 4)), info).shape == (0, 4)
    assert unscale_boxes([], info).shape == (0, 4)


def test_bad_mode_and_size_raise():
    with pytest.raises(ValueError, match="crop"):
        resize_info(10, 10, 20, "crop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="0x10"):
        resize_info(0, 10, 20, "stretch")
