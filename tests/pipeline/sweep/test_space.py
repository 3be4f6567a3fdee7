"""The sweep without Ray: search space, trial configuration, trial data, the epoch hook,
validation recall, the trial table, the best-params overlay and the plot.

The real sweeps (Ray Tune, a local Ray cluster, ``ray job submit``, resume) are in
``test_sweep_cluster.py``.
"""

from __future__ import annotations

import argparse
import io
import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from pipeline import evaluate, sweep, sweep_report, sweep_space, sweep_trial, train_loop
from pipeline import recall as R
from pipeline.checkpoints import LocalCheckpoints
from pipeline.config import Config, ConfigError, load_config
from tests.conftest import ROOT
from tests.pipeline.test_data import write_prepared
from tests.pipeline.test_train_loop import TINY

PARAMS = ROOT / "params.yaml"

SPACE = {
    "anchors.scales": {"choice": [[8, 16, 32], [4, 8, 16]]},
    "rpn.pos_iou": {"uniform": [0.6, 0.8]},
    "train.lr": {"loguniform": [0.0001, 0.01]},
    "rpn.num_samples": {"randint": [16, 18]},
    "train.lr_schedule": {"choice": ["cosine", "constant"]},
}


# --------------------------------------------------------------------------------------------
# Space and trial configuration


def test_search_space_samples_decode_to_valid_values():
    from ray.tune.search.variant_generator import generate_variants

    space = sweep_space.search_space(SPACE)
    # list choices travel as YAML text (Optuna takes only scalar categories)
    assert space["anchors.scales"].categories == ["[8, 16, 32]", "[4, 8, 16]"]
    seen_samples, seen_scales = set(), set()
    for _ in range(60):
        _, sampled = next(generate_variants(space))
        values = sweep_space.decode(SPACE, sampled)
        assert values["anchors.scales"] in ([8, 16, 32], [4, 8, 16])
        assert 0.6 <= values["rpn.pos_iou"] <= 0.8 and 1e-4 <= values["train.lr"] <= 1e-2
        assert values["train.lr_schedule"] in ("cosine", "constant")
        seen_samples.add(values["rpn.num_samples"])
        seen_scales.add(tuple(values["anchors.scales"]))
        Config().replace(values)  # every sample is a valid config
    assert seen_samples == {16, 17, 18}  # randint: both ends included
    assert len(seen_scales) == 2


def test_decode_refuses_a_value_outside_the_space():
    with pytest.raises(ConfigError, match="anchors.scales"):
        sweep_space.decode(SPACE, {**dict.fromkeys(SPACE, 1), "anchors.scales": "[1, 2]"})
    with pytest.raises(ConfigError, match="no value"):
        sweep_space.decode(SPACE, {})


def test_trial_config_trains_at_the_sweep_size_with_anchors_scaled():
    base = Config().replace({"data.image_size": 640, "sweep.image_size": 320, "sweep.epochs": 3,
                             "sweep.workers_per_trial": 2, "sweep.cpus_per_trial": 1.0,
                             "sweep.gpus_per_trial": 0.5, "rpn.min_size": 16.0})
    cfg = sweep_space.trial_config(base, {"anchors.scales": [4, 8, 16], "rpn.pos_iou": 0.65})
    assert cfg.data.image_size == 320
    assert cfg.anchors.scales == (2.0, 4.0, 8.0)  # same anchor / image proportion as at 640
    assert cfg.rpn.min_size == 8.0 and cfg.rpn.pos_iou == 0.65
    assert cfg.train.rpn_epochs == 3 and cfg.train.num_workers == 2
    assert cfg.train.use_gpu == "true" and cfg.train.gpus_per_worker == 0.25
    assert cfg.train.cpus_per_worker == 0.5 and cfg.train.checkpoint_every == 0
    assert sweep_space.worker_resources(base) == {"CPU": 0.5, "GPU": 0.25}
    # sweep.image_size 0: the prepared size, nothing rescaled
    same = sweep_space.trial_config(base.replace({"sweep.image_size": 0}),
                                    {"anchors.scales": [4, 8, 16]})
    assert same.data.image_size == 640 and same.anchors.scales == (4.0, 8.0, 16.0)
    assert same.train.use_gpu == "true"


def test_trial_config_refuses_an_invalid_combination():
    with pytest.raises(ConfigError, match="neg_iou"):
        sweep_space.trial_config(Config(), {"rpn.pos_iou": 0.5, "rpn.neg_iou": 0.6})


