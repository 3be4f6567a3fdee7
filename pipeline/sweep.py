"""The ``sweep`` stage: ``frcnn sweep [--resume]``, a Ray Tune search over ``sweep.space``.

Each trial trains the RPN with :func:`pipeline.train_loop.train`, the loop of ``frcnn train
--stage rpn``, on a Ray Train worker group of its own (Ray 2.60's ``Tuner`` cannot take a
``TorchTrainer``, so every trial is a function that builds one and fits it, its results passed
on to Tune by ``TuneReportCallback``: :mod:`pipeline.sweep_trial`). After each epoch the trial's
rank 0 measures proposal recall on ``sweep.split`` with :func:`pipeline.evaluate.evaluate_model`
(metric names of :func:`pipeline.sweep_space.metric_names`: ``AR@<N>``, ``recall@0.5/300``,
``recall@0.7/300``); that is what Tune, the ASHA scheduler and the tables see. Trial
configuration, image size and the anchor rescaling: :mod:`pipeline.sweep_space`; the outputs:
:mod:`pipeline.sweep_report`. This module is the driver.

Data: the first ``sweep.max_train_images`` images of ``data.out_dir/train.parquet`` and all of
``sweep.split``, resized to ``sweep.image_size`` (bilinear, boxes scaled) once by the driver,
go to the trials through Ray's object store, so trials on other nodes need no shared folder.

Search: ``sweep.search`` random (Tune's random search, seeded by ``sweep.seed``) or optuna (TPE;
``pip install 'frcnn[optuna]'``), ``sweep.num_samples`` trials, at most
``sweep.max_concurrent_trials`` at a time. Scheduler: ASHA on ``sweep.metric`` / ``sweep.mode``
by epoch, ``max_t = sweep.epochs``, ``sweep.grace_period``, ``sweep.reduction_factor``; a trial
that has reported its last epoch is left to finish.

Resources: each trial holds one unit of the custom resource ``trial_slot`` (zero CPU: Tune
refuses a trial with no resources at all) and its workers ``sweep.cpus_per_trial`` CPUs and
``sweep.gpus_per_trial`` GPUs (fractions allowed) split over ``sweep.workers_per_trial``.
A local Ray offers ``sweep.max_concurrent_trials`` slots; a cluster (``train.ray_address``,
or ``RAY_ADDRESS`` as set by ``ray job submit``) offers what its nodes declare (``cluster.yaml``:
one per GPU worker).

Storage (``E = sweep.storage_path/sweep.name``, a folder or a bucket URI)::

    E/                       Tune's experiment (what --resume restores) and trial folders
    E/train_runs/<trial>/    each trial's Ray Train run (checkpoints); removed at the end
                             for trials that finished or were stopped (train.keep_checkpoints
                             keeps them)
    E/trials/<trial>.json    written by a trial whose training finished
    E/frcnn_sweep.json       the MLflow parent run id and the key of the sweep's inputs
    E/outputs/               copies of the three outputs below

Outputs (driver, atomically): ``sweep.table_path`` (one row per trial, see
:mod:`pipeline.sweep_report`), ``sweep.best_params_path`` (the best trial as an overlay of
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

import argparse
import hashlib
import importlib.util
import io as _io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from ray.tune.schedulers import ASHAScheduler

from pipeline import storage, sweep_report, sweep_space, sweep_trial, tracking
from pipeline.config import Config, ConfigError

STATE = "frcnn_sweep.json"
TABLE_COLUMNS = ("image_id", "image", "boxes", "labels", "difficult")


def run(cfg: Config, args: argparse.Namespace) -> int:
    """CLI entry: ``frcnn sweep [--resume]``."""
    from ray.tune import TuneError

    resume = bool(getattr(args, "resume", False))
    try:
        sweep_space.check(cfg)
        check_search(cfg)
    except ConfigError as exc:
        print(f"frcnn sweep: invalid parameters: {exc}", file=sys.stderr)
        return 2
    try:
        sweep(cfg, resume=resume)
    except (FileNotFoundError, ValueError, tracking.TrackingError, TuneError) as exc:
        print(f"frcnn sweep: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"frcnn sweep: interrupted; `frcnn sweep` (same parameters) continues "
              f"it from {experiment_path(cfg)}", file=sys.stderr)
        return 130
    return 0


def check_search(cfg: Config) -> None:
    """``sweep.search: optuna`` needs the optional ``optuna`` package."""
    if cfg.sweep.search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError("sweep.search: optuna needs the optuna package, which is not "
                          "installed: pip install 'frcnn[optuna]' (or use sweep.search=random)")


# --------------------------------------------------------------------------------------------
# Storage


def experiment_path(cfg: Config) -> str:
    """``sweep.storage_path/sweep.name``: absolute for a folder, a URI unchanged."""
    return f"{storage.resolve(cfg.sweep.storage_path)}/{cfg.sweep.name}"



# --------------------------------------------------------------------------------------------
# Data for the trials


def _resize_rows(rows: list[dict[str, Any]], source: int, size: int) -> None:
    """Resize ``source``-pixel square images to ``size`` in place (PNG), scaling the boxes."""
    from PIL import Image

    from pipeline.datasets.resize import resize_image

    factor = size / source
    for row in rows:
        with Image.open(_io.BytesIO(row["image"])) as img:
            small, _ = resize_image(img.convert("RGB"), size, "stretch")
        out = _io.BytesIO()
        small.save(out, format="PNG", compress_level=1)
        row["image"] = out.getvalue()
        row["boxes"] = [[float(v) * factor for v in box] for box in row["boxes"] or []]


def trial_tables(cfg: Config) -> dict[str, bytes]:
    """``{"train": Parquet bytes, "eval": Parquet bytes}``: what every trial trains and is
    measured on (see the module docstring).

    Raises:
        FileNotFoundError: the prepared data is missing (run ``frcnn prepare``).
        ValueError: it was prepared at another ``data.image_size``, or a table is empty.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data import read_classes

    prepared = Path(cfg.data.out_dir)
    info = read_classes(prepared)
    if info["image_size"] != cfg.data.image_size:
        raise ValueError(f"{prepared}/classes.json: prepared at image_size {info['image_size']} "
                         f"but data.image_size is {cfg.data.image_size}; run `frcnn prepare`")
    size = sweep_space.trial_image_size(cfg)
    out = {}
    for name, split, limit in (("train", "train", cfg.sweep.max_train_images),
                               ("eval", cfg.sweep.split, 0)):
        path = prepared / f"{split}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; run `frcnn prepare` first")
        table = pq.read_table(path, columns=list(TABLE_COLUMNS))
        if limit:
            table = table.slice(0, limit)
        if table.num_rows == 0:
            raise ValueError(f"{path}: no images: a sweep needs {split} images")
        if size != cfg.data.image_size:
            rows = table.to_pylist()
            _resize_rows(rows, cfg.data.image_size, size)
            table = pa.Table.from_pylist(rows, schema=table.schema)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        out[name] = sink.getvalue().to_pybytes()
    return out


