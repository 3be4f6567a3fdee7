"""Distributed for real: training and a sweep on a Ray cluster of several nodes with no shared
folder, storage in an S3 bucket, tracking on an MLflow server; a worker node lost mid-run.

Everything on this machine, started and stopped by the test (by process / session id): a Ray
head and two more nodes (``ray start``, each with one unit of ``frcnn_worker`` and of
``trial_slot``; the training stages' 2 workers each ask for a ``frcnn_worker``, so they land on
different nodes, and a lost node leaves room for its worker on the third), an
S3-compatible server (``moto_server``), and ``mlflow server`` proxying artifacts. The driver runs
``frcnn`` from a folder of its own: the workers are told only bucket URIs (the training table
and the RPN model are staged in the bucket and each node keeps its own copy in its own cache
folder, ``$FRCNN_CACHE``), checkpoints and sweep state live in the bucket, and every run logs
to the server.

While ``train_rpn`` runs (3 epochs, a checkpoint every step), once a checkpoint is in the bucket
the node of one worker is killed (SIGKILL to its raylet and workers): Ray Train restarts the
worker group on the nodes left (the third node has room) from the last checkpoint, and the stage
ends with exactly the planned steps and epochs, one restart on its MLflow run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import yaml

from pipeline.config import Config
from tests.support import mlflow_store
from tests.support.factories import RAY_PARAMS, TINY_SWEEP
from tests.support.procs import kill_session, subprocess_env
from tests.support.ray_cluster import ray_cluster
from tests.support.servers import mlflow_server, moto_server

NODES = ("head", "node_b", "node_c")      # each offers one training worker place
WORKER_NODES = NODES[1:]                  # the ones the test may kill (the driver is on the head)


def _params(cluster, server, bucket: str) -> dict:
    cfg = Config().replace({
        **RAY_PARAMS, "data.image_size": 128, "data.synthetic_images": 8,
        "train.ray_address": cluster.address, "train.worker_resources": {"frcnn_worker": 1},
        "train.rpn_epochs": 3, "train.checkpoint_every": 1, "train.keep_checkpoints": True,
        "train.loader_workers": 0, "train.max_failures": 2,
        "train.storage_path": f"s3://{bucket}/checkpoints",
        **{k: v for k, v in TINY_SWEEP.items() if k.startswith("sweep.")},
        "sweep.num_samples": 2, "sweep.cpus_per_trial": 0.5, "sweep.max_train_images": 4,
        "sweep.storage_path": f"s3://{bucket}/sweeps",
        "tracking.uri": server.url, "anchors.scales": [2, 4], "rpn.min_size": 4.0,
    })
    return cfg.to_dict()


def _objects(s3, prefix: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="x")
    keys, token = [], None
    while True:
        page = client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix,
                                      **({"ContinuationToken": token} if token else {}))
        keys += [o["Key"] for o in page.get("Contents", [])]
        token = page.get("NextContinuationToken")
        if not token:
            return keys


def _frcnn(driver: Path, env: dict, *args: str, timeout: float = 900) -> str:
    done = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=driver, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"frcnn {' '.join(args)}:\n{done.stdout[-4000:]}\n" \
                                 f"{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def _kill_a_worker_node_after_a_checkpoint(cluster, s3, proc, timeout: float = 600) -> str:
    """Once ``train_rpn`` has a checkpoint of step >= 2 in the bucket, SIGKILL the node of
    one of its workers; returns that node's name."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "train_rpn ended before a node could be killed"
        steps = [int(k.split("_s")[1].split("/")[0]) for k in _objects(s3, "checkpoints/")
                 if "/checkpoint_e" in k and k.endswith("progress.json")]
        hosts = [n for n in WORKER_NODES if n in cluster.nodes
                 and cluster.processes(n, "RayTrainWorker")]
        if steps and max(steps) >= 2 and hosts:
            cluster.kill_node(hosts[0])
            return hosts[0]
        time.sleep(1)
    raise AssertionError("no checkpoint of step >= 2 appeared in the bucket")


