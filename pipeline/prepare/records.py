"""What a dataset reader hands to the prepare stage, and the checks every box goes through.

Shapes: N boxes of one image. Boxes follow the package conventions (see
:mod:`pipeline.prepare`): float ``(N, 4)`` x1y1x2y2 in the original image's continuous pixel
frame; labels int64 ``(N,)`` in ``1..K``; difficult bool ``(N,)``.

A reader refuses what it can see in the annotation alone (missing or malformed files, zero-area
boxes, unknown classes, paths leaving the dataset folder) as :class:`Problem` s; the worker that
decodes the image refuses what needs the pixels (unreadable images, a size that disagrees with
the annotation, boxes entirely outside the image). A problem rejects its whole image: an image
whose annotation is partly wrong would teach the detector that a real object is background.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.errors import DataError

__all__ = ["DataError", "ImageItem", "Problem", "Reading", "SyntheticKey", "box_problem",
           "clip_boxes", "unusable_path"]


@dataclass(frozen=True)
class Problem:
    """One reason an image (or an annotation that belongs to none) is rejected.

    Attributes:
        source: the file at fault (annotation file, image file, or COCO JSON).
        reason: what is wrong, in words.
        image_id: the image it rejects ("" when it concerns no single image).
        box_index: index of the offending object in the image's annotation (None: the image).
    """

    source: str
    reason: str
    image_id: str = ""
    box_index: int | None = None

    def message(self) -> str:
        where = f"object {self.box_index}: " if self.box_index is not None else ""
        return f"{self.source}: {where}{self.reason}"


@dataclass(frozen=True)
class SyntheticKey:
    """Everything needed to regenerate one synthetic image (see :mod:`.synthetic`)."""

    seed: int
    index: int
    num_classes: int


@dataclass(frozen=True)
class ImageItem:
    """One image to decode and its annotation, in the original image's pixel frame.

    Exactly one of ``path`` (an image file) and ``synthetic`` (an image to generate) is set.
    ``declared_size`` is ``(W, H)`` as the annotation states it, checked against the decoded
    image (None: not stated).
    """

    image_id: str
    source: str
    boxes: np.ndarray                  # (N, 4) float64
    labels: np.ndarray                 # (N,) int64, 1..K
    difficult: np.ndarray              # (N,) bool
    crowd: np.ndarray                  # (N,) bool: COCO iscrowd
    path: Path | None = None
    synthetic: SyntheticKey | None = None
    declared_size: tuple[int, int] | None = None

    @staticmethod
    def make(image_id: str, source: str, boxes: Sequence[Sequence[float]], labels: Sequence[int],
             difficult: Sequence[bool], crowd: Sequence[bool] | None = None,
             **kwargs) -> "ImageItem":
        """Build an item from plain lists (the arrays get their canonical dtypes and shapes);
        ``crowd`` defaults to none."""
        flags = np.asarray(difficult, dtype=bool).reshape(-1)
        return ImageItem(image_id=image_id, source=source,
                         boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                         labels=np.asarray(labels, dtype=np.int64).reshape(-1),
                         difficult=flags,
                         crowd=(np.zeros_like(flags) if crowd is None
                                else np.asarray(crowd, dtype=bool).reshape(-1)), **kwargs)


@dataclass
class Reading:
    """What a reader returns.

    Attributes:
        items: the images that passed the annotation checks, sorted by ``image_id``.
        classes: class names; ``labels`` index into it from 1.
        problems: everything refused while reading the annotations.
        splits: ``image_id -> "train" | "val" | "test"`` when the dataset defines its own split
            (VOC ``ImageSets/Main``), else None.
        listed_ids: every image id the dataset lists, refused ones included (the split is drawn
            over these, so fixing one annotation does not reshuffle the others).
    """

    items: list[ImageItem]
    classes: tuple[str, ...]
    problems: list[Problem] = field(default_factory=list)
    splits: dict[str, str] | None = None
    listed_ids: list[str] = field(default_factory=list)


def unusable_path(path: Path) -> str | None:
    """Why the system cannot look ``path`` up at all, or None (a missing file is not a reason:
    the caller says "not found").

    An annotation can name anything: a NUL byte, a 5000-character name, a symlink loop, a
    folder without permission. Readers refuse those as problems instead of crashing on them.
    """
    try:
        path.resolve().stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: pathlib's symlink loop
        return f"unusable path ({type(exc).__name__}: {exc})"[:300]
    return None


def box_problem(box: Sequence[float]) -> str | None:
    """Why a box ``[x1, y1, x2, y2]`` can never be valid, or None.

    Checks the values alone (finite, positive width and height); the image bounds are checked
    after decoding by :func:`clip_boxes`.
    """
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        return f"box {list(box)} is not four numbers"
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return f"box {list(box)} is not four finite numbers"
    if x2 <= x1 or y2 <= y1:
        return f"zero-area box [{_num(x1)}, {_num(y1)}, {_num(x2)}, {_num(y2)}] (x2 <= x1 or y2 <= y1)"
    return None


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Clip boxes to ``[0, width] x [0, height]``; report those entirely outside.

    Args:
        boxes: ``(N, 4)`` float x1y1x2y2 with ``x1 < x2`` and ``y1 < y2``.
    Returns:
        ``(clipped (N, 4) float64, [(index, reason), ...])``; a box that only touches the border
        (zero area once clipped) counts as outside.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    clipped = boxes.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0.0, float(width))
    clipped[:, 1::2] = clipped[:, 1::2].clip(0.0, float(height))
    outside = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    problems = [(int(i), f"box [{', '.join(_num(v) for v in boxes[i])}] lies entirely outside "
                         f"the {width}x{height} image") for i in np.flatnonzero(outside)]
    return clipped, problems


def _num(value: float) -> str:
    """``504.0`` -> ``"504"``, ``12.5`` -> ``"12.5"``: numbers as the annotation wrote them."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)
