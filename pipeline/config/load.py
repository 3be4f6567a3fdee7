"""Loading the configuration: YAML files and ``--set`` overrides -> a validated ``Config``.

``params.yaml`` (plus any overlay files, later ones winning) plus ``--set section.key=value``
overrides are merged into a plain nested dict, then turned into the frozen dataclasses of
:mod:`pipeline.config.schema`. Unknown keys, wrong types and out-of-range values raise
:class:`pipeline.errors.ConfigError` naming the key, what was given, and what is allowed, before
any work starts.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from pipeline.config.schema import Config, from_dict
from pipeline.config.tree import deep_merge, plain, set_dotted
from pipeline.config.validate import range_text
from pipeline.errors import ConfigError


def load_config(params: Sequence[str | Path] = ("params.yaml",),
                overrides: Sequence[str] = ()) -> Config:
    """Read YAML files (later ones win, merged key by key), apply ``section.key=value`` strings.

    Raises:
        ConfigError: a file is missing or not a mapping, or any key/value is invalid.
    """
    tree: dict[str, Any] = {}
    for path in params:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: parameter file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, ValueError, RecursionError) as exc:
            # ValueError: not UTF-8, or an integer beyond Python's 4300-digit limit;
            # RecursionError: nesting too deep
            raise ConfigError(f"{path}: not valid YAML: {str(exc)[:300]}") from None
        if loaded is None:
            continue
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, "
                              f"got {type(loaded).__name__}")
        deep_merge(tree, loaded, origin=str(path))
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(tree, key, value, origin=f"--set {item}")
    return from_dict(tree)


def parse_override(item: str) -> tuple[str, Any]:
    """``"rpn.pos_iou=0.6"`` -> ``("rpn.pos_iou", 0.6)``; the value is parsed as YAML."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    parts = key.split(".", 1)
    if key.count(".") < 1 or not all(part.isidentifier() or "." in part for part in parts):
        raise ConfigError(f"--set {item!r}: expected section.key=value, got key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):
        value = raw  # not YAML: keep the literal string, validation decides
    return key, value


def describe(sections: Sequence[str] | None = None) -> str:
    """Every parameter (of ``sections``, default all) with its default and allowed values: the
    text of ``--help``'s epilog."""
    lines = []
    for section in dataclasses.fields(Config):
        if sections is not None and section.name not in sections:
            continue
        cls = section.default_factory  # type: ignore[misc]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else "{}"
            allowed = range_text(f.metadata) if f.metadata else ""
            tp = hints[f.name]
            if typing.get_origin(tp) is Literal:
                allowed = " | ".join(map(str, typing.get_args(tp)))
            doc = f.metadata.get("doc", "") if f.metadata else ""
            extra = "; ".join(x for x in (allowed, doc) if x)
            lines.append(f"  {section.name}.{f.name} = {plain(default)!r}"
                         + (f"  ({extra})" if extra else ""))
    return "\n".join(lines)
