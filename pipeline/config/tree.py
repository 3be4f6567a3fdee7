"""Nested parameter trees (``{"section": {"key": value}}``): flattening, merging, setting."""

from __future__ import annotations

from typing import Any, Mapping

from pipeline.errors import ConfigError


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def deep_merge(base: dict[str, Any], new: Mapping[str, Any], origin: str) -> None:
    for key, value in new.items():
        if not isinstance(key, str):
            raise ConfigError(f"{origin}: keys must be strings, got {key!r}")
        if key == "space":  # a sweep space is replaced whole, not merged
            base[key] = value
        elif isinstance(value, Mapping) and isinstance(base.get(key), dict):
            deep_merge(base[key], value, origin)
        else:
            base[key] = dict(value) if isinstance(value, Mapping) else value


def set_dotted(tree: dict[str, Any], key: str, value: Any, origin: str) -> None:
    section, _, leaf = key.partition(".")
    if not leaf:
        raise ConfigError(f"{origin}: expected section.key, got {key!r}")
    node = tree.setdefault(section, {})
    if not isinstance(node, dict):
        raise ConfigError(f"{origin}: section {section!r} is not a mapping")
    if section == "sweep" and leaf.startswith("space."):
        node.setdefault("space", {})
        node["space"] = dict(node["space"] or {})
        node["space"][leaf[len("space."):]] = value
        return
    node[leaf] = value
