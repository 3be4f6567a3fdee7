"""Prepared Parquet tables -> batches for the detector.

Input: ``data/prepared/<split>.parquet``, one row per image (written by ``frcnn prepare``):
``image_id`` (str), ``image`` (PNG/JPEG bytes of the resized S x S RGB image), ``boxes`` (list of
``[x1, y1, x2, y2]`` floats in the resized frame), ``labels`` (list of class ids ``1..K``),
``difficult`` (list of bool); other columns are ignored.

Output of :func:`collate` (B images per batch, G boxes per image):

- ``images``: float32 ``(B, 3, S, S)``, RGB scaled to [0, 1]. Not normalised here:
  ``detector.FasterRCNN`` subtracts the ImageNet mean and divides by its standard deviation
  itself (the statistics torchvision's VGG-16 weights expect), so every caller (training,
  evaluation, prediction) feeds it the same plain 0-1 images.
- ``targets``: list of B dicts, ``boxes`` float32 ``(G, 4)`` x1y1x2y2 pixels, ``labels`` int64
  ``(G,)`` in ``1..K``.
- ``image_ids``: list of B strings.

Augmentation (training only) is the one Faster R-CNN uses: a horizontal flip with probability
``hflip``. Whether an image is flipped in epoch ``e`` is a pure function of ``(seed, e, its
image_id)``, so a run resumed mid-epoch sees exactly the images a run without interruption
would have seen, whichever reader delivers them.

Sharding: :class:`ResumableSampler` is torch's ``DistributedSampler`` (same seeded permutation,
same wrap-around padding, same ``rank::world_size`` stride) that can also start part-way
through an epoch (resume). Images are decoded (:func:`pipeline.images.decode`) in
``DataLoader`` worker processes.
"""

from __future__ import annotations

import bisect
import itertools
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pipeline.errors import DataError
from pipeline.images import decode
from pipeline.prepared_table import open_table
from pipeline.annotations import Annotations, read_annotations


def hflip(image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror ``(3, H, W)`` left-right and its ``(G, 4)`` x1y1x2y2 boxes: ``x -> W - x``."""
    width = image.shape[-1]
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return image.flip(-1), flipped


def flip_decision(seed: int, epoch: int, image_id: str, probability: float) -> bool:
    """Whether image ``image_id`` is flipped in ``epoch``: a function of ``(seed, epoch,
    image_id)`` alone, so every reader (this one, :mod:`pipeline.training.ray_input`) and every
    resumed run flips the same images."""
    if probability <= 0.0:
        return False
    key = zlib.crc32(image_id.encode("utf-8"))
    return bool(np.random.default_rng([seed, epoch, key]).random() < probability)


def make_sample(data: bytes, ann: Annotations, index: int, *, flip: bool, use_difficult: bool
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], str]:
    """One training sample: row ``index`` of ``ann`` with its image ``data`` (PNG / JPEG) ->
    ``(image (3, S, S) in [0, 1], {"boxes": (G, 4), "labels": (G,)}, image_id)``; crowd regions
    dropped, difficult ones unless ``use_difficult``, mirrored when ``flip``."""
    image = decode(data)
    rows = ann.rows(index)
    boxes = torch.from_numpy(ann.boxes[rows].copy())        # (G, 4)
    labels = torch.from_numpy(ann.labels[rows].copy())      # (G,)
    # crowd regions (COCO iscrowd) never train as objects; difficult ones on request
    drop = ann.crowd[rows] | (ann.difficult[rows] & (not use_difficult))
    if drop.any():
        keep = torch.from_numpy(~drop)
        boxes, labels = boxes[keep], labels[keep]
    if flip:
        image, boxes = hflip(image, boxes)
    return image, {"boxes": boxes, "labels": labels}, ann.image_id(index)


class DetectionDataset(Dataset):
    """One prepared split. ``dataset[i]`` -> ``(image (3,S,S) in [0, 1], target dict, image_id)``.

    The annotations are read once, as flat arrays (:func:`pipeline.prepared_table.read_annotations`:
    no Python object per box); the images one Parquet row group at a time (the last one kept),
    so a split of any size is never loaded into memory whole: a process holds at most one row
    group of image bytes (:data:`pipeline.prepare.writer.ROW_GROUP_ROWS` images).

    Args:
        path: a prepared Parquet table.
        hflip: probability of a horizontal flip (0 for evaluation).
        seed: seed of the flip decisions.
        use_difficult: keep boxes marked ``difficult`` (PASCAL VOC); Faster R-CNN drops them
            for training.
    """

    def __init__(self, path: str | Path, *, hflip: float = 0.0, seed: int = 0,
                 use_difficult: bool = False) -> None:
        self.path = Path(path)
        self.table = open_table(self.path)  # exists, with the model's columns (else an error)
        self.annotations = read_annotations(self.path)  # flat arrays, no object per box
        sizes = [self.table.row_group_rows(i) for i in range(self.table.num_row_groups)]
        self._starts = list(itertools.accumulate(sizes, initial=0))  # row group g: [starts[g], starts[g+1])
        self._cached: tuple[int, Any] | None = None  # (row group, its image column)
        self.hflip = hflip
        self.seed = seed
        self.use_difficult = use_difficult
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.annotations)

    @property
    def row_group_starts(self) -> list[int]:
        """First row of each Parquet row group, then the row count."""
        return self._starts

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__, _cached=None)  # loader workers read their own row groups

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's flip decisions; call before creating the loader's iterator."""
        self.epoch = epoch

    def image_bytes(self, index: int) -> bytes:
        """The stored PNG / JPEG bytes of image ``index`` (reads its row group if needed)."""
        group = bisect.bisect_right(self._starts, index) - 1
        if self._cached is None or self._cached[0] != group:
            column = self.table.read_row_group(group, columns=["image"])
            self._cached = (group, column.column("image"))
        return self._cached[1][index - self._starts[group]].as_py()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], str]:
        ann = self.annotations
        flip = flip_decision(self.seed, self.epoch, ann.image_id(index), self.hflip)
        return make_sample(self.image_bytes(index), ann, index, flip=flip,
                           use_difficult=self.use_difficult)


