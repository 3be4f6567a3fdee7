"""The training stages' driver (``frcnn train``): inputs checked before Ray, and for real on Ray.

The two ``slow`` tests start a local Ray with 2 CPU workers (gloo DDP) at 64 x 64; each start
costs about 25-40 s on a 2-core machine. (The run key and resume point:
:mod:`tests.pipeline.training.test_resume`; the loop itself: ``test_loop.py``.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detector import load_model
from pipeline.cli import main
from pipeline.errors import DataError
from pipeline.training import checkpoints, resume
from tests.support import mlflow_store
from tests.support.factories import RAY_PARAMS, write_ray_project
from tests.support.procs import subprocess_env


def _project(tmp_path: Path, **overrides) -> Path:
    return write_ray_project(tmp_path, overrides)


def _frcnn(project: Path, *args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "train", *args], cwd=project,
                          env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------------------------
# Without Ray


def test_missing_prepared_data_fails_before_ray(tmp_path, monkeypatch, capsys):
    import ray

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--stage", "rpn"]) == 1
    err = capsys.readouterr().err
    assert "frcnn train --stage rpn: data/prepared/classes.json: not found; run `frcnn prepare` " \
        "first" in err
    assert not ray.is_initialized()


@pytest.mark.parametrize("where", ["param", "env"])
def test_use_gpu_auto_on_a_cluster_is_refused_before_ray(tmp_path, monkeypatch, capsys, where):
    import ray

    project = _project(tmp_path, **{"train.use_gpu": "auto"})
    monkeypatch.chdir(project)
    args = ["train", "--stage", "rpn"]
    if where == "env":
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    else:
        args += ["--set", "train.ray_address=10.0.0.5:6379"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "train.use_gpu: auto cannot be decided on a Ray cluster (10.0.0.5:6379): set " \
        "train.use_gpu to true" in err
    assert not ray.is_initialized() and not (project / "mlflow.db").exists()


def test_frcnn_stage_needs_the_rpn_model(tmp_path, monkeypatch, capsys):
    project = _project(tmp_path)
    monkeypatch.chdir(project)
    assert main(["train", "--stage", "frcnn"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"frcnn train --stage frcnn: {project.resolve() / 'models' / 'rpn.pt'}: ")
    assert "frcnn train --stage rpn` first" in err


def test_stage_inputs_name_paths_and_refuse_data_of_another_size(tmp_path, monkeypatch):
    from pipeline.config import Config
    from pipeline.errors import DataError
    from pipeline.training.inputs import stage_inputs

    project = _project(tmp_path)
    monkeypatch.chdir(project)
    cfg = Config().replace(RAY_PARAMS)
    inputs = stage_inputs(cfg, "rpn")
    assert inputs.name == "train_rpn" and inputs.classes == ["class1", "class2"]
    assert inputs.train_path == (project / "data" / "prepared" / "train.parquet").resolve()
    assert inputs.init_model is None and inputs.model_path == Path("models/rpn.pt")
    with pytest.raises(DataError, match="prepared at image_size 64 but data.image_size is 128"):
        stage_inputs(cfg.replace({"data.image_size": 128}), "rpn")


def test_restart_recorder_counts_the_restarts_ray_will_make(tmp_path, monkeypatch, capsys):
    """Ray Train's callback on a worker-group failure: each retried failure is counted in the
    stage's MLflow run (tag and metric ``restarts``, tag ``last_restart``); the one after
    ``max_failures`` (Ray gives up) is not."""
    from pipeline import tracking
    from pipeline.config import Config
    from pipeline.training.driver import restart_recorder

    monkeypatch.delenv(tracking.ENV_URI, raising=False)
    cfg = Config().replace({"tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    with tracking.stage_run(cfg, "train_rpn") as run:
        recorder = restart_recorder("train_rpn", run.tracking_uri, run.run_id, max_failures=1)
        recorder.after_exception(None, {1: RuntimeError("worker died\nmore")})
        recorder.after_exception(None, {0: RuntimeError("again")})
    assert "train_rpn: worker rank(s) [1] failed (RuntimeError: worker died); Ray Train " \
        "restarts the worker group from the last checkpoint (failure 1 of at most 1)" \
        in capsys.readouterr().out
    got = mlflow_store.only_run(tmp_path / "mlflow.db", "train_rpn")
    assert got.data.tags["restarts"] == "1"
    assert got.data.tags["last_restart"] == "worker rank(s) [1] failed (RuntimeError: worker died)"
    assert mlflow_store.metric_steps(tmp_path / "mlflow.db", run.run_id, "restarts") == [1]


def test_untrained_anchor_types_are_printed_and_tagged_on_the_stage_run(tmp_path, monkeypatch,
                                                                       capsys):
    """Settings that leave anchor types without a trainable position (allow_border 0 and
    anchors as wide as the 64 px image): the stage warns and tags its MLflow run, before Ray."""
    from pipeline.errors import RunFailedError
    from pipeline.training import driver

    project = _project(tmp_path, **{"rpn.allow_border": 0.0, "anchors.scales": [1, 4]})
    monkeypatch.chdir(project)

    def no_ray(*args, **kwargs):
        raise RunFailedError("stopped before Ray for this test")

    monkeypatch.setattr(driver, "_fit", no_ray)
    assert main(["train", "--stage", "rpn"]) == 1
    err = capsys.readouterr().err
    assert "train_rpn: warning: 3 anchor type(s) never lie inside the 64x64 image" in err
    run = mlflow_store.only_run(project / "mlflow.db", "train_rpn")
    assert run.data.tags["untrained_anchor_types"] == (
        "ratio 0.5 x scale 4 (91x45 px), ratio 1 x scale 4 (64x64 px), "
        "ratio 2 x scale 4 (45x91 px)")


def test_workers_read_the_drivers_files_locally_and_staged_copies_on_a_cluster(tmp_path,
                                                                              monkeypatch):
    """On the private local Ray the workers open the driver's files; with a cluster address
    (or a bucket as storage) they get copies staged in the run's storage, by content digest."""
    from pipeline.config import Config
    from pipeline.training.inputs import stage_inputs, worker_inputs

    project = _project(tmp_path)
    monkeypatch.chdir(project)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = Config().replace(RAY_PARAMS)
    inputs = stage_inputs(cfg, "rpn")
    root = str(tmp_path / "storage")
    assert worker_inputs(cfg, inputs, root) == {"train_files": [str(inputs.train_path)],
                                                "init_model": None}
    staged = worker_inputs(cfg.replace({"train.ray_address": "127.0.0.1:6379"}), inputs, root)
    assert staged == {"train_files": [f"{root}/staged/{inputs.train_digest}/train.parquet"],
                      "init_model": None}
    assert Path(staged["train_files"][0]).read_bytes() == inputs.train_path.read_bytes()


