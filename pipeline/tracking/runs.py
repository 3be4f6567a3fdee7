"""MLflow runs: the handle every write goes through (redacted), stage runs and sweep children."""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from pipeline.config import Config
from pipeline.redaction import redact
from pipeline.tracking.store import (_client, _experiment_id, check_reachable, resolve_uri,
                                     source_tags)

FINISHED, FAILED, KILLED, RUNNING = "FINISHED", "FAILED", "KILLED", "RUNNING"
# Artifacts with these suffixes are text: their content is redacted before it is uploaded.
TEXT_SUFFIXES = (".yaml", ".yml", ".json", ".csv", ".txt", ".md", ".log")
_MAX_PARAM = 6000   # MLflow's limit on a parameter value
_MAX_TAG = 5000


# --------------------------------------------------------------------------------------------
# Names and values


def metric_name(name: str) -> str:
    """An MLflow-valid metric name: ``AR@300`` -> ``AR_at_300``; other characters MLflow refuses
    become ``_``."""
    return re.sub(r"[^\w./\- :]", "_", name.replace("@", "_at_"))


def flatten_metrics(nested: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"AR@300": .., "val": {"AR@300": ..}}`` -> ``{"AR@300": .., "val/AR@300": ..}``."""
    out: dict[str, float] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_metrics(value, prefix=f"{name}/"))
        else:
            out[name] = float(value)
    return out


def _text(value: Any, limit: int) -> str:
    return redact(str(value))[:limit]


# --------------------------------------------------------------------------------------------
# Runs


@dataclass(frozen=True)
class RunHandle:
    """An MLflow run: where it lives, and the only way to write to it (every text redacted).

    Plain and picklable: it travels to Ray workers and sweep trials, which log through it.
    """

    run_id: str
    experiment_id: str
    tracking_uri: str

    @property
    def client(self) -> Any:
        """The store's ``MlflowClient`` (for reads; writes go through the methods below)."""
        return _client(self.tracking_uri)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters not logged yet (MLflow keeps a parameter's first value)."""
        from mlflow.entities import Param

        logged = set(self.client.get_run(self.run_id).data.params)
        batch = [Param(key, _text(value, _MAX_PARAM)) for key, value in params.items()
                 if key not in logged]
        if batch:
            self.client.log_batch(self.run_id, params=batch)  # MLflow chunks the batch itself

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(key, _text(value, _MAX_TAG)) for key, value in tags.items()]
        if batch:
            self.client.log_batch(self.run_id, tags=batch)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log finite and non-finite values alike, names made MLflow-valid (:func:`metric_name`)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(metric_name(redact(key)), float(value), now, int(step))
                 for key, value in metrics.items() if not isinstance(value, bool)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_metric_points(self, points: list[tuple[str, float, int, int]]) -> None:
        """Log ``[(name, value, timestamp ms, step)]`` as they are, in one request (names
        already MLflow-valid and redacted: :class:`pipeline.tracking.buffered.MetricsBuffer`)."""
        from mlflow.entities import Metric

        if points:
            self.client.log_batch(self.run_id, metrics=[Metric(*p) for p in points])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, redact(text), artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file; a text file (:data:`TEXT_SUFFIXES`) is redacted on the way."""
        path = Path(path)
        if path.suffix.lower() not in TEXT_SUFFIXES:
            self.client.log_artifact(self.run_id, str(path), artifact_path)
            return
        text = path.read_text(encoding="utf-8", errors="replace")
        with tempfile.TemporaryDirectory(prefix="frcnn-artifact-") as folder:
            copy = Path(folder) / path.name
            copy.write_text(redact(text), encoding="utf-8")
            self.client.log_artifact(self.run_id, str(copy), artifact_path)

    def end(self, status: str = FINISHED, error: str | None = None) -> None:
        """End the run with ``status``; ``error`` becomes the ``error`` tag (redacted)."""
        if error:
            self.set_tags({"error": error})
        self.client.set_terminated(self.run_id, status=status)

    def reopen(self) -> None:
        """Mark an ended run running again (a resumed stage or trial)."""
        self.client.update_run(self.run_id, status=RUNNING)


def open_run(tracking_uri: str, run_id: str, experiment_id: str = "") -> RunHandle:
    """The handle of an existing run, from any process (no active-run state)."""
    return RunHandle(run_id=run_id, experiment_id=experiment_id, tracking_uri=tracking_uri)


def log_config(run: RunHandle, cfg: Config) -> None:
    """Every parameter (``section.key``) and the resolved config as ``config/params.yaml``."""
    run.log_params(cfg.flat())
    run.log_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config/params.yaml")


def _reopen_or_none(client: Any, run_id: str | None, experiment_id: str) -> str | None:
    """``run_id`` when it exists in this experiment (reopened), else None."""
    from mlflow.exceptions import MlflowException

    if run_id is None:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    if run.info.experiment_id != experiment_id:
        return None
    client.update_run(run_id, status=RUNNING)
    return run_id


@contextlib.contextmanager
def stage_run(cfg: Config, stage: str, *, run_id: str | None = None,
              tags: Mapping[str, Any] | None = None) -> Iterator[RunHandle]:
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
    uri = resolve_uri(cfg.tracking.uri)
    check_reachable(uri)
    client = _client(uri)
    experiment_id = _experiment_id(client, cfg.tracking.experiment, uri)
    run_id = _reopen_or_none(client, run_id, experiment_id) \
        or client.create_run(experiment_id, run_name=stage).info.run_id
    run = RunHandle(run_id=run_id, experiment_id=experiment_id, tracking_uri=uri)
    run.set_tags({**source_tags(f"frcnn {stage}"),
                  "dvc_stage": os.environ.get("DVC_STAGE") or stage,
                  **(tags or {})})
    log_config(run, cfg)
    try:
        yield run
    except KeyboardInterrupt:
        run.end(KILLED, "interrupted (KeyboardInterrupt)")
        raise
    except BaseException as exc:
        with contextlib.suppress(Exception):
            run.log_text(traceback.format_exc(), "error.txt")
        run.end(FAILED, f"{type(exc).__name__}: {exc}")
        raise
    run.end(FINISHED)


def child_run(parent: RunHandle, name: str, *, params: Mapping[str, Any],
              tags: Mapping[str, Any]) -> RunHandle:
    """A child run of ``parent`` named ``name``: found again by its ``trial_id`` tag (a resumed
    sweep trial; reopened) or created with ``params`` and ``tags``."""
    client = parent.client
    found = client.search_runs(
        [parent.experiment_id],
        f"tags.trial_id = '{name}' and tags.`mlflow.parentRunId` = '{parent.run_id}'")
    if found:
        run = RunHandle(found[0].info.run_id, parent.experiment_id, parent.tracking_uri)
        run.reopen()
        return run
    created = client.create_run(parent.experiment_id, run_name=name)
    run = RunHandle(created.info.run_id, parent.experiment_id, parent.tracking_uri)
    run.set_tags({**source_tags(f"frcnn sweep trial {name}"), "mlflow.parentRunId": parent.run_id,
                  "trial_id": name, **tags})
    run.log_params(params)
    return run


def end_children(parent: RunHandle,
                 outcomes: Mapping[str, tuple[str, str, str | None, Mapping[str, float]]]
                 ) -> None:
    """End each child run of ``parent``: ``outcomes[trial_id] = (MLflow status, trial status,
    error or None, final metric values)``; the trial status becomes the ``trial_status`` tag,
    the final values plain metrics (columns of the UI's run table)."""
    runs = parent.client.search_runs([parent.experiment_id],
                                     f"tags.`mlflow.parentRunId` = '{parent.run_id}'",
                                     max_results=5000)
    for found in runs:
        outcome = outcomes.get(found.data.tags.get("trial_id"))
        if outcome is None:
            continue
        status, trial_status, error, final = outcome
        run = RunHandle(found.info.run_id, parent.experiment_id, parent.tracking_uri)
        run.set_tags({"trial_status": trial_status})
        run.log_metrics(final)
        run.end(status, error)


def record_restart(tracking_uri: str, run_id: str, reason: str) -> int:
    """Count a worker-group restart on the run: tag ``restarts`` (running total, across resumed
    drivers too) and ``last_restart``, metric ``restarts``. Returns the new total."""
    run = open_run(tracking_uri, run_id)
    total = int(run.client.get_run(run_id).data.tags.get("restarts", "0")) + 1
    run.set_tags({"restarts": total, "last_restart": reason})
    run.log_metrics({"restarts": total}, step=total)
    return total


def finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric, finite, non-boolean entries of ``metrics`` as floats."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
