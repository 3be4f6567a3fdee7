"""The sweep's driver: ``frcnn sweep [--resume]``, a Ray Tune search over ``sweep.space``.

Each trial trains the RPN with :func:`pipeline.training.loop.train`, the loop of ``frcnn train
--stage rpn``: in its Tune trainable when it has one worker, on a Ray Train worker group of its
own (DDP) when ``sweep.workers_per_trial > 1`` (Ray 2.60's ``Tuner`` cannot take a
``TorchTrainer``, so such a trial is a function that builds one and fits it:
:mod:`pipeline.sweep.trial`). After each epoch the trial measures proposal recall on
``sweep.split`` with :func:`pipeline.evaluation.core.evaluate_model` (metric names of
:func:`pipeline.sweep.space.metric_names`: ``AR@<N>``, ``recall@0.5/300``, ``recall@0.7/300``,
each also ``/mean_class``; and per class); that is what Tune, the ASHA scheduler and the tables
see. Before any trial the space's ``fit`` choices become shapes fitted on the train split, and a
sweep whose trials run at another size than ``data.image_size`` warns what that biases. Trial
configuration, image size and the anchor rescaling: :mod:`pipeline.sweep.space`; the trials'
data: :mod:`pipeline.sweep.data`; search and scheduler: :mod:`pipeline.sweep.scheduler`; the
outputs: :mod:`pipeline.sweep.report`.

Search: ``sweep.num_samples`` trials (times every grid's length), at most
``sweep.max_concurrent_trials`` at a time; a failed trial is run once more from its start.

Resources: each trial holds one unit of the custom resource ``trial_slot``, and its one worker's
``sweep.cpus_per_trial`` CPUs and ``sweep.gpus_per_trial`` GPUs (the trainable trains itself),
or with several workers those split over ``sweep.workers_per_trial`` (fractions allowed).
A local Ray offers ``sweep.max_concurrent_trials`` slots; a cluster (``train.ray_address``,
or ``RAY_ADDRESS`` as set by ``ray job submit``) offers what its nodes declare (``cluster.yaml``:
one per GPU worker).

Storage (``E = sweep.storage_path/sweep.name``, a folder or a bucket URI)::

    E/                       Tune's experiment (what --resume restores) and trial folders
    E/train_runs/<trial>/    a multi-worker trial's Ray Train run (checkpoints); removed at
                             the end for trials that finished or were stopped
                             (train.keep_checkpoints keeps them); one-worker trials write none
    E/data/train-<digest>.parquet  the trial training table, written by the first
                             multi-worker trial for their workers' Ray Data reads
    E/trials/<trial>.json    written by a trial whose training finished
    E/attempts/<trial>.json  how many times the trial started (2+: retried)
    E/frcnn_sweep.json       the MLflow parent run id and the key of the sweep's inputs
    E/outputs/               copies of the three outputs below

Outputs (driver, atomically): ``sweep.table_path`` (one row per trial, see
:mod:`pipeline.sweep.report`), ``sweep.best_params_path`` (the best trial as an overlay of
``params.yaml``: ``frcnn train --params params.yaml --params sweeps/best_params.yaml``) and
``sweep.plot_path`` (the metric per trial over epochs).

Resume: Tune restores ``E`` (``Tuner.restore``: unfinished and errored trials resume, finished
ones are not run again; a resumed trial's Train run continues from its last checkpoint; the
MLflow parent run is reopened and each child found again by its ``trial_id`` tag) when
``--resume`` is given, and also without it when ``E`` holds an unfinished sweep of the same
parameters and data (the key in ``frcnn_sweep.json``): a killed ``dvc repro`` run again picks
up where it stopped, as ``frcnn train`` does. ``--resume`` with changed parameters or data is
refused; without ``--resume``, a finished sweep or one of other inputs is deleted and the sweep
starts afresh.

MLflow: the sweep is the parent run ``sweep`` (:func:`pipeline.tracking.stage_run`: config,
``best/<metric>``, trial counts, the outputs as artifacts); every trial a child run named by its
trial id, tagged ``mlflow.parentRunId``, ``trial_id`` and, at the end, ``trial_status``, with
the sampled values (``sampled.<section.key>``), the trial's effective config, and the loop's
step and per-epoch metrics (``epoch/AR_at_300``: MLflow refuses ``@``), logged by rank 0; it
ends FINISHED (finished), KILLED (stopped early) or FAILED (errored).
"""

from __future__ import annotations

import hashlib
import sys
import time
from typing import Any

from pipeline import storage, tracking
from pipeline.config import Config
from pipeline.errors import DataError, RunFailedError
from pipeline.prepared_table import MODEL_COLUMNS, read_classes, split_path
from pipeline.annotations import read_ground_truth
from pipeline.redaction import redact
from pipeline.sweep import report, space, trial
from pipeline.sweep.data import inputs_key, trial_tables
from pipeline.sweep.scheduler import scheduler, searcher
from pipeline.sweep.space import trial_image_size

