"""Security: no secret reaches MLflow, from any run; credentials masked; servers on 127.0.0.1.

- Fault: secrets in the environment (``AWS_SECRET_ACCESS_KEY``, ``MLFLOW_TRACKING_PASSWORD``,
  ``GITHUB_TOKEN``...) and credentials embedded in every URI-like parameter of the config
  (``tracking.uri: http://user:pass@host``, ``train.storage_path`` and ``sweep.storage_path:
  s3://key:secret@bucket``, a ``data.source``), one of them even inside an error message.
- Must survive: the whole ``dvc repro`` (every stage, and a sweep with a failing trial) against a
  real ``mlflow server`` on 127.0.0.1 whose URI carries a password, with its checkpoints and sweep
  state in an S3 bucket (``moto_server``) whose URIs carry keys; then no secret anywhere in the
  MLflow store: parameters, tags, metric names, every artifact, error texts, the database file's
  bytes and the server's artifact folder. The default SQLite store is checked the same way by
  ``tests/pipeline/test_dvc_repro.py`` and, here, for a stage that succeeds and one that fails.
- ``make ui`` serves MLflow on 127.0.0.1; nothing in the project binds 0.0.0.0 (the local Ray's
  dashboard: ``tests/pipeline/test_ray_session.py``).
(``weights_only=True`` for every ``torch.load``: :mod:`tests.reliability.test_corrupt_files`.)
"""

from __future__ import annotations

import base64
import http.server
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pandas as pd
import pytest

from pipeline import prepare, tracking
from pipeline.config import Config
from pipeline.errors import DataError
from pipeline.redaction import redact
from tests.conftest import ROOT
from tests.support import mlflow_store
from tests.support.dvc_repo import make_dvc_repo
from tests.support.servers import mlflow_server, moto_server

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-pass-0123456789",
    "MLFLOW_TRACKING_TOKEN": "mlflow-token-abcdef0123",
    "GITHUB_TOKEN": "ghp_0123456789abcdefABCDEF",
    "MY_SERVICE_API_KEY": "sk-live-9876543210zyxw",
}
URI_SECRETS = ("uri-pass-246813579", "s3-secret-1357924680")


def secret_hits(store: str, *, raw_files: list[Path], download_to: Path) -> list[str]:
    """Every place in the store that holds a planted secret: params, tags, metric names,
    artifacts (downloaded through the store), and the raw bytes of ``raw_files`` (the database,
    the artifact folder)."""
    secrets = (*SECRETS.values(), *URI_SECRETS)
    client = mlflow_store.client(store)
    hits = []
    for run in mlflow_store.runs(store):
        texts = {"params": [f"{k}={v}" for k, v in run.data.params.items()],
                 "tags": [f"{k}={v}" for k, v in run.data.tags.items()],
                 "metrics": list(run.data.metrics)}
        folder = Path(client.download_artifacts(run.info.run_id, "",
                                                str(download_to / run.info.run_id)))
        texts["artifacts"] = [p.read_bytes().decode("latin-1") for p in sorted(folder.rglob("*"))
                              if p.is_file()]
        hits += [f"{run.info.run_name} {where}" for where, values in texts.items()
                 for s in secrets for v in values if s in v]
    for path in raw_files:
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            data = file.read_bytes() if file.is_file() else b""
            hits += [f"{file}: bytes" for s in secrets if s.encode() in data]
    return hits


