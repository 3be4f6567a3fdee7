"""pipeline.images: decoding (PNG exactly as PIL, JPEG within a grey level or two), stretch and
letterbox geometry, boxes scaled exactly as the pixels, round trips."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from pipeline.images import (PAD_COLOUR, READ_ERRORS, ResizeInfo, decode, open_rgb,
                             resize_image, resize_info, scale_boxes, to_tensor, unscale_boxes)


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


# --------------------------------------------------------------------------------------------
# Decoding


def _photo(mode: str = "RGB", size: tuple[int, int] = (37, 23)) -> Image.Image:
    """Noise with structure (a gradient plus random pixels), in ``mode``."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    pixels[..., 0] = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :]
    return Image.fromarray(pixels).convert(mode)


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_decode_png_matches_pil_exactly(mode):
    """PNG bytes (what ``prepare`` writes by default) decode to PIL's own RGB pixels, exactly,
    as float32 (3, H, W) in [0, 1], whatever the PNG's colour type."""
    image = _photo(mode)
    data = _encoded(image, "PNG")
    tensor = decode(data)
    assert tensor.shape == (3, 23, 37) and tensor.dtype == torch.float32
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255
    assert torch.equal(tensor, torch.from_numpy(expected).permute(2, 0, 1))
    assert float(tensor.min()) >= 0.0 and float(tensor.max()) <= 1.0


def test_decode_jpeg_is_within_a_few_grey_levels_of_pil():
    data = _encoded(_photo(), "JPEG")
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)
    got = decode(data).permute(1, 2, 0).numpy() * 255
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 3


def test_to_tensor_matches_decode_of_the_same_pixels():
    for mode in ("RGB", "L"):
        image = _photo(mode)
        tensor = to_tensor(image)
        assert tensor.shape == (3, 23, 37) and tensor.dtype == torch.float32
        assert torch.equal(tensor, decode(_encoded(image, "PNG")))


def test_decode_refuses_bytes_that_are_no_image():
    with pytest.raises(RuntimeError):
        decode(b"not an image at all")


def test_open_rgb_decodes_fully_and_refuses_truncated_files(tmp_path):
    path = tmp_path / "a.png"
    _photo("L").save(path)
    image = open_rgb(path)
    assert image.mode == "RGB" and image.size == (37, 23)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(READ_ERRORS):
        open_rgb(truncated)
    with pytest.raises(READ_ERRORS):
        open_rgb(tmp_path / "missing.png")
