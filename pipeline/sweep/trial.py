"""Inside a sweep trial: the Tune function trainable, its Ray Train workers, and MLflow children.

:func:`trial` (one per trial, run by Tune) decodes the sampled values, opens the trial's MLflow
child run, and fits a ``TorchTrainer`` of :func:`trial_worker` whose reports reach Tune through
``TuneReportCallback``; :func:`trial_worker` (every Ray Train worker) runs
:func:`pipeline.training.loop.train` of the RPN with :func:`validation_recall` on rank 0 after
each epoch. A trial whose training ends writes a marker ``E/trials/<trial>.json`` so a resumed sweep
does not train it again. The layout of ``E`` and the MLflow runs: :mod:`pipeline.sweep.driver`.

Files under ``E`` go through :mod:`pipeline.storage`, so ``sweep.storage_path`` may be a folder
or a bucket URI.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from pipeline import storage, tracking
from pipeline.config import from_dict
from pipeline.sweep import space

TRAIN_RUNS = "train_runs"
MARKERS = "trials"


def validation_recall(model: Any, split: Any, *, budgets: tuple[int, ...], batch_size: int,
                      device: Any) -> dict[str, float]:
    """Proposal recall of ``model`` on ``split`` (a :class:`pipeline.prepared.GroundTruth`):
    ``{name: value}`` for :func:`pipeline.sweep.space.metric_names` (a metric that cannot be
    computed, e.g. without boxes, is left out)."""
    from pipeline.evaluation.core import evaluate_model
    from pipeline.evaluation.metrics import split_metrics

    results = evaluate_model(rpn_model=model, detector=None, splits=[split], budgets=budgets,
                             num_classes=model.num_classes, image_size=model.image_size,
                             batch_size=batch_size, device=device, progress=False)
    values = split_metrics(results.summary, split.name, budgets, None, [])
    wanted = set(space.metric_names(budgets))
    return {k: float(v) for k, v in values.items() if k in wanted}


def trial_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker of a trial: :func:`pipeline.training.loop.train` of the
    RPN (through :func:`pipeline.training.ray_worker.fit_on_worker`), recall measured after
    each epoch on rank 0."""
    import ray
    import torch

    from pipeline.prepared import read_ground_truth
    from pipeline.training import ray_worker

    worker = ray_worker.worker_context(config)
    cfg, device = worker.cfg, worker.device
    folder = Path(tempfile.mkdtemp(prefix="frcnn-sweep-"))
    try:
        for name, data in ray.get(config["tables"]).items():
            (folder / f"{name}.parquet").write_bytes(data)
        on_epoch_end = log = None
        if worker.rank == 0:
            split = read_ground_truth(folder / "eval.parquet", config["split"])
            budgets = tuple(cfg.eval.proposal_budgets)

            def on_epoch_end(model: torch.nn.Module, epoch: int) -> dict[str, float]:
                return validation_recall(model, split, budgets=budgets,
                                         batch_size=cfg.eval.batch_size, device=device)

            log = config["run"].log_metrics
        ray_worker.fit_on_worker(worker, stage="rpn", train_path=folder / "train.parquet",
                                 num_classes=config["num_classes"], log=log,
                                 model_meta={"classes": config["classes"]},
                                 on_epoch_end=on_epoch_end)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """One trial (a Tune function trainable): build the trial's config, fit a ``TorchTrainer``
    of :func:`trial_worker` whose reports go to Tune, mark the trial finished."""
    from ray import tune

    started = time.perf_counter()
    base = from_dict(setup["params"])
    trial_id = tune.get_context().get_trial_id()
    sampled = space.decode(base.sweep.space, config)
    run = tracking.child_run(setup["parent"], trial_id,
                             params={f"sampled.{k}": v for k, v in sampled.items()},
                             tags={"sweep": base.sweep.name, "ray_job_id": setup["ray_job_id"]})
    marker = f"{setup['experiment']}/{MARKERS}/{trial_id}.json"
    done = storage.read_json(marker)
    if done.get("finished"):
        # finished before an interruption that Tune's saved state predates: report the end
        # again instead of starting its workers
        tune.report(done["metrics"])
        run.end(tracking.FINISHED)
        return
    try:
        cfg = space.trial_config(base, sampled)
        tracking.log_config(run, cfg)
        _log_anchor_coverage(run, cfg, setup, trial_id)
        result = _fit_trial(cfg, base, setup, trial_id, run)
    except Exception as exc:
        run.end(tracking.FAILED, f"{type(exc).__name__}: {exc}")
        raise
    storage.write_json(marker, {"finished": True, "metrics": tracking.finite(result.metrics),
                                "wall_seconds": time.perf_counter() - started})
    run.end(tracking.FINISHED)


def _log_anchor_coverage(run: tracking.RunHandle, cfg: Any, setup: Mapping[str, Any],
                         trial_id: str) -> None:
    """Before any training: the trial's anchor-only recall on the sweep's split (metrics
    ``anchors/...`` on its run) and, when its settings leave anchor types untrained, a warning
    and the tag :data:`pipeline.anchors.TAG`."""
    import ray

    from pipeline import anchors
    from pipeline.evaluation.anchors import anchor_recall
    from pipeline.prepared import read_ground_truth

    untrained = anchors.warn_untrained(cfg, trial_id)
    if untrained:
        run.set_tags({anchors.TAG: untrained})
    split = read_ground_truth("eval.parquet", cfg.sweep.split,
                              data=ray.get(setup["tables"])["eval"])
    run.log_metrics(anchor_recall(cfg, split, setup["classes"]))


def _fit_trial(cfg: Any, base: Any, setup: Mapping[str, Any], trial_id: str,
               run: tracking.RunHandle) -> Any:
    """The trial's ``TorchTrainer`` of :func:`trial_worker`, fitted; its reports reach Tune
    through ``TuneReportCallback``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    resources = space.worker_resources(base)
    trainer = TorchTrainer(
        trial_worker,
        train_loop_config={
            "params": cfg.to_dict(), "tables": setup["tables"], "split": base.sweep.split,
            "num_classes": len(setup["classes"]), "classes": setup["classes"], "run": run,
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
    return trainer.fit()


def trial_dirname(trial: Any) -> str:
    """Trial folders named by trial id alone (the results find their trial by it)."""
    return trial.trial_id
