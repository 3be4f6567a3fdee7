"""Anchor boxes: ``a = len(ratios) * len(scales)`` boxes centred on each feature-map cell.

Shapes: ``H x W`` feature map, ``a`` anchors per cell, ``A = H * W * a`` anchors per image.

Order (what the RPN head's reshapes follow, see :func:`detector.rpn.flatten_head_output`): cell
by cell in row-major order (``y`` outer, ``x`` inner), the ``a`` anchors of a cell together, and
within a cell **ratio-major**: anchor ``r * len(scales) + s`` has ratio ``ratios[r]`` and scale
``scales[s]``. So anchor ``i`` sits in cell ``(y, x) = divmod(i // a, W)``. This is also the order
of torchvision's ``AnchorGenerator``.

Geometry: the centre of cell ``(y, x)`` is the centre of its ``stride x stride`` input patch,
``((x + 0.5) * stride, (y + 0.5) * stride)`` (torchvision puts it at the patch's top-left
corner, half a cell away). An anchor of scale ``s`` and ratio ``r = height / width`` has side
``size = s * stride`` at ratio 1 and keeps the area ``size**2`` at every ratio:
``width = size / sqrt(r)``, ``height = size * sqrt(r)`` (not rounded to whole pixels).

Anchor types: the ``a`` (ratio, scale) pairs of a cell, in the same ratio-major order. A type
whose anchors all cross the image border by more than ``allow_border`` pixels is never labelled
for training (:func:`trainable_anchor_counts`, :func:`untrained_anchor_types`): its channels of
the RPN head then get no gradient at all (e.g. ratios 0.5 and 2 at scale 32, 724 x 362 and
362 x 724 pixels, in a 640 x 640 image with ``allow_border = 0``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "AnchorGenerator",
    "cell_anchors",
    "generate_anchors",
    "inside_image",
    "trainable_anchor_counts",
    "untrained_anchor_types",
]


def cell_anchors(stride: int, scales: Sequence[float], ratios: Sequence[float]) -> Tensor:
    """The ``a`` anchors of one cell, centred on ``(0, 0)``: ``(a, 4)`` float32, ratio-major."""
    rows = []
    for ratio in ratios:
        for scale in scales:
            size = float(scale) * stride
            half_w = 0.5 * size / math.sqrt(ratio)
            half_h = 0.5 * size * math.sqrt(ratio)
            rows.append((-half_w, -half_h, half_w, half_h))
    return torch.tensor(rows, dtype=torch.float32)


def generate_anchors(
    feature_size: tuple[int, int],
    stride: int = 16,
    scales: Sequence[float] = (8, 16, 32),
    ratios: Sequence[float] = (0.5, 1.0, 2.0),
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """All anchors of a feature map, in input-image pixels.

    Args:
        feature_size: ``(H, W)`` of the feature map.
        stride: input pixels per feature-map cell (16 for VGG-16 conv5_3); also the base size
            that ``scales`` multiply.
        scales: anchor sides at ratio 1, in units of ``stride``.
        ratios: height / width ratios.
        device: where to build them.

    Returns:
        ``(H * W * a, 4)`` float32 x1y1x2y2, in the order described in the module docstring
        (``feature_size=(40, 40)`` with the defaults gives 14,400).
    """
    if not scales or not ratios:
        raise ValueError(f"anchors need at least one scale and one ratio (got {scales}, {ratios})")
    if min(scales) <= 0 or min(ratios) <= 0:
        raise ValueError(f"anchor scales and ratios must be positive (got {scales}, {ratios})")
    h, w = feature_size
    base = cell_anchors(stride, scales, ratios).to(device)  # (a, 4)
    ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) * stride
    xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each, x varying fastest
    centres = torch.stack((cx, cy, cx, cy), dim=-1).reshape(h * w, 1, 4)  # (H*W, 1, 4)
    # (H*W, 1, 4) + (1, a, 4) -> (H*W, a, 4) -> (H*W*a, 4): cell-major, the a anchors of a cell together
    return (centres + base[None]).reshape(-1, 4)


class AnchorGenerator(nn.Module):
    """:func:`generate_anchors` with fixed settings and a cache per (feature size, device).

    Holds no parameters or buffers, so it leaves the state dict alone. Anchors are cached as
    plain tensors; a handful of feature sizes and devices is all a run ever sees.
    """

    def __init__(self, *, stride: int, scales: Sequence[float], ratios: Sequence[float]) -> None:
        super().__init__()
        self.stride = int(stride)
        self.scales = tuple(float(s) for s in scales)
        self.ratios = tuple(float(r) for r in ratios)
        if self.stride < 1:
            raise ValueError(f"anchor stride must be a positive integer (got {stride})")
        if not self.scales or not self.ratios or min(self.scales + self.ratios) <= 0:
            raise ValueError(
                f"anchor scales and ratios must be non-empty and positive (got {scales}, {ratios})")
        self._cache: dict[tuple[int, int, str], Tensor] = {}

    @property
    def num_per_cell(self) -> int:
        """``a``: anchors per feature-map cell."""
        return len(self.scales) * len(self.ratios)

    @property
    def types(self) -> tuple[tuple[float, float], ...]:
        """The ``a`` anchor types of a cell as ``(ratio, scale)`` pairs, ratio-major (anchor
        ``j`` of a cell has type ``types[j]``)."""
        return tuple((r, s) for r in self.ratios for s in self.scales)

    def forward(self, feature_size: tuple[int, int], device: torch.device) -> Tensor:
        """``(H * W * a, 4)`` float32 anchors for a feature map of ``feature_size`` on ``device``."""
        key = (int(feature_size[0]), int(feature_size[1]), str(device))
        anchors = self._cache.get(key)
        if anchors is None:
            anchors = generate_anchors(key[:2], self.stride, self.scales, self.ratios, device=device)
            self._cache[key] = anchors
        return anchors

    def extra_repr(self) -> str:
        return f"stride={self.stride}, scales={self.scales}, ratios={self.ratios}"


def inside_image(anchors: Tensor, image_size: tuple[int, int], allow_border: float) -> Tensor:
    """``(A, 4)`` -> ``(A,)`` bool: anchors inside the ``(height, width)`` image widened by
    ``allow_border`` pixels on every side; all true when ``allow_border < 0`` (border-crossing
    anchors kept)."""
    if allow_border < 0:
        return torch.ones(anchors.shape[0], dtype=torch.bool, device=anchors.device)
    h, w = image_size
    return ((anchors[:, 0] >= -allow_border) & (anchors[:, 1] >= -allow_border)
            & (anchors[:, 2] <= w + allow_border) & (anchors[:, 3] <= h + allow_border))


def trainable_anchor_counts(generator: AnchorGenerator, image_size: int | tuple[int, int],
                            allow_border: float) -> Tensor:
    """How many positions of each anchor type can be labelled for training in an image.

    An anchor is trainable when :func:`inside_image` keeps it. The feature map of an
    ``H x W`` image has ``(H // stride, W // stride)`` cells (VGG-16's four floor-halving
    max-pools).

    Args:
        generator: the anchors (stride, scales, ratios).
        image_size: ``(height, width)`` in pixels, or one int for a square image.
        allow_border: pixels an anchor may cross the border by; negative keeps every anchor.

    Returns:
        ``(a,)`` int64 counts in ``generator.types`` order, each in ``0 .. H*W`` cells (640 x 640
        with the defaults and ``allow_border = 0``: ``[952, 504, 0, 1024, 576, 64, 952, 504, 0]``).
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    anchors = generator((h // generator.stride, w // generator.stride), torch.device("cpu"))
    inside = inside_image(anchors, (int(h), int(w)), allow_border)
    # (H*W*a,) -> (H*W, a): one row per cell, one column per anchor type -> (a,)
    return inside.view(-1, generator.num_per_cell).sum(dim=0)


def untrained_anchor_types(generator: AnchorGenerator, image_size: int | tuple[int, int],
                           allow_border: float) -> list[tuple[float, float]]:
    """The ``(ratio, scale)`` anchor types with no trainable position at all (see
    :func:`trainable_anchor_counts`), in ``generator.types`` order; empty when every type trains."""
    counts = trainable_anchor_counts(generator, image_size, allow_border).tolist()
    return [t for t, n in zip(generator.types, counts) if n == 0]