@pytest.mark.slow
def test_train_and_sweep_on_a_multi_node_cluster_with_a_bucket_and_a_tracking_server(tmp_path):
    started = time.perf_counter()
    slot = {"frcnn_worker": 1, "trial_slot": 1}
    with moto_server(tmp_path / "s3") as s3, mlflow_server(tmp_path / "mlflow") as server, \
            ray_cluster(tmp_path / "cluster", head_cpus=2, head_resources=slot,
                        env={**s3.env(), "FRCNN_CACHE": str(tmp_path / "cache_head")}) as cluster:
        for count, name in enumerate(WORKER_NODES, start=2):  # one at a time: 2 cores
            cluster.add_node(name, cpus=1, resources=slot,
                             env={**s3.env(), "FRCNN_CACHE": str(tmp_path / f"cache_{name}")})
            cluster.wait_for_nodes(count)
        driver = tmp_path / "driver"  # a folder no worker is told about
        driver.mkdir()
        (driver / "params.yaml").write_text(yaml.safe_dump(_params(cluster, server, s3.bucket)))
        env = subprocess_env(**s3.env())
        _frcnn(driver, env, "prepare")

        # train_rpn, a worker node killed after a checkpoint
        log = open(tmp_path / "train_rpn.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--stage", "rpn"],
                                cwd=driver, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            killed = _kill_a_worker_node_after_a_checkpoint(cluster, s3, proc)
            assert proc.wait(timeout=900) == 0, (tmp_path / "train_rpn.log").read_text()[-5000:]
        finally:
            if proc.poll() is None:
                kill_session(proc)
            log.close()
        out = (tmp_path / "train_rpn.log").read_text()
        assert "workers read s3://frcnn-test/checkpoints/staged/" in out
        rpn = json.loads((driver / "metrics" / "train_rpn.json").read_text())
        assert (rpn["steps"], rpn["epochs"]) == (9, 3)     # 6 images / 2 workers x 3 epochs
        run = mlflow_store.only_run(server.url, "train_rpn")
        assert run.info.status == "FINISHED" and run.data.tags["restarts"] == "1"
        assert mlflow_store.metric_steps(server.url, run.info.run_id, "loss")[-1] == 9

        # train_frcnn and a 2-trial sweep on the nodes left
        _frcnn(driver, env, "train", "--stage", "frcnn")
        frcnn = json.loads((driver / "metrics" / "train_frcnn.json").read_text())
        assert (frcnn["steps"], frcnn["epochs"]) == (3, 1)
        out = _frcnn(driver, env, "sweep")
        assert "sweep: best trial" in out

        # every run FINISHED on the server, with its artifacts
        runs = mlflow_store.runs(server.url)
        assert {r.info.status for r in runs} == {"FINISHED"}, [(r.info.run_name, r.info.status)
                                                                for r in runs]
        names = sorted(r.info.run_name for r in runs if "trial_id" not in r.data.tags)
        assert names == ["prepare", "sweep", "train_frcnn", "train_rpn"]
        assert len([r for r in runs if "trial_id" in r.data.tags]) == 2
        for name, artifact in (("train_rpn", "model/rpn.pt"), ("train_frcnn", "model/frcnn.pt"),
                               ("sweep", "sweep/sweep.parquet")):
            found = mlflow_store.only_run(server.url, name)
            assert artifact in mlflow_store.artifacts(server.url, found.info.run_id), name
        assert list((tmp_path / "mlflow" / "artifacts").rglob("rpn.pt"))

        # checkpoints, staged data and sweep state in the bucket; copies only in node caches
        keys = _objects(s3, "")
        assert any(k.startswith("checkpoints/train_rpn-") and "checkpoint_e003_s0000009" in k
                   for k in keys)
        assert any(k.startswith("checkpoints/staged/") and k.endswith("/rpn.pt") for k in keys)
        assert any(k.startswith("sweeps/anchor_sweep/") and k.endswith("frcnn_sweep.json")
                   for k in keys)
        assert any(k.startswith("sweeps/anchor_sweep/outputs/sweep.parquet") for k in keys)
        cached = {n for n in NODES if list((tmp_path / f"cache_{n}").rglob("train.parquet"))}
        assert len(cached) >= 2 and killed in cached
    print(f"\nmulti-node test: {time.perf_counter() - started:.0f} s, node {killed} killed")