def test_metric_names_are_what_evaluate_reports():
    # a one-image recall table at every default budget: split_metrics names the metrics
    budgets = (50, 100, 300, 1000, 2000)
    rows = R.image_recall_rows(image_id="a", split="val", gt_boxes=torch.tensor([[0., 0, 9, 9]]),
                               labels=torch.tensor([1]), difficult=torch.tensor([False]),
                               best_iou=torch.full((1, 5), 0.8), budgets=budgets)
    summary = R.summarize(R.recall_table([rows]))
    values = evaluate.split_metrics(summary, "val", budgets, None, [])
    names = sweep_space.metric_names(budgets)
    assert set(names) <= set(values)
    assert names == ["AR@50", "AR@100", "AR@300", "AR@1000", "AR@2000", "recall@0.5/300",
                     "recall@0.7/300"]
    assert sweep_space.metric_names((100, 200)) == ["AR@100", "AR@200"]


def test_check_names_the_allowed_metrics():
    sweep_space.check(load_config([PARAMS]))  # params.yaml as shipped
    with pytest.raises(ConfigError, match=r"sweep.metric: 'AR@123'.*AR@300"):
        sweep_space.check(Config().replace({"sweep.metric": "AR@123",
                                            "sweep.space.train.lr": {"uniform": [0.1, 0.2]}}))
    with pytest.raises(ConfigError, match="sweep.space: empty"):
        sweep_space.check(Config())


@pytest.mark.parametrize("override, match", [
    ({"sweep.image_size": 16}, "sweep.image_size"),
    ({"sweep.cpus_per_trial": 0.0}, "both 0"),
    ({"sweep.name": "a/b"}, "sweep.name"),
    ({"sweep.workers_per_trial": 0}, "sweep.workers_per_trial"),
])
def test_sweep_config_checks(override, match):
    with pytest.raises(ConfigError, match=match):
        Config().replace(override)


def test_optuna_without_the_package_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sweep.importlib.util, "find_spec", lambda name: None)
    cfg = load_config([PARAMS]).replace({"sweep.search": "optuna"})
    with pytest.raises(ConfigError, match=r"pip install 'frcnn\[optuna\]'"):
        sweep.check_search(cfg)
    monkeypatch.chdir(tmp_path)
    assert sweep.run(cfg, argparse.Namespace(resume=False)) == 2
    assert "frcnn[optuna]" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Trial data, storage paths, inputs key


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """A project folder with 6 training images prepared at 128 x 128."""
    write_prepared(tmp_path / "data" / "prepared", size=128, num_images=6)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _cfg(**overrides) -> Config:
    return load_config([PARAMS]).replace({"data.image_size": 128, "sweep.image_size": 64,
                                  "sweep.max_train_images": 4, **overrides})


def test_trial_tables_take_the_first_images_resized_with_their_boxes(project):
    tables = sweep.trial_tables(_cfg())
    train = pq.read_table(io.BytesIO(tables["train"])).to_pylist()
    source = pq.read_table(project / "data" / "prepared" / "train.parquet").to_pylist()
    assert [r["image_id"] for r in train] == [r["image_id"] for r in source[:4]]
    for small, big in zip(train, source):
        assert Image.open(io.BytesIO(small["image"])).size == (64, 64)
        assert np.allclose(np.asarray(small["boxes"]), np.asarray(big["boxes"]) / 2)
        assert small["labels"] == big["labels"]
    val = pq.read_table(io.BytesIO(tables["eval"])).column("image_id").to_pylist()
    assert val == ["val_000", "val_001"]  # the whole sweep.split
    # at the prepared size the bytes of the images are kept
    same = sweep.trial_tables(_cfg(**{"sweep.image_size": 0, "sweep.max_train_images": 0}))
    assert pq.read_table(io.BytesIO(same["train"])).column("image").to_pylist() == \
        [r["image"] for r in source]


def test_trial_tables_refuse_data_prepared_at_another_size(project):
    with pytest.raises(ValueError, match="prepared at image_size 128"):
        sweep.trial_tables(_cfg(**{"data.image_size": 256}))


def test_inputs_key_follows_parameters_and_data_not_locations(project):
    cfg = _cfg()
    tables = sweep.trial_tables(cfg)
    key = sweep.inputs_key(cfg, tables)
    moved = cfg.replace({"tracking.uri": "sqlite:////elsewhere.db", "sweep.storage_path": "/x",
                         "sweep.table_path": "t.parquet", "train.ray_address": "auto"})
    assert sweep.inputs_key(moved, tables) == key
    assert sweep.inputs_key(cfg.replace({"sweep.epochs": 3}), tables) != key
    assert sweep.inputs_key(cfg, {**tables, "eval": tables["train"]}) != key


def test_experiment_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sweep.experiment_path(Config()) == f"{tmp_path.resolve()}/ray_results/anchor_sweep"
    cfg = Config().replace({"sweep.storage_path": "s3://bucket/sweeps/", "sweep.name": "s1"})
    assert sweep.experiment_path(cfg) == "s3://bucket/sweeps/s1"


def test_resume_without_a_sweep_is_an_error_before_ray_starts(project, capsys):
    assert sweep.run(_cfg(), argparse.Namespace(resume=True)) == 1
    assert "no sweep to resume" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# In a trial: the epoch hook of the training loop, validation recall


