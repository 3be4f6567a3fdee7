"""Content digests that decide whether a run can be resumed: files and parameter sets.

A training stage's run key and a sweep's inputs key are both :func:`digest` of the parameters
that determine the result (:func:`params_subset` drops the operational ones: where things are
stored, logged or run) plus :func:`file_digest` of the data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def params_subset(tree: Mapping[str, Any], *, sections: Iterable[str],
                  exclude: Iterable[str] = ()) -> dict[str, Any]:
    """``tree`` (``Config.to_dict()``) restricted to ``sections``, without the ``section.key``
    entries of ``exclude``."""
    excluded = set(exclude)
    return {section: {k: v for k, v in tree[section].items() if f"{section}.{k}" not in excluded}
            for section in sections}


def params_at(tree: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """``{"section.key": value}`` of ``tree`` (``Config.to_dict()``) for each of ``keys``."""
    return {key: tree[key.split(".")[0]][key.split(".", 1)[1]] for key in keys}


def digest(value: Any, length: int = 16) -> str:
    """SHA-256 (first ``length`` hex digits) of a JSON-serialisable value, keys sorted."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]
