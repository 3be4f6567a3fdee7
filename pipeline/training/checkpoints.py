"""Training checkpoints: what one holds, how it is written and read back.

A checkpoint is a folder (Ray Train persists it under ``train.storage_path/<run name>/``)::

    checkpoint_e001_s0000028/
        progress.json    # {"stage", "epoch", "epoch_step", "step", "total_steps", "done"}
        train_state.pt   # model state dict, optimiser, LR scheduler, AMP scaler, counters,
                         # running epoch sums, per-epoch history, RNG states
        model.pt         # last checkpoint of a run only: detector.serialization.save_model format

``epoch`` counts finished epochs, ``epoch_step`` optimiser steps done in the current epoch,
``step`` optimiser steps in all. Everything is saved with ``torch.save`` and read back with
``torch.load(weights_only=True)``: tensors, numbers, strings, lists, tuples and dicts only.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline import files, storage
from pipeline.errors import DataError, MissingInputError

TRAIN_STATE = "train_state.pt"
PROGRESS = "progress.json"
MODEL = "model.pt"

# report(metrics, checkpoint folder or None, checkpoint name): called by every rank at every
# checkpoint; only rank 0 passes a folder, which is the report's from then on: it keeps, moves
# or uploads it and deletes it when done (Ray Train: ray.train.report, uploading in the
# background). When the report raises, the loop deletes the folder.
ReportFn = Callable[[dict[str, float], "Path | None", str], None]


def checkpoint_name(epoch: int, step: int) -> str:
    """``checkpoint_e<finished epochs>_s<steps>``: names sort in training order."""
    return f"checkpoint_e{epoch:03d}_s{step:07d}"


def rng_state() -> dict[str, Any]:
    """Torch (CPU and CUDA) and Python RNG states, in weights_only-loadable types."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write(folder: str | Path, state: dict[str, Any], progress: dict[str, Any]) -> None:
    """Write ``train_state.pt`` and ``progress.json`` into ``folder`` (atomically each)."""
    folder = Path(folder)
    with files.atomic_path(folder / TRAIN_STATE) as tmp:
        torch.save(state, tmp)
    storage.write_json(folder / PROGRESS, progress)


def read_progress(folder: str | Path) -> dict[str, Any]:
    """``progress.json`` of a checkpoint folder.

    Raises:
        FileNotFoundError: no ``progress.json``.
        ValueError: it is truncated or corrupt (the message names the file).
    """
    path = Path(folder) / PROGRESS
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise DataError(f"{path}: truncated or corrupt checkpoint progress ({exc})") from None
    if not isinstance(progress, dict):
        raise DataError(f"{path}: not checkpoint progress (expected an object)")
    return progress


def read_state(folder: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``train_state.pt`` of a checkpoint folder, loaded with ``weights_only=True``.

    Raises:
        FileNotFoundError: the folder is not a training checkpoint.
        ValueError: the file is truncated, corrupt or not a training state (the message names
            the file); nothing of it is used.
    """
    path = Path(folder) / TRAIN_STATE
    if not path.is_file():
        raise MissingInputError(f"{path}: not a training checkpoint (no {TRAIN_STATE})")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling / zip errors of every kind: the file is unusable
        raise DataError(f"{path}: not a readable training checkpoint, truncated or corrupt "
                         f"({type(exc).__name__}: {str(exc)[:300]})") from exc
    if not isinstance(state, dict):
        raise DataError(f"{path}: not a training checkpoint (a {type(state).__name__})")
    return state


class LocalCheckpoints:
    """A :data:`ReportFn` for runs without Ray: keeps the last ``keep`` checkpoints in ``root``.

    ``root/<checkpoint name>/`` folders; :meth:`latest` is the one to resume from.
    """

    def __init__(self, root: str | Path, keep: int = 2) -> None:
        self.root = Path(root)
        self.keep = keep
        self.reports: list[dict[str, float]] = []

    def __call__(self, metrics: dict[str, float], folder: Path | None, name: str) -> None:
        self.reports.append(dict(metrics))
        if folder is None:
            return
        with files.atomic_dir(self.root / name) as tmp:
            shutil.copytree(folder, tmp, dirs_exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        for old in self.checkpoints()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("checkpoint_*") if (p / PROGRESS).is_file())

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None
