"""Training input through Ray Data: the prepared table read by Ray Data tasks and split among
the Ray Train workers, decoded and flipped in each worker.

The driver (:func:`epoch_datasets`, :func:`data_config`) gives ``TorchTrainer`` one lazy
dataset per epoch, ``train_e<k>``: ``ray.data.read_parquet`` over the table's files (a local
folder, or a bucket every node reaches: nothing is downloaded whole, and a read task reads each
file once), the files in an order seeded by ``(seed, epoch)``. Ray Train splits each among the
workers (``streaming_split(equal=True)``); each worker (:class:`ShardInput`, the interface of
:class:`pipeline.training.loader.TableInput`) reads its shard with
``get_dataset_shard("train_e<k>").iter_batches`` through a local shuffle buffer of
``train.shuffle_buffer`` rows seeded by ``(seed, epoch, rank)``, and decodes the images (and
flips them: :func:`pipeline.training.loader.flip_decision`) in a pool of
``train.loader_workers`` threads, a batch ahead of the step.

Guarantees (tested in ``tests/pipeline/training/test_ray_input.py``):

- **Every image once per epoch.** The epoch's first ``-N mod W`` rows are appended again, as
  torch's ``DistributedSampler`` wraps around, so each of the ``W`` workers gets exactly
  ``ceil(N / W)`` rows and the equal split drops none: the same step count on every rank, the
  same as the plain reader's.
- **Exact resume.** Rows stream in order (``preserve_order``), and the split hands each block to
  the worker that has received the fewest rows so far: with no locality hints the same rows
  reach the same worker in the same order on every run, and the seeded shuffle buffer keeps
  that so. A run resumed at step ``k`` of an epoch skips its first ``k`` batches of that epoch
  without decoding them: no image trains twice in the epoch and none is left out (the skipped
  rows are read again, not trained on).
"""

from __future__ import annotations

import concurrent.futures
import math
from collections import deque
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline.prepared_table import MODEL_COLUMNS
from pipeline.annotations import annotations_of
from pipeline.training.loader import collate, flip_decision, make_sample


def dataset_name(epoch: int) -> str:
    """The name of epoch ``epoch``'s dataset."""
    return f"train_e{epoch}"


# --------------------------------------------------------------------------------------------
# The driver


def epoch_order(files: Sequence[str], seed: int, epoch: int) -> list[str]:
    """The table's files in epoch ``epoch``'s order (a permutation seeded by ``(seed,
    epoch)``)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(files))
    return [files[i] for i in order]


def epoch_datasets(files: Sequence[str], *, rows: int, epochs: int, seed: int,
                   world_size: int) -> dict[str, Any]:
    """``{"train_e<k>": lazy Dataset}`` for ``k < epochs``: the ``files`` (paths or URIs of one
    prepared table, ``rows`` rows in all) in the epoch's order, padded by its first rows to a
    multiple of ``world_size``."""
    import ray.data

    pad = (-rows) % world_size
    out = {}
    for epoch in range(epochs):
        # a read task per file, whatever the cluster's size: the blocks, and so the rows each
        # rank gets, do not change when a restart finds fewer or more CPUs
        ds = ray.data.read_parquet(epoch_order(files, seed, epoch), columns=list(MODEL_COLUMNS),
                                   override_num_blocks=len(files))
        if pad:  # a table smaller than the pad (fewer rows than workers) is repeated first
            repeated = ds.union(*[ds] * (-(-pad // rows) - 1)) if pad > rows else ds
            ds = ds.union(repeated.limit(pad))
        out[dataset_name(epoch)] = ds
    return out


def data_config() -> Any:
    """Ray Train's ``DataConfig`` for :func:`epoch_datasets`: every dataset split equally, in
    order, without locality hints (the same rows to the same rank on every run)."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    return DataConfig(execution_options=ExecutionOptions(preserve_order=True),
                      enable_shard_locality=False)


# --------------------------------------------------------------------------------------------
# The workers


class ShardInput:
    """This Ray Train worker's shard of :func:`epoch_datasets`, an epoch at a time (see the
    module docstring).

    Args:
        rows: rows of the whole table; world_size, rank: this worker's place.
        image_size: the side of the prepared images.
        batch_size, seed, hflip, use_difficult: ``train.*``.
        shuffle_buffer: rows of the local shuffle buffer (0: the split's order).
        threads: decoding threads.
        shard: ``shard(name)`` -> the worker's ``DataIterator`` (default
            ``ray.train.get_dataset_shard``).
    """

    def __init__(self, *, rows: int, world_size: int, rank: int, image_size: int,
                 batch_size: int, seed: int, hflip: float, use_difficult: bool,
                 shuffle_buffer: int, threads: int, shard: Any = None) -> None:
        self.shard_size = math.ceil(rows / world_size)
        self.image_size = image_size
        self.rank = rank
        self.batch_size = batch_size
        self.seed = seed
        self.hflip = hflip
        self.use_difficult = use_difficult
        self.shuffle_buffer = shuffle_buffer
        self.threads = max(1, threads)
        self._shard = shard

    @classmethod
    def of_worker(cls, cfg: Any, *, rows: int, world_size: int, rank: int) -> "ShardInput":
        """The input of the worker of rank ``rank`` of ``world_size`` training with ``cfg``
        (a :class:`pipeline.config.Config`) on a table of ``rows`` rows."""
        train = cfg.train
        return cls(rows=rows, world_size=world_size, rank=rank,
                   image_size=cfg.data.image_size, batch_size=train.batch_size, seed=train.seed,
                   hflip=train.hflip, use_difficult=train.use_difficult,
                   shuffle_buffer=train.shuffle_buffer, threads=train.loader_workers)

    def _iterator(self, epoch: int) -> Any:
        if self._shard is not None:
            return self._shard(dataset_name(epoch))
        import ray.train
        return ray.train.get_dataset_shard(dataset_name(epoch))

    def tables(self, epoch: int) -> Iterator[Any]:
        """The epoch's batches as Arrow tables, in the shard's (shuffled) order."""
        shuffle = {"local_shuffle_buffer_size": self.shuffle_buffer,
                   "local_shuffle_seed": int(np.random.default_rng(
                       [self.seed, epoch, self.rank]).integers(2**31))} \
            if self.shuffle_buffer else {}
        return self._iterator(epoch).iter_batches(batch_size=self.batch_size,
                                                  batch_format="pyarrow", prefetch_batches=2,
                                                  **shuffle)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, Any]]:
        """The epoch's collated batches from optimiser step ``start_step`` on (the earlier
        ones are read and skipped, not decoded); decoded a batch ahead in a thread pool."""
        tables = iter(self.tables(epoch))
        for _ in range(start_step):
            next(tables, None)
        with concurrent.futures.ThreadPoolExecutor(self.threads,
                                                   thread_name_prefix="decode") as pool:
            ahead: deque[list[concurrent.futures.Future]] = deque()
            for table in tables:
                ahead.append(self._submit(pool, table, epoch))
                if len(ahead) > 1:
                    yield collate([f.result() for f in ahead.popleft()])
            while ahead:
                yield collate([f.result() for f in ahead.popleft()])

    def _submit(self, pool: Any, table: Any, epoch: int) -> list[concurrent.futures.Future]:
        ann = annotations_of(table, f"{dataset_name(epoch)} (rank {self.rank})")
        images = table.column("image")
        return [pool.submit(make_sample, images[i].as_py(), ann, i,
                            flip=flip_decision(self.seed, epoch, ann.image_id(i), self.hflip),
                            use_difficult=self.use_difficult)
                for i in range(table.num_rows)]
