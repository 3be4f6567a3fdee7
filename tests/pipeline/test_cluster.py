"""Distributed for real: the whole ``dvc repro`` on a Ray cluster of several nodes with no shared
folder, storage in an S3 bucket, tracking on an MLflow server; a worker node lost mid-run; and
not one secret in the tracking store.

Everything on this machine, started and stopped by the test (by process / session id): a Ray
head and two more nodes (``ray start``, each with one unit of ``frcnn_worker`` and of
``trial_slot``; the training stages' 2 workers each ask for a ``frcnn_worker``, so they land on
different nodes, and a lost node leaves room for its worker on the third), an
S3-compatible server (``moto_server``), and ``mlflow server`` proxying artifacts. ``dvc repro``
runs in a fresh git + DVC repository the nodes are told nothing about (prepare and evaluate on
the driver; train_rpn, train_frcnn and a 2-trial sweep on the cluster): the workers get only
bucket URIs (the training table and the RPN model are staged in the bucket; Ray Data's read
tasks stream the table from there, and each node keeps a copy of the RPN model alone in its own
cache folder, ``$FRCNN_CACHE``), checkpoints and sweep state live in the bucket, and every run
logs to the server.

Secrets (:mod:`tests.support.secrets`) fill the environment; the tracking URI carries a
password and the bucket URIs carry keys; one sweep trial fails (its sampled ``rpn.pos_iou`` is
below ``rpn.neg_iou``). Afterwards no secret is anywhere in the store (parameters, tags, metric
names, artifacts, error texts, the database's and the artifact folder's bytes) nor in
``dvc.lock``.

While ``train_rpn`` runs (3 epochs, a checkpoint every step), once a checkpoint is in the bucket
the node of one worker is killed (SIGKILL to its raylet and workers): Ray Train restarts the
worker group on the nodes left (the third node has room) from the last checkpoint, and the stage
ends with exactly the planned steps and epochs. How many restarts the loss costs depends on
timing (under load Ray may also restart a group whose new placement is not ready yet): at least
one, at most ``train.max_failures``, and the run's ``restarts`` tag says how many.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import boto3
import pandas as pd
import pytest

from tests.support import mlflow_store
from tests.support.factories import RAY_PARAMS, TINY_SWEEP
from tests.support.procs import kill_session
from tests.support.ray_cluster import ray_cluster
from tests.support.secrets import SECRETS, bucket_secret_hits, secret_hits
from tests.support.servers import mlflow_server, moto_server

NODES = ("head", "node_b", "node_c")      # each offers one training worker place
WORKER_NODES = NODES[1:]                  # the ones the test may kill (the driver is on the head)


def _overrides(cluster, server, bucket: str) -> dict:
    return {
        **RAY_PARAMS, "data.image_size": 128, "data.synthetic_images": 8, "data.num_workers": 1,
        "train.ray_address": cluster.address, "train.worker_resources": {"frcnn_worker": 1},
        "train.rpn_epochs": 3, "train.checkpoint_every": 1, "train.keep_checkpoints": True,
        "train.loader_workers": 0, "train.max_failures": 2,
        "train.storage_path": f"{bucket}/checkpoints", "eval.num_pictures": 1,
        **{k: v for k, v in TINY_SWEEP.items() if k.startswith("sweep.")},
        "sweep.num_samples": 1, "sweep.seed": 1, "sweep.cpus_per_trial": 0.5,
        "sweep.max_train_images": 4, "sweep.storage_path": f"{bucket}/sweeps",
        # a grid: both values run, whatever the random draws (0.25 < rpn.neg_iou fails)
        "sweep.space": {"rpn.pos_iou": {"grid": [0.7, 0.25]}},
        "tracking.uri": server.url,   # its account in the environment
        "anchors.scales": [2, 4], "rpn.min_size": 4.0,
    }


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


def _kill_a_worker_node_after_a_checkpoint(cluster, s3, proc, timeout: float = 600) -> str:
    """Once ``train_rpn`` has a checkpoint of step >= 2 in the bucket and not yet its last
    (step 9), SIGKILL the node of one of its workers; returns that node's name."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before a node could be killed"
        steps = [int(k.split("_s")[1].split("/")[0]) for k in _objects(s3, "checkpoints/train_rpn-")
                 if "/checkpoint_e" in k and k.endswith("progress.json")]
        assert not steps or max(steps) < 9, "train_rpn ended before a node could be killed"
        hosts = [n for n in WORKER_NODES if n in cluster.nodes
                 and cluster.processes(n, "RayTrainWorker")]
        if steps and max(steps) >= 2 and hosts:
            cluster.kill_node(hosts[0])
            return hosts[0]
        time.sleep(1)
    raise AssertionError("no checkpoint of step >= 2 appeared in the bucket")


@pytest.mark.slow
def test_dvc_repro_on_a_multi_node_cluster_with_a_bucket_a_tracking_server_and_no_leak(
        tmp_path, dvc_repo, monkeypatch):
    started = time.perf_counter()
    slot = {"frcnn_worker": 1, "trial_slot": 1}
    with moto_server(tmp_path / "s3") as s3, mlflow_server(tmp_path / "mlflow") as server:
        nodes_env = {**s3.env(), **server.env()}   # what every node of a real cluster is given
        for name, value in server.env().items():   # this test's own reads of the store
            monkeypatch.setenv(name, value)
        with ray_cluster(tmp_path / "cluster", head_cpus=2, head_resources=slot,
                         env={**nodes_env, "FRCNN_CACHE": str(tmp_path / "cache_head")}
                         ) as cluster:
            _run_and_check(tmp_path, dvc_repo, s3, server, cluster, slot, nodes_env, started)


