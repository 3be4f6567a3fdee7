"""Inside a sweep trial: the Tune function trainable, its training, and its MLflow child run.

:func:`trial` (one per trial, run by Tune) decodes the sampled values, opens the trial's MLflow
child run, logs the anchor coverage of its settings, and trains the RPN with
:func:`pipeline.training.loop.train`, scoring proposal recall on the sweep's split after each
epoch (:class:`Scorer`):

- one worker (``sweep.workers_per_trial: 1``, the default): the loop runs right in the Tune
  trainable, which holds the trial's CPUs / GPUs, reports each epoch with ``tune.report`` and
  writes no checkpoint (nothing resumes a trial: a failed one is run again from its start);
- several: a ``TorchTrainer`` of :func:`trial_worker` (DDP), whose workers read their shards of
  the trial's training table through Ray Data as the training stages' do, whose checkpoints let
  Ray Train restart a lost worker group, its reports passed on to Tune by
  ``TuneReportCallback``.

A trial whose training ends writes a marker ``E/trials/<trial>.json`` so a resumed sweep does
not train it again; every start of a trial is counted in ``E/attempts/<trial>.json`` (Tune
runs a failed trial once more: the sweep's table says which were retried). The layout of
``E`` and the MLflow runs: :mod:`pipeline.sweep.driver`.

Files under ``E`` go through :mod:`pipeline.storage`, so ``sweep.storage_path`` may be a folder
or a bucket URI.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from pipeline import storage, tracking
from pipeline.config import from_dict
from pipeline.evaluation.metrics import CURVE_THRESHOLDS, HEADLINE_BUDGET
from pipeline.sweep import space

TRAIN_RUNS = "train_runs"
MARKERS = "trials"
#: ``E/attempts/<trial>.json``: ``{"attempts": n}``, how many times the trial has started
ATTEMPTS = "attempts"
#: per-class metrics a trial reports beside :func:`pipeline.sweep.space.metric_names`
PER_CLASS_PREFIXES = (f"AR@{HEADLINE_BUDGET}/",
                      *(f"recall@{t:g}/{HEADLINE_BUDGET}/" for t in CURVE_THRESHOLDS))


def validation_recall(model: Any, split: Any, *, budgets: tuple[int, ...], batch_size: int,
                      device: Any, classes: Any = ()) -> dict[str, float]:
    """Proposal recall of ``model`` on ``split`` (a :class:`pipeline.prepared_table.GroundTruth`):
    ``{name: value}`` for :func:`pipeline.sweep.space.metric_names` and each class's
    ``AR@300/<class>`` and ``recall@<t>/300/<class>`` (a metric that cannot be computed, e.g.
    without boxes, is left out)."""
    from pipeline.evaluation.core import evaluate_model
    from pipeline.evaluation.metrics import split_metrics

    results = evaluate_model(rpn_model=model, detector=None, splits=[split], budgets=budgets,
                             num_classes=model.num_classes, image_size=model.image_size,
                             batch_size=batch_size, device=device, progress=False,
                             class_names=classes)
    values = split_metrics(results.summary, split.name, budgets, None, classes)
    wanted = set(space.metric_names(budgets))
    return {k: float(v) for k, v in values.items()
            if k in wanted or k.startswith(PER_CLASS_PREFIXES)}


class Scorer:
    """A trial's ``on_epoch_end``: proposal recall on the sweep's split after each epoch
    (:func:`validation_recall`), with ``score_seconds``, the time spent scoring so far."""

    def __init__(self, split: Any, *, budgets: tuple[int, ...], batch_size: int, device: Any,
                 classes: Any) -> None:
        self.split, self.budgets, self.batch_size = split, budgets, batch_size
        self.device, self.classes, self.seconds = device, list(classes), 0.0

    def __call__(self, model: Any, epoch: int) -> dict[str, float]:
        started = time.perf_counter()
        values = validation_recall(model, self.split, budgets=self.budgets,
                                   batch_size=self.batch_size, device=self.device,
                                   classes=self.classes)
        self.seconds += time.perf_counter() - started
        return {**values, "score_seconds": self.seconds}


@contextlib.contextmanager
def trial_files(setup: Mapping[str, Any]) -> Iterator[Path]:
    """A temporary folder holding the trial tables, ``train.parquet`` and ``eval.parquet``."""
    import ray

    folder = Path(tempfile.mkdtemp(prefix="frcnn-sweep-"))
    try:
        for name, data in ray.get(setup["tables"]).items():
            (folder / f"{name}.parquet").write_bytes(data)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _scorer(cfg: Any, folder: Path, split: str, classes: Any, device: Any) -> Scorer:
    from pipeline.annotations import read_ground_truth

    return Scorer(read_ground_truth(folder / "eval.parquet", split),
                  budgets=tuple(cfg.eval.proposal_budgets), batch_size=cfg.eval.batch_size,
                  device=device, classes=classes)


def trial_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker of a multi-worker trial: the RPN loop (through
    :func:`pipeline.training.ray_worker.fit_on_worker`), recall measured after each epoch on
    rank 0."""
    from pipeline.training import ray_worker
    from pipeline.training.ray_input import ShardInput

    worker = ray_worker.worker_context(config)
    lead = worker.rank == 0
    data = ShardInput.of_worker(worker.cfg, rows=config["rows"], world_size=worker.world_size,
                                rank=worker.rank)
    with trial_files(config) as folder, (tracking.MetricsBuffer(config["run"], say=ray_worker.say)
                                         if lead else contextlib.nullcontext()) as steps:
        ray_worker.fit_on_worker(
            worker, stage="rpn", data=data,
            num_classes=len(config["classes"]), log=steps.log if lead else None,
            model_meta={"classes": config["classes"]},
            on_epoch_end=_scorer(worker.cfg, folder, config["split"], config["classes"],
                                 worker.device) if lead else None)


def trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """One trial (a Tune function trainable): build the trial's config, log its anchor
    coverage, train and score it (in this process, or on a ``TorchTrainer`` of several
    workers), mark the trial finished."""
    from ray import tune

    started = time.perf_counter()
    base = from_dict(setup["params"])
    trial_id = tune.get_context().get_trial_id()
    sampled = space.decode(base.sweep.space, config)
    run = tracking.child_run(setup["parent"], trial_id,
                             params={f"sampled.{k}": space.encode(v) for k, v in sampled.items()},
                             tags={"sweep": base.sweep.name, "ray_job_id": setup["ray_job_id"]})
    attempt = _count_attempt(setup["experiment"], trial_id)
    if attempt > 1:
        print(f"sweep: trial {trial_id} starts again (attempt {attempt}): Tune retries a failed "
              f"trial once (a lost node), and a resumed sweep restarts unfinished ones",
              flush=True)
        run.set_tags({"attempts": str(attempt)})
    marker = f"{setup['experiment']}/{MARKERS}/{trial_id}.json"
    done = storage.read_json(marker)
    if done.get("finished"):
        # finished before an interruption that Tune's saved state predates: report the end
        # again instead of training again
        tune.report(done["metrics"])
        run.end(tracking.FINISHED)
        return
    try:
        cfg = space.trial_config(base, sampled)
        tracking.log_config(run, cfg)
        _log_anchor_coverage(run, base.replace(space.expand(sampled)), setup, trial_id)
        train_and_score = _fit_here if cfg.train.num_workers == 1 else _fit_on_workers
        metrics = train_and_score(cfg, base, setup, trial_id, run)
    except Exception as exc:
        run.end(tracking.FAILED, f"{type(exc).__name__}: {exc}")
        raise
    storage.write_json(marker, {"finished": True, "metrics": tracking.finite(metrics),
                                "wall_seconds": time.perf_counter() - started})
    run.end(tracking.FINISHED)


def _count_attempt(experiment: str, trial_id: str) -> int:
    """Count this start of the trial in ``E/attempts/<trial>.json``; returns its number."""
    path = f"{experiment}/{ATTEMPTS}/{trial_id}.json"
    attempt = int(storage.read_json(path).get("attempts", 0)) + 1
    storage.write_json(path, {"attempts": attempt})
    return attempt


