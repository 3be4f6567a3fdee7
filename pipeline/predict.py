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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from pipeline import plots
from pipeline.config import Config
from pipeline.images import (READ_ERRORS, ResizeInfo, ResizeMode, open_rgb, resize_image,
                             to_tensor, unscale_boxes)


@dataclass
class Loaded:
    """One readable image: the original, and the model input made from it."""

    path: str
    original: Image.Image
    info: ResizeInfo
    tensor: Tensor              # (3, S, S) float32 RGB in [0, 1]


def load_images(paths: Sequence[str], size: int, mode: ResizeMode
                ) -> Iterator[Loaded | tuple[str, str]]:
    """For each path, a :class:`Loaded` or ``(path, reason)`` when it cannot be read."""
    for path in paths:
        try:
            image = open_rgb(path)
        except READ_ERRORS as exc:
            reason = "not found" if isinstance(exc, FileNotFoundError) else \
                f"unreadable image ({type(exc).__name__}: {exc})"
            yield path, reason
            continue
        resized, info = resize_image(image, size, mode)
        yield Loaded(path, image, info, to_tensor(resized))


def predict(model: nn.Module, images: Sequence[Loaded], *, class_names: Sequence[str],
            batch_size: int, device: torch.device) -> list[dict[str, Any]]:
    """Detections of each image in its original pixel frame (the JSON objects, in order).

    Args:
        model: a detector in eval mode on ``device``; ``model(images (B, 3, S, S))`` -> per
            image ``{"boxes", "scores", "labels"}`` in the S x S frame.
    """
    results = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        batch = torch.stack([item.tensor for item in chunk]).to(device)
        with torch.inference_mode():
            outputs = model(batch)
        for item, out in zip(chunk, outputs):
            order = torch.argsort(out["scores"], descending=True)
            boxes = unscale_boxes(out["boxes"][order].float().cpu().numpy(), item.info)
            labels = [int(v) for v in out["labels"][order].cpu()]
            results.append({
                "image": item.path,
                "width": item.info.orig_width,
                "height": item.info.orig_height,
                "boxes": [[round(float(v), 2) for v in box] for box in boxes],
                "scores": [round(float(s), 4) for s in out["scores"][order].cpu()],
                "labels": labels,
                "classes": [class_names[k - 1] if 1 <= k <= len(class_names) else str(k)
                            for k in labels],
            })
    return results


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
    model raises :class:`pipeline.errors.PipelineError` before any image is read."""
    from pipeline.modeling import load_model_file

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_model_file(args.model or cfg.train.frcnn_model, "frcnn", device)
    model.eval()
    class_names = [str(c) for c in meta["classes"]] if "classes" in meta else []

    loaded, failed = [], 0
    for item in load_images(args.images, model.image_size, cfg.data.resize):
        if isinstance(item, Loaded):
            loaded.append(item)
        else:
            failed += 1
            print(f"frcnn predict: {item[0]}: {item[1]}", file=sys.stderr)
    results = predict(model, loaded, class_names=class_names, batch_size=cfg.eval.batch_size,
                      device=device)
    if args.draw:
        for path in draw_all(loaded, results, Path(args.draw), class_names):
            print(path)
    else:
        # A JSON array, one image per line.
        print("[" + ",\n ".join(json.dumps(r) for r in results) + "]")
    return 1 if failed else 0