def inputs_key(cfg: Config, tables: Mapping[str, bytes]) -> str:
    """Hash of what a sweep's results depend on: parameters (not where things are stored or
    logged) and the trial tables. A resume needs the same key."""
    tree = cfg.to_dict()
    tree.pop("tracking")
    for key in ("ray_address", "storage_path"):
        tree["train"].pop(key)
    for key in ("storage_path", "table_path", "best_params_path", "plot_path"):
        tree["sweep"].pop(key)
    digest = hashlib.sha256(json.dumps(tree, sort_keys=True).encode())
    for name in sorted(tables):
        digest.update(hashlib.sha256(tables[name]).digest())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# The driver


def _start_ray(cfg: Config) -> bool:
    """Connect to ``train.ray_address`` / ``$RAY_ADDRESS``, or start a private local Ray with
    ``sweep.max_concurrent_trials`` trial slots; True when this call did either.

    Every worker of the sweep gets ``RAY_ADDRESS`` (the cluster's GCS address) in its
    environment: Ray Train's placement-group cleaner, which frees a trial's worker resources
    when Tune stops the trial, finds the cluster through it; without it, a second Ray instance
    on the same machine makes the cleaner fail, the resources leak, and later trials wait for
    them forever.
    """
    import ray
    from ray._private import services

    if ray.is_initialized():
        return False
    address = cfg.train.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        port = _free_port()
        gcs = f"{services.get_node_ip_address()}:{port}"
        previous = os.environ.get("RAY_GCS_SERVER_PORT")
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # the port a new local Ray's GCS takes
        try:
            # "local": a new Ray even when `ray start` left one running on this machine
            ray.init(address="local", resources={"trial_slot": cfg.sweep.max_concurrent_trials},
                     runtime_env={"env_vars": {"RAY_ADDRESS": gcs}})
        finally:
            if previous is None:
                os.environ.pop("RAY_GCS_SERVER_PORT", None)
            else:
                os.environ["RAY_GCS_SERVER_PORT"] = previous
        return True
    gcs = None if address.startswith("ray://") else \
        services.canonicalize_bootstrap_address_or_die(address)
    ray.init(address=address, runtime_env={"env_vars": {"RAY_ADDRESS": gcs}} if gcs else None)
    if ray.cluster_resources().get("trial_slot", 0) < 1:
        print(f"sweep: no node of the Ray cluster at {address} offers the resource "
              f"'trial_slot' yet; trials wait for one (cluster.yaml's GPU workers declare "
              f"it; `ray start ... --resources '{{\"trial_slot\": N}}'` on other nodes)",
              file=sys.stderr, flush=True)
    return True


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class LetLastEpochFinish(ASHAScheduler):
    """ASHA that never stops a trial which has reported its last epoch (``max_t``): it is done
    training, and stopping it would only lose its end (its model, its finished mark)."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get(self._time_attr, 0) >= self._max_t:
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def _scheduler(cfg: Config) -> LetLastEpochFinish:
    return LetLastEpochFinish(time_attr="epoch", max_t=cfg.sweep.epochs,
                              grace_period=min(cfg.sweep.grace_period, cfg.sweep.epochs),
                              reduction_factor=cfg.sweep.reduction_factor,
                              stop_last_trials=False)


def _searcher(cfg: Config) -> Any:
    if cfg.sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        return OptunaSearch(seed=cfg.sweep.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator
    return BasicVariantGenerator(random_state=cfg.sweep.seed)


def sweep(cfg: Config, *, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) the sweep and write its outputs; returns a summary.

    Raises:
        FileNotFoundError, ValueError: missing or mismatched prepared data; nothing to resume;
            parameters changed under ``--resume``; no trial reported ``sweep.metric``.
        KeyboardInterrupt: the sweep was interrupted (its state is saved: ``--resume``).
    """
    import ray
    from ray import tune

    wall_start = time.perf_counter()
    from pipeline.data import read_classes
    info = read_classes(cfg.data.out_dir)
    tables = trial_tables(cfg)
    experiment = experiment_path(cfg)
    key = inputs_key(cfg, tables)
    state = storage.read_json(f"{experiment}/{STATE}")
    if resume:
        if not tune.Tuner.can_restore(experiment):
            raise ValueError(f"{experiment}: no sweep to resume; run `frcnn sweep` without "
                             f"--resume")
        if state.get("inputs_key") != key:
            raise ValueError(f"{experiment}: parameters or data changed since this sweep "
                             f"started; resume with the same ones, or run without --resume to "
                             f"start afresh")
    elif (state.get("inputs_key") == key and not state.get("finished")
          and tune.Tuner.can_restore(experiment)):
        print(f"sweep: {experiment} holds an interrupted sweep of the same parameters and data; "
              f"resuming it (finished trials are not run again)", flush=True)
        resume = True
    elif storage.exists(experiment):
        print(f"sweep: starting afresh; removing the previous sweep at {experiment}", flush=True)
        storage.delete_dir(experiment)

    started = _start_ray(cfg)
    try:
        with tracking.stage_run(cfg, "sweep", run_id=state.get("mlflow_run_id") if resume
                                else None) as parent:
            job_id = ray.get_runtime_context().get_job_id()
            parent.set_tags({"ray_job_id": job_id, "sweep_path": experiment,
                             "resumed": str(resume).lower()})
            storage.write_bytes(f"{experiment}/{STATE}", json.dumps(
                {"mlflow_run_id": parent.run_id, "inputs_key": key}).encode())
            setup = {
                "params": cfg.to_dict(), "tables": ray.put(tables),
                "classes": [str(c) for c in info["classes"]], "experiment": experiment,
                "tracking_uri": parent.tracking_uri, "experiment_id": parent.experiment_id,
                "parent_run_id": parent.run_id, "sweep_name": cfg.sweep.name,
                "ray_job_id": job_id,
            }
            trainable = tune.with_resources(tune.with_parameters(sweep_trial.trial, setup=setup),
                                            {"trial_slot": 1})
            if resume:
                print(f"sweep: resuming {experiment}", flush=True)
                tuner = tune.Tuner.restore(experiment, trainable=trainable,
                                           resume_unfinished=True, resume_errored=True)
            else:
                print(f"sweep: {cfg.sweep.num_samples} trial(s) of {len(cfg.sweep.space)} "
                      f"parameter(s), {cfg.sweep.search} search, ASHA on {cfg.sweep.metric} "
                      f"({cfg.sweep.mode}); trials at "
                      f"{sweep_space.trial_image_size(cfg)} px, "
                      f"{sweep_space.worker_resources(cfg)} x {cfg.sweep.workers_per_trial} "
                      f"worker(s) each; in {experiment}", flush=True)
                tuner = tune.Tuner(
                    trainable,
                    param_space=sweep_space.search_space(cfg.sweep.space),
                    tune_config=tune.TuneConfig(
                        metric=cfg.sweep.metric, mode=cfg.sweep.mode,
                        search_alg=_searcher(cfg), scheduler=_scheduler(cfg),
                        num_samples=cfg.sweep.num_samples,
                        max_concurrent_trials=cfg.sweep.max_concurrent_trials,
                        trial_dirname_creator=sweep_trial.trial_dirname),
                    run_config=tune.RunConfig(name=cfg.sweep.name,
                                              storage_path=experiment.rsplit("/", 1)[0],
                                              failure_config=tune.FailureConfig(max_failures=0),
                                              verbose=1),
                )
            try:
                grid = tuner.fit()
            except SystemExit as exc:  # SIGTERM (`ray job stop`): Ray raises SystemExit
                raise KeyboardInterrupt("sweep stopped") from exc
            if grid.num_terminated + grid.num_errors < len(grid):
                raise KeyboardInterrupt("sweep interrupted")
            records = sweep_report.collect(cfg, grid, experiment)
            summary = sweep_report.write_outputs(cfg, records, experiment, parent)
            storage.write_bytes(f"{experiment}/{STATE}", json.dumps(
                {"mlflow_run_id": parent.run_id, "inputs_key": key, "finished": True}).encode())
            sweep_report.end_children(parent, records)
            if not cfg.train.keep_checkpoints:
                for rec in records:
                    if rec.status != sweep_report.ERRORED:
                        runs = f"{experiment}/{sweep_trial.TRAIN_RUNS}"
                        storage.delete_dir(f"{runs}/{rec.trial_id}")
            summary["wall_seconds"] = time.perf_counter() - wall_start
            parent.log_metrics({"wall_seconds": summary["wall_seconds"]})
            if summary["best_trial"] is None:
                raise ValueError(f"no trial reported {cfg.sweep.metric}; see "
                                 f"{cfg.sweep.table_path}")
            print(f"sweep: best trial {summary['best_trial']} {cfg.sweep.metric} "
                  f"{summary['best_value']:.4f}; wrote {cfg.sweep.table_path}, "
                  f"{cfg.sweep.best_params_path}, {cfg.sweep.plot_path} "
                  f"({summary['wall_seconds']:.0f} s)", flush=True)
            return summary
    finally:
        if started:
            ray.shutdown()