def test_a_table_of_part_files_is_staged_part_by_part(tmp_path, monkeypatch):
    """A training table written as a folder of parts: each part staged under the table's
    digest and name, read by Ray Data from there."""
    import shutil

    import pyarrow.parquet as pq

    from pipeline.config import Config
    from pipeline.prepare.writer import SplitWriter
    from pipeline.prepared_table import table_digest
    from pipeline.training.inputs import stage_inputs, worker_inputs

    project = _project(tmp_path)
    monkeypatch.chdir(project)
    table = project / "data" / "prepared" / "train.parquet"
    rows = pq.read_table(table).to_pylist()
    table.unlink()
    writer = SplitWriter(table, rows_per_file=4, rows_per_group=2)
    for row in rows:
        writer.add(row)
    writer.close()
    inputs = stage_inputs(Config().replace(RAY_PARAMS), "rpn")
    assert inputs.train_digest == table_digest(table)
    root = str(tmp_path / "storage")
    staged = worker_inputs(Config().replace({**RAY_PARAMS, "train.ray_address": "auto"}),
                           inputs, root)
    base = f"{root}/staged/{inputs.train_digest}/train.parquet"
    assert staged["train_files"] == [f"{base}/part-00000.parquet", f"{base}/part-00001.parquet"]
    assert pq.read_table(base).to_pylist() == rows
    shutil.rmtree(root)


