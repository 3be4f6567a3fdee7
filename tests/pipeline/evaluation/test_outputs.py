"""pipeline.evaluation.outputs: every report file of the evaluate stage, and where MLflow keeps
it.

Writes failing half-way: ``tests/reliability/test_atomic_outputs.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from PIL import Image

from pipeline.config import Config
from pipeline.evaluation import recall as R
from pipeline.evaluation.outputs import OutputPaths, artifact_dir, write_outputs


def test_outputs_of_a_perfect_model(perfect, tmp_path):
    paths = OutputPaths(tmp_path / "reports", tmp_path / "metrics" / "evaluate.json")
    classes = list(perfect.data.classes)
    written = write_outputs(perfect.results, perfect.values, paths, "test", classes)
    assert all(p.is_file() for p in written)
    table = pd.read_parquet(paths.recall_table)
    assert tuple(table.columns) == R.TABLE_COLUMNS and set(table["split"]) == {"test", "val"}
    summary = pd.read_parquet(paths.recall_summary)
    assert tuple(summary.columns) == R.SUMMARY_COLUMNS
    assert set(summary["size"]) <= set(R.SIZES) and set(summary["metric"]) == {"recall", "AR"}
    iou_csv = pd.read_csv(paths.plots / "recall_vs_iou.csv")
    assert list(iou_csv.columns) == ["iou", *(f"top{b}" for b in perfect.budgets), "anchors",
                                     "ceiling"]
    assert len(iou_csv) == 10 and (iou_csv["top300"] == 1.0).all()
    prop_csv = pd.read_csv(paths.plots / "recall_vs_proposals.csv")
    assert list(prop_csv.columns) == ["budget", "recall@0.5", "recall@0.7"]
    assert prop_csv["budget"].tolist() == list(perfect.budgets)
    for png in ("recall_vs_iou.png", "recall_vs_proposals.png"):
        assert (paths.plots / png).stat().st_size > 1000
    pictures = sorted(paths.pictures.glob("*.png"))
    assert [p.name for p in pictures] == ["test_test_000.png", "test_test_001.png"]
    with Image.open(pictures[1]) as img:
        assert img.size == (perfect.data.size, perfect.data.size)
    assert json.loads(paths.metrics.read_text()) == perfect.values


def test_output_paths_follow_the_config():
    paths = OutputPaths.from_config(Config().replace({"eval.reports_dir": "out/r",
                                                      "eval.metrics_path": "m/e.json"}))
    assert paths.recall_table == Path("out/r/proposal_recall.parquet")
    assert paths.recall_summary == Path("out/r/recall_summary.parquet")
    assert (paths.plots, paths.pictures, paths.metrics) == (Path("out/r/plots"),
                                                            Path("out/r/pictures"),
                                                            Path("m/e.json"))


def test_artifact_dir_mirrors_the_reports_folder(tmp_path):
    paths = OutputPaths(tmp_path / "reports", tmp_path / "metrics" / "evaluate.json")
    assert artifact_dir(paths.recall_table, paths) == "reports"
    assert artifact_dir(paths.plots / "recall_vs_iou.png", paths) == "reports/plots"
    assert artifact_dir(paths.pictures / "test_a.png", paths) == "reports/pictures"
    assert artifact_dir(paths.metrics, paths) == "metrics"
