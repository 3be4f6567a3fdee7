"""The ``train`` stage: ``frcnn train --stage rpn|frcnn`` on a Ray Train worker group.

Reads ``data.out_dir/train.parquet`` and ``classes.json``; the ``frcnn`` stage starts from
``train.rpn_model``. Writes (atomically):

- ``train.rpn_model`` / ``train.frcnn_model``: the model (``detector.serialization`` format:
  state dict + constructor config + the class names);
- ``train.metrics_dir/train_<stage>.json``: last-epoch mean losses, steps, epochs, images/s,
  training and wall seconds (DVC metrics);
- ``train.metrics_dir/train_<stage>_epochs.csv``: mean losses per epoch (DVC plots).

Ray: a local Ray starts and stops with the command unless ``train.ray_address`` names a cluster
(``auto`` or ``ray://host:port``). ``train.num_workers`` workers with ``train.cpus_per_worker``
CPUs each (fractions let 2 workers share a 2-core machine) and, when GPUs are used
(``train.use_gpu``; ``auto``: when Ray sees any), ``train.gpus_per_worker`` GPUs each; DDP over
gloo (CPU) or NCCL (GPU). Each worker runs :func:`pipeline.train_loop.train` on its shard.

Checkpoints and resume: every checkpoint goes through ``ray.train.report`` to
``train.storage_path/<run name>``; ``train.max_failures`` worker-group restarts continue from
the latest one. The run name is ``train_<stage>-<key>``, ``key`` a hash of what determines the
training (model and training parameters, the training table's content, the RPN model for the
``frcnn`` stage), so running the same stage again after an interruption (Ctrl-C, a killed
process) finds the run's checkpoints, which Ray Train V2 hands to the workers through
``ray.train.get_checkpoint()``: training continues from there, the same MLflow run is reopened,
and the command says ``resuming from checkpoint ...``. Changed parameters or data give a new
key, hence a fresh start. A run that finishes deletes its checkpoints (unless
``train.keep_checkpoints``: then an identical rerun finds the finished run and returns its model
without training).

MLflow: one run named ``train_<stage>`` (see :mod:`pipeline.tracking`); rank 0 logs step
metrics into it; the driver adds the model, metrics JSON and epoch CSV as artifacts.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io as _io
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pipeline import checkpoints, data, io, ray_worker, tracking
from pipeline.storage import delete_dir, read_json, read_text, resolve, write_bytes
from pipeline.config import Config

RUN_STATE = "frcnn_run.json"  # beside Ray's files in the run folder: the MLflow run id

# Parameters that do not change what is trained: excluded from the run key, so changing them
# between an interruption and the rerun still resumes.
_NOT_IN_KEY = {"use_gpu", "cpus_per_worker", "gpus_per_worker", "loader_workers",
               "checkpoint_every", "log_every", "max_failures", "storage_path", "ray_address",
               "rpn_model", "frcnn_model", "metrics_dir", "keep_checkpoints"}


def run(cfg: Config, args: argparse.Namespace) -> int:
    """CLI entry: ``frcnn train --stage rpn|frcnn``."""
    from ray.train import TrainingFailedError
    try:
        train_stage(cfg, args.stage)
    except (FileNotFoundError, ValueError, MemoryError, tracking.TrackingError,
            TrainingFailedError) as exc:
        print(f"frcnn train --stage {args.stage}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


# --------------------------------------------------------------------------------------------
# Paths, run key, resume detection


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_key(cfg: Config, stage: str, train_path: Path, init_model: Path | None) -> str:
    """Hash of everything that determines a stage's training (12 hex digits)."""
    tree = cfg.to_dict()
    relevant = {
        "stage": stage,
        "image_size": tree["data"]["image_size"],
        **{s: tree[s] for s in ("backbone", "anchors", "rpn", "roi")},
        "train": {k: v for k, v in tree["train"].items() if k not in _NOT_IN_KEY},
        "train_data": _file_digest(train_path),
        "init_model": _file_digest(init_model) if init_model is not None else None,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]


def latest_checkpoint(storage: str, run_name: str) -> tuple[str, dict[str, Any]] | None:
    """The checkpoint Ray Train V2 will restore for ``run_name``, with its ``progress.json``.

    Reads Ray's ``checkpoint_manager_snapshot.json`` in the run folder (what ``get_checkpoint``
    is built from); None when the run has no checkpoint yet.
    """
    snapshot_path = f"{storage}/{run_name}/checkpoint_manager_snapshot.json"
    snapshot = read_text(snapshot_path)
    if snapshot is None:
        return None
    latest = _json(snapshot, snapshot_path, f"{storage}/{run_name}").get("latest_checkpoint_result")
    if not latest:
        return None
    folder = f"{storage}/{run_name}/{latest['checkpoint_dir_name']}"
    progress = read_text(f"{folder}/{checkpoints.PROGRESS}")
    if progress is None:
        return None
    return folder, _json(progress, f"{folder}/{checkpoints.PROGRESS}", f"{storage}/{run_name}")


