"""What every trial of a sweep trains and is measured on, and the key of a sweep's inputs.

:func:`trial_tables`: the first ``sweep.max_train_images`` images of ``data.out_dir``'s train
split and all of ``sweep.split``, resized to ``sweep.image_size`` (bilinear, boxes scaled) once
by the driver a row group at a time, as Parquet bytes; they reach the trials through Ray's
object store, so trials on other nodes need no shared folder. :func:`inputs_key`: what a
resumed sweep must share with the interrupted one.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any, Mapping

from pipeline.config import Config
from pipeline.digests import digest, params_at
from pipeline.errors import DataError
from pipeline.prepared_table import MODEL_COLUMNS, open_table, read_classes, split_path
from pipeline.sweep import space
from pipeline.sweep.space import trial_image_size



def _resize_rows(rows: list[dict[str, Any]], source: int, size: int) -> None:
    """Resize ``source``-pixel square images to ``size`` in place (PNG), scaling the boxes."""
    from PIL import Image

    from pipeline.images import resize_image

    factor = size / source
    for row in rows:
        with Image.open(io.BytesIO(row["image"])) as img:
            small, _ = resize_image(img.convert("RGB"), size, "stretch")
        out = io.BytesIO()
        small.save(out, format="PNG", compress_level=1)
        row["image"] = out.getvalue()
        row["boxes"] = [[float(v) * factor for v in box] for box in row["boxes"] or []]


def trial_tables(cfg: Config) -> dict[str, bytes]:
    """``{"train": Parquet bytes, "eval": Parquet bytes}`` (see the module docstring).

    Raises:
        MissingInputError: the prepared data is missing (run ``frcnn prepare``).
        DataError: it was prepared at another ``data.image_size``, or a table is empty.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    prepared = Path(cfg.data.out_dir)
    read_classes(prepared, image_size=cfg.data.image_size)
    size = trial_image_size(cfg)
    out = {}
    for name, split, limit in (("train", "train", cfg.sweep.max_train_images),
                               ("eval", cfg.sweep.split, 0)):
        path = split_path(prepared, split)
        source = open_table(path)
        schema = pa.schema([source.schema_arrow.field(c) for c in MODEL_COLUMNS])
        sink, rows = pa.BufferOutputStream(), 0
        with pq.ParquetWriter(sink, schema) as writer:
            # a row group at a time: the driver never holds a split's image column whole
            for group in range(source.num_row_groups):
                table = source.read_row_group(group, columns=list(MODEL_COLUMNS))
                if limit:
                    table = table.slice(0, limit - rows)
                if size != cfg.data.image_size:
                    resized = table.to_pylist()
                    _resize_rows(resized, cfg.data.image_size, size)
                    table = pa.Table.from_pylist(resized, schema=schema)
                writer.write_table(table)
                rows += table.num_rows
                if limit and rows >= limit:
                    break
        if rows == 0:
            raise DataError(f"{path}: no images: a sweep needs {split} images")
        out[name] = sink.getvalue().to_pybytes()
    return out


def inputs_key(cfg: Config, tables: Mapping[str, bytes]) -> str:
    """Digest of what a sweep's results depend on: parameters (not where things are stored or
    logged) and the trial tables. A resume needs the same key."""
    tree = cfg.to_dict()
    params = params_at(tree, space.key_params())
    return digest({"params": params,
                   "tables": {name: hashlib.sha256(data).hexdigest()
                              for name, data in sorted(tables.items())}})
