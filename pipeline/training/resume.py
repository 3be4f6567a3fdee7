"""Finding a training stage's interrupted run again: its key, its checkpoints, its MLflow run.

A stage's Ray Train run is named ``train_<stage>-<key>`` under ``train.storage_path``, ``key`` a
digest of what determines the training (:func:`run_key`): the model and training parameters
(:func:`key_params`: not the operational ones), the training table's content, and the RPN
model for the ``frcnn`` stage. Running the same stage again after an interruption finds the
run's checkpoints (:func:`latest_checkpoint`, what Ray Train V2 will restore) and its MLflow run
(:func:`read_run_state`, a small file beside Ray's in the run folder).
"""

from __future__ import annotations

import json
from typing import Any

from pipeline import storage
from pipeline.config import Config
from pipeline.config.schema import operational_keys, stage_keys
from pipeline.digests import digest, params_at
from pipeline.errors import DataError
from pipeline.redaction import redact
from pipeline.training.checkpoints import PROGRESS

RUN_STATE = "frcnn_run.json"  # beside Ray's files in the run folder: the MLflow run id

#: The sections whose parameters (operational ones aside) determine a stage's training
TRAINING_SECTIONS = ("backbone", "anchors", "rpn", "roi", "train")
STAGES = ("rpn", "frcnn")


def key_params(stage: str) -> list[str]:
    """``section.key`` of every parameter that determines ``stage``'s training: the training
    sections and ``data.image_size``, less the operational parameters and the other stage's
    own (:func:`pipeline.config.schema.operational_keys`, :func:`~pipeline.config.schema.
    stage_keys`). ``dvc.yaml``'s params of ``train_<stage>`` are the same list (checked in
    ``tests/test_layout.py``)."""
    left_out = {*operational_keys(), *(k for other in STAGES if other != stage
                                       for k in stage_keys(other))}
    tree = Config().to_dict()
    return ["data.image_size", *(f"{section}.{key}" for section in TRAINING_SECTIONS
                                 for key in tree[section]
                                 if f"{section}.{key}" not in left_out)]


def run_key(cfg: Config, stage: str, train_digest: str, init_digest: str | None) -> str:
    """Digest of everything that determines a stage's training (12 hex digits); the data
    enter by their content digests (:func:`pipeline.prepared_table.table_digest` of the training
    table and, for the ``frcnn`` stage, of the RPN model)."""
    tree = cfg.to_dict()
    return digest({
        "stage": stage,
        "params": params_at(tree, key_params(stage)),
        "train_data": train_digest,
        "init_model": init_digest,
    }, length=12)


def latest_checkpoint(root: str, run_name: str) -> tuple[str, dict[str, Any]] | None:
    """The checkpoint Ray Train V2 will restore for ``run_name``, with its ``progress.json``.

    Asks Ray Train (``ray.train.Result.from_path``: the record ``get_checkpoint`` is built
    from); None when the run has no checkpoint yet.

    Raises:
        DataError: Ray's record or the progress file is torn or corrupt (names it, and the
            folder to delete to start afresh).
    """
    import ray.train

    run_folder = f"{root}/{run_name}"
    fs, path = storage.fs_of(run_folder)
    try:
        result = ray.train.Result.from_path(path, storage_filesystem=fs)
    except RuntimeError:  # no such run, or no checkpoint recorded in it yet
        return None
    except Exception as exc:  # Ray's own errors for a torn or foreign record
        raise DataError(f"{redact(run_folder)}: Ray Train's record of its checkpoints is "
                        f"unreadable ({type(exc).__name__}: {redact(str(exc))[:200]}); delete "
                        f"{redact(run_folder)} to start this stage afresh") from None
    if result.checkpoint is None:
        return None
    folder = f"{run_folder}/{result.checkpoint.path.rstrip('/').rsplit('/', 1)[-1]}"
    progress = storage.read_text(f"{folder}/{PROGRESS}")
    if progress is None:
        return None
    return folder, _json(progress, f"{folder}/{PROGRESS}", run_folder)


def _json(text: str, path: str, run_folder: str) -> dict[str, Any]:
    """Parse a run folder's JSON file; a truncated or corrupt one is a clear error."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise DataError(f"{path}: truncated or corrupt ({exc}); delete {run_folder} to start "
                        f"this stage afresh") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_run_state(root: str, run_name: str) -> dict[str, Any]:
    """The run's state file (``{"mlflow_run_id": ...}``); ``{}`` when absent or torn (a kill
    while it was written loses only the MLflow run id: the rerun opens a new run)."""
    return storage.read_json(f"{root}/{run_name}/{RUN_STATE}")


def write_run_state(root: str, run_name: str, mlflow_run_id: str) -> None:
    storage.write_json(f"{root}/{run_name}/{RUN_STATE}", {"mlflow_run_id": mlflow_run_id})


def delete_run(root: str, run_name: str) -> bool:
    """Delete the run folder ``root/run_name`` (its checkpoints) when it holds the run state
    this project writes first (:func:`write_run_state`): a folder it did not make is left as it
    is. Returns whether it was deleted."""
    if not storage.exists(f"{root}/{run_name}/{RUN_STATE}"):
        return False
    storage.delete_dir(f"{root}/{run_name}")
    return True
