"""pipeline.sweep.trial without Ray: what a trial's rank 0 measures after each epoch.

A trial's whole life (Tune, its Ray Train workers, its MLflow child run) is in
``test_driver.py``'s slow tests.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from pipeline.modeling import build_model
from pipeline.annotations import read_ground_truth
from pipeline.sweep import trial
from tests.support.factories import write_prepared


def test_validation_recall_reports_the_sweep_metrics(tmp_path, tiny_cfg):
    prepared = write_prepared(tmp_path / "prepared", size=64, num_images=2)
    torch.manual_seed(0)
    model = build_model(tiny_cfg, num_classes=2, stage="rpn")
    split = read_ground_truth(prepared / "val.parquet", "val")
    values = trial.validation_recall(model, split, budgets=(50, 300), batch_size=2,
                                     device=torch.device("cpu"))
    names = {"AR@50", "AR@300", "recall@0.5/300", "recall@0.7/300"}
    per_class = {f"{n}/{c}" for n in ("AR@300", "recall@0.5/300", "recall@0.7/300")
                 for c in ("1", "2") if any((lab == int(c)).any() for lab in split.labels)}
    assert set(values) == names | {f"{n}/mean_class" for n in names} | per_class
    assert all(0.0 <= v <= 1.0 for v in values.values())


def test_trial_folders_are_named_by_trial_id():
    assert trial.trial_dirname(SimpleNamespace(trial_id="a1b2_00003")) == "a1b2_00003"
