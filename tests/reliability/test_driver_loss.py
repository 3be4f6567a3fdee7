"""Driver loss under DVC: ``dvc repro train_rpn`` killed part-way, then run again.

Fault: ``kill -9`` of ``dvc repro`` and everything it started (the ``frcnn train`` driver, Ray,
its workers) once training has written a checkpoint, as a lost login node or a CI job cancelled
mid-stage would. Must survive: the same ``dvc repro train_rpn`` afterwards does not redo
``prepare`` (DVC recorded it), resumes training from the last checkpoint rather than from
scratch (``train_rpn: resuming from checkpoint``), finishes with exactly the planned steps, ends
the same MLflow run FINISHED, and leaves ``dvc status`` clean.

The same for the sweep: ``dvc repro sweep`` killed once its first trial has finished; the
rerun resumes the Tune experiment (it says so), does not train the finished trial again, ends
the same MLflow parent run FINISHED with one child per trial, and leaves ``dvc status`` clean.

(`frcnn train` killed and rerun without DVC: tests/pipeline/test_train.py; a sweep stopped with
``ray job stop`` and resumed with ``--resume``: tests/pipeline/test_sweep_cluster.py.)

Each test: one real ``dvc repro`` + Ray run, killed, then a second one: about 60-120 s on 2
cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline import train
from tests.conftest import ROOT
from tests.pipeline.test_train import _session_pids
from tests.pipeline.test_train_loop import TINY

BIN = Path(sys.executable).parent
EPOCHS = 3


def _repo(tmp_path: Path, extra: dict | None = None) -> tuple[Path, dict[str, str]]:
    """A fresh git + DVC repository holding the project's code, dvc.yaml and tiny params
    (``extra``: more ``section.key`` values)."""
    repo = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "tmp", "cache")
    for folder in ("pipeline", "detector", ".dvc"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=ignore)
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in {**TINY, "data.synthetic_images": 8, "data.num_workers": 1,
                       "train.num_workers": 1, "train.batch_size": 1, "train.loader_workers": 0,
                       "train.rpn_epochs": EPOCHS, "train.checkpoint_every": 0,
                       "train.use_gpu": "false", **(extra or {})}.items():
        section, leaf = key.split(".")
        params[section][leaf] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_STAGE")}
    env.update(DVC_NO_ANALYTICS="1", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PYTHONUNBUFFERED="1", PYTHONPATH=str(repo),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")
    for args in (["git", "init", "-q"], ["git", "add", "-A"],
                 ["git", "commit", "-q", "-m", "fresh clone"]):
        subprocess.run(args, cwd=repo, env=env, check=True, capture_output=True, timeout=60)
    return repo, env


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the session ``proc`` leads: dvc, the frcnn driver, Ray and its workers."""
    for pid in _session_pids(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _stage_run(repo: Path, name: str) -> tuple[MlflowClient, str, Any]:
    """``(client, experiment id, the one MLflow run named name)`` of the repository's store."""
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("frcnn").experiment_id
    (run,) = client.search_runs([experiment], f"attributes.run_name = '{name}'")
    return client, experiment, run


def _repro_again(repo: Path, env: dict[str, str], stage: str) -> str:
    """``dvc repro <stage>`` after the kill: it succeeds without re-running ``prepare``."""
    again = subprocess.run([str(BIN / "dvc"), "repro", stage], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=420)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-4000:]
    assert "Running stage 'prepare'" not in out  # recorded by DVC before the kill
    return out


