"""Driver loss under DVC: ``dvc repro train_rpn`` killed part-way, then run again.

Fault: ``kill -9`` of ``dvc repro`` and everything it started (the ``frcnn train`` driver, Ray,
its workers) once training has written a checkpoint, as a lost login node or a CI job cancelled
mid-stage would. Must survive: the same ``dvc repro train_rpn`` afterwards does not redo
``prepare`` (DVC recorded it), resumes training from the last checkpoint rather than from
scratch (``train_rpn: resuming from checkpoint``), finishes with exactly the planned steps, ends
the same MLflow run FINISHED, and leaves ``dvc status`` clean.

(A sweep stopped after its first trial and resumed, not training that trial again, with the
same MLflow parent run: tests/pipeline/sweep/test_driver.py, as a Ray job on a local cluster.)
(A worker node lost mid-run, with Ray restarting the worker group on the nodes left:
tests/pipeline/test_cluster.py.)

One real ``dvc repro`` + Ray run, killed, then a second one: about 60-120 s on 2 cores.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest
import yaml

from pipeline.training import resume
from tests.support import mlflow_store
from tests.support.dvc_repo import DvcRepo
from tests.support.factories import TINY
from tests.support.procs import kill_session

EPOCHS = 3


def _repo(dvc_repo, extra: dict | None = None) -> DvcRepo:
    """A fresh git + DVC repository of the project with :data:`TINY` parameters, 8 synthetic
    images, one worker of batch 1, ``EPOCHS`` epochs with a checkpoint at each epoch's end
    (``extra``: more ``section.key`` values)."""
    return dvc_repo({**TINY, "data.synthetic_images": 8, "data.num_workers": 1,
                     "train.num_workers": 1, "train.batch_size": 1, "train.loader_workers": 0,
                     "train.rpn_epochs": EPOCHS, "train.checkpoint_every": 0,
                     "train.use_gpu": "false", **(extra or {})})


def _repro_again(repo: DvcRepo, stage: str) -> str:
    """``dvc repro <stage>`` after the kill: it succeeds without re-running ``prepare``."""
    done = repo.run(repo.dvc_exe, "repro", stage, timeout=420)
    out = done.stdout + done.stderr
    assert "Running stage 'prepare'" not in out  # recorded by DVC before the kill
    return out


def _checkpoint_step(storage: Path) -> int:
    runs = list(storage.glob("train_rpn-*"))
    with contextlib.suppress(ValueError, OSError):  # Ray may be writing its snapshot
        found = runs and resume.latest_checkpoint(str(storage), runs[0].name)
        return found[1]["step"] if found else 0
    return 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dvc_repro_killed_mid_training_resumes_and_ends_clean(tmp_path, dvc_repo):
    repo = _repo(dvc_repo)
    log = (tmp_path / "first.log").open("w")
    proc = repo.popen("repro", "train_rpn", log=log)
    try:
        deadline, step = time.monotonic() + 300, 0
        while time.monotonic() < deadline and proc.poll() is None:
            step = _checkpoint_step(repo.path / "checkpoints")
            if step >= 1:  # the first epoch's checkpoint: two epochs to go
                break
            time.sleep(0.2)
        assert step >= 1 and proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        kill_session(proc)  # dvc, the frcnn driver, Ray and its workers
        log.close()
    first = (tmp_path / "first.log").read_text()
    assert "Running stage 'prepare'" in first and "Running stage 'train_rpn'" in first
    assert not (repo.path / "models" / "rpn.pt").exists()
    db = repo.path / "mlflow.db"
    killed = mlflow_store.only_run(db, "train_rpn")
    assert killed.info.status == "RUNNING"  # a killed process cannot end its run

    out = _repro_again(repo, "train_rpn")
    resumed = [ln for ln in out.splitlines() if ln.startswith("train_rpn: resuming from")]
    assert resumed, out[-3000:]
    assert int(resumed[0].rsplit("step ", 1)[1].rstrip(")")) >= step
    assert "train_rpn: starting" not in out

    metrics = json.loads((repo.path / "metrics" / "train_rpn.json").read_text())
    steps_per_epoch = metrics["steps"] // EPOCHS
    assert metrics["resumed"] and metrics["epochs"] == EPOCHS and steps_per_epoch >= 3
    assert metrics["steps"] == EPOCHS * steps_per_epoch
    # the same MLflow run, reopened and finished, its loss history continued without a gap
    run = mlflow_store.only_run(db, "train_rpn")
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert set(mlflow_store.metric_steps(db, run.info.run_id, "loss")) == \
        set(range(1, metrics["steps"] + 1))
    assert not list((repo.path / "checkpoints").glob("train_rpn-*"))  # finished: removed

    status = repo.dvc("status", "train_rpn", timeout=120)
    assert "up to date" in status, status
    lock = yaml.safe_load((repo.path / "dvc.lock").read_text())["stages"]
    assert {"prepare", "train_rpn"} <= set(lock)
