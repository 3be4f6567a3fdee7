"""Datasets for the prepare stage: readers (synthetic, PASCAL VOC, COCO), resizing, validation.

Conventions, stated once for the whole package:

- **Boxes** are float ``(N, 4)`` arrays ``x1, y1, x2, y2`` in *continuous* pixel coordinates of
  the image they refer to: ``(0, 0)`` is the top-left corner of the top-left pixel and
  ``(W, H)`` the bottom-right corner of the bottom-right pixel. A valid box has ``x1 < x2``,
  ``y1 < y2`` and overlaps ``[0, W] x [0, H]``; a box crossing the border is clipped to it.
- **VOC** ``<bndbox>`` values are used as they are (no ``-1`` shift of the 1-based pixel
  indices): ``xmin == xmax`` is a zero-area box and is refused, and scaling a box is a plain
  multiplication, so ``boxes == xml * (image_size / W, image_size / H)`` after a stretch resize.
- **COCO** ``bbox`` ``[x, y, w, h]`` becomes ``[x, y, x + w, y + h]``.
- **Labels** are class ids ``1..K`` in the order of ``classes.json``'s ``"classes"`` list; id 0 is
  reserved for background (the detector's convention).
- **difficult**: VOC ``<difficult>1``, and COCO ``iscrowd: 1``, are kept and flagged ``True``.

Modules: :mod:`.records` (what a reader produces; box checks; :class:`DataError`),
:mod:`.synthetic`, :mod:`.voc`, :mod:`.coco` (readers), :mod:`.resize` (image resizing and box
(un)scaling, reused by ``frcnn predict``), :mod:`.splits` (train/val/test assignment),
:mod:`.process` (decode, validate, resize and encode in worker processes), :mod:`.table` (the
Parquet schema and how to read the prepared tables back).
"""

from pipeline.datasets.records import DataError, ImageItem, Problem, Reading

__all__ = ["DataError", "ImageItem", "Problem", "Reading"]