def test_a_set_prepared_into_a_bucket_is_read_where_it_is(tmp_path, monkeypatch, bucket):
    """``data.out_dir`` a bucket URI: the driver reads ``classes.json``, the table's footers and
    its recorded digest there (nothing downloaded whole) and the workers get the bucket's own
    files: nothing is staged; only the RPN model would be."""
    import pyarrow.fs

    from pipeline.config import Config
    from pipeline.prepared_table import CLASSES_FILE, table_digest
    from pipeline.storage import upload_folder
    from pipeline.training.inputs import stage_inputs, worker_inputs

    project = _project(tmp_path)
    local = project / "data" / "prepared"
    upload_folder(local, "mem://b/prepared", last=CLASSES_FILE)
    cfg = Config().replace({**RAY_PARAMS, "data.out_dir": "mem://b/prepared",
                            "train.ray_address": "auto"})
    inputs = stage_inputs(cfg, "rpn")
    assert inputs.train_path == "mem://b/prepared/train.parquet" and inputs.train_rows == 6
    assert inputs.train_digest == table_digest(local / "train.parquet")   # the recorded one
    assert worker_inputs(cfg, inputs, "mem://b/ckpt") == {
        "train_files": ["mem://b/prepared/train.parquet"], "init_model": None}
    assert bucket.get_file_info("b/ckpt").type == pyarrow.fs.FileType.NotFound   # no copy


# --------------------------------------------------------------------------------------------
# With Ray, for real


@pytest.mark.slow
def test_train_rpn_on_two_ray_workers(tmp_path):
    project = _project(tmp_path, **{"train.rpn_epochs": 2, "train.checkpoint_every": 2,
                                    "train.keep_checkpoints": True,
                                    "tracking.system_metrics_interval": 0.5})
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
    # what a rerun would resume from, as Ray Train records it; its progress cut short is named
    found = resume.latest_checkpoint(str(project / "checkpoints"), run_dir.name)
    assert found is not None and found[0] == str(last) and found[1]["step"] == 6
    (last / checkpoints.PROGRESS).write_text('{"step": 6, "ep')
    with pytest.raises(DataError, match=f"{checkpoints.PROGRESS}: truncated or corrupt"):
        resume.latest_checkpoint(str(project / "checkpoints"), run_dir.name)

    # one FINISHED MLflow run with params, tags, step metrics and artifacts
    db = project / "mlflow.db"
    run = mlflow_store.only_run(db, "train_rpn")
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_workers"] == "2"
    assert run.data.params["data.image_size"] == "64"
    assert {"mlflow.source.git.commit", "mlflow.source.name", "mlflow.source.type", "dvc_stage",
            "ray_job_id"} <= set(run.data.tags)
    assert mlflow_store.metric_steps(db, run.info.run_id, "loss") == [1, 2, 3, 4, 5, 6]
    assert len(mlflow_store.metric_steps(db, run.info.run_id, "lr")) == 6
    assert {"rpn_cls", "rpn_reg", "images_per_s", "epoch/loss"} <= set(run.data.metrics)
    assert set(mlflow_store.artifacts(db, run.info.run_id)) == {
        "config/params.yaml", "model/rpn.pt", "metrics/train_rpn.json",
        "metrics/train_rpn_epochs.csv"}
    # the MLflow model, registered; the split it trained on as a dataset input; the workers'
    # system metrics, once per node (both workers share this one); the final values
    client = mlflow_store.client(db)
    (version,) = client.search_model_versions("name = 'frcnn-rpn'")
    assert version.run_id == run.info.run_id
    (used,) = run.inputs.dataset_inputs
    assert used.dataset.name == "train" and json.loads(used.dataset.profile) == {"num_rows": 6}
    assert len(used.dataset.digest) == 16 and "image" in used.dataset.schema
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/node0/cpu_utilization_percentage",
            "system/node0/system_memory_usage_megabytes"} <= system
    assert all(k.startswith("system/node0/") for k in system)  # one node: sampled once
    assert {"final/loss", "final/steps", "final/images_per_s"} <= set(run.data.metrics)
