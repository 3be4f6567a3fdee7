"""The prepare stage (``frcnn prepare``): datasets read, validated, resized, split and written.

Readers for the synthetic set, PASCAL VOC and COCO, the checks every box goes through, and the
worker processes that decode and resize; the output is the prepared set of
:mod:`pipeline.prepared_table`.

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
- **difficult**: VOC ``<difficult>1`` boxes are kept and flagged ``difficult``; COCO
  ``iscrowd: 1`` boxes are kept and flagged ``crowd``.

Modules: :mod:`.records` (what a reader produces; box checks), :mod:`.synthetic`, :mod:`.voc`,
:mod:`.coco` (readers), :mod:`.splits` (train/val/test assignment), :mod:`.process` (decode,
validate, resize and encode in worker processes), :mod:`.writer` (Parquet output) and
:mod:`.stage` (:func:`prepare_dataset`, the stage's work). Resizing is :mod:`pipeline.images`'s
(``frcnn predict`` resizes the same way), the table schema and ``classes.json``
:mod:`pipeline.prepared_table`'s.
"""

from __future__ import annotations

import argparse

from pipeline.config import Config


def run(cfg: Config, args: argparse.Namespace | None = None) -> int:
    """``frcnn prepare``: prepare ``data.source`` into ``data.out_dir`` inside the stage's MLflow
    run; prints the summary. Bad data raises :class:`pipeline.errors.DataError`
    (``<file>: <problem>``), which the command line reports."""
    from pipeline import tracking
    from pipeline.prepare.stage import prepare_dataset
    from pipeline.prepared_table import CLASSES_FILE, REJECTED_FILE
    from pipeline.storage import is_uri, read_bytes

    with tracking.stage_run(cfg, "prepare") as stage:  # one MLflow run; FAILED on an error
        result = prepare_dataset(cfg)
        stage.log_metrics(result.metrics())
        stage.set_tags({"classes": ",".join(result.classes)})
        for name in (CLASSES_FILE, REJECTED_FILE):
            if is_uri(result.out_dir):
                data = read_bytes(f"{result.out_dir}/{name}")
                if data is not None:
                    stage.log_text(data.decode("utf-8"), f"prepared/{name}")
            elif (result.out_dir / name).is_file():
                stage.log_artifact(result.out_dir / name, "prepared")
    print(result.summary())
    return 0
