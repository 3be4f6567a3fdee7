"""MLflow, the one door to it: every run the pipeline opens, every value it logs, redacted.

No other module imports ``mlflow``. Everything written goes through a :class:`RunHandle`, whose
methods pass every parameter, tag, text artifact and error text through
:func:`pipeline.redaction.redact` (URI credentials, secret environment values) first.

- Store: ``MLFLOW_TRACKING_URI`` if set, else ``tracking.uri`` (default ``sqlite:///mlflow.db``,
  a SQLite file in the project folder; relative SQLite paths are made absolute so that Ray
  workers, which run in other folders, write to the same file). Artifacts of a SQLite store go
  to ``mlartifacts/`` beside the database; a tracking server decides its own (``mlflow server
  --artifacts-destination`` proxies them). A server's account comes from MLflow's environment
  variables (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, or
  ``MLFLOW_TRACKING_TOKEN``); a URI with credentials in it is refused
  (:func:`pipeline.config.validate.check_no_credentials`), and :func:`check_reachable` names a
  refused account in one line before any work.
- :func:`stage_run` wraps a stage: an MLflow run named after the stage in experiment
  ``tracking.experiment``, with MLflow's source tags (``mlflow.source.name``, ``.type``,
  ``.git.commit``: the UI's Source and Version columns) and ``dvc_stage`` (``$DVC_STAGE``, which
  ``dvc repro`` sets, else the stage name), with every parameter and the resolved config as
  ``config/params.yaml`` (:func:`log_config`). A stage that raises ends its run ``FAILED`` with
  the error as the ``error`` tag and ``error.txt``; Ctrl-C ends it ``KILLED``.
- :func:`open_run` gives the handle of an existing run to another process (rank 0 of a Ray
  Train worker group logs its step metrics this way, through a :class:`MetricsBuffer`: off the
  training step, kept while the store is unreachable and sent when it is back);
  :func:`child_run` finds or creates a sweep trial's run under its parent; :func:`end_children`
  ends them; :func:`record_restart` notes a worker-group restart.

Only parameters from the config are logged, never the environment.

Modules: :mod:`.store` (the URI, its pre-flight check, the client), :mod:`.runs` (run handles,
stage and child runs), :mod:`.inputs` (datasets a run used, system metrics of training
workers), :mod:`.models` (the detector as a registered MLflow model, its weights read back;
imported by the stages that need it, as it brings the serving code along).
``python -m pipeline.tracking uri`` prints the store ``make ui`` serves.
"""

from pipeline.tracking.buffered import MetricsBuffer
from pipeline.tracking.inputs import log_split, system_metrics
from pipeline.tracking.runs import (FAILED, FINISHED, KILLED, RUNNING, RunHandle, child_run,
                                    end_children, finite, flatten_metrics, log_config,
                                    metric_name, open_run, record_restart, stage_run)
from pipeline.tracking.store import (ARTIFACTS_DIR, ENV_URI, check_reachable, git_commit,
                                     resolve_uri)
from pipeline.errors import TrackingError

__all__ = ["ARTIFACTS_DIR", "ENV_URI", "FAILED", "FINISHED", "KILLED", "MetricsBuffer", "RUNNING",
           "RunHandle",
           "TrackingError", "check_reachable", "child_run", "end_children", "finite", "flatten_metrics",
           "git_commit", "log_config", "log_split", "metric_name", "open_run", "record_restart",
           "resolve_uri", "stage_run", "system_metrics"]
