"""Inside a sweep trial: the Tune function trainable, its Ray Train workers, and MLflow children.

:func:`trial` (one per trial, run by Tune) decodes the sampled values, opens the trial's MLflow
child run, and fits a ``TorchTrainer`` of :func:`trial_worker` whose reports reach Tune through
``TuneReportCallback``; :func:`trial_worker` (every Ray Train worker) runs
:func:`pipeline.train_loop.train` of the RPN with :func:`validation_recall` on rank 0 after each
epoch. A trial whose training ends writes a marker ``E/trials/<trial>.json`` so a resumed sweep
does not train it again. The layout of ``E`` and the MLflow runs: :mod:`pipeline.sweep`.

Files under ``E`` go through :mod:`pipeline.storage`, so ``sweep.storage_path`` may be a folder
or a bucket URI.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from pipeline import storage, sweep_space, tracking
from pipeline.config import Config, from_dict

TRAIN_RUNS = "train_runs"
MARKERS = "trials"


# --------------------------------------------------------------------------------------------
# Inside a trial (a Tune function trainable) and its Ray Train workers


def validation_recall(model: Any, split: Any, *, budgets: tuple[int, ...], batch_size: int,
                      device: Any) -> dict[str, float]:
    """Proposal recall of ``model`` on ``split`` (a :class:`pipeline.evaluate.SplitData`):
    ``{name: value}`` for :func:`pipeline.sweep_space.metric_names` (a metric that cannot be
    computed, e.g. without boxes, is left out)."""
    from pipeline import evaluate

    results = evaluate.evaluate_model(rpn_model=model, detector=None, splits=[split],
                                      budgets=budgets, num_classes=model.num_classes,
                                      image_size=model.image_size, batch_size=batch_size,
                                      device=device, progress=False)
    values = evaluate.split_metrics(results.summary, split.name, budgets, None, [])
    wanted = set(sweep_space.metric_names(budgets))
    return {k: float(v) for k, v in values.items() if k in wanted}


def trial_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker of a trial: :func:`pipeline.train_loop.train` of the RPN
    (through :func:`pipeline.ray_worker.fit_on_worker`), recall measured after each epoch on
    rank 0."""
    import ray
    import torch

    from pipeline import evaluate, ray_worker

    worker = ray_worker.worker_context(config)
    cfg, device = worker.cfg, worker.device
    folder = Path(tempfile.mkdtemp(prefix="frcnn-sweep-"))
    try:
        for name, data in ray.get(config["tables"]).items():
            (folder / f"{name}.parquet").write_bytes(data)
        on_epoch_end = log = None
        if worker.rank == 0:
            split = evaluate.read_split(folder / "eval.parquet", config["split"])
            budgets = tuple(cfg.eval.proposal_budgets)

            def on_epoch_end(model: torch.nn.Module, epoch: int) -> dict[str, float]:
                return validation_recall(model, split, budgets=budgets,
                                         batch_size=cfg.eval.batch_size, device=device)

            logger = tracking.MetricLogger(config["tracking_uri"], config["run_id"])

            def log(metrics: dict[str, float], step: int) -> None:
                logger.log(evaluate.mlflow_metrics(metrics), step)

        ray_worker.fit_on_worker(worker, stage="rpn", train_path=folder / "train.parquet",
                                 num_classes=config["num_classes"], log=log,
                                 model_meta={"classes": config["classes"]},
                                 on_epoch_end=on_epoch_end)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _child_run(setup: Mapping[str, Any], trial_id: str, sampled: Mapping[str, Any]) -> str:
    """The trial's MLflow child run: found again by its ``trial_id`` tag (a resumed trial), or
    created under the sweep's parent run with the sampled values as parameters."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(setup["tracking_uri"])
    parent = setup["parent_run_id"]
    found = client.search_runs(
        [setup["experiment_id"]],
        f"tags.trial_id = '{trial_id}' and tags.`mlflow.parentRunId` = '{parent}'")
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(setup["experiment_id"], run_name=trial_id, tags={
        "mlflow.parentRunId": parent, "trial_id": trial_id, "sweep": setup["sweep_name"],
        "ray_job_id": setup["ray_job_id"]})
    params = [Param(f"sampled.{k}", str(v)[:6000]) for k, v in sampled.items()]
    client.log_batch(run.info.run_id, params=params)
    return run.info.run_id


def _log_config(tracking_uri: str, run_id: str, cfg: Config) -> None:
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    logged = set(client.get_run(run_id).data.params)
    params = [Param(k, str(v)[:6000]) for k, v in cfg.flat().items() if k not in logged]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[start:start + 100])


def _end_run(tracking_uri: str, run_id: str, status: str, error: str | None = None) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    if error:
        client.set_tag(run_id, "error", error[:5000])
    client.set_terminated(run_id, status=status)


def trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """One trial (a Tune function trainable): build the trial's config, fit a ``TorchTrainer``
    of :func:`trial_worker` whose reports go to Tune, mark the trial finished."""
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    started = time.perf_counter()
    base = from_dict(setup["params"])
    trial_id = tune.get_context().get_trial_id()
    sampled = sweep_space.decode(base.sweep.space, config)
    uri = setup["tracking_uri"]
    run_id = _child_run(setup, trial_id, sampled)
    marker = f"{setup['experiment']}/{MARKERS}/{trial_id}.json"
    done = storage.read_json(marker)
    if done.get("finished"):
        # finished before an interruption that Tune's saved state predates: report the end
        # again instead of starting its workers
        tune.report(done["metrics"])
        _end_run(uri, run_id, "FINISHED")
        return
    try:
        cfg = sweep_space.trial_config(base, sampled)
        _log_config(uri, run_id, cfg)
        resources = sweep_space.worker_resources(base)
        trainer = TorchTrainer(
            trial_worker,
            train_loop_config={
                "params": cfg.to_dict(), "tables": setup["tables"],
                "split": base.sweep.split, "num_classes": len(setup["classes"]),
                "classes": setup["classes"], "tracking_uri": uri, "run_id": run_id,
                "threads": max(1, round(resources["CPU"])),
            },
            scaling_config=ScalingConfig(num_workers=cfg.train.num_workers,
                                         use_gpu="GPU" in resources,
                                         resources_per_worker=resources),
            run_config=RunConfig(
                name=trial_id, storage_path=f"{setup['experiment']}/{TRAIN_RUNS}",
                callbacks=[TuneReportCallback()],
                failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=1)),
        )
        result = trainer.fit()
    except Exception as exc:
        _end_run(uri, run_id, "FAILED", f"{type(exc).__name__}: {exc}")
        raise
    metrics = {k: v for k, v in result.metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    storage.write_bytes(marker, json.dumps({"finished": True, "metrics": metrics,
                                     "wall_seconds": time.perf_counter() - started}).encode())
    _end_run(uri, run_id, "FINISHED")


def trial_dirname(trial: Any) -> str:
    """Trial folders named by trial id alone (the results find their trial by it)."""
    return trial.trial_id
