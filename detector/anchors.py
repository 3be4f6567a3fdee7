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

Explicit shapes: instead of ``scales`` x ``ratios``, ``shapes`` lists the ``a`` anchors of a cell
as ``(width, height)`` pixels (fitted to a dataset, say: ``frcnn anchors --fit``), in the given
order. A shape is the type ``(ratio, scale) = (height / width, sqrt(width * height) / stride)``,
so everything that speaks of types works for both.

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
    "anchor_sizes",
    "cell_anchors",
    "describe_anchor_types",
    "generate_anchors",
    "inside_image",
    "trainable_anchor_counts",
    "untrained_anchor_types",
]


def anchor_sizes(stride: int, scales: Sequence[float], ratios: Sequence[float],
                 shapes: Sequence[Sequence[float]] | None = None) -> tuple[tuple[float, float], ...]:
    """``(width, height)`` in pixels of the ``a`` anchors of a cell: ``shapes`` as given, or
    ``scales`` x ``ratios`` ratio-major (side ``scale * stride`` at ratio 1, constant area)."""
    if shapes:
        sizes = tuple((float(w), float(h)) for w, h in shapes)
        if min(min(wh) for wh in sizes) <= 0:
            raise ValueError(f"anchor shapes must be positive (width, height) pairs (got {shapes})")
        return sizes
    if not scales or not ratios:
        raise ValueError(f"anchors need at least one scale and one ratio (got {scales}, {ratios})")
    if min(scales) <= 0 or min(ratios) <= 0:
        raise ValueError(f"anchor scales and ratios must be positive (got {scales}, {ratios})")
    return tuple((float(s) * stride / math.sqrt(r), float(s) * stride * math.sqrt(r))
                 for r in ratios for s in scales)


def cell_anchors(sizes: Sequence[tuple[float, float]]) -> Tensor:
    """The anchors of one cell centred on ``(0, 0)``: ``(a, 4)`` float32 x1y1x2y2, from their
    ``(width, height)`` (:func:`anchor_sizes`)."""
    half = torch.tensor(sizes, dtype=torch.float64) / 2  # (a, 2) half width, half height
    return torch.cat([-half, half], dim=1).float()


def generate_anchors(
    feature_size: tuple[int, int],
    stride: int = 16,
    scales: Sequence[float] = (8, 16, 32),
    ratios: Sequence[float] = (0.5, 1.0, 2.0),
    *,
    shapes: Sequence[Sequence[float]] | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """All anchors of a feature map, in input-image pixels.

    Args:
        feature_size: ``(H, W)`` of the feature map.
        stride: input pixels per feature-map cell (16 for VGG-16 conv5_3); also the base size
            that ``scales`` multiply.
        scales: anchor sides at ratio 1, in units of ``stride``.
        ratios: height / width ratios.
        shapes: ``(width, height)`` pixels of each anchor of a cell, used instead of ``scales``
            and ``ratios`` when given.
        device: where to build them.

    Returns:
        ``(H * W * a, 4)`` float32 x1y1x2y2, in the order described in the module docstring
        (``feature_size=(40, 40)`` with the defaults gives 14,400).
    """
    h, w = feature_size
    base = cell_anchors(anchor_sizes(stride, scales, ratios, shapes)).to(device)  # (a, 4)
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

    def __init__(self, *, stride: int, scales: Sequence[float], ratios: Sequence[float],
                 shapes: Sequence[Sequence[float]] | None = None) -> None:
        super().__init__()
        self.stride = int(stride)
        self.scales = tuple(float(s) for s in scales)
        self.ratios = tuple(float(r) for r in ratios)
        if self.stride < 1:
            raise ValueError(f"anchor stride must be a positive integer (got {stride})")
        #: ``(width, height)`` pixels of each anchor of a cell (:func:`anchor_sizes`)
        self.sizes = anchor_sizes(self.stride, self.scales, self.ratios, shapes)
        self.shapes = self.sizes if shapes else None
        self._cache: dict[tuple[int, int, str], Tensor] = {}

    @property
    def num_per_cell(self) -> int:
        """``a``: anchors per feature-map cell."""
        return len(self.sizes)

    @property
    def types(self) -> tuple[tuple[float, float], ...]:
        """The ``a`` anchor types of a cell as ``(ratio, scale)`` pairs, in cell order (anchor
        ``j`` of a cell has type ``types[j]``): ratio-major for ``scales`` x ``ratios``; for
        explicit shapes ``(height / width, sqrt(width * height) / stride)``."""
        if self.shapes is None:
            return tuple((r, s) for r in self.ratios for s in self.scales)
        return tuple((h / w, math.sqrt(w * h) / self.stride) for w, h in self.sizes)

    def feature_size(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """``(H, W)`` cells of the feature map of an image of ``image_size`` (``(height,
        width)`` or one side): ``side // stride``, VGG-16's four floor-halving max-pools. The
        one place this is computed."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        return int(h) // self.stride, int(w) // self.stride

    def num_anchors(self, image_size: int | tuple[int, int]) -> int:
        """``H * W * a``: the anchors of an image of ``image_size``."""
        h, w = self.feature_size(image_size)
        return h * w * self.num_per_cell

    def forward(self, feature_size: tuple[int, int], device: torch.device) -> Tensor:
        """``(H * W * a, 4)`` float32 anchors for a feature map of ``feature_size`` on ``device``."""
        key = (int(feature_size[0]), int(feature_size[1]), str(device))
        anchors = self._cache.get(key)
        if anchors is None:
            anchors = generate_anchors(key[:2], self.stride, self.scales, self.ratios,
                                       shapes=self.shapes, device=device)
            self._cache[key] = anchors
        return anchors

    def extra_repr(self) -> str:
        if self.shapes is not None:
            return f"stride={self.stride}, shapes={self.shapes}"
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
    anchors = generator(generator.feature_size((h, w)), torch.device("cpu"))
    inside = inside_image(anchors, (int(h), int(w)), allow_border)
    # (H*W*a,) -> (H*W, a): one row per cell, one column per anchor type -> (a,)
    return inside.view(-1, generator.num_per_cell).sum(dim=0)


def untrained_anchor_types(generator: AnchorGenerator, image_size: int | tuple[int, int],
                           allow_border: float) -> list[tuple[float, float]]:
    """The ``(ratio, scale)`` anchor types with no trainable position at all (see
    :func:`trainable_anchor_counts`), in ``generator.types`` order; empty when every type trains."""
    counts = trainable_anchor_counts(generator, image_size, allow_border).tolist()
    return [t for t, n in zip(generator.types, counts) if n == 0]


def describe_anchor_types(generator: AnchorGenerator, types: Sequence[tuple[float, float]]) -> str:
    """``"ratio 0.5 x scale 32 (724x362 px), ..."``: anchor types of ``generator`` with their
    sizes in pixels (explicit shapes: ``"shape 24x40 px"``)."""
    sizes = dict(zip(generator.types, generator.sizes))
    parts = []
    for t in types:
        w, h = sizes[t]
        parts.append(f"shape {w:.0f}x{h:.0f} px" if generator.shapes is not None
                     else f"ratio {t[0]:g} x scale {t[1]:g} ({w:.0f}x{h:.0f} px)")
    return ", ".join(parts)
