"""The evaluate stage's driver: load the models and splits, score them, write and log.

Inputs (paths from the config, mirrored by ``dvc.yaml``): ``data.out_dir``'s ``<split>.parquet``
and ``classes.json`` for each split of ``eval.splits``; ``train.rpn_model`` (the trained RPN: its
proposals are scored for recall, its anchors give the anchor baseline); ``train.frcnn_model``
(the full detector, scored for mAP; its own RPN, which kept training in the joint stage and is
what the detector's mAP rests on, is scored for recall too: ``detector_rpn/...``). Outputs:
:mod:`pipeline.evaluation.outputs`; metrics: :mod:`pipeline.evaluation.metrics`; MLflow: the
``evaluate`` run holds every metric and every file as an artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import Config
from pipeline.errors import DataError
from pipeline.evaluation import recall as R
from pipeline.evaluation.core import evaluate_model
from pipeline.evaluation.metrics import DETECTOR_RPN, add_prefixed, format_summary, metrics
from pipeline.evaluation.outputs import OutputPaths, artifact_dir, write_outputs
from pipeline.modeling import load_model_file
from pipeline.prepared_table import MODEL_COLUMNS, read_classes, split_path, table_digest
from pipeline.annotations import read_ground_truth


def check_compatible(model: nn.Module, path: str | Path, image_size: int,
                     num_classes: int) -> None:
    """The model was built for the prepared images and classes (else a clear error)."""
    if model.image_size != image_size or model.num_classes != num_classes:
        raise DataError(f"{path}: model built for {model.image_size}x{model.image_size} images "
                        f"and {model.num_classes} classes, but the prepared data has "
                        f"{image_size}x{image_size} and {num_classes}; re-run training")


def evaluate_stage(cfg: Config) -> dict[str, Any]:
    """Read, evaluate, write, log to MLflow; returns the metrics (see the module docstring)."""
    from pipeline import tracking

    paths = OutputPaths.from_config(cfg)
    prepared = Path(cfg.data.out_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    budgets = R.check_budgets(cfg.eval.proposal_budgets)
    info = read_classes(prepared)
    class_names = [str(c) for c in info["classes"]]
    image_size = int(info["image_size"])
    splits = [read_ground_truth(split_path(prepared, name), name) for name in cfg.eval.splits]
    models = []
    for path, stage in ((cfg.train.rpn_model, "rpn"), (cfg.train.frcnn_model, "frcnn")):
        model = load_model_file(path, stage, device)[0]
        check_compatible(model, path, image_size, len(class_names))
        models.append(model)

    with tracking.stage_run(cfg, "evaluate") as run:
        for split in splits:
            tracking.log_split(run, name=split.name, source=str(split.path),
                               digest=table_digest(split.path), rows=len(split),
                               columns=MODEL_COLUMNS, context="evaluation")
        results = evaluate_model(rpn_model=models[0], detector=models[1], splits=splits,
                                 budgets=budgets, num_classes=len(class_names),
                                 image_size=image_size, batch_size=cfg.eval.batch_size,
                                 device=device, num_pictures=cfg.eval.num_pictures,
                                 num_workers=2 if device.type == "cuda" else 0,
                                 class_names=class_names)
        values = metrics(results, list(cfg.eval.splits), budgets, class_names)
        own = evaluate_model(rpn_model=models[1], detector=None, splits=splits, budgets=budgets,
                             num_classes=len(class_names), image_size=image_size,
                             batch_size=cfg.eval.batch_size, device=device, progress=False,
                             class_names=class_names)
        add_prefixed(values, metrics(own, list(cfg.eval.splits), budgets, class_names),
                     DETECTOR_RPN)
        written = write_outputs(results, values, paths, cfg.eval.splits[0], class_names)
        run.log_metrics(tracking.flatten_metrics(values))
        for path in written:
            run.log_artifact(path, artifact_dir(path, paths))
    print(format_summary(values))
    return values
