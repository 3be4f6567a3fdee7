"""Security: no secret reaches MLflow, from any run; credentials masked; servers on 127.0.0.1.

- Fault: secrets in the environment (``AWS_SECRET_ACCESS_KEY``, ``MLFLOW_TRACKING_PASSWORD``,
  ``GITHUB_TOKEN``...) and credentials embedded in every URI-like parameter of the config
  (``tracking.uri: http://user:pass@host``, ``train.storage_path`` and ``sweep.storage_path:
  s3://key:secret@bucket``, a ``data.source``), one of them even inside an error message.
- Must survive: the whole ``dvc repro`` (every stage, and a sweep with a failing trial) against a
  real ``mlflow server`` on 127.0.0.1 whose URI carries a password, with its checkpoints and sweep
  state in an S3 bucket (``moto_server``) whose URIs carry keys, on a multi-node Ray cluster
  (``tests/pipeline/test_cluster.py``); the same against the default SQLite store
  (``tests/pipeline/test_dvc_repro.py``); then no secret anywhere in the MLflow store
  (:func:`tests.support.secrets.secret_hits`: parameters, tags, metric names, every artifact,
  error texts, the database file's bytes, the artifact folder) nor in ``dvc.lock``. Here: a
  stage that succeeds and one whose error holds a secret, every write of a run handle, and a
  tracking URI with credentials.
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

import pytest

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
