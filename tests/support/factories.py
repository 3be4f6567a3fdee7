"""Test data and configs: prepared sets in the schema of ``frcnn prepare``, params files, presets.

- :func:`write_prepared`: a tiny prepared set (``{split}.parquet`` with
  :data:`pipeline.prepared_table.SCHEMA`, and ``classes.json`` by
  :func:`pipeline.prepared_table.write_classes`) whose images are drawn rectangles
  (``"shapes"``, the default: what training sees), random noise with random boxes, some
  ``difficult`` (``"noise"``: what the evaluation tests score), or empty bytes (``"blank"``: a
  table that only *says* how big it is, for checks that read metadata).
- :func:`write_params`: a complete ``params.yaml`` (defaults or the project's file, overridden).
- The presets: :data:`TINY` (the real detector at 64 x 64, cheap to train on a CPU) and
  :func:`tiny_cfg`; :data:`RAY_PARAMS` (2 CPU Ray Train workers sharing 2 cores);
  :data:`TINY_SWEEP` (a sweep of 64 x 64 trials on data prepared at 128 x 128);
  :data:`SEARCH_SPACE` (every kind of distribution).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from PIL import Image, ImageDraw

from pipeline.config import Config, load_config
from pipeline.prepared_table import SCHEMA, split_path, table_digest, write_classes
from tests.support import ROOT

#: The real detector at 64 x 64 with narrow heads and few samples: a training step costs about
#: a second of one CPU core.
TINY: dict[str, Any] = {
    "data.image_size": 64, "anchors.scales": [1, 2], "rpn.min_size": 4.0,
    "rpn.pre_nms_top_n_train": 100, "rpn.post_nms_top_n_train": 50,
    "rpn.pre_nms_top_n_test": 100, "rpn.post_nms_top_n_test": 50,
    "rpn.num_samples": 32, "roi.num_samples": 16, "roi.hidden_dim": 32, "roi.pool_size": 2,
    "train.num_workers": 1, "train.batch_size": 2, "train.loader_workers": 0,
    "train.warmup_steps": 1, "train.lr": 0.01,
}

#: :data:`TINY` on a local Ray: 2 CPU workers of half a core each (gloo DDP), batch 1.
RAY_PARAMS: dict[str, Any] = {
    **TINY,
    "train.num_workers": 2, "train.cpus_per_worker": 0.5, "train.batch_size": 1,
    "train.loader_workers": 1, "train.use_gpu": "false",
}

#: Data prepared at 128 x 128, trials at 64 x 64 (anchor scales halve with the size: the space's
#: [2, 4] means 32 and 64 pixel anchors at 128, 16 and 32 at 64; fitted shapes halve too).
TINY_SWEEP: dict[str, Any] = {
    "data.image_size": 128, "rpn.min_size": 4.0, "roi.hidden_dim": 32, "roi.pool_size": 2,
    "train.batch_size": 2, "train.loader_workers": 0, "train.warmup_steps": 1,
    "eval.batch_size": 2,
    "sweep.image_size": 64, "sweep.max_train_images": 4, "sweep.cpus_per_trial": 1.0,
    "sweep.space": {
        # whole anchor settings, one of them shapes fitted on the train split
        "anchors": {"choice": [{"scales": [2, 4]}, {"scales": [1, 2, 4], "ratios": [1.0]},
                               "fit"]},
        "rpn.pos_iou": {"uniform": [0.6, 0.8]},
        "rpn.neg_iou": {"uniform": [0.2, 0.4]},
        "rpn.num_samples": {"choice": [32, 64]},
        "rpn.pos_fraction": {"uniform": [0.25, 0.75]},
        "rpn.pre_nms_top_n_test": {"choice": [100, 200]},
        "rpn.nms_iou": {"uniform": [0.6, 0.8]},
        "train.lr": {"loguniform": [0.001, 0.02]},
    },
}

#: A search space of every distribution kind (``sweep.space``), for the sweep's unit tests.
SEARCH_SPACE: dict[str, Any] = {
    "anchors.scales": {"choice": [[8, 16, 32], [4, 8, 16]]},
    "rpn.pos_iou": {"uniform": [0.6, 0.8]},
    "train.lr": {"loguniform": [0.0001, 0.01]},
    "rpn.num_samples": {"randint": [16, 18]},
    "train.lr_schedule": {"choice": ["cosine", "constant"]},
}

def tiny_cfg(**overrides: Any) -> Config:
    """:data:`TINY` over the defaults, plus ``overrides`` (``train__rpn_epochs=2`` is
    ``train.rpn_epochs``)."""
    return Config().replace({**TINY, **{k.replace("__", "."): v for k, v in overrides.items()}})


def write_params(path: Path, overrides: Mapping[str, Any] | None = None, *,
                 project_params: bool = False) -> Path:
    """A complete ``params.yaml`` at ``path``: the defaults (or, with ``project_params``, the
    project's ``params.yaml``) with ``{"section.key": value}`` overrides, validated."""
    base = load_config([ROOT / "params.yaml"]) if project_params else Config()
    cfg = base.replace(dict(overrides or {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------
# Prepared sets

COLOURS = [(230, 40, 40), (40, 200, 40), (40, 40, 230), (230, 230, 40)]
Content = Literal["shapes", "noise", "blank"]


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _shapes(rng: np.random.Generator, size: int, num_classes: int
            ) -> tuple[bytes, list, list, list]:
    """1-3 flat rectangles (colour by class) on grey, their boxes exactly the pixels covered."""
    img = Image.new("RGB", (size, size), (90, 90, 90))
    draw = ImageDraw.Draw(img)
    boxes, labels = [], []
    for _ in range(int(rng.integers(1, 4))):
        w, h = rng.integers(size // 5, size // 2, size=2)
        x1, y1 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        label = int(rng.integers(1, num_classes + 1))
        draw.rectangle([x1, y1, x1 + w - 1, y1 + h - 1], fill=COLOURS[(label - 1) % len(COLOURS)])
        boxes.append([float(x1), float(y1), float(x1 + w), float(y1 + h)])
        labels.append(label)
    return _png(img), boxes, labels, [False] * len(labels)


def _noise(gen: torch.Generator, index: int, size: int, num_classes: int
           ) -> tuple[bytes, list, list, list]:
    """Random pixels; ``index % 5`` random boxes (none for every fifth image), the third one
    ``difficult``."""
    g = index % 5
    xy = torch.rand(g, 2, generator=gen) * size * 0.6
    wh = torch.rand(g, 2, generator=gen) * size * 0.35 + 4
    boxes = torch.cat([xy, (xy + wh).clamp(max=size)], 1)
    pixels = (torch.rand(size, size, 3, generator=gen) * 255).byte().numpy()
    labels = torch.randint(1, num_classes + 1, (g,), generator=gen).tolist()
    return _png(Image.fromarray(pixels)), boxes.tolist(), labels, [j == 2 for j in range(g)]


def write_prepared(folder: Path, *, splits: Mapping[str, int] | None = None, num_images: int = 6,
                   num_eval: int = 2, size: int = 64, num_classes: int = 2,
                   classes: Sequence[str] | None = None, seed: int = 0,
                   content: Content = "shapes") -> Path:
    """A prepared set in ``folder``; returns ``folder``.

    Args:
        splits: images per split, written in this order (default: ``num_images`` train,
            ``num_eval`` val and test); ids are ``<split>_<index:03d>``.
        classes: class names (default ``class1..class<num_classes>``).
        content: ``"shapes"``, ``"noise"`` or ``"blank"`` (see the module docstring); each is
            a pure function of ``seed``.
    """
    classes = list(classes) if classes is not None else [f"class{i}"
                                                          for i in range(1, num_classes + 1)]
    splits = dict(splits) if splits is not None else {"train": num_images, "val": num_eval,
                                                      "test": num_eval}
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in splits.items():
        rows = []
        for i in range(n):
            if content == "shapes":
                image, boxes, labels, difficult = _shapes(rng, size, len(classes))
            elif content == "noise":
                image, boxes, labels, difficult = _noise(gen, i, size, len(classes))
            else:
                image, boxes, labels, difficult = b"", [[0.0, 0.0, 8.0, 8.0]], [1], [False]
            rows.append({"image_id": f"{split}_{i:03d}", "source": "fixture",
                         "orig_width": size, "orig_height": size, "image": image,
                         "boxes": boxes, "labels": labels, "difficult": difficult,
                         "crowd": [False] * len(labels),
                         "scale_x": 1.0, "scale_y": 1.0, "pad_x": 0.0, "pad_y": 0.0})
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), split_path(folder, split))
    write_classes(folder, classes=classes, image_size=size, resize="stretch", image_format="png",
                  source="fixture", split="random", images=splits, rejected_problems=0,
                  digests={s: table_digest(split_path(folder, s)) for s in splits})
    return folder


def write_ray_project(folder: Path, overrides: Mapping[str, Any] | None = None) -> Path:
    """A project folder for ``frcnn train`` on a local Ray: ``data/prepared`` (6 training
    images at 64 x 64) and a ``params.yaml`` of :data:`RAY_PARAMS` and ``overrides``."""
    write_prepared(folder / "data" / "prepared", size=64, num_images=6)
    write_params(folder / "params.yaml", {**RAY_PARAMS, **(overrides or {})})
    return folder
