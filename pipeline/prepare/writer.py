"""Streaming the prepared rows into Parquet files (the schema is :mod:`pipeline.prepared_table`'s)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.prepared_table import SCHEMA

#: Rows per Parquet row group: what a reader holds of the images at a time (the training loader
#: reads one row group per image it needs: 16 PNGs at 640 px are ~6 MiB).
ROW_GROUP_ROWS = 16
#: Rows per file of a prepared table (a multiple of ROW_GROUP_ROWS): a split of more rows is a
#: folder of such files. Ray Data reads a table with a task per file, so files are the unit of
#: parallel reading and of the per-epoch shuffle of the training input: 2,048 images at 640 px
#: are ~1.1 GiB of PNG, and 1M images ~490 files.
ROWS_PER_FILE = 2048
#: The image bytes are PNG / JPEG, already compressed: stored as they are (a reader copies
#: them without a decompression pass); the other columns zstd.
def _compression() -> dict[str, str]:
    """``{leaf column path: codec}`` (nested columns are named by their Parquet paths, e.g.
    ``boxes.list.element.list.element``)."""
    buffer = pa.BufferOutputStream()
    pq.write_table(SCHEMA.empty_table(), buffer)
    schema = pq.ParquetFile(pa.BufferReader(buffer.getvalue())).schema
    paths = [schema.column(i).path for i in range(len(schema))]
    return {path: "NONE" if path == "image" else "ZSTD" for path in paths}


COMPRESSION = _compression()
#: Columns with min / max statistics in the footer: all but the image bytes, whose statistics
#: would be two whole images per row group (a 2,048-image file's footer: 592 KB with them, a few
#: KB without), read by every reader that opens the file (the driver, Ray Data's planning and
#: its read tasks); nothing filters on the image column.
STATISTICS = [path for path in COMPRESSION if path != "image"]


class SplitWriter:
    """Streams rows into a prepared table at ``path``, a row group of ``rows_per_group`` at a
    time (bounded memory): one Parquet file when the split holds at most ``rows_per_file`` rows, else a folder
    of part files of ``rows_per_file`` rows each (``path/part-00000.parquet``, ...), which Ray
    Data reads in parallel, a read task per file (:func:`pipeline.prepared_table.table_files`)."""

    def __init__(self, path: Path, rows_per_file: int = ROWS_PER_FILE,
                 rows_per_group: int = ROW_GROUP_ROWS) -> None:
        self.path = Path(path)
        self.rows = 0
        self.rows_per_file = rows_per_file
        self.rows_per_group = rows_per_group
        self._parts = self.path.with_name(f".{self.path.name}.parts")
        self._parts.mkdir(parents=True, exist_ok=True)
        self._files: list[Path] = []
        self._buffer: list[dict[str, Any]] = []
        self._writer: pq.ParquetWriter | None = None
        self._file_rows = 0

    def add(self, row: Mapping[str, Any]) -> None:
        self._buffer.append(dict(row))
        if len(self._buffer) >= self.rows_per_group:
            self._flush()

    def close(self) -> None:
        """Write what is left and put the table at ``path``."""
        self._flush()
        if self._writer is None:  # an empty split is still a readable table with the schema
            self._open().write_table(SCHEMA.empty_table())
        self._writer.close()
        if len(self._files) == 1:
            self._files[0].replace(self.path)
            self._parts.rmdir()
        else:
            self._parts.replace(self.path)

    def abort(self) -> None:
        """Stop without writing more (an error elsewhere): close the open file and remove the
        parts; ``path`` is left as it was."""
        import shutil

        self._buffer = []
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        shutil.rmtree(self._parts, ignore_errors=True)

    def _open(self) -> pq.ParquetWriter:
        if self._writer is not None:
            self._writer.close()
        self._files.append(self._parts / f"part-{len(self._files):05d}.parquet")
        self._writer = pq.ParquetWriter(self._files[-1], SCHEMA, compression=COMPRESSION,
                                        write_statistics=STATISTICS)
        self._file_rows = 0
        return self._writer

    def _flush(self) -> None:
        if not self._buffer:
            return
        if self._writer is None or self._file_rows >= self.rows_per_file:
            self._open()
        self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=SCHEMA))
        self.rows += len(self._buffer)
        self._file_rows += len(self._buffer)
        self._buffer = []
