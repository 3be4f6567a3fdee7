"""Images: decoding (files and stored bytes), resizing to ``size x size``, box mapping.

Decoding, the one place for it:

- :func:`open_rgb`: an image file -> a fully decoded RGB ``PIL.Image`` (``prepare`` and
  ``predict`` read files this way; a truncated file is an error, never grey pixels);
- :func:`decode`: PNG / JPEG bytes of a prepared table -> float32 ``(3, H, W)`` RGB in [0, 1]
  (``torchvision.io.decode_image``; what training, evaluation and the sweep feed the model);
- :func:`to_tensor`: a ``PIL.Image`` -> the same float32 ``(3, H, W)`` layout.

Images go to the model as 0-1 RGB: ``detector.FasterRCNN`` normalises them itself.

Resizing, two modes (``data.resize``):

- ``stretch``: x and y scale independently, ``scale_x = size / W``, ``scale_y = size / H``; no
  padding.
- ``letterbox``: the aspect ratio is kept: ``s = min(size / W, size / H)``, the image is resized to
  ``round(W * s) x round(H * s)`` and pasted *centred* on a ``size x size`` canvas filled with the
  ImageNet mean colour (zero after the detector's normalisation). ``pad_x``, ``pad_y`` are the
  offsets of the pasted image's top-left corner. The per-axis scales are the exact ratios of the
  pasted size to the original (they differ from ``s`` by the rounding of the short side).

Either way a point maps as ``x' = x * scale_x + pad_x``, ``y' = y * scale_y + pad_y``
(:func:`scale_boxes`), and back with :func:`unscale_boxes`; ``frcnn predict`` uses the same
functions to report detections in the original image's pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageFile

if TYPE_CHECKING:  # torch is imported where tensors are made: prepare's workers never need it
    import torch

ResizeMode = Literal["stretch", "letterbox"]

#: What reading a broken, truncated, hostile or missing image file raises.
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

#: Canvas colour of letterbox padding: the ImageNet mean, RGB.
PAD_COLOUR = (124, 116, 104)


@dataclass(frozen=True)
class ResizeInfo:
    """How an image was resized; enough to map boxes both ways."""

    orig_width: int
    orig_height: int
    size: int
    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float


def resize_info(width: int, height: int, size: int, mode: ResizeMode) -> ResizeInfo:
    """The mapping :func:`resize_image` applies to a ``width x height`` image, without pixels."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if mode == "stretch":
        return ResizeInfo(width, height, size, size / width, size / height, 0.0, 0.0)
    if mode == "letterbox":
        new_w, new_h = _letterbox_size(width, height, size)
        return ResizeInfo(width, height, size, new_w / width, new_h / height,
                          float((size - new_w) // 2), float((size - new_h) // 2))
    raise ValueError(f"resize mode {mode!r} is not one of stretch, letterbox")


def resize_image(image: Image.Image, size: int, mode: ResizeMode) -> tuple[Image.Image, ResizeInfo]:
    """Resize an RGB image to ``size x size`` (bilinear, antialiased when shrinking).

    Returns:
        ``(resized image (size x size, the input's mode), ResizeInfo)``.
    """
    info = resize_info(image.width, image.height, size, mode)
    if mode == "stretch":
        if image.size == (size, size):
            return image, info
        return image.resize((size, size), Image.Resampling.BILINEAR), info
    new_w, new_h = _letterbox_size(image.width, image.height, size)
    inner = image if image.size == (new_w, new_h) else image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    if (new_w, new_h) == (size, size):
        return inner, info
    fill = PAD_COLOUR if image.mode == "RGB" else 0
    canvas = Image.new(image.mode, (size, size), fill)
    canvas.paste(inner, (int(info.pad_x), int(info.pad_y)))
    return canvas, info


def scale_boxes(boxes: np.ndarray, info: ResizeInfo) -> np.ndarray:
    """Original-image boxes -> resized-image boxes.

    Args:
        boxes: ``(N, 4)`` float x1y1x2y2 in the original image's pixel frame.
    Returns:
        ``(N, 4)`` float64 in the ``info.size`` frame.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scale = np.array([info.scale_x, info.scale_y, info.scale_x, info.scale_y])
    offset = np.array([info.pad_x, info.pad_y, info.pad_x, info.pad_y])
    return boxes * scale + offset


def unscale_boxes(boxes: np.ndarray, info: ResizeInfo, *, clip: bool = True) -> np.ndarray:
    """Resized-image boxes -> original-image boxes (the inverse of :func:`scale_boxes`).

    Args:
        boxes: ``(N, 4)`` float x1y1x2y2 in the ``info.size`` frame (e.g. detections).
        clip: clip the result to ``[0, orig_width] x [0, orig_height]`` (boxes reaching into the
            letterbox padding end at the image border).
    Returns:
        ``(N, 4)`` float64 in the original image's pixel frame.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scale = np.array([info.scale_x, info.scale_y, info.scale_x, info.scale_y])
    offset = np.array([info.pad_x, info.pad_y, info.pad_x, info.pad_y])
    out = (boxes - offset) / scale
    if clip:
        out[:, 0::2] = out[:, 0::2].clip(0.0, info.orig_width)
        out[:, 1::2] = out[:, 1::2].clip(0.0, info.orig_height)
    return out


def _letterbox_size(width: int, height: int, size: int) -> tuple[int, int]:
    scale = min(size / width, size / height)
    return (max(1, min(size, round(width * scale))), max(1, min(size, round(height * scale))))


# --------------------------------------------------------------------------------------------
# Decoding


def open_rgb(path: str | Path) -> Image.Image:
    """A fully decoded RGB image file (a truncated file is an error, never grey pixels).

    Raises:
        One of :data:`READ_ERRORS`: missing, unreadable, truncated or too large.
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def decode(data: bytes) -> "torch.Tensor":
    """PNG / JPEG bytes -> float32 ``(3, H, W)`` RGB in [0, 1].

    ``torchvision.io.decode_image`` (libpng / libjpeg): PNG decodes to the same pixels as PIL;
    JPEG may differ from PIL's decoder by a grey level or two.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_image

    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return _to_unit_float(decode_image(raw, mode=ImageReadMode.RGB))


def to_tensor(image: Image.Image) -> "torch.Tensor":
    """RGB ``PIL.Image`` -> float32 ``(3, H, W)`` in [0, 1]."""
    from torchvision.transforms.functional import pil_to_tensor

    return _to_unit_float(pil_to_tensor(image.convert("RGB")))


def _to_unit_float(pixels: "torch.Tensor") -> "torch.Tensor":
    """uint8 ``(3, H, W)`` -> float32 in [0, 1]."""
    return pixels.float().div_(255.0)
