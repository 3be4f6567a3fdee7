"""The prepared tables: ``<out_dir>/{train,val,test}.parquet``, ``classes.json``, ``rejected.csv``.

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
difficult       list<bool>               ``(N,)`` VOC difficult / COCO iscrowd
scale_x         float64                  ``x_resized = x_orig * scale_x + pad_x``
scale_y         float64                  ``y_resized = y_orig * scale_y + pad_y``
pad_x           float64                  letterbox offset (0 for stretch)
pad_y           float64
==============  =======================  ===================================================

``S`` is ``classes.json``'s ``"image_size"``. :mod:`pipeline.data` turns the tables into training
batches; :func:`row_resize_info` maps a row's boxes back to its original image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.datasets.resize import ResizeInfo

SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("source", pa.string()),
    ("orig_width", pa.int32()),
    ("orig_height", pa.int32()),
    ("image", pa.binary()),
    ("boxes", pa.list_(pa.list_(pa.float32(), 4))),
    ("labels", pa.list_(pa.int64())),
    ("difficult", pa.list_(pa.bool_())),
    ("scale_x", pa.float64()),
    ("scale_y", pa.float64()),
    ("pad_x", pa.float64()),
    ("pad_y", pa.float64()),
])
ROW_GROUP_ROWS = 32
CLASSES_FILE = "classes.json"
REJECTED_FILE = "rejected.csv"
REJECTED_COLUMNS = ("source", "reason", "image_id", "box_index")


class SplitWriter:
    """Streams rows into one Parquet file, ``ROW_GROUP_ROWS`` at a time (bounded memory)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = 0
        self._buffer: list[dict[str, Any]] = []
        self._writer = pq.ParquetWriter(path, SCHEMA, compression="zstd")

    def add(self, row: Mapping[str, Any]) -> None:
        self._buffer.append(dict(row))
        if len(self._buffer) >= ROW_GROUP_ROWS:
            self._flush()

    def close(self) -> None:
        self._flush()
        if self.rows == 0:  # an empty split is still a readable table with the schema
            self._writer.write_table(SCHEMA.empty_table())
        self._writer.close()

    def _flush(self) -> None:
        if self._buffer:
            self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=SCHEMA))
            self.rows += len(self._buffer)
            self._buffer = []


def load_split(out_dir: str | Path, split: str, columns: list[str] | None = None):
    """One split as a pandas DataFrame (all columns unless ``columns`` is given).

    Training reads the tables through :mod:`pipeline.data`; this is for inspection and tests.
    """
    return pq.read_table(Path(out_dir) / f"{split}.parquet", columns=columns).to_pandas()


def row_resize_info(row: Mapping[str, Any], image_size: int) -> ResizeInfo:
    """The :class:`ResizeInfo` that maps this row's boxes back to the original image."""
    return ResizeInfo(int(row["orig_width"]), int(row["orig_height"]), int(image_size),
                      float(row["scale_x"]), float(row["scale_y"]),
                      float(row["pad_x"]), float(row["pad_y"]))
