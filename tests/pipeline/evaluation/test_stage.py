"""The evaluate stage (``frcnn evaluate``): missing and mismatched inputs named before any work,
and a real run writing every output and logging it to MLflow."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.config import Config
from pipeline.errors import DataError, MissingInputError
from pipeline.evaluation import run
from pipeline.evaluation.stage import check_compatible, evaluate_stage
from tests.support import mlflow_store
from tests.support.factories import write_prepared


def _config(tmp_path: Path, prepared: Path, **extra) -> Config:
    return Config().replace({
        "data.out_dir": str(prepared), "eval.reports_dir": str(tmp_path / "reports"),
        "eval.metrics_path": str(tmp_path / "metrics" / "evaluate.json"),
        "train.rpn_model": str(tmp_path / "models" / "rpn.pt"),
        "train.frcnn_model": str(tmp_path / "models" / "frcnn.pt"),
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", **extra})


def _tiny_detector(num_classes: int, size: int, **kw):
    from detector import FasterRCNN, RoIHeadSettings
    torch.manual_seed(0)
    return FasterRCNN(num_classes, image_size=size, roi_head=RoIHeadSettings(hidden_dim=32), **kw)


def _prepared(tmp_path: Path, splits: dict[str, int], size: int = 64) -> Path:
    return write_prepared(tmp_path / "prepared", splits=splits, size=size, classes=("cat", "dog"),
                          content="noise")


def test_missing_inputs_are_named(tmp_path):
    with pytest.raises(MissingInputError) as caught:
        evaluate_stage(_config(tmp_path, tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere" / "classes.json") in str(caught.value)
    prepared = _prepared(tmp_path, {"test": 1, "val": 1})
    with pytest.raises(MissingInputError) as caught:
        evaluate_stage(_config(tmp_path, prepared))
    assert str(tmp_path / "models" / "rpn.pt") in str(caught.value)
    assert "frcnn train --stage rpn" in str(caught.value)
    (prepared / "val.parquet").unlink()
    with pytest.raises(MissingInputError) as caught:
        evaluate_stage(_config(tmp_path, prepared))
    assert str(prepared / "val.parquet") in str(caught.value)
    assert not (tmp_path / "mlflow.db").exists()  # refused before the stage's MLflow run


def test_a_model_of_another_size_or_class_count_is_refused(tmp_path):
    model = _tiny_detector(3, 64)
    check_compatible(model, "m.pt", 64, 3)
    with pytest.raises(DataError, match=r"m.pt: model built for 64x64 images and 3 classes, but "
                                        r"the prepared data has 128x128 and 3; re-run training"):
        check_compatible(model, "m.pt", 128, 3)
    with pytest.raises(DataError, match="has 64x64 and 2"):
        check_compatible(model, "m.pt", 64, 2)


@pytest.mark.slow
def test_run_writes_everything_and_logs_to_mlflow(tmp_path, monkeypatch, capsys):
    from detector.serialization import save_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    size = 64
    prepared = _prepared(tmp_path, {"test": 3, "val": 2}, size=size)
    cfg = _config(tmp_path, prepared, **{"eval.proposal_budgets": [5, 50, 300],
                                         "eval.num_pictures": 2})
    model = _tiny_detector(2, size)
    save_model(cfg.train.rpn_model, model)
    save_model(cfg.train.frcnn_model, model)
    assert run(cfg) == 0
    out = capsys.readouterr().out
    assert "AR@300" in out and "mAP@0.5" in out
    values = json.loads(Path(cfg.eval.metrics_path).read_text())
    assert {"recall@0.5/300", "recall@0.7/300", "AR@300", "mAP@0.5", "val"} <= set(values)
    # the detector's own RPN (frcnn.pt), whose proposals the mAP rests on, and the ceiling
    assert {"detector_rpn/AR@300", "detector_rpn/recall@0.5/300", "detector_rpn/AR@300/mean_class",
            "ceiling/AR", "AR@300/mean_class"} <= set(values)
    assert "detector_rpn/AR@300" in values["val"]
    assert not [k for k in values if k.startswith("detector_rpn/") and "/class" in k]
    db = tmp_path / "mlflow.db"
    (logged,) = mlflow_store.runs(db)
    assert logged.info.run_name == "evaluate" and logged.info.status == "FINISHED"
    assert logged.data.metrics["AR_at_300"] == pytest.approx(values["AR@300"])
    assert logged.data.metrics["val/AR_at_300"] == pytest.approx(values["val"]["AR@300"])
    artifacts = set(mlflow_store.artifacts(db, logged.info.run_id, "reports"))
    assert {"reports/proposal_recall.parquet", "reports/recall_summary.parquet"} <= artifacts
    assert {a.rsplit("/", 1)[0] for a in artifacts} >= {"reports/plots", "reports/pictures"}
    assert not math.isnan(values["AR@300"])
