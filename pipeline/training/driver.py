"""The training stages' driver: ``frcnn train --stage rpn|frcnn`` on a Ray Train worker group.

Reads ``data.out_dir/train.parquet`` and ``classes.json``; the ``frcnn`` stage starts from
``train.rpn_model``. Writes (atomically):

- ``train.rpn_model`` / ``train.frcnn_model``: the model (``detector.serialization`` format:
  state dict + constructor config + the class names);
- ``train.metrics_dir/train_<stage>.json``: last-epoch mean losses, steps, epochs, images/s,
  training and wall seconds (DVC metrics);
- ``train.metrics_dir/train_<stage>_epochs.csv``: mean losses per epoch (DVC plots).

Ray (:mod:`pipeline.ray_session`): a local Ray starts and stops with the command unless
``train.ray_address`` (or ``$RAY_ADDRESS``) names a cluster (``auto`` or ``ray://host:port``).
``train.num_workers`` workers with ``train.cpus_per_worker`` CPUs each (fractions let 2 workers
share a 2-core machine) and, when GPUs are used (``train.use_gpu``; ``auto``: when the local
Ray sees any, refused on a cluster), ``train.gpus_per_worker`` GPUs each; DDP over gloo (CPU)
or NCCL (GPU). Each worker runs :func:`pipeline.training.loop.train` on its shard.

Checkpoints and resume: every checkpoint goes through ``ray.train.report`` to
``train.storage_path/<run name>``; ``train.max_failures`` worker-group restarts continue from
the latest one. The run name is ``train_<stage>-<key>`` (:mod:`pipeline.training.resume`), so
running the same stage again after an interruption (Ctrl-C, a killed
process) finds the run's checkpoints, which Ray Train V2 hands to the workers through
``ray.train.get_checkpoint()``: training continues from there, the same MLflow run is reopened,
and the command says ``resuming from checkpoint ...``. Changed parameters or data give a new
key, hence a fresh start. A run that finishes deletes its checkpoints (unless
``train.keep_checkpoints``: then an identical rerun finds the finished run and returns its model
without training).

MLflow: one run named ``train_<stage>`` (see :mod:`pipeline.tracking`); rank 0 logs step
metrics into it off the training step (buffered and sent by a thread: an unreachable tracking
server delays the metrics, never the training); the driver adds the model, metrics JSON and
epoch CSV as artifacts.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import sys
import time

from pathlib import Path
from typing import Any

from pipeline import files, modeling, storage, tracking
from pipeline.config import Config
from pipeline.errors import ConfigError, RunFailedError
from pipeline.prepared_table import MODEL_COLUMNS, read_image_bytes
from pipeline.redaction import redact
from pipeline.storage import local_copy, resolve
from pipeline.tracking.models import log_detector, thumbnail
from pipeline.training import checkpoints, ray_worker
from pipeline.training.inputs import StageInputs, check_torch_file, stage_inputs, worker_inputs
from pipeline.training.ray_input import ShardInput, data_config, epoch_datasets
from pipeline.training.resume import (delete_run, latest_checkpoint, read_run_state, run_key,
                                      write_run_state)


def train_stage(cfg: Config, stage: str) -> dict[str, Any]:
    """Train one stage with Ray Train, write its model and metrics; returns the metrics.

    Raises:
        PipelineError: bad inputs (before Ray starts), too little memory, an unreachable
            tracking store, or a run that failed after its restarts (:class:`RunFailedError`).
        KeyboardInterrupt: interrupted; the checkpoints stay, the same command resumes.
    """
    wall_start = time.perf_counter()
    check_placement(cfg)
    inputs = stage_inputs(cfg, stage)
    root = resolve(cfg.train.storage_path)
    run_name = f"{inputs.name}-{run_key(cfg, stage, inputs.train_digest, inputs.init_digest)}"
    previous = latest_checkpoint(root, run_name)
    if previous is not None and "://" not in root:
        check_torch_file(Path(previous[0]) / checkpoints.TRAIN_STATE,
                          f"the checkpoint to resume from (delete {redact(root)}/{run_name} to start "
                          f"afresh)")
    old_run = read_run_state(root, run_name).get("mlflow_run_id") if previous else None

    with tracking.stage_run(cfg, inputs.name, run_id=old_run) as mlrun:
        write_run_state(root, run_name, mlrun.run_id)
        untrained = modeling.warn_untrained(cfg, inputs.name)
        if untrained:
            mlrun.set_tags({modeling.UNTRAINED_TAG: untrained})
        tracking.log_split(mlrun, name="train", source=str(inputs.train_path),
                           digest=inputs.train_digest, rows=inputs.train_rows,
                           columns=MODEL_COLUMNS,
                           context="training")
        if previous is not None:
            path, progress = previous
            print(f"{inputs.name}: resuming from checkpoint {path} (epoch {progress['epoch']}, "
                  f"step {progress['step']})", flush=True)
            mlrun.set_tags({"resumed_from": path})
        else:
            print(f"{inputs.name}: starting {run_name} (checkpoints in {redact(root)}/{run_name})",
                  flush=True)
        _check_local_memory(cfg, inputs.train_rows)
        try:
            result = _fit(cfg, inputs, run_name, root, mlrun)
        except (KeyboardInterrupt, SystemExit) as exc:
            # Ctrl-C: Ray Train's own SIGINT handler aborts the run, then exits the process.
            print(f"{inputs.name}: interrupted; its checkpoints stay in {redact(root)}/{run_name}: run "
                  f"the same command again to resume", file=sys.stderr, flush=True)
            raise KeyboardInterrupt from exc
        metrics = _write_outputs(cfg, inputs, result, mlrun, resumed=previous is not None,
                                 wall_start=wall_start)
        if not cfg.train.keep_checkpoints:
            delete_run(root, run_name)  # finished: nothing to resume; the model is saved
        return metrics


def _write_outputs(cfg: Config, inputs: StageInputs, result: Any, mlrun: tracking.RunHandle, *,
                   resumed: bool, wall_start: float) -> dict[str, Any]:
    """The model, ``train_<stage>.json`` and ``train_<stage>_epochs.csv`` (atomically), and the
    same in MLflow; returns the metrics."""
    with result.checkpoint.as_directory() as folder:
        progress = checkpoints.read_progress(folder)
        with files.atomic_path(inputs.model_path) as tmp:
            shutil.copyfile(Path(folder) / checkpoints.MODEL, tmp)
    history = progress["history"]
    terms = [k for k in ("rpn_cls", "rpn_reg", "roi_cls", "roi_reg") if k in history[-1]]
    metrics = {
        **{k: history[-1][k] for k in ["loss", *terms]},
        "epochs": len(history),
        "steps": progress["step"],
        "num_workers": cfg.train.num_workers,
        "images_per_s": result.metrics["images_per_s"],
        "train_seconds": result.metrics["train_seconds"],
        "wall_seconds": time.perf_counter() - wall_start,
        "resumed": resumed,
    }
    metrics_path = inputs.metrics_dir / f"{inputs.name}.json"
    epochs_path = inputs.metrics_dir / f"{inputs.name}_epochs.csv"
    storage.write_json(metrics_path, metrics)
    files.write_text(epochs_path, _csv(history, ["epoch", "steps", "loss", *terms]))
    mlrun.log_metrics({f"final/{k}": v for k, v in tracking.finite(metrics).items()},
                      step=progress["step"])
    for path in (metrics_path, epochs_path):
        mlrun.log_artifact(path, "metrics")
    mlrun.log_artifact(inputs.model_path, "model")
    example = read_image_bytes(inputs.train_path, [0])[0]  # one row group, not the column
    uri = log_detector(mlrun, inputs.model_path, cfg=cfg, stage=inputs.stage,
                       example_image=thumbnail(example))
    print(f"{inputs.name}: logged the MLflow model {uri}", flush=True)
    print(f"{inputs.name}: wrote {inputs.model_path} and {metrics_path} "
          f"({metrics['images_per_s']:.2f} images/s, {metrics['wall_seconds']:.0f} s)",
          flush=True)
    return metrics


def check_placement(cfg: Config) -> None:
    """``train.use_gpu: auto`` is decided by what a private local Ray sees; on a cluster
    (``train.ray_address`` / ``$RAY_ADDRESS``) it is refused before any work: an autoscaling
    cluster may have no GPU node yet when the stage starts, and a snapshot would train on CPUs.

    Raises:
        ConfigError: ``auto`` with a cluster address.
    """
    address = cfg.train.ray_address or os.environ.get("RAY_ADDRESS")
    if cfg.train.use_gpu == "auto" and address:
        raise ConfigError(f"train.use_gpu: auto cannot be decided on a Ray cluster ({address}): "
                          f"set train.use_gpu to true (each worker asks Ray for "
                          f"train.gpus_per_worker GPUs; an autoscaler starts GPU nodes for them) "
                          f"or false (overlays/gpu.yaml is a GPU profile)")


def _use_gpu(cfg: Config) -> bool:
    import ray
    if cfg.train.use_gpu == "auto":  # a private local Ray (check_placement): this machine
        return ray.cluster_resources().get("GPU", 0) > 0
    return cfg.train.use_gpu == "true"


def _worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker of a training stage: the loop, rank 0's step metrics sent
    to the stage's run off the step (:class:`pipeline.tracking.MetricsBuffer`), and each
    node's system metrics sampled once, by its local rank 0 (node ``node<n>``)."""
    worker = ray_worker.worker_context(config)
    run = tracking.open_run(config["tracking_uri"], config["run_id"])
    init_model = config["init_model"]
    tcfg = worker.cfg.tracking
    data = ShardInput.of_worker(worker.cfg, rows=config["rows"], world_size=worker.world_size,
                                rank=worker.rank)
    steps = tracking.MetricsBuffer(run, say=ray_worker.say) if worker.rank == 0 else None
    try:
        with tracking.system_metrics(run, node=worker.node, interval=tcfg.system_metrics_interval,
                                     enabled=tcfg.system_metrics and worker.local_rank == 0):
            ray_worker.fit_on_worker(worker, stage=config["stage"], data=data,
                                     num_classes=config["num_classes"],
                                     init_model=local_copy(init_model, config["init_digest"])
                                     if init_model else None,
                                     log=steps.log if steps is not None else None,
                                     model_meta=config["model_meta"])
    finally:
        if steps is not None:
            steps.close()


