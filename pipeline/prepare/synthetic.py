"""The built-in synthetic detection set, generated deterministically from a seed.

Every image is ``CANVAS x CANVAS`` (640) RGB: a background (a two-colour gradient in a random
direction, low in saturation, with pixel noise and a few faint lines as clutter) and 1 to 8
objects. Each class is a distinct shape with its own hue and texture (solid, stripes, checks or a
shading gradient), so classes differ by outline, colour and texture, while the instance colour is
jittered. Object sizes (the square root of the box area) are log-uniform over ``[MIN_SIDE,
MAX_SIDE]`` = 24..560 pixels, spanning the anchor scales, with aspect ratios in ``[1/2, 2]``.
Objects are drawn largest first and a new object may cover at most 40% of any earlier (larger)
one, so objects overlap without hiding each other. Boxes are the drawn shapes' tight extents in
continuous pixel coordinates.

Image ``i`` depends only on ``(seed, i)`` (its own ``numpy`` generator), so the set is the same
whatever the number of worker processes and whatever the order they run in.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from pipeline.prepare.records import ImageItem, Reading, SyntheticKey

CANVAS = 640
MIN_SIDE, MAX_SIDE = 24.0, 560.0
MAX_OBJECTS = 8
MAX_COVER = 0.4          # a later (smaller) object covers at most this fraction of an earlier one
PLACEMENT_TRIES = 30

#: Class names, in class-id order (id = position + 1). ``data.synthetic_classes`` takes the first K.
SHAPES = ("rectangle", "ellipse", "triangle", "diamond", "cross", "ring",
          "hexagon", "star", "trapezoid", "semicircle", "arrow", "frame")
TEXTURES = ("solid", "stripes", "checks", "shade")


@dataclass(frozen=True)
class SyntheticObject:
    """One object: its class index (0-based, into SHAPES), integer box and colour."""

    cls: int
    x0: int
    y0: int
    x1: int  # exclusive: the shape covers pixels x0..x1-1, its box is [x0, y0, x1, y1]
    y1: int
    rgb: tuple[int, int, int]


def class_names(num_classes: int) -> tuple[str, ...]:
    """The first ``num_classes`` shape names (ids 1..K)."""
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"synthetic classes must be in 1..{len(SHAPES)}, got {num_classes}")
    return SHAPES[:num_classes]


def layout(seed: int, index: int, num_classes: int) -> list[SyntheticObject]:
    """The objects of image ``index`` (cheap: no pixels). Same as :func:`render` draws."""
    return _layout(_rng(seed, index), num_classes)


def render(seed: int, index: int, num_classes: int) -> tuple[Image.Image, list[SyntheticObject]]:
    """Draw image ``index``: ``(RGB CANVAS x CANVAS image, its objects)``."""
    rng = _rng(seed, index)
    objects = _layout(rng, num_classes)
    pixels = _background(rng)
    for obj in objects:
        _draw_object(pixels, obj, rng)
    return Image.fromarray(pixels, "RGB"), objects


def boxes_and_labels(objects: list[SyntheticObject]) -> tuple[np.ndarray, np.ndarray]:
    """``(boxes (N, 4) float64 x1y1x2y2, labels (N,) int64 in 1..K)``."""
    boxes = np.array([[o.x0, o.y0, o.x1, o.y1] for o in objects], dtype=np.float64).reshape(-1, 4)
    labels = np.array([o.cls + 1 for o in objects], dtype=np.int64)
    return boxes, labels


# --------------------------------------------------------------------------------------------
# Layout


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, 0x5EED])


def _layout(rng: np.random.Generator, num_classes: int) -> list[SyntheticObject]:
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    sides = np.exp(rng.uniform(math.log(MIN_SIDE), math.log(MAX_SIDE), size=count))
    aspects = np.exp(rng.uniform(math.log(0.5), math.log(2.0), size=count))
    classes = rng.integers(0, num_classes, size=count)
    order = np.argsort(-sides, kind="stable")       # largest first: small ones are drawn on top
    placed: list[SyntheticObject] = []
    for i in order:
        w = int(np.clip(round(sides[i] * math.sqrt(aspects[i])), 8, CANVAS))
        h = int(np.clip(round(sides[i] / math.sqrt(aspects[i])), 8, CANVAS))
        rgb = _object_colour(int(classes[i]), num_classes, rng)
        for _ in range(PLACEMENT_TRIES):
            x0 = int(rng.integers(0, CANVAS - w + 1))
            y0 = int(rng.integers(0, CANVAS - h + 1))
            obj = SyntheticObject(int(classes[i]), x0, y0, x0 + w, y0 + h, rgb)
            if all(_cover(obj, other) <= MAX_COVER for other in placed):
                placed.append(obj)
                break
    return placed  # never empty: the first object always fits


def _cover(new: SyntheticObject, old: SyntheticObject) -> float:
    """Fraction of ``old``'s box that ``new``'s box covers."""
    iw = min(new.x1, old.x1) - max(new.x0, old.x0)
    ih = min(new.y1, old.y1) - max(new.y0, old.y0)
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / ((old.x1 - old.x0) * (old.y1 - old.y0))


def _object_colour(cls: int, num_classes: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """Saturated colour around the class hue (class hues evenly spread around the wheel)."""
    hue = (cls / num_classes + rng.uniform(-0.025, 0.025)) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.55, 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


# --------------------------------------------------------------------------------------------
# Pixels


def _background(rng: np.random.Generator) -> np.ndarray:
    """``(CANVAS, CANVAS, 3)`` uint8: gradient of two muted colours, noise, faint lines."""
    c0, c1 = (np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.3),
                                           rng.uniform(0.2, 0.9))) * 255 for _ in range(2))
    angle = rng.uniform(0, 2 * math.pi)
    coords = np.arange(CANVAS, dtype=np.float32) / (CANVAS - 1)
    t = (np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None])   # (H, W)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    img += rng.normal(0.0, rng.uniform(2.0, 12.0), size=(CANVAS, CANVAS, 1)).astype(np.float32)
    pixels = img.clip(0, 255).astype(np.uint8)
    canvas = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(0, 6))):
        shade = tuple(int(v) for v in np.clip(c0 + rng.normal(0, 25, 3), 0, 255))
        draw.line([tuple(int(v) for v in rng.integers(0, CANVAS, 2)),
                   tuple(int(v) for v in rng.integers(0, CANVAS, 2))],
                  fill=shade, width=int(rng.integers(1, 4)))
    return np.array(canvas)


def _draw_object(pixels: np.ndarray, obj: SyntheticObject, rng: np.random.Generator) -> None:
    """Paint ``obj`` into ``pixels`` (H, W, 3) uint8, in place."""
    w, h = obj.x1 - obj.x0, obj.y1 - obj.y0
    mask = _shape_mask(SHAPES[obj.cls], w, h)                  # (h, w) bool
    texture = _texture(TEXTURES[obj.cls % len(TEXTURES)], obj.rgb, w, h, obj.cls, rng)
    region = pixels[obj.y0:obj.y1, obj.x0:obj.x1]              # (h, w, 3) view
    region[mask] = texture[mask]


def _shape_mask(shape: str, w: int, h: int) -> np.ndarray:
    """``(h, w)`` bool mask of ``shape`` touching all four sides of the ``w x h`` box."""
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    X, Y = w - 1, h - 1

    def poly(points):
        draw.polygon([(x * X, y * Y) for x, y in points], fill=255)

    thick = max(2, round(0.22 * min(w, h)))
    if shape == "rectangle":
        draw.rectangle([0, 0, X, Y], fill=255)
    elif shape == "ellipse":
        draw.ellipse([0, 0, X, Y], fill=255)
    elif shape == "triangle":
        poly([(0.5, 0), (1, 1), (0, 1)])
    elif shape == "diamond":
        poly([(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)])
    elif shape == "cross":
        a, b = 1 / 3, 2 / 3
        poly([(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b),
              (0, a), (a, a)])
    elif shape == "ring":
        draw.ellipse([0, 0, X, Y], fill=255)
        if w > 2 * thick and h > 2 * thick:
            draw.ellipse([thick, thick, X - thick, Y - thick], fill=0)
    elif shape == "hexagon":
        poly([(0.25, 0), (0.75, 0), (1, 0.5), (0.75, 1), (0.25, 1), (0, 0.5)])
    elif shape == "star":
        angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
        radii = [1.0 if k % 2 == 0 else 0.45 for k in range(10)]
        pts = [(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles)]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        poly([((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys)))
              for x, y in pts])
    elif shape == "trapezoid":
        poly([(0.25, 0), (0.75, 0), (1, 1), (0, 1)])
    elif shape == "semicircle":
        draw.pieslice([0, 0, X, 2 * Y], 180, 360, fill=255)
    elif shape == "arrow":
        poly([(0, 0.3), (0.55, 0.3), (0.55, 0), (1, 0.5), (0.55, 1), (0.55, 0.7), (0, 0.7)])
    elif shape == "frame":
        draw.rectangle([0, 0, X, Y], fill=255)
        if w > 2 * thick and h > 2 * thick:
            draw.rectangle([thick, thick, X - thick, Y - thick], fill=0)
    else:  # pragma: no cover - SHAPES lists every case above
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(img) > 0


def _texture(kind: str, rgb: tuple[int, int, int], w: int, h: int, cls: int,
             rng: np.random.Generator) -> np.ndarray:
    """``(h, w, 3)`` uint8 fill for an object of colour ``rgb``."""
    base = np.array(rgb, dtype=np.float32)
    dark = base * 0.45
    ys, xs = np.mgrid[0:h, 0:w]
    if kind == "solid":
        weight = np.zeros((h, w), dtype=np.float32)
    elif kind == "stripes":
        period = max(4, round(min(w, h) / 6))
        along = xs if cls % 2 else ys
        weight = ((along // (period // 2 or 1)) % 2).astype(np.float32)
    elif kind == "checks":
        cell = max(3, round(min(w, h) / 5))
        weight = (((xs // cell) + (ys // cell)) % 2).astype(np.float32)
    else:  # shade: light at the top-left, dark at the bottom-right
        weight = ((xs / max(w - 1, 1) + ys / max(h - 1, 1)) / 2).astype(np.float32)
    fill = base * (1 - weight[..., None]) + dark * weight[..., None]
    fill += rng.normal(0.0, 4.0, size=(h, w, 1)).astype(np.float32)
    return fill.clip(0, 255).astype(np.uint8)


def read_synthetic(*, num_images: int, num_classes: int, seed: int) -> Reading:
    """The synthetic set as a :class:`Reading`: boxes from :func:`layout`; the pixels are drawn
    later, by the workers, from the same seeds."""
    items = []
    for index in range(num_images):
        boxes, labels = boxes_and_labels(layout(seed, index, num_classes))
        items.append(ImageItem.make(
            f"synthetic_{index:06d}", f"synthetic:{seed}:{index}", boxes, labels,
            [False] * len(labels), synthetic=SyntheticKey(seed, index, num_classes),
            declared_size=(CANVAS, CANVAS)))
    return Reading(items=items, classes=class_names(num_classes),
                   listed_ids=[item.image_id for item in items])
