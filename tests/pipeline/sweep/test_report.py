"""pipeline.sweep.report: the trial table, the best trial as a params overlay, the plot."""

from __future__ import annotations

import io
import math

import pandas as pd
import yaml
from PIL import Image

from pipeline.config import load_config
from pipeline.sweep import report as sweep_report
from tests.support import ROOT

PARAMS = ROOT / "params.yaml"


def _records() -> list[sweep_report.TrialRecord]:
    def hist(*values):
        return [{"epoch": e + 1, "AR@300": v, "AR@50": v / 2, "train_seconds": 5.0 * (e + 1),
                 "score_seconds": 1.0 * (e + 1)} for e, v in enumerate(values)]

    return [
        sweep_report.TrialRecord("t2", {"anchors.scales": [4.0, 8.0], "train.lr": 0.01},
                                 hist(0.2, 0.5), finished=True, wall_seconds=12.0),
        sweep_report.TrialRecord("t1", {"anchors.scales": [8.0, 16.0], "train.lr": 0.001},
                                 hist(0.3, 0.45, 0.4), finished=True, wall_seconds=10.0),
        sweep_report.TrialRecord("t3", {"anchors.scales": [2.0], "train.lr": 0.002},
                                 hist(0.1), wall_seconds=5.0),
        sweep_report.TrialRecord("t4", {"anchors.scales": [2.0], "train.lr": 0.003},
                                 error="ConfigError: rpn.neg_iou (0.5) must be <= rpn.pos_iou",
                                 attempts=2),
    ]


def test_trial_table_one_row_per_trial():
    table = sweep_report.trial_table(_records(), space_keys=["anchors.scales", "train.lr"],
                                     metrics=["AR@50", "AR@300"], metric="AR@300", mode="max")
    assert list(table.columns) == [
        "trial_id", "anchors.scales", "train.lr", "final_AR@50", "final_AR@300", "best_AR@300",
        "best_epoch", "epochs", "status", "attempts", "wall_seconds", "train_seconds",
        "score_seconds", "error"]
    assert list(table["trial_id"]) == ["t1", "t2", "t3", "t4"]
    assert list(table["status"]) == ["finished", "finished", "stopped early", "errored"]
    assert list(table["epochs"]) == [3, 2, 1, 0]
    assert list(table["attempts"]) == [1, 1, 1, 2]     # t4 retried after its failure
    assert table["final_AR@300"].tolist()[:3] == [0.4, 0.5, 0.1]
    assert table["best_AR@300"].tolist()[:3] == [0.45, 0.5, 0.1]
    assert table["best_epoch"].tolist() == [2, 2, 1, -1]
    # the loop's clock less its scoring, and the scoring (t1: 3 epochs of 5 s, 1 s scored each)
    assert table["train_seconds"].tolist()[:3] == [12.0, 8.0, 4.0]
    assert table["score_seconds"].tolist()[:3] == [3.0, 2.0, 1.0]
    assert math.isnan(table["final_AR@300"].iloc[3]) and "neg_iou" in table["error"].iloc[3]
    # Parquet keeps the list column
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    back = pd.read_parquet(io.BytesIO(buf.getvalue()))
    assert list(back["anchors.scales"].iloc[0]) == [8.0, 16.0]


def test_best_trial_overlay_applies_over_params_yaml(tmp_path):
    table = sweep_report.trial_table(_records(), space_keys=["anchors.scales", "train.lr"],
                                     metrics=["AR@300"], metric="AR@300", mode="max")
    best = sweep_report.best_trial(table, metric="AR@300", mode="max")
    assert best["trial_id"] == "t2"  # best final value (t1 peaked higher at epoch 2 only)
    assert sweep_report.best_trial(table, metric="AR@300", mode="min")["trial_id"] == "t3"
    overlay = sweep_report.best_overlay(best, ["anchors.scales", "train.lr"])
    assert overlay == {"anchors": {"scales": [4.0, 8.0]}, "train": {"lr": 0.01}}
    path = tmp_path / "best_params.yaml"
    path.write_text(sweep_report.overlay_yaml(overlay, ["from a test"]))
    assert path.read_text().startswith("# from a test\n")
    cfg = load_config([PARAMS, path])
    assert cfg.anchors.scales == (4.0, 8.0) and cfg.train.lr == 0.01
    assert cfg.anchors.ratios == load_config([PARAMS]).anchors.ratios  # the rest from params.yaml
    assert yaml.safe_load(path.read_text()) == overlay


def test_no_scored_trial_has_no_best():
    records = [sweep_report.TrialRecord("t", {}, error="boom")]
    table = sweep_report.trial_table(records, space_keys=[], metrics=["AR@300"],
                                     metric="AR@300", mode="max")
    assert sweep_report.best_trial(table, metric="AR@300", mode="max") is None


def test_plot_trials_writes_a_png(tmp_path):
    path = sweep_report.plot_trials(_records(), tmp_path / "plots" / "sweep.png",
                                    metric="AR@300", best_id="t2")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 300


def test_trial_coverage_columns_need_no_training(tmp_path):
    """Each trial's anchor coverage on the sweep's split at data.image_size (what training will
    see, whatever size the trials run at) and the types its settings leave untrained; an invalid
    combination has none."""
    import torch

    from pipeline.annotations import GroundTruth

    cfg = load_config([PARAMS], ["sweep.image_size=320", "rpn.allow_border=0"])
    # at 640 px, scale 4 is a 64 px anchor, centred at 8 + 16 k: this box is one
    split = GroundTruth("val", tmp_path / "val.parquet", ["a"],
                        [torch.tensor([[120.0, 120.0, 184.0, 184.0]])], [torch.tensor([1])],
                        [torch.tensor([False])])
    coverage = sweep_report.trial_coverage(cfg, {"anchors.scales": [4.0, 8.0, 32.0]}, split,
                                           ["cell"])
    assert coverage["anchors/recall@0.5/cell"] == 1.0 and coverage["anchors/AR/cell"] == 1.0
    assert coverage["ceiling/AR/cell"] == 1.0
    assert coverage["untrained_anchor_types"] == \
        "ratio 0.5 x scale 32 (724x362 px), ratio 2 x scale 32 (362x724 px)"
    assert sweep_report.trial_coverage(cfg, {"rpn.neg_iou": 0.9}, split, ["cell"]) == {}
    records = _records()
    records[0].coverage = coverage
    table = sweep_report.trial_table(records, space_keys=["anchors.scales", "train.lr"],
                                     metrics=["AR@300"], metric="AR@300", mode="max")
    assert list(table.columns)[-len(coverage):] == list(coverage)
    row = table.set_index("trial_id").loc["t2"]
    assert row["anchors/AR"] == 1.0 and "ratio 0.5" in row["untrained_anchor_types"]
