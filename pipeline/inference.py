"""The detector on images: decode, resize as ``frcnn prepare`` does, run in batches, map boxes
back to each original image (the core of ``frcnn predict`` and of the served MLflow model,
:mod:`pipeline.tracking.served_model`).

Each image is decoded to RGB, resized exactly as ``frcnn prepare`` resizes (``resize``,
:func:`pipeline.images.resize_image`, to the model's own ``image_size``), run through the
detector in batches (GPU when present), and its detections are mapped back to the original
image's pixels (:func:`pipeline.images.unscale_boxes`, clipped to the image): one dict per
image, ``{"image", "width", "height", "boxes", "scores", "labels", "classes"}``, best score first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from PIL import Image
from torch import Tensor, nn

from pipeline.images import (READ_ERRORS, ResizeInfo, ResizeMode, open_rgb, resize_image,
                             to_tensor, unscale_boxes)


@dataclass
class Loaded:
    """One readable image: the original, and the model input made from it."""

    path: str
    original: Image.Image
    info: ResizeInfo
    tensor: Tensor              # (3, S, S) float32 RGB in [0, 1]


def load_images(sources: Sequence[str | tuple[str, Any]], size: int, mode: ResizeMode
                ) -> Iterator[Loaded | tuple[str, str]]:
    """For each source (a path, or ``(name, path or file-like)``), a :class:`Loaded` or
    ``(name, reason)`` when it cannot be read."""
    for source in sources:
        name, where = source if isinstance(source, tuple) else (source, source)
        try:
            image = open_rgb(where)
        except READ_ERRORS as exc:
            detail = f": {exc}" if isinstance(where, (str, Path)) else ""  # not a BytesIO repr
            reason = "not found" if isinstance(exc, FileNotFoundError) else \
                f"unreadable image ({type(exc).__name__}{detail})"
            yield name, reason
            continue
        resized, info = resize_image(image, size, mode)
        yield Loaded(name, image, info, to_tensor(resized))


def predict_sources(model: nn.Module, sources: Sequence[str | tuple[str, Any]], *,
                    class_names: Sequence[str], resize: ResizeMode, batch_size: int,
                    device: torch.device) -> tuple[list[Loaded], list[dict[str, Any]],
                                                   list[tuple[str, str]]]:
    """Read, resize and detect: ``(loaded images, their results, [(name, reason)] of the
    unreadable ones)``; what ``frcnn predict`` and the served MLflow model both do."""
    loaded, failed = [], []
    for item in load_images(sources, model.image_size, resize):
        if isinstance(item, Loaded):
            loaded.append(item)
        else:
            failed.append(item)
    results = predict(model, loaded, class_names=class_names, batch_size=batch_size,
                      device=device)
    return loaded, results, failed


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


def predict_proposals(model: nn.Module, sources: Sequence[str | tuple[str, Any]], *,
                      class_names: Sequence[str], resize: ResizeMode, batch_size: int,
                      device: torch.device) -> tuple[list[Loaded], list[dict[str, Any]],
                                                     list[tuple[str, str]]]:
    """As :func:`predict_sources`, with the RPN's proposals (``boxes``, objectness ``scores``,
    best first, the model's test-time top-N) instead of detections: what the RPN stage's
    model serves."""
    loaded, failed = [], []
    for item in load_images(sources, model.image_size, resize):
        (loaded if isinstance(item, Loaded) else failed).append(item)
    results = []
    for start in range(0, len(loaded), batch_size):
        chunk = loaded[start:start + batch_size]
        proposals = model.propose(torch.stack([item.tensor for item in chunk]).to(device))
        for item, (boxes, scores) in zip(chunk, proposals):
            boxes = unscale_boxes(boxes.float().cpu().numpy(), item.info)
            results.append({"image": item.path, "width": item.info.orig_width,
                            "height": item.info.orig_height,
                            "boxes": [[round(float(v), 2) for v in box] for box in boxes],
                            "scores": [round(float(v), 4) for v in scores.cpu()]})
    return loaded, results, failed
