"""MLflow tracking: one MLflow run per stage run, metrics from training workers.

- Store: ``MLFLOW_TRACKING_URI`` if set, else ``tracking.uri`` (default ``sqlite:///mlflow.db``,
  a SQLite file in the project folder; relative SQLite paths are made absolute so that Ray
  workers, which run in other folders, write to the same file). Artifacts of a SQLite store go
  to ``mlartifacts/`` beside the database. ``make ui`` serves the same store.
- Experiment: ``tracking.experiment``.
- :func:`stage_run` wraps a stage: an MLflow run named after the stage, tagged ``git_commit``,
  ``dvc_stage`` (``$DVC_STAGE``, which ``dvc repro`` sets, else the stage name) and
  ``ray_job_id`` (set by stages that use Ray), with every parameter (``cfg.flat()``) and the
  resolved config as ``config/params.yaml``. A stage that raises ends its run as ``FAILED`` with
  the error as the ``error`` tag and ``error.txt``; Ctrl-C ends it as ``KILLED``.
- :class:`MetricLogger` logs step metrics into an existing run from another process (rank 0 of
  a Ray Train worker group).

Only parameters from the config are logged, never the environment; everything logged goes
through :func:`redact` (URI credentials, values of secret-looking environment variables).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import time
import traceback
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from pipeline.config import Config

ENV_URI = "MLFLOW_TRACKING_URI"
ARTIFACTS_DIR = "mlartifacts"


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, bad URI)."""


# scheme://user:password@host or scheme://token@host: everything between :// and @
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/@\s]+@")
_SECRET_NAMES = re.compile(r"(?i)(secret|password|passwd|token|credential|api_?key|access_?key"
                           r"|private_?key)")


def redact(text: str) -> str:
    """``text`` with credentials masked: the user-info of URIs (``http://user:pass@host`` ->
    ``http://***@host``) and the value of every environment variable whose name looks secret
    (``*SECRET*``, ``*PASSWORD*``, ``*TOKEN*``, ``*API_KEY*``...; values of 8+ characters).

    Applied to everything this module logs (parameters, tags, the config artifact, errors) and
    to the URIs in its messages.
    """
    text = _USERINFO.sub(r"\1***@", text)
    for name, value in _environ_snapshot().items():
        if len(value) >= 8 and _SECRET_NAMES.search(name) and value in text:
            text = text.replace(value, f"***{name}***")
    return text


def _environ_snapshot() -> dict[str, str]:
    """The environment now, safe while other threads change it (MLflow's telemetry thread
    deletes a variable of its own: ``os.environ.items()`` then raises KeyError mid-way)."""
    values = {name: os.environ.get(name) for name in list(os.environ)}
    return {name: value for name, value in values.items() if value is not None}


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


def check_reachable(uri: str, *, timeout: float = 5.0) -> None:
    """Fail fast, before any work, when the store cannot be reached.

    ``http(s)://`` servers must answer ``/health``; a SQLite file's folder must exist or be
    creatable.

    Raises:
        TrackingError: naming the URI and the reason.
    """
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
                if response.status != 200:
                    raise TrackingError(f"MLflow tracking server {redact(uri)} answered "
                                        f"{response.status} at {redact(url)}")
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
                f"MLflow tracking store {uri}: cannot create {folder}: {exc}") from None


def git_commit(cwd: str | Path | None = None) -> str:
    """``git rev-parse HEAD`` of the project, or ``"unknown"`` outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def _artifact_location(uri: str) -> str | None:
    """``mlartifacts/`` beside a SQLite database; the server's default otherwise."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / ARTIFACTS_DIR).as_uri()
    return None


def _quiet_store_setup() -> None:
    """Keep "Creating initial MLflow database tables..." (INFO, on stderr) off the console."""
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _param_value(value: Any) -> str:
    return redact(str(value))[:6000]  # MLflow's limit on a parameter value


