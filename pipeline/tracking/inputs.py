"""What a run ran on: the prepared splits it read (MLflow dataset inputs) and, for training
workers, the machine itself (MLflow system metrics).

- :func:`log_split`: a prepared split as an MLflow dataset input of the run (name, source, a
  digest of the table's content, its row count and columns; never image bytes), so the UI's
  Dataset column and "compare runs" show which data each run used.
- :func:`system_metrics`: CPU, memory, disk, network (GPU too, with ``pynvml``) of a training
  node, sampled every ``tracking.system_metrics_interval`` seconds into its stage's run by
  MLflow's own monitor, under ``system/<node>/...`` (by each node's local rank 0: once per
  node, not once per worker).
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Iterator, Sequence

from pipeline.redaction import redact
from pipeline.tracking.runs import RUNNING, RunHandle
from pipeline.tracking.store import global_uri


def log_split(run: RunHandle, *, name: str, source: str, digest: str, rows: int,
              columns: Sequence[str], context: str) -> None:
    """Log a prepared split as a dataset input of ``run``.

    Args:
        name: e.g. ``train``; source: where it lives (credentials masked); digest: of its
        content (the first 16 hex digits are kept); rows: its number of images; columns: its
        columns; context: ``training``, ``evaluation``, ``sweep``.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.exceptions import MlflowException

    kind = source.split("://", 1)[0] if "://" in source else "local"
    dataset = Dataset(name=name, digest=digest[:16], source_type=kind,
                      source=json.dumps({"uri": redact(source)}),
                      schema=json.dumps({"columns": list(columns)}),
                      profile=json.dumps({"num_rows": int(rows)}))
    inputs = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])]
    try:
        run.client.log_inputs(run.run_id, datasets=inputs)
    except MlflowException:
        # two runs logging the same new dataset at once (the store's unique key on experiment,
        # name and digest): the other one's row is there now, and a second call reuses it
        time.sleep(0.5)
        run.client.log_inputs(run.run_id, datasets=inputs)


@contextlib.contextmanager
def system_metrics(run: RunHandle, *, node: str, interval: float,
                   enabled: bool = True) -> Iterator[None]:
    """Inside the block, MLflow's system-metrics monitor samples this process's machine into
    ``run`` as node ``node``; nothing when not ``enabled``."""
    if not enabled:
        yield
        return
    import logging

    import mlflow

    # its start / stop / "no GPU" notes at INFO would fill every worker's log
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    mlflow.set_system_metrics_sampling_interval(interval)
    mlflow.set_system_metrics_node_id(node)
    # MLflow's monitor samples into the process's active run, in the global store
    with global_uri(run.tracking_uri):
        mlflow.start_run(run_id=run.run_id, log_system_metrics=True)
        try:
            yield
        finally:
            mlflow.end_run(status=RUNNING)  # the stage's driver ends its run itself