def _json(text: str, path: str, run_folder: str) -> dict[str, Any]:
    """Parse a run folder's JSON file; a truncated or corrupt one is a clear error."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{path}: truncated or corrupt ({exc}); delete {run_folder} to start "
                         f"this stage afresh") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _read_run_state(storage: str, run_name: str) -> dict[str, Any]:
    try:
        state = read_json(f"{storage}/{run_name}/{RUN_STATE}")
    except ValueError:  # cut short by a kill while written: only the MLflow run id is lost
        return {}
    return state if isinstance(state, dict) else {}


# --------------------------------------------------------------------------------------------
# Ray


def _start_ray(cfg: Config) -> bool:
    """Connect to ``train.ray_address`` or start a local Ray; True when this call did either."""
    if cfg.train.ray_address is None:
        # A private local cluster: no token authentication, no usage reporting.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    if ray.is_initialized():
        return False
    ray.init(address=cfg.train.ray_address, log_to_driver=True)
    return True


def _use_gpu(cfg: Config) -> bool:
    import ray
    if cfg.train.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return cfg.train.use_gpu == "true"


def _worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker of a training stage."""
    worker = ray_worker.worker_context(config)
    logger = tracking.MetricLogger(config["tracking_uri"], config["run_id"]) \
        if worker.rank == 0 else None
    ray_worker.fit_on_worker(worker, stage=config["stage"], train_path=config["train_path"],
                             num_classes=config["num_classes"],
                             init_model=config["init_model"],
                             log=logger.log if logger is not None else None,
                             model_meta=config["model_meta"])


# --------------------------------------------------------------------------------------------
# The stage


def train_stage(cfg: Config, stage: str) -> dict[str, Any]:
    """Train one stage with Ray Train, write its model and metrics; returns the metrics."""
    wall_start = time.perf_counter()
    name = f"train_{stage}"
    prepared = Path(cfg.data.out_dir)
    train_path = (prepared / "train.parquet").resolve()
    info = data.read_classes(prepared)
    if info["image_size"] != cfg.data.image_size:
        raise ValueError(f"{prepared}/classes.json: prepared at image_size {info['image_size']} "
                         f"but data.image_size is {cfg.data.image_size}; run `frcnn prepare`")
    if not train_path.is_file():
        raise FileNotFoundError(f"{train_path}: not found; run `frcnn prepare` first")
    init_model = Path(cfg.train.rpn_model).resolve() if stage == "frcnn" else None
    if init_model is not None and not init_model.is_file():
        raise FileNotFoundError(f"{init_model}: RPN model not found; run "
                                f"`frcnn train --stage rpn` first")
    if init_model is not None:
        _check_torch_file(init_model, "the RPN model (train.rpn_model)")
    model_path = Path(cfg.train.rpn_model if stage == "rpn" else cfg.train.frcnn_model)
    metrics_dir = Path(cfg.train.metrics_dir)

    storage = resolve(cfg.train.storage_path)
    run_name = f"{name}-{run_key(cfg, stage, train_path, init_model)}"
    previous = latest_checkpoint(storage, run_name)
    if previous is not None and "://" not in storage:
        _check_torch_file(Path(previous[0]) / checkpoints.TRAIN_STATE,
                          f"the checkpoint to resume from (delete {storage}/{run_name} to start "
                          f"afresh)")
    old_mlflow_run = _read_run_state(storage, run_name).get("mlflow_run_id") if previous else None

    with tracking.stage_run(cfg, name, run_id=old_mlflow_run) as mlrun:
        write_bytes(f"{storage}/{run_name}/{RUN_STATE}",
                    json.dumps({"mlflow_run_id": mlrun.run_id}).encode("utf-8"))
        if previous is not None:
            path, progress = previous
            print(f"{name}: resuming from checkpoint {path} (epoch {progress['epoch']}, "
                  f"step {progress['step']})", flush=True)
            mlrun.set_tags({"resumed_from": path})
        else:
            print(f"{name}: starting {run_name} (checkpoints in {storage}/{run_name})", flush=True)
        _check_local_memory(cfg, train_path)
        try:
            result = _fit(cfg, stage, name, run_name, storage, mlrun, train_path, init_model, info)
        except (KeyboardInterrupt, SystemExit) as exc:
            # Ctrl-C: Ray Train's own SIGINT handler aborts the run, then exits the process.
            print(f"{name}: interrupted; its checkpoints stay in {storage}/{run_name}: run the "
                  f"same command again to resume", file=sys.stderr, flush=True)
            raise KeyboardInterrupt from exc

        with result.checkpoint.as_directory() as folder:
            progress = checkpoints.read_progress(folder)
            with io.atomic_path(model_path) as tmp:
                shutil.copyfile(Path(folder) / checkpoints.MODEL, tmp)
        final = result.metrics
        history = progress["history"]
        terms = [k for k in ("rpn_cls", "rpn_reg", "roi_cls", "roi_reg") if k in history[-1]]
        metrics = {
            **{k: history[-1][k] for k in ["loss", *terms]},
            "epochs": len(history),
            "steps": progress["step"],
            "num_workers": cfg.train.num_workers,
            "images_per_s": final["images_per_s"],
            "train_seconds": final["train_seconds"],
            "wall_seconds": time.perf_counter() - wall_start,
            "resumed": previous is not None,
        }
        metrics_path = metrics_dir / f"{name}.json"
        epochs_path = metrics_dir / f"{name}_epochs.csv"
        io.write_json(metrics_path, metrics)
        io.write_text(epochs_path, _csv(history, ["epoch", "steps", "loss", *terms]))
        mlrun.log_metrics({f"final/{k}": float(v) for k, v in metrics.items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)},
                          step=progress["step"])
        for path in (metrics_path, epochs_path):
            mlrun.log_artifact(path, "metrics")
        mlrun.log_artifact(model_path, "model")
        if not cfg.train.keep_checkpoints:
            delete_dir(f"{storage}/{run_name}")  # finished: nothing to resume; the model is saved
        print(f"{name}: wrote {model_path} and {metrics_path} "
              f"({metrics['images_per_s']:.2f} images/s, {metrics['wall_seconds']:.0f} s)",
              flush=True)
        return metrics


