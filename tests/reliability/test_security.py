"""Security: no secret reaches MLflow, a checkpoint, Tune's state or DVC; no credentials in URIs;
an authenticated tracking server; servers on 127.0.0.1.

- Fault: secrets in the environment (``AWS_SECRET_ACCESS_KEY``, ``MLFLOW_TRACKING_PASSWORD``,
  ``GITHUB_TOKEN``...), one of them even inside an error message; credentials planted in a URI
  of the config or the environment (``tracking.uri: http://user:pass@host``, ``s3://key:secret@
  bucket``, ``MLFLOW_TRACKING_URI``).
- Must survive: a URI with credentials is refused before any work, in one line saying where
  credentials go, the secret masked, nothing written; the whole ``dvc repro`` (every stage, and
  a sweep with a failing trial) against a real, authenticated ``mlflow server`` on 127.0.0.1,
  with its checkpoints and sweep state in an S3 bucket (``moto_server``), on a multi-node Ray
  cluster (``tests/pipeline/test_cluster.py``), and the same against the default SQLite store
  (``tests/pipeline/test_dvc_repro.py``): no secret anywhere in the MLflow store
  (:func:`tests.support.secrets.secret_hits`: parameters, tags, metric names, every artifact,
  error texts, the database file's bytes, the artifact folder), in the bucket (checkpoints,
  Tune's pickled state) nor in ``dvc.lock``. Here: the refusals, a stage that succeeds and one
  whose error holds a secret, every write of a run handle, and MLflow's basic-auth server
  refusing a wrong password in one line and taking the right one.
- ``make ui`` serves MLflow on 127.0.0.1; nothing in the project binds 0.0.0.0 (the local Ray's
  dashboard: ``tests/pipeline/test_ray_session.py``).
(``weights_only=True`` for every ``torch.load``: :mod:`tests.reliability.test_corrupt_files`.)
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from pipeline import prepare, tracking
from pipeline.config import Config
from pipeline.errors import DataError
from pipeline.redaction import redact
from tests.conftest import ROOT
from tests.support import mlflow_store
from tests.support.secrets import SECRETS, URI_SECRETS, secret_hits

def test_a_stage_that_succeeds_and_one_whose_error_holds_a_secret(tmp_path, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # wins over tracking.uri below
    cfg = Config().replace({
        "data.synthetic_images": 4, "data.image_size": 32, "data.num_workers": 1,
        "data.out_dir": str(tmp_path / "prepared"),
        "tracking.uri": "http://mlflow.example.com:5000",
        "train.storage_path": "s3://bucket/checkpoints"})

    assert prepare.run(cfg) == 0  # a stage that succeeds
    failing = cfg.replace({"data.source": f"voc:{tmp_path}/{SECRETS['GITHUB_TOKEN']}"})
    with pytest.raises(DataError):
        prepare.run(failing)  # and one whose error message holds a secret

    runs = mlflow_store.runs(store)
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
    for run in runs:
        assert not any(k.upper() in SECRETS or k.upper().startswith(("AWS_", "MLFLOW_TRACKING_"))
                       for k in (*run.data.params, *run.data.tags))
    failed = next(r for r in runs if r.info.status == "FAILED")
    assert "***GITHUB_TOKEN***" in failed.data.tags["error"]
    assert secret_hits(store, raw_files=[tmp_path / "mlflow.db", tmp_path / "mlartifacts"],
                       download_to=tmp_path / "downloads") == []


def test_every_write_of_a_run_handle_is_redacted(tmp_path, monkeypatch):
    """params, tags, metric names, text and file artifacts, the error of ``end``."""
    monkeypatch.setenv("GITHUB_TOKEN", SECRETS["GITHUB_TOKEN"])
    token = SECRETS["GITHUB_TOKEN"]
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = Config().replace({"tracking.uri": store})
    source = f"coco:https://bob:{URI_SECRETS[0]}@data.example.com/train.json"
    with tracking.stage_run(cfg, "unit") as run:
        run.log_params({"data.source_copy": source})
        run.set_tags({"where": f"s3://k:{URI_SECRETS[1]}@b/x"})
        run.log_metrics({f"odd/{token}": 1.0})
        run.log_text(f"token {token}", "notes/a.txt")
        (tmp_path / "b.json").write_text(f'{{"uri": "{source}"}}')
        run.log_artifact(tmp_path / "b.json", "files")
        run.end(tracking.FAILED, f"failed with {token} at {source}")
    (found,) = mlflow_store.runs(store)
    assert found.data.params["data.source_copy"] == "coco:https://***@data.example.com/train.json"
    assert found.data.tags["error"] == ("failed with ***GITHUB_TOKEN*** at "
                                        "coco:https://***@data.example.com/train.json")
    assert secret_hits(store, raw_files=[tmp_path / "mlflow.db", tmp_path / "mlartifacts"],
                       download_to=tmp_path / "downloads") == []


def test_redact_masks_uri_credentials_and_secret_environment_values(monkeypatch):
    monkeypatch.setenv("DB_PASSWORD", "correct-horse-battery")
    monkeypatch.setenv("HOME_DIR_NAME", "correct-horse-battery-not-secret-name")
    text = ("http://u:p@h:5000 https://tok@h/x s3://k:s@b/p sqlite:///a/b@c.db "
            "file:///x postgresql://user:pw@db/mlflow password=correct-horse-battery")
    assert redact(text) == (
        "http://***@h:5000 https://***@h/x s3://***@b/p sqlite:///a/b@c.db file:///x "
        "postgresql://***@db/mlflow password=***DB_PASSWORD***")
    assert redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


@pytest.mark.parametrize("where, value, goes", [
    ("tracking.uri", f"http://alice:{URI_SECRETS[0]}@mlflow.example.com:5000",
     "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
    ("train.storage_path", f"s3://AKIAEXAMPLE:{URI_SECRETS[1]}@bucket/checkpoints",
     "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
    ("sweep.storage_path", f"s3://AKIAEXAMPLE:{URI_SECRETS[1]}@bucket/sweeps", "AWS_ACCESS_KEY_ID"),
    ("data.source", f"voc:s3://AKIAEXAMPLE:{URI_SECRETS[1]}@bucket/voc", "AWS_ACCESS_KEY_ID"),
    ("data.out_dir", f"gs://me:{URI_SECRETS[1]}@bucket/prepared", "GOOGLE_APPLICATION_CREDENTIALS"),
    ("MLFLOW_TRACKING_URI", f"https://alice:{URI_SECRETS[0]}@mlflow.example.com",
     "MLFLOW_TRACKING_USERNAME"),
])
def test_a_uri_with_credentials_is_refused_before_any_work(tmp_path, monkeypatch, capsys, where,
                                                            value, goes):
    """One line, exit 2, naming the parameter and where credentials go instead; the secret
    masked; nothing written (no store, no prepared set, no checkpoint)."""
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["prepare", "--params", str(ROOT / "params.yaml"),
            "--set", f"data.out_dir={tmp_path / 'prepared'}",
            "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    if where.isupper():
        monkeypatch.setenv(where, value)
    else:
        args += ["--set", f"{where}={value}"]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith(f"frcnn prepare: invalid parameters: {where}: ")
    assert "credentials in a URI are refused" in err and goes in err
    assert not any(secret in out + err for secret in URI_SECRETS)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_tracking_server_refuses_a_wrong_password_in_one_line_and_takes_the_right_one(
        tmp_path, monkeypatch, capsys):
    """A real ``mlflow server --app-name basic-auth`` on 127.0.0.1: a stage logging with the
    wrong password stops before any work with one line (exit 1, no password shown, no run);
    with the account of the environment it logs its run."""
    from pipeline.cli import main
    from tests.support.servers import mlflow_server

    monkeypatch.chdir(tmp_path)
    args = ["prepare", "--params", str(ROOT / "params.yaml"),
            "--set", f"data.out_dir={tmp_path / 'prepared'}", "--set", "data.synthetic_images=4",
            "--set", "data.image_size=32", "--set", "data.num_workers=1"]
    with mlflow_server(tmp_path / "mlflow") as server:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", server.env()["MLFLOW_TRACKING_USERNAME"])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password-13579")
        assert main([*args, "--set", f"tracking.uri={server.url}"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert f"MLflow tracking server {server.url} refused user " in err
        assert "401 wrong username or password" in err and "wrong-password-13579" not in err
        assert not (tmp_path / "prepared").exists()
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.env()["MLFLOW_TRACKING_PASSWORD"])
        assert main([*args, "--set", f"tracking.uri={server.url}"]) == 0
        (run,) = mlflow_store.runs(server.url)
        assert run.info.run_name == "prepare" and run.info.status == "FINISHED"
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")   # and without an account: refused
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
        assert main([*args, "--set", f"tracking.uri={server.url}"]) == 1
        assert "refused no account (MLFLOW_TRACKING_USERNAME unset)" in capsys.readouterr().err


def test_make_ui_serves_on_localhost_only():
    if shutil.which("make") is None:
        pytest.skip("needs make")
    dry = subprocess.run(["make", "-n", "ui"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "mlflow ui --backend-store-uri" in dry.stdout
    assert re.search(r"--host 127\.0\.0\.1\b", dry.stdout), dry.stdout
    for path in [ROOT / "Makefile", ROOT / "dvc.yaml", *ROOT.glob("pipeline/**/*.py"),
                 *ROOT.glob("detector/**/*.py")]:
        text = path.read_text(encoding="utf-8")
        assert "0.0.0.0" not in text and "host='::'" not in text and 'host="::"' not in text, path


def test_the_cluster_recipe_authenticates_ray_and_mlflow():
    """``cluster.yaml``: every node starts Ray with token authentication (the token a file
    mounted on every node, never in a command line), the tracking server runs MLflow's
    basic-auth app with its account from a mounted file, the dashboard stays on 127.0.0.1, and
    no command holds a URI with credentials."""
    from pipeline.config.validate import URI_USERINFO

    recipe = yaml.safe_load((ROOT / "cluster.yaml").read_text(encoding="utf-8"))
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands")
              for c in recipe[key] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    assert all(". ~/.frcnn/cluster.env" in c for c in starts)
    assert "--dashboard-host=127.0.0.1" in starts[0]
    (server,) = [c for c in recipe["head_start_ray_commands"] if "mlflow server" in c]
    assert "--app-name basic-auth" in server and "MLFLOW_AUTH_ADMIN_PASSWORD=$" in server
    assert recipe["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    every = yaml.safe_dump(recipe)
    assert not URI_USERINFO.search(every) and "RAY_AUTH_TOKEN=" not in every
