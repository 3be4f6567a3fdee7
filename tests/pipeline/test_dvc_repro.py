"""``dvc.yaml`` and ``dvc repro``: what each stage declares, the ``prepare`` stage alone in a fresh
repository, and the whole pipeline end to end.

(That every module a stage imports is one of its deps: ``tests/test_layout.py``.)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import boto3
import pandas as pd
import pytest
import yaml

from pipeline.config import Config, DataConfig
from pipeline.evaluation import recall as R
from pipeline.evaluation.outputs import OutputPaths
from tests.support import ROOT
from tests.support.secrets import SECRETS, bucket_secret_hits, secret_hits
from tests.support.servers import moto_server


def _resolved() -> dict:
    """dvc.yaml with its ``${section.key}`` filled in from params.yaml, as DVC resolves it."""
    import re

    from pipeline.config import load_config

    flat = load_config([ROOT / "params.yaml"]).flat()
    text = re.sub(r"\$\{([a-z_]+\.[a-z_]+)\}", lambda m: str(flat[m.group(1)]),
                  (ROOT / "dvc.yaml").read_text())
    return yaml.safe_load(text)


def _stages() -> dict:
    return _resolved()["stages"]


# --------------------------------------------------------------------------------------------
# What the stages declare


def test_prepare_stage_declares_its_package_and_every_data_parameter():
    stage = _stages()["prepare"]
    assert {"pipeline/prepare", "pipeline/prepared_table.py", "pipeline/images.py"} <= set(stage["deps"])
    # every data parameter but the operational ones (workers; the output folder: its outs)
    declared = {f.name for f in dataclasses.fields(DataConfig)} - {"num_workers", "out_dir"}
    assert set(stage["params"]) == {f"data.{name}" for name in declared}
    assert stage["outs"] == ["data/prepared"] and stage["cmd"] == "frcnn prepare"


def test_evaluate_stage_declares_inputs_parameters_and_outputs():
    spec = _resolved()
    stage = spec["stages"]["evaluate"]
    cfg = Config()
    paths = OutputPaths.from_config(cfg)
    assert {"pipeline/evaluation", "pipeline/plots.py", "detector", cfg.data.out_dir,
            cfg.train.rpn_model, cfg.train.frcnn_model} <= set(stage["deps"])
    assert set(stage["params"]) == {"eval.splits", "eval.proposal_budgets", "eval.num_pictures"}
    outs = {next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]}
    assert outs == {str(p) for p in (paths.recall_table, paths.recall_summary, paths.pictures,
                                     paths.plots / "recall_vs_iou.csv",
                                     paths.plots / "recall_vs_proposals.csv")}
    assert [next(iter(m)) for m in stage["metrics"]] == [str(paths.metrics)]
    assert {next(iter(p)) for p in stage["plots"]} == {
        str(paths.plots / "recall_vs_iou.png"), str(paths.plots / "recall_vs_proposals.png")}
    plots = {next(iter(p)): next(iter(p.values())) for p in spec["plots"]}
    iou_columns = [f"top{b}" for b in cfg.eval.proposal_budgets] + ["anchors", "ceiling"]
    assert plots["recall_vs_iou"]["y"] == {str(paths.plots / "recall_vs_iou.csv"): iou_columns}
    assert plots["recall_vs_proposals"]["y"] == {
        str(paths.plots / "recall_vs_proposals.csv"): ["recall@0.5", "recall@0.7"]}


# --------------------------------------------------------------------------------------------
# dvc repro for real


@pytest.mark.slow
def test_dvc_repro_prepare_then_up_to_date(dvc_repo):
    repo = dvc_repo({"data.synthetic_images": 6, "data.image_size": 32, "data.num_workers": 1})
    first = repo.dvc("repro", "prepare", timeout=300)
    assert "Running stage 'prepare'" in first
    assert "prepared 6 images" in first
    out = repo.path / "data" / "prepared"
    assert {p.name for p in out.iterdir()} >= {"train.parquet", "val.parquet", "test.parquet",
                                               "classes.json"}
    lock = yaml.safe_load((repo.path / "dvc.lock").read_text())["stages"]["prepare"]
    assert lock["params"]["params.yaml"]["data.synthetic_images"] == 6

    second = repo.dvc("repro", "prepare", timeout=300)
    assert "Running stage" not in second
    assert "didn't change" in second or "up to date" in second

    params = repo.params()
    params["data"]["seed"] = 1
    repo.write_params(params)
    status = repo.dvc("status", "prepare", timeout=300)
    assert "prepare:" in status and "data.seed" in status


@pytest.mark.slow
def test_dvc_repro_end_to_end_at_a_small_size(dvc_repo, tmp_path):
    """The whole `dvc repro` (prepare, train_rpn, train_frcnn, evaluate, sweep) for real (Ray,
    MLflow, DVC) at 128 x 128 with anchors of 32 and 64 pixels, then every evaluate output,
    the sweep's outputs, `dvc metrics show`, `dvc plots show`, and a clean `dvc status`.

    The default SQLite store, with secrets in the environment (the bucket's keys among them)
    and the checkpoints and sweep state in an S3 bucket (``moto_server``): afterwards not one
    secret in the store (:func:`tests.support.secrets.secret_hits`), in the bucket's objects
    (checkpoints, Tune's pickled state) nor in ``dvc.lock``."""
    with moto_server(tmp_path / "s3") as s3:
        bucket = f"s3://{s3.bucket}"   # its keys in the environment
        repo = dvc_repo({
            "data.synthetic_images": 10, "data.image_size": 128, "data.num_workers": 1,
            "train.max_steps": 2, "train.num_workers": 1, "roi.hidden_dim": 64,
            "anchors.scales": [2, 4],  # 32 and 64 px: inside a 128 px image
            "rpn.min_size": 4.0, "eval.num_pictures": 2,
            # 1 trial at 64 px on 2 workers, which read its table from the bucket through Ray
            # Data (a failing one too: tests/pipeline/test_cluster.py)
            "sweep.image_size": 64, "sweep.max_train_images": 4, "sweep.num_samples": 1,
            "sweep.workers_per_trial": 2, "sweep.cpus_per_trial": 1.0,
            "train.storage_path": f"{bucket}/checkpoints",
            "sweep.storage_path": f"{bucket}/sweeps"})
        repo.env.update(SECRETS, **s3.env(secret=SECRETS["AWS_SECRET_ACCESS_KEY"]))
        out = repo.dvc("repro")
        _check_outputs(repo, out)
        # the trial's workers read its table from the bucket (Ray Data), where it was put once
        objects = boto3.client("s3", endpoint_url=s3.endpoint, **s3.client_args()
                               ).list_objects_v2(Bucket=s3.bucket, Prefix="sweeps/")["Contents"]
        assert [o["Key"] for o in objects if "/data/train-" in o["Key"]] != []
        assert secret_hits(str(repo.path / "mlflow.db"),
                           raw_files=[repo.path / "mlflow.db", repo.path / "mlartifacts"],
                           download_to=tmp_path / "downloads") == []
        assert bucket_secret_hits(s3.endpoint, s3.bucket) == []   # checkpoints, Tune state
        lock = (repo.path / "dvc.lock").read_text()
        assert not [s for s in SECRETS.values() if s in lock]
        _check_a_remote_clone_is_complete(repo, tmp_path)
        _check_an_experiment_and_its_diffs(repo)


def _check_a_remote_clone_is_complete(repo, tmp_path: Path) -> None:
    """`dvc push` to a shared remote (a folder here), then a fresh clone with `dvc pull` has
    every output: `dvc status` is clean and `dvc repro` runs nothing."""
    remote = tmp_path / "dvc-remote"
    repo.dvc("remote", "add", "--default", "shared", str(remote))
    repo.run("git", "add", "-A")
    repo.run("git", "commit", "-q", "-m", "a run of the pipeline")
    assert "pushed" in repo.dvc("push")
    clone = tmp_path / "clone"
    repo.run("git", "clone", "-q", str(repo.path), str(clone))
    cloned = dataclasses.replace(repo, path=clone)
    cloned.dvc("pull")
    assert (clone / "models" / "frcnn.pt").read_bytes() == \
        (repo.path / "models" / "frcnn.pt").read_bytes()
    assert "up to date" in cloned.dvc("status")
    assert "Running stage" not in cloned.dvc("repro")


def _check_an_experiment_and_its_diffs(repo) -> None:
    """`dvc exp run -S anchors.scales=...` (up to evaluate), then `dvc exp show` lists it, and
    `dvc params diff` / `dvc metrics diff` against the committed run show the swept value and
    the recall it changed."""
    out = repo.dvc("exp", "run", "-n", "small-anchors", "-S", "anchors.scales=[1,2]",
                   "evaluate")
    assert "Running stage 'train_rpn'" in out and "Running stage 'evaluate'" in out
    assert "Running stage 'prepare'" not in out                  # its inputs did not change
    shown = json.loads(repo.dvc("exp", "show", "--json"))
    assert "small-anchors" in json.dumps(shown)
    params = json.loads(repo.dvc("params", "diff", "HEAD", "small-anchors", "--json"))
    scales = params["params.yaml"]["anchors.scales"]        # DVC writes a list as its YAML text
    assert {k: yaml.safe_load(str(v)) for k, v in scales.items()} == {"old": [2, 4], "new": [1, 2]}
    metrics = json.loads(repo.dvc("metrics", "diff", "HEAD", "small-anchors", "--json"))
    # "<split>.<name>" (evaluate.json holds a section per split); only what changed is listed
    scores = metrics["metrics/evaluate.json"]
    changed = [k for k in scores if k.rsplit(".", 1)[-1] == "anchors/AR"]
    assert changed, sorted(scores)
    change = scores[changed[0]]
    assert change["old"] != change["new"] and change["diff"] != 0


def _check_outputs(repo, out: str) -> None:
    for stage in ("prepare", "train_rpn", "train_frcnn", "evaluate", "sweep"):
        assert f"Running stage '{stage}'" in out
    assert "AR@300" in out and "sweep: best trial" in out

    paths = OutputPaths(repo.path / "reports", repo.path / "metrics" / "evaluate.json")
    table = pd.read_parquet(paths.recall_table)
    assert tuple(table.columns) == R.TABLE_COLUMNS and len(table) > 0
    assert set(table["split"]) == {"test", "val"} and -1 in set(table["budget"])
    summary = pd.read_parquet(paths.recall_summary)
    assert tuple(summary.columns) == R.SUMMARY_COLUMNS
    assert list(pd.read_csv(paths.plots / "recall_vs_iou.csv").columns) == \
        ["iou", "top50", "top100", "top300", "top1000", "top2000", "anchors", "ceiling"]
    assert list(pd.read_csv(paths.plots / "recall_vs_proposals.csv").columns) == \
        ["budget", "recall@0.5", "recall@0.7"]
    for png in ("recall_vs_iou.png", "recall_vs_proposals.png"):
        assert (paths.plots / png).stat().st_size > 1000
    assert len(list(paths.pictures.glob("*.png"))) == 2
    values = json.loads(paths.metrics.read_text())
    assert {"recall@0.5/300", "recall@0.7/300", "AR@100", "AR@300", "AR@1000", "mAP@0.5",
            "val"} <= set(values)

    shown = repo.dvc("metrics", "show", "--json")
    assert "recall@0.5/300" in shown and "mAP@0.5" in shown
    plots = json.loads(repo.dvc("plots", "show", "--json"))["data"]
    assert {"recall_vs_iou", "recall_vs_proposals"} <= set(plots)
    assert plots["recall_vs_iou"][0]["type"] == "vega"
    assert plots[str(Path("reports/plots/recall_vs_iou.png"))][0]["type"] == "image"

    trials = pd.read_parquet(repo.path / "reports" / "sweep.parquet")
    assert len(trials) == 1 and set(trials["status"]) == {"finished"}
    assert (repo.path / "reports" / "sweep.png").stat().st_size > 1000
    best = yaml.safe_load((repo.path / "sweeps" / "best_params.yaml").read_text())
    # a whole anchor setting: scales (shapes cleared) or the shapes fitted on the train split
    assert set(best) <= {"anchors", "rpn", "train"} and "shapes" in best["anchors"]
    assert "scales" in best["anchors"] or best["anchors"]["shapes"]
    assert "up to date" in repo.dvc("status")
    assert "Running stage" not in repo.dvc("repro")  # nothing left to do
