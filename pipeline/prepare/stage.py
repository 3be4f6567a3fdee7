"""The prepare stage's work: read a dataset, validate it, resize it, split it, write the tables.

Reads ``data.source`` (``synthetic`` | ``voc:PATH`` | ``coco:PATH_TO_JSON``), checks every
annotation and image, resizes images to ``data.image_size`` (``data.resize``: stretch or
letterbox) with their boxes scaled the same way, assigns each image to train / val / test
(:mod:`pipeline.prepare.splits`) and writes into ``data.out_dir``:

- ``{train,val,test}.parquet``: one row per image (schema in :mod:`pipeline.prepared_table`);
- ``classes.json``: ``"classes"`` (names of ids 1..K), ``"background": 0``, ``"image_size"``,
  the resize mode, image format and per-split counts;
- ``rejected.csv`` (``data.on_invalid: skip`` only): ``source, reason, image_id, box_index``, one
  line per problem; a problem rejects its whole image.

With ``data.on_invalid: error`` the first problems stop the stage with ``<file>: <problem>``.
Either way the output folder is written beside the target and renamed into place at the end, so
a failed run leaves the previous output (or none), never a partial one.

The work is :func:`prepare_dataset` (a plain function returning a :class:`PrepareResult`);
:func:`pipeline.prepare.run` is the command around it.
"""

from __future__ import annotations

import contextlib
import csv
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipeline.config import Config, DataConfig
from pipeline.files import atomic_dir
from pipeline.prepare.coco import read_coco
from pipeline.prepare.process import process_items
from pipeline.prepare.records import DataError, Problem, Reading
from pipeline.prepare.splits import assign_splits
from pipeline.prepare.synthetic import read_synthetic
from pipeline.prepare.voc import read_voc
from pipeline.prepare.writer import SplitWriter
from pipeline.prepared_table import (CLASSES_FILE, REJECTED_COLUMNS, REJECTED_FILE, SPLITS, split_path,
                                     table_digest, write_classes)
from pipeline.storage import is_uri, upload_folder

MAX_LISTED_PROBLEMS = 5


@dataclass(frozen=True)
class PrepareResult:
    """What :func:`prepare_dataset` wrote."""

    out_dir: Path | str        # a URI for a set written to a bucket
    source: str
    classes: tuple[str, ...]
    images: dict[str, int]                 # per split
    boxes: dict[str, int]                  # per split
    rejected: tuple[Problem, ...] = ()
    seconds: float = 0.0
    num_workers: int = 1
    image_size: int = 0

    @property
    def num_images(self) -> int:
        return sum(self.images.values())

    @property
    def rejected_images(self) -> int:
        """Images dropped (a problem without an image, e.g. a COCO annotation of an unlisted
        image, drops no image)."""
        return len({p.image_id for p in self.rejected if p.image_id})

    @property
    def images_per_second(self) -> float:
        """Images written per second of the whole stage (reading, decoding, writing)."""
        return self.num_images / self.seconds if self.seconds > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        """Flat numeric summary (for MLflow)."""
        out: dict[str, float] = {f"images_{s}": float(n) for s, n in self.images.items()}
        out |= {f"boxes_{s}": float(n) for s, n in self.boxes.items()}
        out |= {"num_classes": float(len(self.classes)), "rejected_images": float(self.rejected_images),
                "rejected_problems": float(len(self.rejected)), "seconds": self.seconds,
                "images_per_second": self.images_per_second}
        return out

    def summary(self) -> str:
        """A few lines for the console."""
        split_text = ", ".join(f"{s} {self.images[s]}" for s in SPLITS)
        lines = [
            f"prepared {self.num_images} images ({split_text}), {sum(self.boxes.values())} boxes, "
            f"{self.image_size}x{self.image_size}, from {self.source}",
            f"classes ({len(self.classes)}): {', '.join(self.classes)}",
            f"rejected: {self.rejected_images} image(s)"
            + (f", see {self.out_dir}/{REJECTED_FILE}" if self.rejected else ""),
            f"{self.images_per_second:.1f} images/s ({self.seconds:.1f} s, "
            f"{self.num_workers} worker(s)) -> {self.out_dir}",
        ]
        return "\n".join(lines)


def read_dataset(data: DataConfig) -> Reading:
    """The annotations named by ``data.source`` (images are decoded later)."""
    kind, _, arg = data.source.partition(":")
    if kind == "synthetic":
        return read_synthetic(num_images=data.synthetic_images,
                              num_classes=data.synthetic_classes, seed=data.seed)
    if kind == "voc":
        return read_voc(arg, classes=data.classes, use_imagesets=data.split == "imagesets")
    if kind == "coco":
        return read_coco(arg, image_root=data.image_root, classes=data.classes)
    raise DataError(f"data.source: {data.source!r} is not synthetic | voc:PATH | coco:PATH")


