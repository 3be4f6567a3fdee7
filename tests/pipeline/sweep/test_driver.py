"""pipeline.sweep.driver: where a sweep lives and when it resumes; ``frcnn sweep`` for real (Ray
Tune trials that each fit a Ray Train worker group, on the CPU).

- :func:`test_sweep_job_on_a_local_cluster_is_stopped_and_resumed`: ``ray start --head`` on
  127.0.0.1 (free ports, its own temp folder, so no other Ray on the machine is touched or
  found), ``ray job submit`` of a 2-trial sweep, ``ray job stop`` once the first trial has
  finished, ``ray job submit ... frcnn sweep --resume``; the finished trial is not trained
  again, no child run is duplicated (about 100 s); the outputs and the MLflow parent / child
  runs. (The sweep inside a whole `dvc repro`, with a failing trial, on one machine and on a
  multi-node cluster: tests/pipeline/test_dvc_repro.py, tests/pipeline/test_cluster.py; the
  ASHA settings: test_scheduler.py.)

Each trial's Ray Train worker group costs about 20-25 s of start-up here; the training itself is
a few seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.config import Config, load_config
from pipeline.errors import DataError
from pipeline.ray_session import local_token
from pipeline.sweep import run
from pipeline.sweep.driver import experiment_path
from tests.support import BIN, ROOT, mlflow_store
from tests.support.factories import TINY_SWEEP, write_params, write_prepared
from tests.support.ray_cluster import ray_cluster
from tests.support.procs import subprocess_env

SPACE_KEYS = list(TINY_SWEEP["sweep.space"])
METRIC = "AR@300/mean_class"  # params.yaml's sweep.metric


# --------------------------------------------------------------------------------------------
# Before Ray: where the sweep lives, what --resume needs


def test_experiment_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert experiment_path(Config()) == f"{tmp_path.resolve()}/ray_results/anchor_sweep"
    cfg = Config().replace({"sweep.storage_path": "s3://bucket/sweeps/", "sweep.name": "s1"})
    assert experiment_path(cfg) == "s3://bucket/sweeps/s1"


def test_resume_without_a_sweep_is_an_error_before_ray_starts(project, sweep_cfg):
    import ray

    with pytest.raises(DataError, match="no sweep to resume; run `frcnn sweep` without "
                                        "--resume"):
        run(sweep_cfg(), argparse.Namespace(resume=True))
    assert not ray.is_initialized()


@pytest.mark.parametrize("state, restorable, resume, expected", [
    ({"inputs_key": "k"}, True, True, True),                       # --resume, same inputs
    ({"inputs_key": "k"}, True, False, True),                      # interrupted: picked up
    ({"inputs_key": "k", "finished": True}, True, False, False),   # finished: afresh
    ({"inputs_key": "other"}, True, False, False),                 # other inputs: afresh
])
def test_decide_resume(tmp_path, monkeypatch, state, restorable, resume, expected):
    from ray import tune

    from pipeline.sweep import driver

    monkeypatch.setattr(tune.Tuner, "can_restore", staticmethod(lambda path: restorable))
    experiment = tmp_path / "anchor_sweep"
    (experiment / "trials").mkdir(parents=True)
    assert driver._decide_resume(str(experiment), "k", state, resume) is expected
    assert experiment.exists() == expected  # what is not resumed is removed


def test_a_folder_the_sweep_did_not_make_is_never_deleted_nor_restored(tmp_path, monkeypatch):
    """No ``frcnn_sweep.json`` (the sweep's marker): an empty or absent folder is used; one
    holding files (``sweep.name: checkpoints``, say) is refused, naming it, and left whole;
    Tune's state in it is never looked at, let alone unpickled."""
    from ray import tune

    from pipeline.sweep import driver

    looked = []
    monkeypatch.setattr(tune.Tuner, "can_restore",
                        staticmethod(lambda path: looked.append(path) or True))
    assert driver._decide_resume(str(tmp_path / "absent"), "k", {}, resume=False) is False
    (tmp_path / "empty").mkdir()
    assert driver._decide_resume(str(tmp_path / "empty"), "k", {}, resume=False) is False
    foreign = tmp_path / "checkpoints"
    (foreign / "train_rpn-abc").mkdir(parents=True)
    (foreign / "train_rpn-abc" / "model.pt").write_bytes(b"weights")
    (foreign / "tuner.pkl").write_bytes(b"not ours")
    with pytest.raises(DataError, match=f"{foreign}: holds files but no frcnn_sweep.json"):
        driver._decide_resume(str(foreign), "k", {}, resume=False)
    with pytest.raises(DataError, match="no sweep to resume"):
        driver._decide_resume(str(foreign), "k", {}, resume=True)
    assert (foreign / "train_rpn-abc" / "model.pt").read_bytes() == b"weights"
    assert looked == []


def test_decide_resume_refuses_changed_inputs(tmp_path, monkeypatch):
    from ray import tune

    from pipeline.sweep import driver

    monkeypatch.setattr(tune.Tuner, "can_restore", staticmethod(lambda path: True))
    with pytest.raises(DataError, match="parameters or data changed since this sweep started"):
        driver._decide_resume(str(tmp_path), "new", {"inputs_key": "old"}, resume=True)
    assert tmp_path.exists()


# --------------------------------------------------------------------------------------------
# With Ray, for real


def _check_outputs(out: Path, *, trials: int, epochs: int) -> pd.DataFrame:
    table = pd.read_parquet(out / "reports" / "sweep.parquet")
    assert len(table) == trials and table["trial_id"].is_unique
    assert set(SPACE_KEYS) <= set(table.columns)
    assert {"final_AR@300", f"best_{METRIC}", f"final_{METRIC}", "best_epoch", "epochs", "status",
            "wall_seconds", "train_seconds", "score_seconds", "anchors/AR", "ceiling/AR"
            } <= set(table.columns)
    assert any(c.startswith("final_AR@300/class") for c in table.columns)   # per class
    assert (table["train_seconds"] > 0).all() and (table["score_seconds"] > 0).all()
    assert (table["train_seconds"] + table["score_seconds"] <= table["wall_seconds"] + 1).all()
    assert set(table["status"]) <= {"finished", "stopped early"}, table["error"].tolist()
    assert (table["epochs"] >= 1).all() and (table["epochs"] <= epochs).all()
    assert ((table["status"] == "finished") == (table["epochs"] == epochs)).all()
    assert table["final_AR@300"].between(0, 1).all() and (table["wall_seconds"] > 0).all()
    # the overlay: the best trial's values, and it applies over params.yaml
    best = table.loc[table[f"final_{METRIC}"].idxmax()]
    overlay = out / "sweeps" / "best_params.yaml"
    cfg = load_config([ROOT / "params.yaml", overlay])
    setting = yaml.safe_load(best["anchors"])              # the whole anchor setting, as text
    if "shapes" in setting:                                # 'fit': fitted on the train split
        assert [list(s) for s in cfg.anchors.shapes] == setting["shapes"]
    else:
        assert cfg.anchors.shapes is None and list(cfg.anchors.scales) == setting["scales"]
    assert cfg.train.lr == pytest.approx(best["train.lr"])
    assert (out / "reports" / "sweep.png").stat().st_size > 1000
    return table


def _check_mlflow(out: Path, table: pd.DataFrame, *, epochs: int) -> tuple:
    db = out / "mlflow.db"
    parents, children = mlflow_store.sweep_runs(db)
    (parent,) = parents
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics[f"best/{METRIC.replace('@', '_at_')}"] == pytest.approx(
        table[f"final_{METRIC}"].max())
    assert {c.data.tags["trial_id"] for c in children} == set(table["trial_id"])
    assert len(children) == len(table)  # one child per trial, none duplicated
    by_trial = {c.data.tags["trial_id"]: c for c in children}
    for _, row in table.iterrows():
        child = by_trial[row["trial_id"]]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["trial_status"] == row["status"]
        assert child.info.status == ("FINISHED" if row["status"] == "finished" else "KILLED")
        assert float(child.data.params["sampled.train.lr"]) == pytest.approx(row["train.lr"])
        assert child.data.params["data.image_size"] == "64"  # what the trial trained at
        # per-epoch recall (a stopped trial's workers may log part of one more epoch)
        steps = mlflow_store.metric_steps(db, child.info.run_id, "epoch/AR_at_300")
        assert steps[:row["epochs"]] == list(range(1, row["epochs"] + 1))
    return parent, by_trial


def _print_table(title: str, table: pd.DataFrame, seconds: float) -> None:
    shown = table.drop(columns=["error"])
    print(f"\n{title}: {len(table)} trials in {seconds:.0f} s\n{shown.to_string(index=False)}")


# --------------------------------------------------------------------------------------------
# Local Ray


# --------------------------------------------------------------------------------------------
# A Ray cluster started with `ray start`, the sweep submitted with `ray job submit`


def _submit(cluster, job_dir: Path, submission_id: str, *args: str) -> None:
    """``ray job submit`` as a user of the cluster: with its token in the environment."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--working-dir",
           str(job_dir), "--submission-id", submission_id, "--no-wait", "--",
           str(BIN / "frcnn"), "sweep", "--params", "params.yaml", *args]
    done = subprocess.run(cmd, env=subprocess_env(**cluster.env()), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _wait(client, job_id: str, until, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id))
        if until(status):
            return status
        assert time.monotonic() < deadline, \
            f"job {job_id}: still {status} after {timeout} s\n{client.get_job_logs(job_id)[-5000:]}"
        time.sleep(1)


@pytest.mark.slow
def test_sweep_job_on_a_local_cluster_is_stopped_and_resumed(tmp_path, monkeypatch):
    from ray.job_submission import JobSubmissionClient

    out, job_dir = tmp_path / "out", tmp_path / "job"
    write_prepared(out / "data" / "prepared", size=128, num_images=6)
    job_dir.mkdir()
    # absolute paths: the job runs in a copy of job_dir that Ray unpacks elsewhere
    write_params(job_dir / "params.yaml", project_params=True, overrides={
        # three trials one at a time: when the first has finished, two are left, so the stop
        # lands mid-sweep however fast the machine trains
        **TINY_SWEEP, "sweep.num_samples": 3, "sweep.max_concurrent_trials": 1,
        "sweep.epochs": 1, "data.out_dir": str(out / "data" / "prepared"),
        "sweep.storage_path": str(out / "ray_results"),
        "sweep.table_path": str(out / "reports" / "sweep.parquet"),
        "sweep.best_params_path": str(out / "sweeps" / "best_params.yaml"),
        "sweep.plot_path": str(out / "reports" / "sweep.png"),
        "tracking.uri": f"sqlite:///{out / 'mlflow.db'}"})
    markers = out / "ray_results" / "anchor_sweep" / "trials"
    started = time.perf_counter()
    # the cluster's token is this process's (its job client joins in-process, and Ray reads a
    # token once per process: the private clusters later tests of this process start use it)
    with ray_cluster(tmp_path / "cluster", head_cpus=2, head_resources={"trial_slot": 1},
                     token=local_token()) as cluster:
        for name, value in cluster.env().items():   # this process's job client: the token
            monkeypatch.setenv(name, value)
        client = JobSubmissionClient(cluster.dashboard)
        print(f"\nT cluster up {time.perf_counter() - started:.0f}")
        _submit(cluster, job_dir, "sweep-1")
        try:
            deadline = time.monotonic() + 300
            while not (markers.is_dir() and list(markers.glob("*.json"))):
                status = str(client.get_job_status("sweep-1"))
                assert "RUNNING" in status or "PENDING" in status, \
                    f"{status}\n{client.get_job_logs('sweep-1')[-5000:]}"
                assert time.monotonic() < deadline, "no trial finished in 300 s"
                time.sleep(0.5)
            print(f"T first trial done {time.perf_counter() - started:.0f}")
            (first,) = [p.stem for p in markers.glob("*.json")]
            client.stop_job("sweep-1")
            _wait(client, "sweep-1", lambda s: "STOPPED" in s or "FAILED" in s, 60)
            assert not (out / "reports" / "sweep.parquet").exists()  # interrupted
            (parent,) = mlflow_store.sweep_runs(out / "mlflow.db")[0]
            assert parent.info.status in ("KILLED", "RUNNING")  # RUNNING: no time

            print(f"T stopped {time.perf_counter() - started:.0f}")
            _submit(cluster, job_dir, "sweep-2", "--resume")
            status = _wait(client, "sweep-2",
                           lambda s: any(t in s for t in ("SUCCEEDED", "FAILED", "STOPPED")),
                           300)
            print(f"T resumed done {time.perf_counter() - started:.0f}")
            logs = client.get_job_logs("sweep-2")
            assert "SUCCEEDED" in status, logs[-5000:]
        finally:
            for job in ("sweep-1", "sweep-2"):
                with contextlib.suppress(Exception):
                    client.stop_job(job)
    seconds = time.perf_counter() - started
    assert "sweep: resuming" in logs
    table = _check_outputs(out, trials=3, epochs=1)
    assert list(table["status"]) == ["finished"] * 3
    parent, by_trial = _check_mlflow(out, table, epochs=1)
    assert parent.data.tags["resumed"] == "true"
    # the trial finished before the stop was not trained again: one loss point per step
    steps = mlflow_store.metric_steps(out / "mlflow.db", by_trial[first].info.run_id, "loss")
    assert sorted(steps) == [1, 2]
    _print_table("sweep via ray job submit, stopped and resumed", table, seconds)
