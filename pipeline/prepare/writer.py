"""Streaming the prepared rows into Parquet files (the schema is :mod:`pipeline.prepared`'s)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.prepared import SCHEMA

#: Rows per Parquet row group: what a reader holds of the images at a time (the training loader
#: reads one row group per image it needs: 16 PNGs at 640 px are ~6 MiB).
ROW_GROUP_ROWS = 16
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


class SplitWriter:
    """Streams rows into one Parquet file, ``ROW_GROUP_ROWS`` at a time (bounded memory)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = 0
        self._buffer: list[dict[str, Any]] = []
        self._writer = pq.ParquetWriter(path, SCHEMA, compression=COMPRESSION)

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