def restart_recorder(stage_name: str, tracking_uri: str, run_id: str, max_failures: int) -> Any:
    """A Ray Train callback that records each worker-group restart in the stage's MLflow run.

    Ray Train (``FailureConfig(max_failures)``) restarts a failed worker group from the last
    checkpoint on its own; the callback runs on Ray's controller when a failure is seen and, for
    the failures Ray will retry, sets the run's tag ``restarts`` (running total, across resumed
    drivers too), logs the metric ``restarts`` and tags ``last_restart`` with the ranks and
    error. The class is built here, not at import, so the controller unpickles it without
    importing this module (and torch).
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
                from mlflow.tracking import MlflowClient
                client = MlflowClient(tracking_uri)
                total = int(client.get_run(run_id).data.tags.get("restarts", "0")) + 1
                client.set_tag(run_id, "restarts", str(total))
                client.set_tag(run_id, "last_restart", reason)
                client.log_metric(run_id, "restarts", total, step=total)
            except Exception as exc:  # recording must never stop the recovery itself
                print(f"{stage_name}: could not record the restart in MLflow: {exc}", flush=True)

    return _RestartRecorder()


def _check_torch_file(path: Path, what: str) -> None:
    """Name a truncated or corrupt torch file here, before Ray starts, rather than in every
    worker of every restart. ``mmap``: the tensors are mapped, not read."""
    import torch
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # zip / unpickling errors of every kind
        raise ValueError(f"{path}: {what} is not readable, truncated or corrupt "
                         f"({type(exc).__name__}: {str(exc)[:300]})") from None


def _check_local_memory(cfg: Config, train_path: Path) -> None:
    """An absurd ``train.batch_size`` fails here, before Ray starts, with a clear message.

    Only for a local Ray on CPU, where every worker shares this machine's RAM; GPU workers and
    cluster nodes check their own memory in :func:`pipeline.train_loop.train`.
    """
    import pyarrow.parquet as pq
    import torch

    from pipeline.memory import check_memory
    if cfg.train.ray_address is not None or cfg.train.use_gpu == "true" \
            or (cfg.train.use_gpu == "auto" and torch.cuda.is_available()):
        return
    shard = -(-pq.ParquetFile(train_path).metadata.num_rows // cfg.train.num_workers)
    check_memory(batch_size=cfg.train.batch_size, images_per_step=min(cfg.train.batch_size, shard),
                 image_size=cfg.data.image_size, device=torch.device("cpu"),
                 workers=cfg.train.num_workers)


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    out = _io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        # epochs numbered from 1 in the plots
        writer.writerow(dict(row, epoch=int(row["epoch"]) + 1))
    return out.getvalue()


def _fit(cfg: Config, stage: str, name: str, run_name: str, storage: str,
         mlrun: tracking.StageRun, train_path: Path, init_model: Path | None,
         info: dict[str, Any]) -> Any:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = _start_ray(cfg)
    try:
        mlrun.set_tags({"ray_job_id": ray.get_runtime_context().get_job_id()})
        use_gpu = _use_gpu(cfg)
        resources = {"CPU": cfg.train.cpus_per_worker}
        if use_gpu:
            resources["GPU"] = cfg.train.gpus_per_worker
        trainer = TorchTrainer(
            _worker,
            train_loop_config={
                "params": cfg.to_dict(),
                "stage": stage,
                "train_path": str(train_path),
                "num_classes": len(info["classes"]),
                "init_model": str(init_model) if init_model is not None else None,
                "model_meta": {"classes": list(info["classes"])},
                "tracking_uri": mlrun.tracking_uri,
                "run_id": mlrun.run_id,
                "threads": max(1, int(cfg.train.cpus_per_worker)),
            },
            scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(
                name=run_name, storage_path=storage,
                failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                callbacks=[restart_recorder(name, mlrun.tracking_uri, mlrun.run_id,
                                            cfg.train.max_failures)],
                checkpoint_config=CheckpointConfig(num_to_keep=2)),
        )
        print(f"{name}: {cfg.train.num_workers} worker(s), "
              f"{'GPU' if use_gpu else 'CPU'}, {resources}", flush=True)
        return trainer.fit()
    finally:
        if started:
            ray.shutdown()