def collate(batch: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor], str]]) -> dict[str, Any]:
    """List of dataset items -> ``{"images": (B,3,S,S), "targets": [...], "image_ids": [...]}``."""
    images, targets, ids = zip(*batch)
    return {"images": torch.stack(images), "targets": list(targets), "image_ids": list(ids)}


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` over ``num_items`` indices that can start part-way through an epoch.

    The epoch's permutation (seeded by ``seed + epoch``) is padded by wrapping around to a
    multiple of ``world_size`` so that every rank gets the same number of indices (DDP needs
    equal step counts), then rank ``r`` takes positions ``r, r + world_size, ...`` (torch's own
    logic). ``set_epoch(epoch, start)`` skips the first ``start`` indices of the shard: a run
    resumed mid-epoch continues where it stopped instead of decoding images it will not use.
    """

    def __init__(self, num_items: int, *, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, seed: int = 0) -> None:
        if num_items < 1:
            raise DataError(f"ResumableSampler: no items to sample (num_items={num_items})")
        if not 0 <= rank < world_size:
            raise ValueError(f"ResumableSampler: rank {rank} not in [0, {world_size})")
        super().__init__(range(num_items), num_replicas=world_size, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=False)
        self.start = 0

    @property
    def shard_size(self) -> int:
        """Indices per rank per epoch (padded)."""
        return self.num_samples

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is single-threaded; leave the cores to the model


def make_loader(dataset: DetectionDataset, sampler: ResumableSampler, *, batch_size: int,
                num_workers: int, pin_memory: bool = False) -> DataLoader:
    """A ``DataLoader`` over ``sampler``'s shard that decodes in ``num_workers`` processes.

    Workers are not persistent, so :meth:`DetectionDataset.set_epoch` called before each
    epoch's ``iter(loader)`` reaches them. The loader seeds its workers from its own generator,
    not the global torch RNG, which stays the model's alone: a resumed run that restores the
    RNG state then samples the same anchors and RoIs as an uninterrupted one.
    """
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate, worker_init_fn=_worker_init if num_workers else None,
                      persistent_workers=False, drop_last=False, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(sampler.seed))


class TableInput:
    """This process's shard of a prepared table, an epoch at a time: the plain reader (no Ray:
    the Ray-free loop, the sweep's trials, tests and benchmarks). :mod:`pipeline.training.
    ray_input` gives the same interface over Ray Data.

    - :attr:`shard_size`: images per epoch for this rank (padded to the same on every rank);
    - :attr:`image_size`: the side ``S`` of the images;
    - :meth:`epoch`: the batches of ``epoch`` from optimiser step ``start_step`` on (a resumed
      run's images are those an uninterrupted one would have seen).
    """

    def __init__(self, path: str | Path, *, rank: int = 0, world_size: int = 1,
                 batch_size: int, seed: int = 0, hflip: float = 0.0,
                 use_difficult: bool = False, num_workers: int = 0,
                 pin_memory: bool = False) -> None:
        self.dataset = DetectionDataset(path, hflip=hflip, seed=seed,
                                        use_difficult=use_difficult)
        self.sampler = ResumableSampler(len(self.dataset), rank=rank, world_size=world_size,
                                        shuffle=True, seed=seed)
        self.loader = make_loader(self.dataset, self.sampler, batch_size=batch_size,
                                  num_workers=num_workers, pin_memory=pin_memory)
        self.batch_size = batch_size
        self.image_size = int(self.dataset[0][0].shape[-1])

    @property
    def shard_size(self) -> int:
        return self.sampler.shard_size

    def epoch(self, epoch: int, start_step: int = 0) -> Any:
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch, start=start_step * self.batch_size)
        return self.loader