def _run_and_check(tmp_path, dvc_repo, s3, server, cluster, slot, nodes_env,
                   started: float) -> None:
    """The whole `dvc repro` with a worker node killed mid-training; then every check."""
    for count, name in enumerate(WORKER_NODES, start=2):  # one at a time: 2 cores
        cluster.add_node(name, cpus=1, resources=slot,
                         env={**nodes_env, "FRCNN_CACHE": str(tmp_path / f"cache_{name}")})
        cluster.wait_for_nodes(count)
    bucket = f"s3://{s3.bucket}"
    repo = dvc_repo(_overrides(cluster, server, bucket))   # a folder no node is told about
    # credentials and the cluster's token in the environment only
    repo.env.update(SECRETS, **s3.env(secret=SECRETS["AWS_SECRET_ACCESS_KEY"]),
                    **server.env(), **cluster.env())
    log = open(tmp_path / "repro.log", "w")
    proc = repo.popen("repro", log=log)
    try:
        killed = _kill_a_worker_node_after_a_checkpoint(cluster, s3, proc)
        assert proc.wait(timeout=1500) == 0, (tmp_path / "repro.log").read_text()[-6000:]
    finally:
        if proc.poll() is None:
            kill_session(proc)
        log.close()
    out = (tmp_path / "repro.log").read_text()
    _check_training(out, repo.path, server.url, s3)
    _check_runs_and_artifacts(repo.path, server.url, tmp_path)
    _check_bucket_and_caches(s3, tmp_path, killed)
    assert secret_hits(server.url, raw_files=[server.database, server.artifacts],
                       download_to=tmp_path / "downloads") == []
    assert bucket_secret_hits(s3.endpoint, s3.bucket, secrets=(cluster.token,)) == []
    lock = (repo.path / "dvc.lock").read_text()
    assert not [s for s in (*SECRETS.values(), cluster.token) if s in lock]
    assert not [s for s in (*SECRETS.values(), cluster.token) if s in out]
    print(f"\nmulti-node dvc repro: {time.perf_counter() - started:.0f} s, node {killed} "
          f"killed")


def _check_training(out: str, repo: Path, store: str, s3) -> None:
    """train_rpn: workers read the staged table; exactly the planned steps after the node loss,
    between one restart and ``train.max_failures`` (2); train_frcnn: its steps."""
    assert f"workers read 1 file(s) in s3://{s3.bucket}/checkpoints/staged/" in out
    rpn = json.loads((repo / "metrics" / "train_rpn.json").read_text())
    assert (rpn["steps"], rpn["epochs"]) == (9, 3)     # 6 images / 2 workers x 3 epochs
    run = mlflow_store.only_run(store, "train_rpn")
    assert run.info.status == "FINISHED"
    assert 1 <= int(run.data.tags["restarts"]) <= 2, run.data.tags   # train.max_failures: 2
    assert mlflow_store.metric_steps(store, run.info.run_id, "loss")[-1] == 9
    frcnn = json.loads((repo / "metrics" / "train_frcnn.json").read_text())
    assert (frcnn["steps"], frcnn["epochs"]) == (3, 1)
    trials = pd.read_parquet(repo / "reports" / "sweep.parquet")
    assert sorted(trials["status"]) == ["errored", "finished"], trials
    # the failing trial was retried once (as a trial on a lost node would be), and said so
    assert dict(zip(trials["status"], trials["attempts"])) == {"errored": 2, "finished": 1}
    assert "sweep: retried after a failure" in out


def _check_runs_and_artifacts(repo: Path, store: str, tmp_path: Path) -> None:
    """Every stage run and the finished trial FINISHED on the server (the failed trial FAILED),
    each with its artifacts, which the server keeps in its own folder."""
    runs = mlflow_store.runs(store)
    status = {(r.info.run_name if "trial_id" not in r.data.tags else "trial", r.info.status)
              for r in runs}
    assert status == {("prepare", "FINISHED"), ("train_rpn", "FINISHED"),
                      ("train_frcnn", "FINISHED"), ("evaluate", "FINISHED"),
                      ("sweep", "FINISHED"), ("trial", "FINISHED"), ("trial", "FAILED")}, status
    for name, artifact in (("train_rpn", "model/rpn.pt"), ("train_frcnn", "model/frcnn.pt"),
                           ("evaluate", "metrics/evaluate.json"),
                           ("sweep", "sweep/sweep.parquet")):
        found = mlflow_store.only_run(store, name)
        assert artifact in mlflow_store.artifacts(store, found.info.run_id), name
    assert list((tmp_path / "mlflow" / "artifacts").rglob("rpn.pt"))


def _check_bucket_and_caches(s3, tmp_path: Path, killed: str) -> None:
    """Checkpoints, staged data and sweep state in the bucket; in the nodes' caches only the
    RPN model, never the training table."""
    keys = _objects(s3, "")
    assert any(k.startswith("checkpoints/train_rpn-") and "checkpoint_e003_s0000009" in k
               for k in keys)
    assert any(k.startswith("checkpoints/staged/") and k.endswith("/rpn.pt") for k in keys)
    assert any(k.startswith("sweeps/anchor_sweep/") and k.endswith("frcnn_sweep.json")
               for k in keys)
    assert any(k.startswith("sweeps/anchor_sweep/outputs/sweep.parquet") for k in keys)
    # Ray Data's read tasks streamed the training table from the bucket: no node holds a copy;
    # the RPN model (one small file) each frcnn worker's node downloaded once
    assert not [p for n in NODES for p in (tmp_path / f"cache_{n}").rglob("*.parquet")]
    cached = {n for n in NODES if list((tmp_path / f"cache_{n}").rglob("rpn.pt"))}
    assert cached == set(NODES) - {killed}
