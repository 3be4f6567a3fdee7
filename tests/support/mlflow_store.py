"""Looking things up in an MLflow store the pipeline wrote (a SQLite file, or any URI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

EXPERIMENT = "frcnn"  # tracking.experiment's default


def client(store: str | Path) -> MlflowClient:
    """A client of ``store``: a ``mlflow.db`` path or a tracking URI."""
    store = str(store)
    return MlflowClient(store if "://" in store else f"sqlite:///{store}")


def runs(store: str | Path, name: str | None = None, *, experiment: str = EXPERIMENT
         ) -> list[Any]:
    """The runs of ``experiment`` (those named ``name``, when given), newest first."""
    c = client(store)
    found = c.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} in {store}"
    query = f"attributes.run_name = '{name}'" if name is not None else ""
    return c.search_runs([found.experiment_id], query)


def only_run(store: str | Path, name: str, *, experiment: str = EXPERIMENT) -> Any:
    """The one run named ``name`` (asserted to be the only one)."""
    found = runs(store, name, experiment=experiment)
    assert len(found) == 1, [r.info.run_id for r in found]
    return found[0]


def sweep_runs(store: str | Path) -> tuple[list[Any], list[Any]]:
    """``([parent sweep runs], [child runs])`` of the store."""
    found = runs(store)
    parents = [r for r in found if r.info.run_name == "sweep"]
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def metric_steps(store: str | Path, run_id: str, key: str) -> list[int]:
    """The steps of every logged value of metric ``key``, in the store's order."""
    return [m.step for m in client(store).get_metric_history(run_id, key)]


def artifacts(store: str | Path, run_id: str, path: str | None = None) -> list[str]:
    """Paths of every artifact file of the run (under ``path``), folders walked."""
    c = client(store)
    out = []
    for item in c.list_artifacts(run_id, path):
        out += artifacts(store, run_id, item.path) if item.is_dir else [item.path]
    return out
