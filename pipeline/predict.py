"""``frcnn predict IMAGE... [--model PATH] [--draw DIR]``: the detector on image files.

Each image is decoded to RGB, resized exactly as ``frcnn prepare`` resizes (``data.resize``,
:func:`pipeline.images.resize_image`, to the model's own ``image_size``), run through
the detector in batches of ``eval.batch_size`` (GPU when present), and its detections are mapped
back to the original image's pixels (:func:`pipeline.images.unscale_boxes`, clipped to
the image).

Output: a JSON array on stdout, one object per readable image, in the order given::

    {"image": "path/as/given.jpg", "width": W, "height": H,
     "boxes": [[x1, y1, x2, y2], ...], "scores": [...], "labels": [class id 1..K, ...],
     "classes": [class name, ...]}

best score first: every detection the model returns (its own score threshold, NMS and
per-image maximum, saved with it). With ``--draw DIR`` nothing is printed as JSON; instead
``DIR/<image stem>.png`` is written with the detections drawn (stems made unique), and each
written path is printed.

An image that is missing or unreadable is reported on stderr by name; the others still run, and
the exit code is 1. A missing or unreadable model file: exit code 1 before any image.
Class names come from the model file (``classes``, stored by training); without them the ids
are used.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pipeline import plots
from pipeline.config import Config
from pipeline.inference import Loaded, predict_sources


def draw_all(images: Sequence[Loaded], results: Sequence[dict[str, Any]], out_dir: Path,
             class_names: Sequence[str]) -> list[Path]:
    """Write ``out_dir/<stem>.png`` per image with its detections drawn; returns the paths."""
    written, used = [], set()
    for item, result in zip(images, results):
        stem = Path(item.path).stem or "image"
        name, n = stem, 1
        while name in used:                          # a.jpg and other/a.png: a.png, a_2.png
            n += 1
            name = f"{stem}_{n}"
        used.add(name)
        drawn = plots.draw_boxes(item.original, det_boxes=np.asarray(result["boxes"]),
                                 det_scores=result["scores"], det_labels=result["labels"],
                                 class_names=class_names)
        written.append(plots.save_image(drawn, out_dir / f"{name}.png"))
    return written


def run(cfg: Config, args: argparse.Namespace) -> int:
    """The ``predict`` command; returns 0, or 1 when any image failed. A missing or unreadable
    model raises :class:`pipeline.errors.PipelineError` before any image is read.

    ``--model`` is a file, or an MLflow model URI (``models:/frcnn/latest``, ``models:/frcnn/3``,
    ``runs:/<run id>/detector``) of the store ``tracking.uri``: its weights are downloaded."""
    from pipeline.modeling import load_model_file

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = args.model or cfg.train.frcnn_model
    if str(source).startswith(("models:/", "runs:/")):
        from pipeline.tracking.models import model_weights
        source = model_weights(cfg, str(source), Path(tempfile.mkdtemp(prefix="frcnn-")))
    model, meta = load_model_file(source, "frcnn", device)
    model.eval()
    class_names = [str(c) for c in meta["classes"]] if "classes" in meta else []
    resize = meta.get("resize")   # as the model's training images were resized
    if resize is None:            # a model file of an older version
        resize = cfg.data.resize
        print(f"frcnn predict: {source} does not record how its training images were resized; "
              f"using data.resize={resize}", file=sys.stderr)
    loaded, results, failed = predict_sources(model, args.images, class_names=class_names,
                                              resize=resize,
                                              batch_size=cfg.eval.batch_size, device=device)
    for name, reason in failed:
        print(f"frcnn predict: {name}: {reason}", file=sys.stderr)
    if args.draw:
        for path in draw_all(loaded, results, Path(args.draw), class_names):
            print(path)
    else:
        # A JSON array, one image per line.
        print("[" + ",\n ".join(json.dumps(r) for r in results) + "]")
    return 1 if failed else 0
