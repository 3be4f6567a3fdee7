"""Files in a local folder or a bucket (``s3://``, ``gs://``, ...) alike, through ``pyarrow.fs``.

Where Ray Train and Tune keep runs (``train.storage_path``, ``sweep.storage_path``) may be
either; the stages read and write their own small files there (run state, trial markers) with
these helpers. A local path is used absolute; a URI unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def resolve(root: str) -> str:
    """A storage root as Ray wants it: an absolute folder, or a URI unchanged (no trailing /)."""
    return root.rstrip("/") if "://" in root else str(Path(root).resolve())


def fs_of(uri: str) -> tuple[Any, str]:
    """``(pyarrow FileSystem, path in it)`` of a folder path or URI."""
    import pyarrow.fs
    return pyarrow.fs.FileSystem.from_uri(uri if "://" in uri else Path(uri).resolve().as_uri())


def exists(uri: str) -> bool:
    import pyarrow.fs
    fs, path = fs_of(uri)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def read_text(uri: str) -> str | None:
    """The file's text, or None when there is no such file."""
    import pyarrow.fs
    fs, path = fs_of(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def read_json(uri: str) -> dict[str, Any]:
    """A JSON object file; ``{}`` when there is no such file."""
    text = read_text(uri)
    return json.loads(text) if text is not None else {}


def write_bytes(uri: str, data: bytes) -> None:
    """Write a file, making its folder."""
    fs, path = fs_of(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def delete_dir(uri: str) -> None:
    """Delete a folder and what it holds; nothing when it is not there."""
    if exists(uri):
        fs, path = fs_of(uri)
        fs.delete_dir(path)