def _checkpoint_step(storage: Path) -> int:
    runs = list(storage.glob("train_rpn-*"))
    with contextlib.suppress(ValueError, OSError):  # Ray may be writing its snapshot
        found = runs and train.latest_checkpoint(str(storage), runs[0].name)
        return found[1]["step"] if found else 0
    return 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dvc_repro_killed_mid_training_resumes_and_ends_clean(tmp_path):
    if not (BIN / "dvc").is_file() or shutil.which("git") is None:
        pytest.skip("needs git and dvc (in the virtual environment)")
    repo, env = _repo(tmp_path)
    dvc = str(BIN / "dvc")
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen([dvc, "repro", "train_rpn"], cwd=repo, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, step = time.monotonic() + 300, 0
        while time.monotonic() < deadline and proc.poll() is None:
            step = _checkpoint_step(repo / "checkpoints")
            if step >= 1:  # the first epoch's checkpoint: two epochs to go
                break
            time.sleep(0.2)
        assert step >= 1 and proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        _kill_session(proc)
        log.close()
    first = (tmp_path / "first.log").read_text()
    assert "Running stage 'prepare'" in first and "Running stage 'train_rpn'" in first
    assert not (repo / "models" / "rpn.pt").exists()
    client, experiment, killed = _stage_run(repo, "train_rpn")

    out = _repro_again(repo, env, "train_rpn")
    resumed = [ln for ln in out.splitlines() if ln.startswith("train_rpn: resuming from")]
    assert resumed, out[-3000:]
    assert int(resumed[0].rsplit("step ", 1)[1].rstrip(")")) >= step
    assert "train_rpn: starting" not in out

    metrics = json.loads((repo / "metrics" / "train_rpn.json").read_text())
    steps_per_epoch = metrics["steps"] // EPOCHS
    assert metrics["resumed"] and metrics["epochs"] == EPOCHS and steps_per_epoch >= 3
    assert metrics["steps"] == EPOCHS * steps_per_epoch
    _, _, run = _stage_run(repo, "train_rpn")
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"

    status = subprocess.run([dvc, "status", "train_rpn"], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert {"prepare", "train_rpn"} <= set(lock)


#: A 2-trial sweep at 64 x 64, one trial at a time, 2 epochs each (anchors of 16 and 32 pixels).
SWEEP = {
    "data.synthetic_images": 10, "sweep.image_size": 0, "sweep.max_train_images": 4,
    "sweep.num_samples": 2, "sweep.max_concurrent_trials": 1, "sweep.epochs": 2,
    "sweep.space": {"anchors.scales": {"choice": [[1, 2], [0.5, 1, 2]]},
                    "rpn.pos_iou": {"uniform": [0.6, 0.8]},
                    "train.lr": {"loguniform": [0.001, 0.02]}},
}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dvc_repro_sweep_killed_after_a_trial_resumes_and_ends_clean(tmp_path):
    if not (BIN / "dvc").is_file() or shutil.which("git") is None:
        pytest.skip("needs git and dvc (in the virtual environment)")
    repo, env = _repo(tmp_path, SWEEP)
    dvc = str(BIN / "dvc")
    experiment = repo / "ray_results" / "anchor_sweep"
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen([dvc, "repro", "sweep"], cwd=repo, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            if list((experiment / "trials").glob("*.json")) and \
                    list(experiment.glob("experiment_state*.json")):
                break
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        (finished,) = [p.stem for p in (experiment / "trials").glob("*.json")]
    finally:
        _kill_session(proc)
        log.close()
    assert not (repo / "reports" / "sweep.parquet").exists()
    client, experiment_id, killed = _stage_run(repo, "sweep")

    out = _repro_again(repo, env, "sweep")
    assert "resuming it" in out, out[-3000:]

    import pandas as pd
    table = pd.read_parquet(repo / "reports" / "sweep.parquet")
    assert len(table) == 2 and list(table["status"]) == ["finished", "finished"]
    assert (table["epochs"] == 2).all()
    _, _, parent = _stage_run(repo, "sweep")
    assert parent.info.run_id == killed.info.run_id and parent.info.status == "FINISHED"
    children = client.search_runs(
        [experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(table["trial_id"])
    assert all(c.info.status == "FINISHED" for c in children)
    # the trial that had finished was not trained again: each step logged once
    (child,) = [c for c in children if c.data.tags["trial_id"] == finished]
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "loss")]
    assert steps == sorted(set(steps)) and len(steps) >= 2

    status = subprocess.run([dvc, "status", "sweep"], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
