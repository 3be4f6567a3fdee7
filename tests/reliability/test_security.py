"""Security: no secrets in MLflow, credentials masked, servers on 127.0.0.1.

- Fault: secrets in the environment (``AWS_SECRET_ACCESS_KEY``, ``MLFLOW_TRACKING_PASSWORD``,
  ``GITHUB_TOKEN``...) and credentials embedded in URIs of the config (``tracking.uri:
  http://user:pass@host``, ``train.storage_path: s3://key:secret@bucket``), one of them even
  inside an error message. Must survive: none of them reaches MLflow (parameters, tags, the
  ``config/params.yaml`` and ``error.txt`` artifacts, the store's own bytes), the URIs are
  logged as ``scheme://***@host``.
- ``make ui`` serves MLflow on 127.0.0.1; the local Ray the stages start keeps its dashboard on
  127.0.0.1; nothing in the project binds 0.0.0.0.
(``weights_only=True`` for every ``torch.load``: :mod:`tests.reliability.test_corrupt_files`.)
"""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import prepare, tracking
from pipeline.config import Config
from tests.conftest import ROOT

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-pass-0123456789",
    "MLFLOW_TRACKING_TOKEN": "mlflow-token-abcdef0123",
    "GITHUB_TOKEN": "ghp_0123456789abcdefABCDEF",
    "MY_SERVICE_API_KEY": "sk-live-9876543210zyxw",
}
URI_SECRETS = ("uri-pass-246813579", "s3-secret-1357924680")


def _everything_logged(client: MlflowClient, run, artifact_root: Path) -> str:
    """Params, tags and every artifact file of ``run``, as one text."""
    parts = [f"{k}={v}" for k, v in run.data.params.items()]
    parts += [f"{k}={v}" for k, v in run.data.tags.items()]
    folder = Path(client.download_artifacts(run.info.run_id, "", str(artifact_root)))
    parts += [p.read_text(errors="replace") for p in sorted(folder.rglob("*")) if p.is_file()]
    return "\n".join(parts)


def test_no_secret_reaches_mlflow(tmp_path, monkeypatch):
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
    assert prepare.run(failing) == 1  # and one whose error message holds a secret

    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("frcnn").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
    for run in runs:
        logged = _everything_logged(client, run, tmp_path / f"art-{run.info.run_id}")
        for secret in (*SECRETS.values(), *URI_SECRETS):
            assert secret not in logged, (run.info.status, secret)
        assert run.data.params["tracking.uri"] == "http://***@mlflow.example.com:5000"
        assert run.data.params["train.storage_path"] == "s3://***@bucket/checkpoints"
        assert not any(k.upper() in SECRETS or k.upper().startswith(("AWS_", "MLFLOW_TRACKING_"))
                       for k in (*run.data.params, *run.data.tags))
    failed = next(r for r in runs if r.info.status == "FAILED")
    assert "***GITHUB_TOKEN***" in failed.data.tags["error"]
    # and not hidden anywhere else in the store either
    raw = (tmp_path / "mlflow.db").read_bytes()
    for secret in (*SECRETS.values(), *URI_SECRETS):
        assert secret.encode() not in raw, secret


def test_redact_masks_uri_credentials_and_secret_environment_values(monkeypatch):
    monkeypatch.setenv("DB_PASSWORD", "correct-horse-battery")
    monkeypatch.setenv("HOME_DIR_NAME", "correct-horse-battery-not-secret-name")
    text = ("http://u:p@h:5000 https://tok@h/x s3://k:s@b/p sqlite:///a/b@c.db "
            "file:///x postgresql://user:pw@db/mlflow password=correct-horse-battery")
    assert tracking.redact(text) == (
        "http://***@h:5000 https://***@h/x s3://***@b/p sqlite:///a/b@c.db file:///x "
        "postgresql://***@db/mlflow password=***DB_PASSWORD***")
    assert tracking.redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


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


def test_local_ray_keeps_its_dashboard_on_localhost(monkeypatch):
    """train's local Ray: ray.init is called without opening the dashboard to the network."""
    import ray

    from pipeline import train
    assert inspect.signature(ray.init).parameters["dashboard_host"].default == "127.0.0.1"
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **kw: calls.append(kw))
    assert train._start_ray(Config()) is True
    (kwargs,) = calls
    assert kwargs.get("address") is None
    assert kwargs.get("dashboard_host", "127.0.0.1") in ("127.0.0.1", "localhost", "::1")
