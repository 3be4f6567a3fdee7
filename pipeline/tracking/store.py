"""The tracking store: which URI, whether it answers, and one client per store and process."""

from __future__ import annotations

import base64
import functools
import logging
import os
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.errors import TrackingError
from pipeline.redaction import redact

ENV_URI = "MLFLOW_TRACKING_URI"
ARTIFACTS_DIR = "mlartifacts"


def resolve_uri(uri: str, *, base: str | Path | None = None) -> str:
    """The tracking URI to use: ``$MLFLOW_TRACKING_URI`` if set, else ``uri``.

    A relative SQLite path (``sqlite:///mlflow.db``) becomes absolute, relative to ``base``
    (default: the working directory, the project folder under ``dvc repro``).
    """
    uri = os.environ.get(ENV_URI) or uri
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        path = Path(uri[len(prefix):])
        if not path.is_absolute():
            path = Path(base or Path.cwd()).resolve() / path
        return prefix + str(path)
    return uri


def _health_request(uri: str) -> urllib.request.Request:
    """``GET <server>/health``, credentials (from the URI or MLflow's environment variables) as
    a basic-auth header rather than in the URL, which urllib cannot resolve."""
    parts = urllib.parse.urlsplit(uri.rstrip("/"))
    user, password = parts.username, parts.password
    user = urllib.parse.unquote(user) if user else os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = (urllib.parse.unquote(password) if password
                else os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path + "/health", "", ""))
    request = urllib.request.Request(url)
    if user:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request


def check_reachable(uri: str, *, timeout: float = 5.0) -> None:
    """Fail fast, before any work, when the store cannot be reached.

    ``http(s)://`` servers must answer ``/health``; a SQLite file's folder must exist or be
    creatable.

    Raises:
        TrackingError: naming the URI (credentials masked) and the reason.
    """
    if uri.startswith(("http://", "https://")):
        try:
            request = _health_request(uri)
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                if response.status != 200:
                    raise TrackingError(f"MLflow tracking server {redact(uri)} answered "
                                        f"{response.status} at /health")
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