@dataclass(frozen=True)
class StageRun:
    """An active stage run: where it lives and how to add to it."""

    run_id: str
    experiment_id: str
    tracking_uri: str

    def _client(self) -> Any:
        from mlflow.tracking import MlflowClient
        return MlflowClient(self.tracking_uri)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        client = self._client()
        for key, value in tags.items():
            client.set_tag(self.run_id, key, redact(str(value)))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        MetricLogger(self.tracking_uri, self.run_id).log(metrics, step=step or 0)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._client().log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client().log_text(self.run_id, text, artifact_file)


def _experiment_id(client: Any, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(uri))
    except Exception:  # created concurrently by another stage: use theirs
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


@contextlib.contextmanager
def stage_run(cfg: Config, stage: str, *, run_id: str | None = None,
              tags: Mapping[str, Any] | None = None) -> Iterator[StageRun]:
    """Run the body inside an MLflow run named ``stage``; end it FINISHED / FAILED / KILLED.

    Args:
        cfg: the resolved config: gives the store and experiment, and is logged whole.
        stage: the run name, e.g. ``"prepare"``, ``"train_rpn"``.
        run_id: reopen this existing run (a resumed training stage) instead of creating one;
            ignored when it does not exist in the store.
        tags: extra tags.

    Raises:
        TrackingError: the store is unreachable (before the body runs).
    """
    from mlflow.entities import Param, RunStatus, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = resolve_uri(cfg.tracking.uri)
    check_reachable(uri)
    _quiet_store_setup()
    client = MlflowClient(uri)
    experiment_id = _experiment_id(client, cfg.tracking.experiment, uri)

    logged: dict[str, str] = {}
    if run_id is not None:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            run = None
        if run is None or run.info.experiment_id != experiment_id:
            run_id = None
        else:
            logged = dict(run.data.params)
            client.update_run(run_id, status="RUNNING")
    all_tags = {"git_commit": git_commit(), "dvc_stage": os.environ.get("DVC_STAGE") or stage,
                **(tags or {})}
    if run_id is None:
        run_id = client.create_run(experiment_id, run_name=stage).info.run_id
    # Parameters are immutable in MLflow: a reopened run keeps the values it started with.
    params = [Param(k, _param_value(v)) for k, v in cfg.flat().items() if k not in logged]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[start:start + 100])
    client.log_batch(run_id, tags=[RunTag(k, redact(str(v))) for k, v in all_tags.items()])
    client.log_text(run_id, redact(yaml.safe_dump(cfg.to_dict(), sort_keys=False)),
                    "config/params.yaml")

    handle = StageRun(run_id=run_id, experiment_id=experiment_id, tracking_uri=uri)
    try:
        yield handle
    except KeyboardInterrupt:
        client.set_tag(run_id, "error", "interrupted (KeyboardInterrupt)")
        client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException as exc:
        client.set_tag(run_id, "error", redact(f"{type(exc).__name__}: {exc}")[:5000])
        with contextlib.suppress(Exception):
            client.log_text(run_id, redact(traceback.format_exc()), "error.txt")
        client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.FINISHED))


class MetricLogger:
    """Log metrics into an existing run from any process (no active-run state).

    Used by rank 0 of the training workers; ``tracking_uri`` must be reachable from there (a
    shared SQLite file locally; a tracking server on a multi-node cluster).
    """

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient
        _quiet_store_setup()
        self.run_id = run_id
        self._client = MlflowClient(tracking_uri)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, int(step)) for key, value in metrics.items()]
        if batch:
            self._client.log_batch(self.run_id, metrics=batch)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.tracking uri [--params FILE ...]``: the store ``make ui`` serves."""
    import argparse

    from pipeline.config import load_config
    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking")
    parser.add_argument("what", choices=["uri"])
    parser.add_argument("--params", action="append", default=None)
    args = parser.parse_args(argv)
    params = args.params or (["params.yaml"] if Path("params.yaml").is_file() else [])
    print(resolve_uri(load_config(params).tracking.uri))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
