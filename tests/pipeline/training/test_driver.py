"""The ``train`` stage: run key, resume detection, and `frcnn train` for real on Ray.

The two ``slow`` tests start a local Ray with 2 CPU workers (gloo DDP) at 64 x 64; each start
costs about 25-40 s on a 2-core machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from detector import load_model
from pipeline import checkpoints, train
from pipeline.cli import main
from pipeline.config import Config
from tests.pipeline.test_data import write_prepared
from tests.pipeline.test_train_loop import TINY

RAY_PARAMS = {
    **TINY,
    "train.num_workers": 2, "train.cpus_per_worker": 0.5, "train.batch_size": 1,
    "train.loader_workers": 1, "train.use_gpu": "false",
}


def _project(tmp_path: Path, **overrides) -> Path:
    """A project folder: prepared data (6 train images at 64 x 64) and a params.yaml."""
    write_prepared(tmp_path / "data" / "prepared", size=64, num_images=6)
    cfg = Config().replace({**RAY_PARAMS, **overrides})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    return tmp_path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_STAGE")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


def _frcnn(project: Path, *args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "train", *args], cwd=project,
                          env=_env(), capture_output=True, text=True, timeout=timeout)


def _mlflow_runs(project: Path, name: str):
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("frcnn")
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'")
    return client, runs


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return out


# --------------------------------------------------------------------------------------------
# Without Ray


def test_run_key_follows_training_inputs_only(tmp_path):
    project = _project(tmp_path)
    data = project / "data" / "prepared" / "train.parquet"
    cfg = Config().replace(RAY_PARAMS)
    key = train.run_key(cfg, "rpn", data, None)
    assert key == train.run_key(cfg.replace({"eval.batch_size": 9, "train.log_every": 5,
                                             "train.use_gpu": "auto",
                                             "train.checkpoint_every": 3}), "rpn", data, None)
    assert key != train.run_key(cfg.replace({"train.lr": 0.02}), "rpn", data, None)
    assert key != train.run_key(cfg.replace({"rpn.pos_iou": 0.6}), "rpn", data, None)
    assert key != train.run_key(cfg, "frcnn", data, None)
    other = write_prepared(tmp_path / "other", size=64, num_images=6, seed=1) / "train.parquet"
    assert key != train.run_key(cfg, "rpn", other, None)


def test_latest_checkpoint_reads_rays_snapshot(tmp_path):
    run = tmp_path / "train_rpn-abc"
    assert train.latest_checkpoint(str(tmp_path), "train_rpn-abc") is None
    (run / "checkpoint_e000_s0000002").mkdir(parents=True)
    (run / "checkpoint_e000_s0000002" / checkpoints.PROGRESS).write_text(
        json.dumps({"epoch": 0, "step": 2}))
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_e000_s0000002"}}))
    path, progress = train.latest_checkpoint(str(tmp_path), "train_rpn-abc")
    assert path == str(run / "checkpoint_e000_s0000002") and progress["step"] == 2


def test_missing_prepared_data_fails_before_ray(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--stage", "rpn"]) == 1
    assert "run `frcnn prepare` first" in capsys.readouterr().err


def test_frcnn_stage_needs_the_rpn_model(tmp_path, monkeypatch, capsys):
    project = _project(tmp_path)
    monkeypatch.chdir(project)
    assert main(["train", "--stage", "frcnn"]) == 1
    assert "frcnn train --stage rpn` first" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# With Ray, for real


@pytest.mark.slow
def test_train_rpn_on_two_ray_workers(tmp_path):
    project = _project(tmp_path, **{"train.rpn_epochs": 2, "train.checkpoint_every": 2,
                                    "train.keep_checkpoints": True})
    done = _frcnn(project, "--stage", "rpn")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "train_rpn: 2 worker(s), CPU" in done.stdout

    # the model file loads (weights_only=True) into an identical model
    model, meta = load_model(project / "models" / "rpn.pt")
    assert meta["classes"] == ["class1", "class2"] and model.config["image_size"] == 64
    payload = torch.load(project / "models" / "rpn.pt", weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, payload["state_dict"][key])

    # metrics and per-epoch plots
    metrics = json.loads((project / "metrics" / "train_rpn.json").read_text())
    assert metrics["steps"] == 6 and metrics["epochs"] == 2 and not metrics["resumed"]
    assert metrics["images_per_s"] > 0 and metrics["num_workers"] == 2
    rows = (project / "metrics" / "train_rpn_epochs.csv").read_text().splitlines()
    assert rows[0] == "epoch,steps,loss,rpn_cls,rpn_reg" and len(rows) == 3

    # checkpoints (kept: train.keep_checkpoints), the last one holding the final model
    (run_dir,) = (project / "checkpoints").glob("train_rpn-*")
    names = sorted(p.name for p in run_dir.glob("checkpoint_e*"))
    assert names == ["checkpoint_e001_s0000004", "checkpoint_e002_s0000006"]  # num_to_keep=2
    last = run_dir / names[-1]
    assert checkpoints.read_progress(last)["done"]
    assert checkpoints.read_state(last)["step"] == 6
    assert (last / checkpoints.MODEL).read_bytes() == (project / "models" / "rpn.pt").read_bytes()

    # one FINISHED MLflow run with params, tags, step metrics and artifacts
    client, runs = _mlflow_runs(project, "train_rpn")
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_workers"] == "2"
    assert run.data.params["data.image_size"] == "64"
    assert {"git_commit", "dvc_stage", "ray_job_id"} <= set(run.data.tags)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    assert len(client.get_metric_history(run.info.run_id, "lr")) == 6
    assert {"rpn_cls", "rpn_reg", "images_per_s", "epoch/loss"} <= set(run.data.metrics)
    assert set(_artifacts(client, run.info.run_id)) == {
        "config/params.yaml", "model/rpn.pt", "metrics/train_rpn.json",
        "metrics/train_rpn_epochs.csv"}


def _session_pids(sid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields after "(comm)": state ppid pgrp session ...
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint(tmp_path):
    project = _project(tmp_path, **{"train.rpn_epochs": 3, "train.checkpoint_every": 1})
    storage = str(project / "checkpoints")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--stage", "rpn"],
                            cwd=project, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        found = None
        while time.monotonic() < deadline and proc.poll() is None:
            runs = list(Path(storage).glob("train_rpn-*"))
            found = runs and train.latest_checkpoint(storage, runs[0].name)
            if found and found[1]["step"] >= 2:
                break
            time.sleep(0.5)
        assert found, "no checkpoint appeared"
        assert proc.poll() is None, "the run finished before it could be killed"
    finally:
        # kill -9 the command and everything it started (Ray's processes share its session)
        for pid in _session_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    client, runs = _mlflow_runs(project, "train_rpn")
    (killed,) = runs
    assert killed.info.status == "RUNNING"  # a killed process cannot end its run

    done = _frcnn(project, "--stage", "rpn")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ckpt_path, progress = found
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("train_rpn: resuming")]
    assert lines, done.stdout[-3000:]
    step = int(lines[0].rsplit("step ", 1)[1].rstrip(")"))
    assert step >= progress["step"] >= 2
    assert "train_rpn: starting" not in done.stdout
    metrics = json.loads((project / "metrics" / "train_rpn.json").read_text())
    assert metrics["resumed"] and metrics["steps"] == 9 and metrics["epochs"] == 3
    # the same MLflow run, reopened and finished, its loss history continued
    _, runs = _mlflow_runs(project, "train_rpn")
    (run,) = runs
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "loss")}
    assert steps == set(range(1, 10))
    assert not list(Path(storage).glob("train_rpn-*"))  # finished: checkpoints removed