STATE = "frcnn_sweep.json"


def experiment_path(cfg: Config) -> str:
    """``sweep.storage_path/sweep.name``: absolute for a folder, a URI unchanged."""
    return f"{storage.resolve(cfg.sweep.storage_path)}/{cfg.sweep.name}"


def sweep(cfg: Config, *, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) the sweep and write its outputs; returns a summary.

    Raises:
        PipelineError: missing or mismatched prepared data; nothing to resume; parameters
            changed under ``--resume``; no trial reported ``sweep.metric``; Tune failed.
        KeyboardInterrupt: the sweep was interrupted (its state is saved: ``--resume``).
    """
    import ray

    from pipeline.ray_session import ray_session

    wall_start = time.perf_counter()
    classes = [str(c) for c in read_classes(cfg.data.out_dir)["classes"]]
    cfg = space.resolve_fit(cfg, lambda: _fit_anchors(cfg))
    warning = space.size_warning(cfg)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    tables = trial_tables(cfg)
    # the anchor coverage of every trial is measured at data.image_size, where training runs
    coverage_split = read_ground_truth(split_path(cfg.data.out_dir, cfg.sweep.split),
                                       cfg.sweep.split)
    experiment = experiment_path(cfg)
    key = inputs_key(cfg, tables)
    state = storage.read_json(f"{experiment}/{STATE}")
    resume = _decide_resume(experiment, key, state, resume)

    with ray_session(cfg.train.ray_address, trial_slots=cfg.sweep.max_concurrent_trials), \
            tracking.stage_run(cfg, "sweep", run_id=state.get("mlflow_run_id") if resume
                               else None) as parent:
        job_id = ray.get_runtime_context().get_job_id()
        parent.set_tags({"ray_job_id": job_id, "sweep_path": experiment,
                         "resumed": str(resume).lower()})
        storage.write_json(f"{experiment}/{STATE}", {"mlflow_run_id": parent.run_id,
                                                     "inputs_key": key})
        _log_tables(parent, cfg, tables)
        setup = {"params": cfg.to_dict(), "tables": ray.put(tables), "classes": classes,
                 "experiment": experiment, "parent": parent, "ray_job_id": job_id,
                 "coverage_split": coverage_split}
        grid = _make_tuner(cfg, setup, experiment, resume).fit_or_stop()
        records = report.collect(cfg, grid, experiment, split=coverage_split, classes=classes)
        summary = _finish(cfg, records, experiment, parent, key)
        summary["wall_seconds"] = time.perf_counter() - wall_start
        parent.log_metrics({"wall_seconds": summary["wall_seconds"]})
        print(f"sweep: best trial {summary['best_trial']} {cfg.sweep.metric} "
              f"{summary['best_value']:.4f}; wrote {cfg.sweep.table_path}, "
              f"{cfg.sweep.best_params_path}, {cfg.sweep.plot_path} "
              f"({summary['wall_seconds']:.0f} s)", flush=True)
        return summary


def _fit_anchors(cfg: Config) -> list[tuple[float, float]]:
    """The ``fit`` choice of the space: anchor shapes fitted on the train split at
    ``data.image_size`` (as many as the configured anchors have per cell)."""
    from pipeline.anchor_coverage import fit_to_split

    train = read_ground_truth(split_path(cfg.data.out_dir, "train"), "train")
    shapes = fit_to_split(cfg, train, num=cfg.anchors.num_anchors)
    print(f"sweep: anchors 'fit': {len(shapes)} shapes fitted on the train split "
          f"({sum(len(b) for b in train.boxes)} boxes): "
          + ", ".join(f"{w:g}x{h:g}" for w, h in shapes), flush=True)
    return shapes


def _log_tables(parent: tracking.RunHandle, cfg: Config, tables: dict[str, bytes]) -> None:
    """The trials' tables as dataset inputs of the sweep's run (digests of their bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, split in (("train", "train"), ("eval", cfg.sweep.split)):
        meta = pq.ParquetFile(pa.BufferReader(tables[name])).metadata
        tracking.log_split(parent, name=f"sweep-{name}", source=f"{cfg.data.out_dir}/{split}"
                           f".parquet at {trial_image_size(cfg)} px",
                           digest=hashlib.sha256(tables[name]).hexdigest(), rows=meta.num_rows,
                           columns=MODEL_COLUMNS, context="sweep")


def _decide_resume(experiment: str, key: str, state: dict[str, Any], resume: bool) -> bool:
    """Whether to restore the sweep in ``experiment``: always with ``--resume`` (refused when
    there is nothing to resume or the inputs changed), and without it when it holds an
    unfinished sweep of the same inputs; otherwise a previous sweep there is removed. Only a
    folder holding the sweep's marker ``frcnn_sweep.json`` (``state``) is restored or removed;
    any other folder with files in it is refused.

    Raises:
        DataError: nothing to resume, other inputs under ``--resume``, or a folder this
            project did not make.
    """
    from ray import tune

    # the sweep's own marker first: Tune's state is unpickled only for the sweep that wrote it
    restorable = bool(state) and tune.Tuner.can_restore(experiment)
    if resume:
        if not restorable:
            raise DataError(f"{redact(experiment)}: no sweep to resume; run `frcnn sweep` without "
                            f"--resume")
        if state.get("inputs_key") != key:
            raise DataError(f"{redact(experiment)}: parameters or data changed since this sweep "
                            f"started; resume with the same ones, or run without --resume to "
                            f"start afresh")
        return True
    if state.get("inputs_key") == key and not state.get("finished") and restorable:
        print(f"sweep: {redact(experiment)} holds an interrupted sweep of the same parameters and data; "
              f"resuming it (finished trials are not run again)", flush=True)
        return True
    if not storage.is_empty(experiment):
        if not state:  # not a folder this project made: never deleted
            raise DataError(f"{redact(experiment)}: holds files but no {STATE}, so it is not a "
                            f"sweep of this project; refusing to delete or write into it: set "
                            f"another sweep.name or sweep.storage_path (or remove it yourself)")
        print(f"sweep: starting afresh; removing the previous sweep at {redact(experiment)}",
              flush=True)
        storage.delete_dir(experiment)
    return False


class _Tuner:
    """A Tune ``Tuner`` whose ``fit`` turns an interruption into ``KeyboardInterrupt`` and a
    failed experiment into :class:`RunFailedError`."""

    def __init__(self, tuner: Any) -> None:
        self.tuner = tuner

    def fit_or_stop(self) -> Any:
        from ray.tune import TuneError

        try:
            grid = self.tuner.fit()
        except SystemExit as exc:  # SIGTERM (`ray job stop`): Ray raises SystemExit
            raise KeyboardInterrupt("sweep stopped") from exc
        except TuneError as exc:
            raise RunFailedError(f"sweep failed: {exc}") from exc
        if grid.num_terminated + grid.num_errors < len(grid):
            raise KeyboardInterrupt("sweep interrupted")
        return grid


def _make_tuner(cfg: Config, setup: dict[str, Any], experiment: str, resume: bool) -> _Tuner:
    """A new ``Tuner`` over ``sweep.space``, or the interrupted one restored."""
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(trial.trial, setup=setup),
                                    space.trial_resources(cfg))
    if resume:
        print(f"sweep: resuming {redact(experiment)}", flush=True)
        return _Tuner(tune.Tuner.restore(experiment, trainable=trainable,
                                         resume_unfinished=True, resume_errored=True))
    print(f"sweep: {space.trial_count(cfg)} trial(s) of {len(cfg.sweep.space)} parameter(s), "
          f"{cfg.sweep.search} search, ASHA on {cfg.sweep.metric} ({cfg.sweep.mode}); trials "
          f"at {space.trial_image_size(cfg)} px, {space.worker_resources(cfg)} x "
          f"{cfg.sweep.workers_per_trial} worker(s) each; in {redact(experiment)}", flush=True)
    return _Tuner(tune.Tuner(
        trainable,
        param_space=space.search_space(cfg.sweep.space),
        tune_config=tune.TuneConfig(
            metric=cfg.sweep.metric, mode=cfg.sweep.mode, search_alg=searcher(cfg),
            scheduler=scheduler(cfg), num_samples=cfg.sweep.num_samples,
            max_concurrent_trials=cfg.sweep.max_concurrent_trials,
            trial_dirname_creator=trial.trial_dirname),
        run_config=tune.RunConfig(name=cfg.sweep.name, storage_path=experiment.rsplit("/", 1)[0],
                                  # a failed trial (a lost node) runs once more from its start
                                  failure_config=tune.FailureConfig(max_failures=1), verbose=1),
    ))


def _finish(cfg: Config, records: list[report.TrialRecord], experiment: str,
            parent: tracking.RunHandle, key: str) -> dict[str, Any]:
    """Outputs, the finished mark, the children's ends, the trials' checkpoints removed."""
    summary = report.write_outputs(cfg, records, experiment, parent)
    storage.write_json(f"{experiment}/{STATE}", {"mlflow_run_id": parent.run_id,
                                                 "inputs_key": key, "finished": True})
    report.end_children(parent, records, space.metric_names(cfg.eval.proposal_budgets))
    if not cfg.train.keep_checkpoints:
        for rec in records:
            if rec.status != report.ERRORED:
                storage.delete_dir(f"{experiment}/{trial.TRAIN_RUNS}/{rec.trial_id}")
    if summary["best_trial"] is None:
        raise DataError(f"no trial reported {cfg.sweep.metric}; see {cfg.sweep.table_path}")
    return summary