def test_a_stage_that_succeeds_and_one_whose_error_holds_a_secret(tmp_path, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # wins over tracking.uri below
    cfg = Config().replace({
        "data.synthetic_images": 4, "data.image_size": 32, "data.num_workers": 1,
        "data.out_dir": str(tmp_path / "prepared"),
        "tracking.uri": f"http://alice:{URI_SECRETS[0]}@mlflow.example.com:5000",
        "train.storage_path": f"s3://AKIAEXAMPLE:{URI_SECRETS[1]}@bucket/checkpoints"})

    assert prepare.run(cfg) == 0  # a stage that succeeds
    failing = cfg.replace({"data.source": f"voc:{tmp_path}/{SECRETS['GITHUB_TOKEN']}"})
    with pytest.raises(DataError):
        prepare.run(failing)  # and one whose error message holds a secret

    runs = mlflow_store.runs(store)
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
    for run in runs:
        assert run.data.params["tracking.uri"] == "http://***@mlflow.example.com:5000"
        assert run.data.params["train.storage_path"] == "s3://***@bucket/checkpoints"
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


class _AuthHealth(http.server.BaseHTTPRequestHandler):
    expected = ""

    def do_GET(self):  # noqa: N802 (the stdlib's name)
        ok = self.path == "/health" and self.headers.get("Authorization") == self.expected
        self.send_response(200 if ok else 401)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_tracking_uri_with_credentials_is_checked_with_them_and_named_masked():
    """``http://user:password@host`` (which MLflow accepts): the pre-flight check sends the
    credentials as basic auth (urllib cannot resolve them in the URL) and never shows them."""
    _AuthHealth.expected = "Basic " + base64.b64encode(b"alice:" + URI_SECRETS[0].encode()
                                                       ).decode()
    server = http.server.HTTPServer(("127.0.0.1", 0), _AuthHealth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        tracking.check_reachable(f"http://alice:{URI_SECRETS[0]}@127.0.0.1:{port}")
        with pytest.raises(tracking.TrackingError) as err:
            tracking.check_reachable(f"http://alice:wrong-password-123@127.0.0.1:{port}")
        assert "***@127.0.0.1" in str(err.value) and "wrong-password" not in str(err.value)
    finally:
        server.shutdown()


@pytest.mark.slow
def test_no_secret_reaches_an_mlflow_server_through_a_whole_dvc_repro(tmp_path):
    """Every stage and a 2-trial sweep (one trial fails: its sampled ``rpn.pos_iou`` is below
    ``rpn.neg_iou``) log to a real tracking server whose URI holds a password; checkpoints and
    sweep state go to an S3 bucket through URIs that hold keys; secrets fill the environment."""
    with moto_server(tmp_path / "s3") as s3, mlflow_server(tmp_path / "mlflow") as server:
        bucket = f"s3://AKIAEXAMPLE:{URI_SECRETS[1]}@{s3.bucket}"
        repo = make_dvc_repo(tmp_path / "repo", {
            "data.synthetic_images": 10, "data.image_size": 128, "data.num_workers": 1,
            "train.max_steps": 2, "train.num_workers": 1, "roi.hidden_dim": 64,
            "anchors.scales": [2, 4], "rpn.min_size": 4.0, "eval.num_pictures": 1,
            "train.storage_path": f"{bucket}/checkpoints",
            "sweep.storage_path": f"{bucket}/sweeps", "sweep.image_size": 64,
            "sweep.max_train_images": 4, "sweep.num_samples": 2, "sweep.seed": 1,
            "sweep.space": {"rpn.pos_iou": {"choice": [0.7, 0.25]}},
            "tracking.uri": server.url.replace("://", f"://alice:{URI_SECRETS[0]}@")})
        repo.env.update(SECRETS, **s3.env(secret=SECRETS["AWS_SECRET_ACCESS_KEY"]),
                        MLFLOW_TRACKING_USERNAME="alice")
        out = repo.dvc("repro", timeout=1500)
        assert "sweep: best trial" in out
        trials = pd.read_parquet(repo.path / "reports" / "sweep.parquet")
        assert sorted(trials["status"]) == ["errored", "finished"], trials
        assert "rpn.neg_iou" in trials.loc[trials["status"] == "errored", "error"].iloc[0]

        store = server.url
        runs = mlflow_store.runs(store)
        by_status = {(r.info.run_name if "trial_id" not in r.data.tags else "trial",
                      r.info.status) for r in runs}
        assert {("prepare", "FINISHED"), ("train_rpn", "FINISHED"), ("train_frcnn", "FINISHED"),
                ("evaluate", "FINISHED"), ("sweep", "FINISHED"), ("trial", "FINISHED"),
                ("trial", "FAILED")} == by_status
        train = mlflow_store.only_run(store, "train_rpn")
        assert train.data.params["train.storage_path"] == f"s3://***@{s3.bucket}/checkpoints"
        assert "model/rpn.pt" in mlflow_store.artifacts(store, train.info.run_id)
        hits = secret_hits(store, raw_files=[server.database, server.artifacts],
                           download_to=tmp_path / "downloads")
        assert hits == []
        # and the repository keeps none either (dvc.lock records the sweep's parameters)
        assert URI_SECRETS[1] not in (repo.path / "dvc.lock").read_text()


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
