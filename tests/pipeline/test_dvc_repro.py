"""``dvc repro`` runs the ``prepare`` stage for real in a fresh git + DVC repository; a second
``dvc repro`` does nothing; editing a declared ``data.*`` parameter makes the stage stale."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import DataConfig
from tests.conftest import ROOT

BIN = Path(sys.executable).parent


def _sh(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.mark.slow
def test_dvc_repro_prepare_then_up_to_date(tmp_path):
    if not (BIN / "dvc").is_file() or shutil.which("git") is None:
        pytest.skip("needs git and dvc (in the virtual environment)")
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "pipeline", repo / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(synthetic_images=6, image_size=32, num_workers=1)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text("__pycache__/\n")
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONPATH=str(repo),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")
    _sh(["git", "init", "-q"], repo, env)
    _sh([str(BIN / "dvc"), "init", "-q"], repo, env)
    _sh(["git", "add", "-A"], repo, env)
    _sh(["git", "commit", "-q", "-m", "fresh clone"], repo, env)

    first = _sh([str(BIN / "dvc"), "repro", "prepare"], repo, env)
    assert "Running stage 'prepare'" in first.stdout
    assert "prepared 6 images" in first.stdout
    out = repo / "data" / "prepared"
    assert {p.name for p in out.iterdir()} >= {"train.parquet", "val.parquet", "test.parquet",
                                               "classes.json"}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["prepare"]
    assert lock["params"]["params.yaml"]["data.synthetic_images"] == 6

    second = _sh([str(BIN / "dvc"), "repro", "prepare"], repo, env)
    assert "Running stage" not in second.stdout
    assert "didn't change" in second.stdout or "up to date" in second.stdout

    params["data"]["seed"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _sh([str(BIN / "dvc"), "status", "prepare"], repo, env)
    assert "prepare:" in status.stdout and "data.seed" in status.stdout


def test_prepare_stage_declares_every_module_and_data_parameter():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["prepare"]
    modules = {f"pipeline/datasets/{p.name}" for p in (ROOT / "pipeline" / "datasets").glob("*.py")}
    assert modules | {"pipeline/prepare.py"} <= set(stage["deps"])
    declared = {f.name for f in dataclasses.fields(DataConfig)} - {"num_workers"}  # no effect on output
    assert set(stage["params"]) == {f"data.{name}" for name in declared}
    assert stage["outs"] == ["data/prepared"] and stage["cmd"] == "frcnn prepare"