def restart_recorder(stage_name: str, tracking_uri: str, run_id: str, max_failures: int) -> Any:
    """A Ray Train callback that records each worker-group restart in the stage's MLflow run.

    Ray Train (``FailureConfig(max_failures)``) restarts a failed worker group from the last
    checkpoint on its own; the callback runs on Ray's controller when a failure is seen and, for
    the failures Ray will retry, counts it in the run (:func:`pipeline.tracking.record_restart`:
    tag and metric ``restarts``, tag ``last_restart`` with the ranks and error). The class is
    built here, not at import, so the controller unpickles it without importing this module
    (and torch).
    """
    from ray.train import UserCallback

    class _RestartRecorder(UserCallback):
        def __init__(self) -> None:
            self.failures = 0

        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]
                            ) -> None:
            self.failures += 1
            if self.failures > max_failures:
                return  # Ray gives up: the stage fails, its run says why
            ranks = sorted(worker_exceptions)
            first = worker_exceptions[ranks[0]] if ranks else None
            reason = (f"worker rank(s) {ranks} failed ({type(first).__name__}: "
                      f"{str(first).splitlines()[0] if str(first) else ''})")[:500]
            print(f"{stage_name}: {reason}; Ray Train restarts the worker group from the last "
                  f"checkpoint (failure {self.failures} of at most {max_failures})", flush=True)
            try:
                from pipeline.tracking import record_restart  # imported here: no torch there
                record_restart(tracking_uri, run_id, reason)
            except Exception as exc:  # recording must never stop the recovery itself
                print(f"{stage_name}: could not record the restart in MLflow: {exc}", flush=True)

    return _RestartRecorder()


