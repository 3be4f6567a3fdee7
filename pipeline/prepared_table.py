"""The prepared set, the contract between ``prepare`` and every stage that reads it.

``<data.out_dir>/{train,val,test}.parquet``, ``classes.json`` and ``rejected.csv``: their names,
columns and readers live here and nowhere else. A split is one Parquet file, or, when it has more
than :data:`pipeline.prepare.writer.ROWS_PER_FILE` rows, a folder of that name holding
``part-00000.parquet``, ... (as Spark writes a table): read as one table by
:class:`PreparedTable` here, by ``pyarrow.parquet.read_table`` and by Ray Data, which reads the
files in parallel. Row groups of :data:`pipeline.prepare.writer.ROW_GROUP_ROWS` images.

One row per image, sorted by ``image_id``:

==============  =======================  ===================================================
column          Arrow type               meaning
==============  =======================  ===================================================
image_id        string                   id in the source dataset (VOC file stem, COCO id)
source          string                   the original image file (``synthetic:SEED:INDEX``)
orig_width      int32                    original image size, pixels
orig_height     int32
image           binary                   the resized ``S x S`` RGB image, PNG or JPEG bytes
boxes           list<fixed_size_list     ``(N, 4)`` x1y1x2y2 in the ``S``-pixel frame
                <float32>[4]>
labels          list<int64>              ``(N,)`` class ids 1..K (0 is background)
difficult       list<bool>               ``(N,)`` VOC ``<difficult>1``
crowd           list<bool>               ``(N,)`` COCO ``iscrowd: 1`` (a region of many objects)
scale_x         float64                  ``x_resized = x_orig * scale_x + pad_x``
scale_y         float64                  ``y_resized = y_orig * scale_y + pad_y``
pad_x           float64                  letterbox offset (0 for stretch)
pad_y           float64
==============  =======================  ===================================================

``S`` is ``classes.json``'s ``"image_size"``. :mod:`pipeline.training.loader` turns the tables
into training batches, :func:`read_ground_truth` reads the boxes of a split for evaluation,
:func:`row_resize_info` maps a row's boxes back to its original image.

``classes.json``: ``"classes"`` (names of ids 1..K), ``"background": 0``, ``"image_size"``, the
resize mode, image format, source (credentials masked) and per-split image counts
(:func:`write_classes`, :func:`read_classes`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.digests import file_digest
from pipeline.errors import DataError, MissingInputError
from pipeline.images import ResizeInfo
from pipeline.redaction import redact
from pipeline import storage
from pipeline.storage import exists, file_size, is_uri, list_folder, read_text

if TYPE_CHECKING:
    pass

SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("source", pa.string()),
    ("orig_width", pa.int32()),
    ("orig_height", pa.int32()),
    ("image", pa.binary()),
    ("boxes", pa.list_(pa.list_(pa.float32(), 4))),
    ("labels", pa.list_(pa.int64())),
    ("difficult", pa.list_(pa.bool_())),
    ("crowd", pa.list_(pa.bool_())),
    ("scale_x", pa.float64()),
    ("scale_y", pa.float64()),
    ("pad_x", pa.float64()),
    ("pad_y", pa.float64()),
])
SPLITS = ("train", "val", "test")
#: The columns the model's readers need (training, evaluation, the sweep's trial tables).
MODEL_COLUMNS = ("image_id", "image", "boxes", "labels", "difficult", "crowd")
CLASSES_FILE = "classes.json"
REJECTED_FILE = "rejected.csv"
REJECTED_COLUMNS = ("source", "reason", "image_id", "box_index")


def split_path(folder: str | Path, split: str) -> Path | str:
    """``<folder>/<split>.parquet``: a Path, or a URI string for a set in a bucket."""
    return _join(folder, f"{split}.parquet")


def _join(folder: str | Path, name: str) -> Path | str:
    return f"{str(folder).rstrip('/')}/{name}" if is_uri(folder) else Path(folder) / name


def _parent(path: str | Path) -> Path | str:
    return str(path).rstrip("/").rpartition("/")[0] if is_uri(path) else Path(path).parent


def _name(path: str | Path) -> str:
    return str(path).rstrip("/").rpartition("/")[2]


def _parquet(file: str | Path) -> pq.ParquetFile:
    """A Parquet file of a prepared table, local or in a bucket (opened, not read)."""
    if not is_uri(file):
        return pq.ParquetFile(file)
    fs, path = storage.fs_of(str(file))
    return pq.ParquetFile(fs.open_input_file(path))


def write_classes(folder: str | Path, *, classes: Sequence[str], image_size: int, resize: str,
                  image_format: str, source: str, split: str, images: Mapping[str, int],
                  rejected_problems: int, digests: Mapping[str, str]) -> Path:
    """Write ``classes.json`` into ``folder`` (a folder being prepared; not atomic itself).
    ``digests``: each split's :func:`table_digest`, recorded for a set that readers find in a
    bucket, where hashing the table at every start would read all of it."""

    info = {
        "background": 0,
        "classes": list(classes),
        "ids": {name: i + 1 for i, name in enumerate(classes)},
        "num_classes": len(classes),
        "id_convention": "labels are 1..K in the order of 'classes'; 0 is background",
        "image_size": image_size,
        "resize": resize,
        "image_format": image_format,
        "box_format": "x1, y1, x2, y2 float pixels of the image_size x image_size image",
        "source": redact(source),
        "split": split,
        "images": dict(images),
        "rejected_problems": rejected_problems,
        "digests": dict(digests),
    }
    path = Path(folder) / CLASSES_FILE
    path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return path


def read_classes(folder: str | Path, *, image_size: int | None = None) -> dict[str, Any]:
    """``classes.json`` of a prepared set: ``{"classes": [names, id 1 first], "image_size": S,
    ...}``.

    Args:
        image_size: when given, the set must have been prepared at this size
            (``data.image_size``).

    Raises:
        MissingInputError: no ``classes.json`` (run ``frcnn prepare`` first).
        DataError: the file is not JSON, has no non-empty ``classes`` list or no ``image_size``,
            or was prepared at another size.
    """
    path = _join(folder, CLASSES_FILE)
    text = read_text(str(path)) if is_uri(path) else \
        Path(path).read_text(encoding="utf-8") if Path(path).is_file() else None
    if text is None:
        raise MissingInputError(f"{redact(str(path))}: not found; run `frcnn prepare` first")
    try:
        info = json.loads(text)
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); run `frcnn prepare` again") from None
    if not isinstance(info, dict) or not isinstance(info.get("classes"), list) \
            or not info["classes"]:
        got = info.get("classes") if isinstance(info, dict) else info
        raise DataError(f"{path}: expected a non-empty 'classes' list, got {got!r}")
    if not isinstance(info.get("image_size"), int):
        raise DataError(f"{path}: expected an integer 'image_size', "
                        f"got {info.get('image_size')!r}")
    if image_size is not None and info["image_size"] != image_size:
        raise DataError(f"{path}: prepared at image_size {info['image_size']} but "
                        f"data.image_size is {image_size}; run `frcnn prepare`")
    return info


def table_files(path: str | Path) -> list[Path] | list[str]:
    """The Parquet files of a prepared table: the file itself, or a folder's
    ``part-*.parquet`` in order (:class:`pipeline.prepare.writer.SplitWriter` writes a folder
    when a split has more than ``ROWS_PER_FILE`` rows). URIs for a table in a bucket."""
    if is_uri(path):
        listed = list_folder(str(path))
        if listed is not None:
            return [f for f in listed if _name(f).startswith("part-") and f.endswith(".parquet")]
        return [str(path)] if exists(str(path)) else []
    path = Path(path)
    if path.is_dir():
        return sorted(path.glob("part-*.parquet"))
    return [path] if path.is_file() else []


class PreparedTable:
    """A prepared table of one file or a folder of part files, read as one: its rows numbered
    across the files in order, its row groups likewise (the subset of ``pyarrow.parquet.
    ParquetFile``'s interface the readers use). Holds only paths and counts: it pickles small
    and opens a file when a row group of it is read."""

    def __init__(self, path: str | Path) -> None:
        self.path = path if is_uri(path) else Path(path)
        self.files = table_files(self.path)
        if not self.files:
            raise MissingInputError(f"{redact(str(self.path))}: prepared table not found; run "
                                    f"`frcnn prepare`")
        self._groups: list[tuple[int, int, int]] = []    # (file, row group in it, rows)
        for f, file in enumerate(self.files):
            meta = _parquet(file).metadata                # each footer read once
            if f == 0:
                self.schema_arrow = meta.schema.to_arrow_schema()
            self._groups += [(f, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        self.num_rows = sum(rows for *_, rows in self._groups)

    @property
    def num_row_groups(self) -> int:
        return len(self._groups)

    def row_group_rows(self, group: int) -> int:
        return self._groups[group][2]

    def read_row_group(self, group: int, columns: Sequence[str] | None = None) -> pa.Table:
        f, g, _ = self._groups[group]
        return _parquet(self.files[f]).read_row_group(g, columns=columns)

    def read(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The whole table (small columns only, please: the image column of a large set does
        not fit in memory)."""
        return pa.concat_tables(_parquet(f).read(columns=columns) for f in self.files)

    @property
    def num_bytes(self) -> int:
        """Stored bytes of all its files."""
        return sum(file_size(str(f)) if is_uri(f) else Path(f).stat().st_size
                   for f in self.files)


def table_digest(path: str | Path) -> str:
    """SHA-256 of a prepared table's content: of its file (:func:`pipeline.digests.file_digest`)
    or, for a folder of part files, of their names and digests in order. For a table in a
    bucket, the digest ``prepare`` recorded in ``classes.json`` (hashing it would read it all).

    Raises:
        MissingInputError: no such table.
        DataError: a table in a bucket whose ``classes.json`` records no digest for it.
    """
    import hashlib

    if is_uri(path):
        if not table_files(path):
            raise MissingInputError(f"{redact(str(path))}: prepared table not found; run "
                                    f"`frcnn prepare`")
        recorded = read_classes(_parent(path)).get("digests", {}).get(_name(path)[:-8])
        if not isinstance(recorded, str):
            raise DataError(f"{redact(str(path))}: its classes.json records no digest of it "
                            f"(prepared by an older version); run `frcnn prepare` again")
        return recorded
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    files = table_files(path)
    if not files:
        raise MissingInputError(f"{path}: prepared table not found; run `frcnn prepare`")
    parts = [[f.name, file_digest(f)] for f in files]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def open_table(path: str | Path, columns: Sequence[str] = MODEL_COLUMNS) -> PreparedTable:
    """A prepared table, checked to exist and to hold ``columns``.

    Raises:
        MissingInputError: no such file or folder of part files (run ``frcnn prepare``).
        DataError: a column is missing.
    """
    table = PreparedTable(path)
    missing = [c for c in columns if c not in table.schema_arrow.names]
    if missing:
        raise DataError(f"{table.path}: missing column(s) {', '.join(missing)}; expected "
                        f"{', '.join(columns)}")
    return table


def read_image_bytes(path: str | Path, indices: Sequence[int]) -> list[bytes]:
    """The stored PNG / JPEG bytes of rows ``indices`` of a prepared table, reading only the
    row groups that hold them (never the whole image column)."""
    import bisect
    import itertools

    table = PreparedTable(path)
    sizes = [table.row_group_rows(g) for g in range(table.num_row_groups)]
    starts = list(itertools.accumulate(sizes, initial=0))
    out: dict[int, bytes] = {}
    by_group: dict[int, list[int]] = {}
    for i in indices:
        if not 0 <= i < starts[-1]:
            raise IndexError(f"{path}: no row {i} (the table has {starts[-1]})")
        by_group.setdefault(bisect.bisect_right(starts, i) - 1, []).append(i)
    for group, rows in by_group.items():
        images = table.read_row_group(group, columns=["image"]).column("image")
        for i in rows:
            out[i] = images[i - starts[group]].as_py()
    return [out[i] for i in indices]


def load_split(out_dir: str | Path, split: str, columns: list[str] | None = None):
    """One split as a pandas DataFrame (all columns unless ``columns`` is given).

    Training reads the tables through :mod:`pipeline.training.loader`; this is for inspection
    and tests.
    """
    return pq.read_table(Path(out_dir) / f"{split}.parquet", columns=columns).to_pandas()


def row_resize_info(row: Mapping[str, Any], image_size: int) -> ResizeInfo:
    """The :class:`ResizeInfo` that maps this row's boxes back to the original image."""
    return ResizeInfo(int(row["orig_width"]), int(row["orig_height"]), int(image_size),
                      float(row["scale_x"]), float(row["scale_y"]),
                      float(row["pad_x"]), float(row["pad_y"]))