def test_on_epoch_end_metrics_join_the_epoch_log_and_report(tmp_path):
    prepared = write_prepared(tmp_path / "prepared", size=64, num_images=4)
    cfg = Config().replace({**TINY, "train.rpn_epochs": 2})
    calls, logged = [], []

    def hook(model: torch.nn.Module, epoch: int) -> dict[str, float]:
        calls.append((epoch, model.training))
        model.eval()
        return {"AR@300": epoch / 10}

    store = LocalCheckpoints(tmp_path / "ckpt")
    result = train_loop.train(cfg, stage="rpn", train_path=prepared / "train.parquet",
                              num_classes=2, report=store, on_epoch_end=hook,
                              log=lambda m, step: logged.append((dict(m), step)))
    assert calls == [(1, True), (2, True)]  # training mode again after the hook's eval()
    assert [r["AR@300"] for r in store.reports] == [0.1, 0.2]
    assert [r["epoch"] for r in store.reports] == [1, 2]
    epoch_logs = [(m["epoch/AR@300"], step) for m, step in logged if "epoch/AR@300" in m]
    assert epoch_logs == [(0.1, 1), (0.2, 2)]
    assert result.model.training


def test_validation_recall_reports_the_sweep_metrics(tmp_path):
    from detector import FasterRCNN
    from pipeline.modeling import model_kwargs

    prepared = write_prepared(tmp_path / "prepared", size=64, num_images=2)
    cfg = Config().replace(TINY)
    torch.manual_seed(0)
    model = FasterRCNN(2, rpn_only=True, **model_kwargs(cfg))
    split = evaluate.read_split(prepared / "val.parquet", "val")
    values = sweep_trial.validation_recall(model, split, budgets=(50, 300), batch_size=2,
                                     device=torch.device("cpu"))
    assert set(values) == {"AR@50", "AR@300", "recall@0.5/300", "recall@0.7/300"}
    assert all(0.0 <= v <= 1.0 for v in values.values())


# --------------------------------------------------------------------------------------------
# Results: table, best trial, overlay, plot


def _records() -> list[sweep_report.TrialRecord]:
    def hist(*values):
        return [{"epoch": e + 1, "AR@300": v, "AR@50": v / 2} for e, v in enumerate(values)]

    return [
        sweep_report.TrialRecord("t2", {"anchors.scales": [4.0, 8.0], "train.lr": 0.01},
                                 hist(0.2, 0.5), finished=True, wall_seconds=12.0),
        sweep_report.TrialRecord("t1", {"anchors.scales": [8.0, 16.0], "train.lr": 0.001},
                                 hist(0.3, 0.45, 0.4), finished=True, wall_seconds=10.0),
        sweep_report.TrialRecord("t3", {"anchors.scales": [2.0], "train.lr": 0.002},
                                 hist(0.1), wall_seconds=5.0),
        sweep_report.TrialRecord("t4", {"anchors.scales": [2.0], "train.lr": 0.003},
                                 error="ConfigError: rpn.neg_iou (0.5) must be <= rpn.pos_iou"),
    ]


def test_trial_table_one_row_per_trial():
    table = sweep_report.trial_table(_records(), space_keys=["anchors.scales", "train.lr"],
                                     metrics=["AR@50", "AR@300"], metric="AR@300", mode="max")
    assert list(table.columns) == [
        "trial_id", "anchors.scales", "train.lr", "final_AR@50", "final_AR@300", "best_AR@300",
        "best_epoch", "epochs", "status", "wall_seconds", "error"]
    assert list(table["trial_id"]) == ["t1", "t2", "t3", "t4"]
    assert list(table["status"]) == ["finished", "finished", "stopped early", "errored"]
    assert list(table["epochs"]) == [3, 2, 1, 0]
    assert table["final_AR@300"].tolist()[:3] == [0.4, 0.5, 0.1]
    assert table["best_AR@300"].tolist()[:3] == [0.45, 0.5, 0.1]
    assert table["best_epoch"].tolist() == [2, 2, 1, -1]
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


def test_optuna_search_suggests_valid_configs():
    """sweep.search=optuna: TPE (Ray's OptunaSearch) takes the space as Tune declares it and
    every suggestion decodes to a valid config."""
    pytest.importorskip("optuna")
    cfg = Config().replace({"sweep.search": "optuna", "sweep.space": SPACE})
    searcher = sweep._searcher(cfg)
    assert type(searcher).__name__ == "OptunaSearch"
    assert searcher.set_search_properties("AR@300", "max", sweep_space.search_space(SPACE))
    for i in range(5):
        values = sweep_space.decode(SPACE, searcher.suggest(f"t{i}"))
        assert values["anchors.scales"] in ([8, 16, 32], [4, 8, 16])
        Config().replace(values)
        searcher.on_trial_complete(f"t{i}", {"AR@300": 0.1 * i})