def _log_anchor_coverage(run: tracking.RunHandle, cfg: Any, setup: Mapping[str, Any],
                         trial_id: str) -> None:
    """Before any training: the anchor coverage of the trial's settings at ``data.image_size``
    (``cfg``, the frame training will use) on the sweep's split (metrics ``anchors/...`` and
    ``ceiling/...``) and, when its settings leave anchor types untrained, a warning and the tag
    :data:`pipeline.modeling.UNTRAINED_TAG`."""
    from pipeline import anchor_coverage, modeling

    untrained = modeling.warn_untrained(cfg, trial_id)
    if untrained:
        run.set_tags({modeling.UNTRAINED_TAG: untrained})
    run.log_metrics(anchor_coverage.coverage_metrics(cfg, setup["coverage_split"],
                                                     class_names=setup["classes"]))


def _fit_here(cfg: Any, base: Any, setup: Mapping[str, Any], trial_id: str,
              run: tracking.RunHandle) -> dict[str, float]:
    """One worker: the loop in this process (the Tune trainable holds the trial's resources),
    each epoch's metrics to Tune, no checkpoint written. Returns the last report."""
    import torch
    from ray import tune

    from pipeline.training import loop

    use_gpu = base.sweep.gpus_per_trial > 0 and torch.cuda.is_available()
    device = torch.device("cuda" if use_gpu else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, round(base.sweep.cpus_per_trial)))
    last: dict[str, float] = {}

    def report(metrics: dict[str, float], _folder: Any, _name: str) -> None:
        last.clear()
        last.update(metrics)
        tune.report(dict(metrics))

    with trial_files(setup) as folder, tracking.MetricsBuffer(run) as steps:
        loop.train(cfg, stage="rpn", train_path=folder / "train.parquet",
                   num_classes=len(setup["classes"]), device=device, report=report,
                   log=steps.log, model_meta={"classes": setup["classes"]},
                   on_epoch_end=_scorer(cfg, folder, base.sweep.split, setup["classes"], device),
                   write_checkpoints=False)
    return last


def _fit_on_workers(cfg: Any, base: Any, setup: Mapping[str, Any], trial_id: str,
                    run: tracking.RunHandle) -> dict[str, float]:
    """Several workers: a ``TorchTrainer`` of :func:`trial_worker` reading the trial's
    training table through Ray Data (:mod:`pipeline.training.ray_input`, as the training
    stages do), fitted; its reports reach Tune through ``TuneReportCallback``. Returns its last
    metrics."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.training.ray_input import data_config, epoch_datasets

    resources = space.worker_resources(base)
    table, rows = _stored_train_table(setup)
    trainer = TorchTrainer(
        trial_worker,
        datasets=epoch_datasets([table], rows=rows, epochs=cfg.train.rpn_epochs,
                                seed=cfg.train.seed, world_size=cfg.train.num_workers),
        dataset_config=data_config(),
        train_loop_config={
            "params": cfg.to_dict(), "tables": setup["tables"], "split": base.sweep.split,
            "rows": rows,
            "classes": setup["classes"], "run": run,
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
    return dict(trainer.fit().metrics)


def _stored_train_table(setup: Mapping[str, Any]) -> tuple[str, int]:
    """``(URI, rows)`` of the trial training table in the sweep's storage, where every node's
    Ray Data read tasks reach it: ``E/data/train-<digest>.parquet``, written by the first
    multi-worker trial (a small file: ``sweep.max_train_images`` images)."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    data = ray.get(setup["tables"])["train"]
    uri = f"{setup['experiment']}/data/train-{hashlib.sha256(data).hexdigest()[:16]}.parquet"
    if not storage.exists(uri):
        storage.write_bytes(uri, data)
    return uri, pq.read_metadata(pa.BufferReader(data)).num_rows


def trial_dirname(trial: Any) -> str:
    """Trial folders named by trial id alone (the results find their trial by it)."""
    return trial.trial_id