def _check_local_memory(cfg: Config, train_rows: int) -> None:
    """An absurd ``train.batch_size`` fails here, before Ray starts, with a clear message.

    Only for a local Ray on CPU, where every worker shares this machine's RAM; GPU workers and
    cluster nodes check their own memory in :func:`pipeline.training.loop.train`.
    """
    import torch

    from pipeline.training.memory import check_memory
    if cfg.train.ray_address is not None or cfg.train.use_gpu == "true" \
            or (cfg.train.use_gpu == "auto" and torch.cuda.is_available()):
        return
    shard = -(-train_rows // cfg.train.num_workers)
    check_memory(batch_size=cfg.train.batch_size, images_per_step=min(cfg.train.batch_size, shard),
                 image_size=cfg.data.image_size, device=torch.device("cpu"),
                 workers=cfg.train.num_workers)


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        # epochs numbered from 1 in the plots
        writer.writerow(dict(row, epoch=int(row["epoch"]) + 1))
    return out.getvalue()


def _fit(cfg: Config, inputs: StageInputs, run_name: str, root: str,
         mlrun: tracking.RunHandle) -> Any:
    """Fit the stage's ``TorchTrainer``; a run that fails for good is a :class:`RunFailedError`."""
    import ray
    from ray.train import (CheckpointConfig, FailureConfig, RunConfig, ScalingConfig,
                           TrainingFailedError)
    from ray.train.torch import TorchTrainer

    from pipeline.ray_session import ray_session

    with ray_session(cfg.train.ray_address):
        mlrun.set_tags({"ray_job_id": ray.get_runtime_context().get_job_id()})
        use_gpu = _use_gpu(cfg)
        resources = {**cfg.train.worker_resources, "CPU": cfg.train.cpus_per_worker}
        if use_gpu:
            resources["GPU"] = cfg.train.gpus_per_worker
        paths = worker_inputs(cfg, inputs, root)
        rows = inputs.train_rows
        epochs = cfg.train.rpn_epochs if inputs.stage == "rpn" else cfg.train.frcnn_epochs
        trainer = TorchTrainer(
            _worker,
            datasets=epoch_datasets(paths["train_files"], rows=rows, epochs=epochs,
                                    seed=cfg.train.seed, world_size=cfg.train.num_workers),
            dataset_config=data_config(),
            train_loop_config={
                "params": cfg.to_dict(), "stage": inputs.stage, "rows": rows,
                "init_model": paths["init_model"], "init_digest": inputs.init_digest,
                "num_classes": len(inputs.classes),
                # what predict needs besides the weights (image size: the model's own config)
                "model_meta": {"classes": inputs.classes, "resize": inputs.resize},
                "tracking_uri": mlrun.tracking_uri, "run_id": mlrun.run_id,
                "threads": max(1, int(cfg.train.cpus_per_worker)),
            },
            scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(
                name=run_name, storage_path=root,
                failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                callbacks=[restart_recorder(inputs.name, mlrun.tracking_uri, mlrun.run_id,
                                            cfg.train.max_failures)],
                checkpoint_config=CheckpointConfig(num_to_keep=2)),
        )
        print(f"{inputs.name}: {cfg.train.num_workers} worker(s), "
              f"{'GPU' if use_gpu else 'CPU'}, {resources}", flush=True)
        try:
            return trainer.fit()
        except TrainingFailedError as exc:
            raise RunFailedError(f"{inputs.name}: training failed: {exc}") from exc
