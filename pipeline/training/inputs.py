"""What a training stage reads, checked before Ray starts, and how its workers reach it.

:func:`stage_inputs` names the stage's inputs and outputs from the config (the prepared set, local
or in a bucket; for the ``frcnn`` stage the RPN model), refusing missing or unreadable ones;
:func:`worker_inputs` gives the paths the Ray Train workers open: the driver's own files on the
private local Ray, and on a cluster (or with a bucket as storage) copies staged in the run's
storage, or the bucket's own files for a set prepared there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.digests import file_digest
from pipeline.errors import DataError, MissingInputError
from pipeline.prepared_table import (open_table, read_classes, split_path, table_digest,
                                     table_files)
from pipeline.redaction import redact
from pipeline.storage import is_uri, stage_file


@dataclass(frozen=True)
class StageInputs:
    """What a training stage reads and writes, checked before Ray starts."""

    stage: str
    train_path: Path | str         # a URI for a set prepared into a bucket
    classes: list[str]
    resize: str                    # how prepare resized the images (recorded in the model)
    init_model: Path | None        # the RPN model the frcnn stage starts from
    model_path: Path
    metrics_dir: Path
    train_rows: int
    train_digest: str              # content digests (run key, staged copies)
    init_digest: str | None

    @property
    def name(self) -> str:
        return f"train_{self.stage}"


def stage_inputs(cfg: Config, stage: str) -> StageInputs:
    """The stage's inputs and outputs from the config; missing or unreadable inputs are named.

    Raises:
        MissingInputError: no prepared data, or (``frcnn``) no RPN model.
        DataError: data prepared at another size; an unreadable RPN model.
    """
    info = read_classes(cfg.data.out_dir, image_size=cfg.data.image_size)
    train_path = split_path(cfg.data.out_dir, "train")
    train_path = train_path if is_uri(train_path) else train_path.resolve()
    if not table_files(train_path):
        raise MissingInputError(f"{redact(str(train_path))}: not found; run `frcnn prepare` "
                                f"first")
    init_model = Path(cfg.train.rpn_model).resolve() if stage == "frcnn" else None
    if init_model is not None and not init_model.is_file():
        raise MissingInputError(f"{init_model}: RPN model not found; run "
                                f"`frcnn train --stage rpn` first")
    if init_model is not None:
        check_torch_file(init_model, "the RPN model (train.rpn_model)")
    return StageInputs(stage=stage, train_path=train_path,
                       classes=[str(c) for c in info["classes"]],
                       resize=str(info.get("resize", cfg.data.resize)), init_model=init_model,
                       model_path=Path(cfg.train.rpn_model if stage == "rpn"
                                       else cfg.train.frcnn_model),
                       metrics_dir=Path(cfg.train.metrics_dir),
                       train_rows=open_table(train_path).num_rows,
                       train_digest=table_digest(train_path),
                       init_digest=file_digest(init_model) if init_model else None)


def worker_inputs(cfg: Config, inputs: StageInputs, root: str) -> dict[str, Any]:
    """``{"train_files": [the training table's files], "init_model"}`` as the workers will
    open them: the driver's own files on
    the private local Ray; on a cluster (``train.ray_address`` / ``$RAY_ADDRESS``) or with a
    bucket as storage, copies staged in the run's storage (``root/staged/<digest>/``), which
    every node reaches: Ray Data's read tasks stream the training table from there (no node
    downloads it whole); the RPN model, one small file, each node downloads once
    (:func:`pipeline.storage.local_copy`)."""
    files = table_files(inputs.train_path)
    if not ("://" in root or cfg.train.ray_address or os.environ.get("RAY_ADDRESS")):
        return {"train_files": [str(f) for f in files],
                "init_model": str(inputs.init_model) if inputs.init_model else None}
    if is_uri(inputs.train_path):  # prepared into a bucket: read where it is
        train_files = [str(f) for f in files]
    else:  # a folder's parts under <digest>/<table name>/, a single file under <digest>/
        name = inputs.train_path.name if inputs.train_path.is_dir() else ""
        train_files = [stage_file(f, root, inputs.train_digest, folder=name) for f in files]
    staged = {"train_files": train_files,
              "init_model": stage_file(inputs.init_model, root, inputs.init_digest)
              if inputs.init_model is not None else None}
    where = staged["train_files"][0].rsplit("/", 1)[0]
    print(f"{inputs.name}: workers read {len(files)} file(s) in {redact(where)}"
          + (f" and {redact(str(staged['init_model']))}" if staged["init_model"] else ""),
          flush=True)
    return staged


def check_torch_file(path: Path, what: str) -> None:
    """Name a truncated or corrupt torch file here, before Ray starts, rather than in every
    worker of every restart. ``mmap``: the tensors are mapped, not read."""
    import torch
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # zip / unpickling errors of every kind
        raise DataError(f"{path}: {what} is not readable, truncated or corrupt "
                        f"({type(exc).__name__}: {str(exc)[:300]})") from None
