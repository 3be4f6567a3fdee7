"""Streaming the prepared rows into Parquet files (the schema is :mod:`pipeline.prepared`'s)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.prepared import SCHEMA

ROW_GROUP_ROWS = 32


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
