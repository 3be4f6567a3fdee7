"""The annotations of a prepared table (boxes, labels, difficult and crowd flags per image),
read without its image column: flat arrays for training and the sweep (:class:`Annotations`),
one tensor view per image for evaluation (:class:`GroundTruth`). The table itself:
:mod:`pipeline.prepared_table`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DataError
from pipeline.prepared_table import open_table
from pipeline.storage import is_uri

if TYPE_CHECKING:
    import torch


@dataclass
class GroundTruth:
    """The ground truth of one prepared split, in table order."""

    name: str
    path: Path
    image_ids: list[str]
    boxes: list[torch.Tensor]        # (G, 4) float32 each, x1y1x2y2 in the S-pixel frame
    labels: list[torch.Tensor]       # (G,) int64 each, 1..K
    difficult: list[torch.Tensor]    # (G,) bool each
    crowd: list[torch.Tensor] | None = None  # (G,) bool each; None: no crowd regions

    def __post_init__(self) -> None:
        if self.crowd is None:
            self.crowd = [d.new_zeros(d.shape) for d in self.difficult]

    def __len__(self) -> int:
        return len(self.image_ids)


@dataclass(frozen=True)
class Annotations:
    """The annotations of a prepared split in flat arrays: no Python object per box or image
    (1M images of 10 boxes: ~250 MB, against gigabytes as lists). Image ``i`` owns rows
    ``offsets[i]:offsets[i + 1]`` of ``boxes``, ``labels``, ``difficult`` and ``crowd``."""

    path: Path | str
    image_ids: pa.StringArray     # (N,)
    offsets: np.ndarray           # (N + 1,) int64
    boxes: np.ndarray             # (M, 4) float32, x1y1x2y2 in the S-pixel frame
    labels: np.ndarray            # (M,) int64, 1..K
    difficult: np.ndarray         # (M,) bool
    crowd: np.ndarray             # (M,) bool

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_id(self, index: int) -> str:
        return str(self.image_ids[index].as_py())

    def rows(self, index: int) -> slice:
        """Image ``index``'s rows of the flat arrays."""
        return slice(int(self.offsets[index]), int(self.offsets[index + 1]))


ANNOTATION_COLUMNS = ("image_id", "boxes", "labels", "difficult", "crowd")


def read_annotations(path: str | Path, *, data: bytes | None = None) -> Annotations:
    """A prepared table's annotations (:class:`Annotations`); the image column is not read.

    Args:
        path: the table's file; or, with ``data``, only its name in messages.
        data: the table's Parquet bytes, read instead of ``path``.

    Raises:
        MissingInputError: naming the path (run ``frcnn prepare``).
        DataError: a column is missing, or boxes, labels and flags disagree in an image.
    """
    columns = list(ANNOTATION_COLUMNS)
    if data is not None:
        names = pq.read_schema(pa.BufferReader(data)).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
        table = pq.read_table(pa.BufferReader(data), columns=columns)
    else:
        table = open_table(path, columns).read(columns=columns)
    return annotations_of(table, path)


def annotations_of(table: pa.Table, path: str | Path) -> Annotations:
    """:class:`Annotations` of rows of a prepared table already read (a Ray Data batch, a row
    group); ``path`` names them in errors.

    Raises:
        DataError: boxes, labels and flags disagree in an image.
    """
    import pyarrow.compute as pc

    path = path if is_uri(path) else Path(path)
    column = {name: table.column(name).combine_chunks() for name in ANNOTATION_COLUMNS}
    ids = column["image_id"]

    def lengths(name: str) -> np.ndarray:
        return pc.fill_null(pc.list_value_length(column[name]), -1).to_numpy()

    counts = np.maximum(lengths("boxes"), 0)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    boxes = column["boxes"].flatten().flatten().to_numpy(zero_copy_only=False)
    boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)   # a writable copy
    if boxes.shape[0] != offsets[-1]:  # a null box in a list: every later image would shift
        raise DataError(f"{path}: {int(offsets[-1])} boxes listed but {boxes.shape[0]} given "
                        f"(a box is null)")
    flat = {}
    for name in ("labels", "difficult", "crowd"):
        got = lengths(name)
        absent = got < 0  # a null list: no labels (an error unless no boxes), no flags (False)
        bad = np.flatnonzero(np.where(absent, 0 if name == "labels" else counts, got) != counts)
        if bad.size:
            i = int(bad[0])
            raise DataError(f"{path}: image {ids[i].as_py()!r} has {int(counts[i])} boxes but "
                            f"{max(int(got[i]), 0)} {name}")
        values = column[name].flatten().to_numpy(zero_copy_only=False)
        if name == "labels":
            flat[name] = np.array(values, dtype=np.int64)
        else:
            flags = np.zeros(int(offsets[-1]), dtype=bool)
            flags[np.repeat(~absent, counts)] = values
            flat[name] = flags
    return Annotations(path, ids, offsets, boxes, flat["labels"], flat["difficult"],
                       flat["crowd"])


def read_ground_truth(path: str | Path, name: str, *, data: bytes | None = None) -> GroundTruth:
    """The boxes, labels, difficult and crowd flags of a prepared table, image by image
    (:func:`read_annotations`, split into one tensor view per image).

    Raises:
        MissingInputError: naming the path (run ``frcnn prepare``).
        DataError: a column is missing, or boxes, labels and flags disagree in an image.
    """
    import torch

    ann = read_annotations(path, data=data)
    sizes = np.diff(ann.offsets).tolist()

    def split(values: np.ndarray) -> list[torch.Tensor]:
        return list(torch.from_numpy(values).split(sizes))

    return GroundTruth(name, Path(path), [str(i) for i in ann.image_ids.to_pylist()],
                       split(ann.boxes), split(ann.labels), split(ann.difficult),
                       split(ann.crowd))