@contextlib.contextmanager
def _output_dir(out_dir: str) -> Iterator[Path]:
    """A fresh local folder to write the set into; on success it replaces ``out_dir`` whole
    (:func:`pipeline.files.atomic_dir`), or, for a bucket URI, is uploaded there with
    ``classes.json``, which every reader requires, removed first and written last."""
    if not is_uri(out_dir):
        with atomic_dir(out_dir) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="frcnn-prepare-") as tmp:
        yield Path(tmp)
        upload_folder(Path(tmp), out_dir, last=CLASSES_FILE)


def prepare_dataset(cfg: Config, *, progress: bool = True) -> PrepareResult:
    """Prepare ``cfg.data.source`` into ``cfg.data.out_dir`` (see the module docstring).

    Raises:
        DataError: ``"<file>: <problem>"``: a problem with ``on_invalid: error``; a dataset that
            cannot be read at all; or nothing (or no training image) left to write.
    """
    data = cfg.data
    start = time.perf_counter()
    reading = read_dataset(data)
    problems = list(reading.problems)
    if problems and data.on_invalid == "error":
        raise _refusal(problems)
    splits = reading.splits if reading.splits is not None else assign_splits(
        reading.listed_ids, val_fraction=data.val_fraction, test_fraction=data.test_fraction,
        seed=data.seed)

    boxes = dict.fromkeys(SPLITS, 0)
    with _output_dir(data.out_dir) as tmp:
        writers = {split: SplitWriter(split_path(tmp, split)) for split in SPLITS}
        results = process_items(reading.items, image_size=data.image_size, resize=data.resize,
                                image_format=data.image_format, num_workers=data.num_workers,
                                progress=progress)
        try:
            for result in results:
                if result.problems:
                    if data.on_invalid == "error":
                        raise _refusal(list(result.problems))
                    problems.extend(result.problems)
                    continue
                assert result.row is not None
                split = splits[result.image_id]
                writers[split].add(result.row)
                boxes[split] += len(result.row["labels"])
        except BaseException:
            for writer in writers.values():  # the error is what the caller sees
                writer.abort()
            raise
        finally:
            results.close()  # on an error: stop the workers now, not when garbage-collected
        for writer in writers.values():
            writer.close()
        images = {split: writers[split].rows for split in SPLITS}
        _check_splits(images, data, reading, problems)
        write_classes(tmp, classes=reading.classes, image_size=data.image_size,
                      resize=data.resize, image_format=data.image_format, source=data.source,
                      split=data.split, images=images, rejected_problems=len(problems),
                      digests={s: table_digest(split_path(tmp, s)) for s in SPLITS})
        if data.on_invalid == "skip":
            _write_rejected(tmp / REJECTED_FILE, problems)
    return PrepareResult(out_dir=data.out_dir if is_uri(data.out_dir) else Path(data.out_dir),
                         source=data.source, classes=reading.classes,
                         images=images, boxes=boxes, rejected=tuple(problems),
                         seconds=time.perf_counter() - start, num_workers=data.num_workers,
                         image_size=data.image_size)


# --------------------------------------------------------------------------------------------


def _refusal(problems: list[Problem]) -> DataError:
    shown = [p.message() for p in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        shown.append(f"... and {len(problems) - MAX_LISTED_PROBLEMS} more problem(s)")
    hint = ("(data.on_invalid=skip drops such images and lists them in "
            f"{REJECTED_FILE})")
    return DataError("\n  ".join(shown + [hint]))


def _check_splits(images: dict[str, int], data: DataConfig, reading: Reading,
                  problems: list[Problem]) -> None:
    where = data.source
    if sum(images.values()) == 0:
        raise DataError(f"{where}: no valid image left ({len(reading.listed_ids)} listed, "
                        f"{len(problems)} problem(s)): the dataset is empty")
    if images["train"] == 0:
        raise DataError(f"{where}: the train split is empty after rejecting invalid images")
    if reading.splits is None:
        for split, fraction in (("val", data.val_fraction), ("test", data.test_fraction)):
            if fraction > 0 and images[split] == 0:
                raise DataError(f"{where}: the {split} split is empty after rejecting invalid "
                                f"images (data.{split}_fraction = {fraction})")


def _write_rejected(path: Path, problems: list[Problem]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(REJECTED_COLUMNS)
        for p in problems:
            writer.writerow([p.source, p.reason, p.image_id,
                             "" if p.box_index is None else p.box_index])
