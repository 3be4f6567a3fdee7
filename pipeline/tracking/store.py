"""The tracking store: which URI, whether it answers, and one client per store and process."""

from __future__ import annotations

import base64
import contextlib
import functools
import logging
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import TrackingError
from pipeline.redaction import redact

ENV_URI = "MLFLOW_TRACKING_URI"
ARTIFACTS_DIR = "mlartifacts"


def resolve_uri(uri: str, *, base: str | Path | None = None) -> str:
    """The tracking URI to use: ``$MLFLOW_TRACKING_URI`` if set, else ``uri``.

    A relative SQLite path (``sqlite:///mlflow.db``) becomes absolute, relative to ``base``
    (default: the working directory, the project folder under ``dvc repro``).

    Raises:
        ConfigError: ``$MLFLOW_TRACKING_URI`` carries credentials (``tracking.uri`` is checked
            with the rest of the config).
    """
    from pipeline.config.validate import check_no_credentials

    if os.environ.get(ENV_URI):
        check_no_credentials({ENV_URI: os.environ[ENV_URI]})
    uri = os.environ.get(ENV_URI) or uri
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        path = Path(uri[len(prefix):])
        if not path.is_absolute():
            path = Path(base or Path.cwd()).resolve() / path
        return prefix + str(path)
    return uri


def _request(uri: str, path: str) -> urllib.request.Request:
    """``GET <server><path>`` with the account of MLflow's environment variables
    (``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``, or ``MLFLOW_TRACKING_TOKEN``), as MLflow's
    own client sends it."""
    request = urllib.request.Request(uri.rstrip("/") + path)
    user, token = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get(
        "MLFLOW_TRACKING_TOKEN")
    if user:
        password = os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {basic}")
    elif token:
        request.add_header("Authorization", f"Bearer {token}")
    return request


def check_reachable(uri: str, *, timeout: float = 5.0) -> None:
    """Fail fast, before any work, when the store cannot be reached or refuses the account.

    ``http(s)://`` servers must answer ``/health`` and let the account of MLflow's environment
    variables read experiments (a server with MLflow's basic-auth app answers 401 to a wrong
    password, 403 to a user without permission); a SQLite file's folder must exist or be
    creatable.

    Raises:
        TrackingError: one line naming the URI and the reason (never the password).
    """
    if uri.startswith(("http://", "https://")):
        try:
            for path in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
                with urllib.request.urlopen(_request(uri, path), timeout=timeout) as response:
                    if response.status != 200:
                        raise TrackingError(f"MLflow tracking server {redact(uri)} answered "
                                            f"{response.status} at {path}")
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                user = os.environ.get("MLFLOW_TRACKING_USERNAME")
                who = f"user {user!r}" if user else "no account (MLFLOW_TRACKING_USERNAME unset)"
                raise TrackingError(
                    f"MLflow tracking server {redact(uri)} refused {who}: "
                    f"{exc.code} {'wrong username or password' if exc.code == 401 else 'no permission'}"
                    f"; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") from None
            raise TrackingError(f"MLflow tracking server {redact(uri)} is unreachable (HTTP "
                                f"Error {exc.code}: {exc.reason}); start it or set tracking.uri "
                                f"/ {ENV_URI}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise TrackingError(f"MLflow tracking server {redact(uri)} is unreachable "
                                f"({redact(str(exc))}); start it or set tracking.uri / {ENV_URI}"
                                ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(
                f"MLflow tracking store {redact(uri)}: cannot create {folder}: {exc}") from None


@contextlib.contextmanager
def global_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to ``uri`` for the block (``log_model`` logs to
    the active run of the global store), then unset again, and ``$MLFLOW_TRACKING_URI``, which
    ``mlflow.set_tracking_uri`` also writes, put back as it was: left behind, they would point
    the process's later runs at this store."""
    import mlflow

    before_env = os.environ.get(ENV_URI)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # unset: MLflow reads $MLFLOW_TRACKING_URI again
        if before_env is not None:
            os.environ[ENV_URI] = before_env


def source_tags(name: str) -> dict[str, str]:
    """MLflow's standard source tags of a run (the UI's Source and Version columns): the
    command (``name``), its kind (``LOCAL``: a command line), the project's git commit."""
    return {"mlflow.source.name": name, "mlflow.source.type": "LOCAL",
            "mlflow.source.git.commit": git_commit()}


def git_commit(cwd: str | Path | None = None) -> str:
    """``git rev-parse HEAD`` of the project, or ``"unknown"`` outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


@functools.lru_cache(maxsize=8)
def _client(uri: str) -> Any:
    """One MlflowClient per store and process (step metrics are logged every step)."""
    from mlflow.tracking import MlflowClient

    for name in ("mlflow.store.db.utils", "alembic"):  # no "Creating initial tables..." on stderr
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(uri)


def _experiment_id(client: Any, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # mlartifacts/ beside the database; a server decides its own
        location = (Path(uri[len("sqlite:///"):]).parent / ARTIFACTS_DIR).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another stage: use theirs
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id
