"""Worker loss: a Ray Train worker process SIGKILLed in the middle of ``train_rpn``.

Fault: ``kill -9`` of one of the 2 ``RayTrainWorker`` processes after the first checkpoint,
while training still has steps to go (what an OOM kill or a lost node does to a worker).
Must survive: Ray Train (``FailureConfig(max_failures=train.max_failures)``) restarts the worker
group from the last checkpoint by itself, the same command finishes with exactly the planned
epochs and steps (none lost, none counted twice: 3 epochs of 3 steps), and the stage's one
MLflow run records the restart (tag and metric ``restarts``) and ends FINISHED.

One real Ray run (2 CPU workers, 64 x 64 images, a restart): about 60-90 s on 2 cores.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.training import resume
from tests.support import mlflow_store
from tests.support.factories import write_ray_project
from tests.support.procs import kill_session, session_pids, subprocess_env

EPOCHS, STEPS_PER_EPOCH = 3, 3  # 6 images, 2 workers, batch 1


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            "utf-8", "replace")
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _train_workers(session: int) -> list[int]:
    """PIDs of the Ray Train worker actors started by the command (``ray::RayTrainWorker...``),
    not their DataLoader processes (forked children with the same title)."""
    titled = {pid for pid in session_pids(session) if "RayTrainWorker" in _cmdline(pid)}
    return sorted(pid for pid in titled if _ppid(pid) not in titled)


def _latest(storage: str) -> dict | None:
    runs = list(Path(storage).glob("train_rpn-*"))
    if not runs:
        return None
    with contextlib.suppress(ValueError, OSError):  # Ray may be writing its snapshot
        found = resume.latest_checkpoint(storage, runs[0].name)
        return found[1] if found else None
    return None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_worker_restarts_from_checkpoint_and_the_run_finishes(tmp_path):
    # a checkpoint at each epoch's end (every step would write 3 x 120 MB of VGG-16 state)
    project = write_ray_project(tmp_path, {"train.rpn_epochs": EPOCHS,
                                           "train.checkpoint_every": 0, "train.max_failures": 2,
                                           "train.loader_workers": 0})
    storage = str(project / "checkpoints")
    log = (project / "out.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--stage", "rpn"],
                            cwd=project, env=subprocess_env(), stdout=log,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    killed = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            progress = _latest(storage)
            workers = _train_workers(proc.pid)
            if progress and 1 <= progress["step"] < EPOCHS * STEPS_PER_EPOCH and workers:
                killed = (workers[-1], progress["step"])
                os.kill(workers[-1], signal.SIGKILL)
                break
            time.sleep(0.2)
        assert killed, "no checkpoint with steps left to go: " + (project / "out.log").read_text()
        proc.wait(timeout=420)
    finally:
        if proc.poll() is None:
            kill_session(proc)
        log.close()
    out = (project / "out.log").read_text()
    assert proc.returncode == 0, out[-4000:]
    assert "restarts the worker group from the last checkpoint (failure 1 of at most 2)" in out
    assert "ActorDiedError" in out or "died" in out  # the worker process itself was lost
    assert "train_rpn: starting" in out  # the driver itself did not resume: Ray did
    assert not os.path.exists(f"/proc/{killed[0]}")

    # exactly the planned training: 3 epochs of 3 steps, each epoch once
    metrics = json.loads((project / "metrics" / "train_rpn.json").read_text())
    assert metrics["steps"] == EPOCHS * STEPS_PER_EPOCH and metrics["epochs"] == EPOCHS
    assert not metrics["resumed"]
    with (project / "metrics" / "train_rpn_epochs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [int(r["steps"]) for r in rows] == [STEPS_PER_EPOCH] * EPOCHS

    # one MLflow run, FINISHED, with the restart recorded
    db = project / "mlflow.db"
    run = mlflow_store.only_run(db, "train_rpn")
    assert run.info.status == "FINISHED"
    assert run.data.tags["restarts"] == "1"
    assert run.data.tags["last_restart"].startswith("worker rank(s) [")
    restarts = mlflow_store.client(db).get_metric_history(run.info.run_id, "restarts")
    assert [m.value for m in restarts] == [1.0]
    # step metrics: every step logged; the steps redone after the restart are logged again
    steps = mlflow_store.metric_steps(db, run.info.run_id, "loss")
    assert set(steps) == set(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    # epoch metrics likewise: an epoch that ended (and was logged) just before the kill, but
    # whose checkpoint Ray had not yet registered, is redone and logged again; MLflow keeps both
    # points (the lost attempt and the redo) and shows the latest
    epochs = mlflow_store.metric_steps(db, run.info.run_id, "epoch/loss")
    assert sorted(set(epochs)) == [1, 2, 3] and len(epochs) <= 4
