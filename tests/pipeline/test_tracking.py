"""pipeline.tracking against a throw-away SQLite store."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pipeline import tracking
from pipeline.config import Config
from tests.support import mlflow_store


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One SQLite store for the module (creating one costs seconds); an experiment per test."""
    return tmp_path_factory.mktemp("mlflow") / "store" / "mlflow.db"


@pytest.fixture()
def cfg(store, request, monkeypatch) -> Config:
    monkeypatch.delenv(tracking.ENV_URI, raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    return Config().replace({"tracking.uri": f"sqlite:///{store}",
                             "tracking.experiment": request.node.name})


def _run(cfg: Config, run_id: str):
    return mlflow_store.client(tracking.resolve_uri(cfg.tracking.uri)).get_run(run_id)


def test_resolve_uri_makes_sqlite_absolute_and_env_wins(tmp_path, monkeypatch):
    monkeypatch.delenv(tracking.ENV_URI, raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_uri("sqlite:///m.db") == f"sqlite:///{tmp_path}/m.db"
    assert tracking.resolve_uri("sqlite:///m.db", base=tmp_path) == f"sqlite:///{tmp_path}/m.db"
    assert tracking.resolve_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    monkeypatch.setenv(tracking.ENV_URI, "http://127.0.0.1:5999")
    assert tracking.resolve_uri("sqlite:///m.db") == "http://127.0.0.1:5999"


def test_unreachable_server_fails_fast_naming_the_uri():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(tracking.TrackingError, match=uri):
        tracking.check_reachable(uri, timeout=2)


def test_stage_run_logs_params_tags_config_and_finishes(cfg, store):
    with tracking.stage_run(cfg, "prepare", tags={"extra": 1}) as run:
        run.log_metrics({"loss": 1.5}, step=1)
        run.log_metrics({"loss": 1.0}, step=2)
    got = _run(cfg, run.run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "prepare"
    assert got.data.params["rpn.pos_iou"] == "0.7"
    assert set(cfg.flat()) <= set(got.data.params)
    tags = got.data.tags
    assert tags["dvc_stage"] == "prepare" and tags["extra"] == "1"
    assert tags["mlflow.source.name"] == "frcnn prepare" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.git.commit"]
    client = mlflow_store.client(run.tracking_uri)
    assert [m.value for m in client.get_metric_history(run.run_id, "loss")] == [1.5, 1.0]
    assert "config/params.yaml" in [a.path for a in client.list_artifacts(run.run_id, "config")]
    # artifacts beside the database
    assert (store.parent / tracking.ARTIFACTS_DIR).is_dir()


def test_failed_stage_ends_failed_with_the_error(cfg, monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "dvc.yaml:prepare")
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.stage_run(cfg, "prepare") as run:
            raise RuntimeError("boom")
    got = _run(cfg, run.run_id)
    assert got.info.status == "FAILED"
    assert got.data.tags["error"] == "RuntimeError: boom"
    assert got.data.tags["dvc_stage"] == "dvc.yaml:prepare"


def test_interrupted_stage_ends_killed(cfg):
    with pytest.raises(KeyboardInterrupt):
        with tracking.stage_run(cfg, "train_rpn") as run:
            raise KeyboardInterrupt
    assert _run(cfg, run.run_id).info.status == "KILLED"


def test_reopened_run_keeps_its_params_and_metrics(cfg):
    with pytest.raises(KeyboardInterrupt):
        with tracking.stage_run(cfg, "train_rpn") as first:
            tracking.open_run(first.tracking_uri, first.run_id).log_metrics({"loss": 2.0}, step=1)
            raise KeyboardInterrupt
    changed = cfg.replace({"eval.batch_size": 7})  # a parameter the run key ignores
    with tracking.stage_run(changed, "train_rpn", run_id=first.run_id) as second:
        tracking.open_run(second.tracking_uri, second.run_id).log_metrics({"loss": 1.0}, step=2)
    assert second.run_id == first.run_id
    got = _run(cfg, first.run_id)
    assert got.info.status == "FINISHED" and got.data.params["eval.batch_size"] == "2"
    history = mlflow_store.client(second.tracking_uri).get_metric_history(first.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0)]


def test_unknown_run_id_starts_a_new_run(cfg):
    with tracking.stage_run(cfg, "train_rpn", run_id="0" * 32) as run:
        pass
    assert run.run_id != "0" * 32 and _run(cfg, run.run_id).info.status == "FINISHED"


def test_git_commit_outside_a_repository(tmp_path: Path):
    assert tracking.git_commit(tmp_path) == "unknown"


def test_metric_names_are_made_valid_for_mlflow():
    from mlflow.utils.validation import _validate_metric_name

    names = tracking.flatten_metrics({"recall@0.5/300": 0.5, "AP@0.5/red+cell": 1.0,
                                      "val": {"AR@300": 0.25}})
    assert names == {"recall@0.5/300": 0.5, "AP@0.5/red+cell": 1.0, "val/AR@300": 0.25}
    valid = {tracking.metric_name(k): v for k, v in names.items()}
    assert valid == {"recall_at_0.5/300": 0.5, "AP_at_0.5/red_cell": 1.0, "val/AR_at_300": 0.25}
    for name in valid:
        _validate_metric_name(name)


def test_run_handle_redacts_what_it_writes_and_keeps_first_params(cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("SERVICE_API_KEY", "sk-live-0123456789")
    with tracking.stage_run(cfg, "prepare") as run:
        run.log_params({"note": "key sk-live-0123456789", "rpn.pos_iou": 0.1})  # logged already
        run.set_tags({"where": "s3://KEY:SECRET@bucket/x"})
        run.log_metrics({"AR@300": 0.5, "flag": True})                       # booleans skipped
        run.log_text("uri http://u:p@host", "notes/uri.txt")
        (tmp_path / "table.csv").write_text("a,sk-live-0123456789\n")
        run.log_artifact(tmp_path / "table.csv", "files")
    got = _run(cfg, run.run_id)
    assert got.data.params["note"] == "key ***SERVICE_API_KEY***"
    assert got.data.params["rpn.pos_iou"] == "0.7"  # the config's, logged first
    assert got.data.tags["where"] == "s3://***@bucket/x"
    assert got.data.metrics == {"AR_at_300": 0.5}
    client = mlflow_store.client(run.tracking_uri)
    folder = tmp_path / "downloaded"
    folder.mkdir()
    text = client.download_artifacts(run.run_id, "files/table.csv", str(folder))
    assert Path(text).read_text() == "a,***SERVICE_API_KEY***\n"
    note = client.download_artifacts(run.run_id, "notes/uri.txt", str(folder))
    assert Path(note).read_text() == "uri http://***@host"


def test_child_runs_are_found_again_and_ended_with_their_trial_status(cfg):
    with tracking.stage_run(cfg, "sweep") as parent:
        first = tracking.child_run(parent, "t1", params={"sampled.train.lr": 0.01},
                                   tags={"sweep": "s"})
        second = tracking.child_run(parent, "t2", params={}, tags={})
        first.end(tracking.FAILED, "boom")
        again = tracking.child_run(parent, "t1", params={"sampled.train.lr": 0.5}, tags={})
        assert again.run_id == first.run_id and _run(cfg, first.run_id).info.status == "RUNNING"
        tracking.end_children(parent, {
            "t1": (tracking.FINISHED, "finished", None, {"AR@300": 0.25}),
            "t2": (tracking.KILLED, "stopped early", "stopped", {})})
    one, two = _run(cfg, first.run_id), _run(cfg, second.run_id)
    assert one.data.tags["mlflow.parentRunId"] == parent.run_id and one.data.tags["sweep"] == "s"
    assert one.data.params["sampled.train.lr"] == "0.01"  # the first value stays
    assert (one.info.status, one.data.tags["trial_status"]) == ("FINISHED", "finished")
    assert (two.info.status, two.data.tags["trial_status"]) == ("KILLED", "stopped early")
    assert two.data.tags["error"] == "stopped"
    assert one.data.metrics == {"AR_at_300": 0.25}   # the final value, a plain metric


@pytest.mark.parametrize("preset,expected", [(None, "disabled"), ("false", "enabled")])
def test_mlflow_telemetry_is_off_unless_asked_for(preset: str | None, expected: str) -> None:
    """Importing the pipeline turns MLflow's telemetry off before MLflow loads; a user's own
    setting wins. (Checked in a fresh interpreter, outside pytest, which MLflow treats apart.)"""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_DISABLE_TELEMETRY", "CI")
           and not k.startswith("PYTEST")}
    if preset is not None:
        env["MLFLOW_DISABLE_TELEMETRY"] = preset
    code = ("import pipeline.tracking\n"
            "from mlflow.environment_variables import MLFLOW_DISABLE_TELEMETRY\n"
            "print('disabled' if MLFLOW_DISABLE_TELEMETRY.get() else 'enabled')")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == expected


def test_a_dataset_logged_by_two_runs_at_once_is_logged_once_each(cfg, monkeypatch):
    """Two stages logging the same new split at the same moment: the store's unique key makes
    the slower insert fail; log_split tries once more and finds the row the other one wrote."""
    from mlflow.exceptions import MlflowException

    with tracking.stage_run(cfg, "prepare") as first, tracking.stage_run(cfg, "prepare") as second:
        split = dict(name="train", source="data/prepared/train.parquet", digest="ab" * 16,
                     rows=6, columns=["image_id"], context="training")
        tracking.log_split(first, **split)
        real = type(second.client).log_inputs
        calls = []

        def racing(self, run_id, datasets=None, **kwargs):  # the insert the other run won
            calls.append(run_id)
            if len(calls) == 1:
                raise MlflowException("UNIQUE constraint failed: datasets.experiment_id, ...")
            return real(self, run_id, datasets=datasets, **kwargs)
        monkeypatch.setattr(type(second.client), "log_inputs", racing)
        tracking.log_split(second, **split)
    assert len(calls) == 2
    for run in (first, second):
        (found,) = _run(cfg, run.run_id).inputs.dataset_inputs
        assert found.dataset.name == "train" and found.dataset.digest == "ab" * 8
