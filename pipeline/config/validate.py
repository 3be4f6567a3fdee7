"""Checking values against the schema's declarations: types, bounds, the sweep space.

Every check raises :class:`pipeline.errors.ConfigError` naming the key (``section.key``), the
value given and what is allowed.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import re
import types
import typing
from typing import Any, Literal, Mapping

from pipeline.errors import ConfigError

SWEEP_DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
#: distributions that list their values (the others give ``[low, high]``)
LISTED = ("choice", "grid")


def build_section(cls: type, section: str, values: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, raw in values.items():
        if key not in fields:
            raise ConfigError(f"unknown key {section}.{key}; allowed: {', '.join(fields)}")
        name = f"{section}.{key}"
        value = coerce(raw, hints[key], name)
        check_bounds(value, fields[key].metadata, name)
        kwargs[key] = value
    return cls(**kwargs)


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if (isinstance(value, str) and value.lower() in ("null", "none", "~")
                and type(None) in args and str not in args):
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for candidate in inner:
            try:
                return coerce(value, candidate, name)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] + " (or null)")
    if origin is Literal:
        if isinstance(value, bool):  # YAML reads true/false as bools; literals are strings
            value = str(value).lower()
        if value not in args:
            allowed = ", ".join(map(str, args))
            raise ConfigError(f"{name}: {value!r} is not allowed; allowed: {allowed}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) == 0:
            raise ConfigError(f"{name}: expected a non-empty list, got {value!r}")
        if args[-1] is not Ellipsis and len(value) != len(args):  # tuple[float, float]: a pair
            raise ConfigError(f"{name}: expected a list of {len(args)} values, got {value!r}")
        return tuple(coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
    if origin in (collections.abc.Mapping, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        if abs(value) > 1e300 or not math.isfinite(value):  # abs() first: isfinite(10**400) raises
            raise ConfigError(f"{name}: expected a finite number, got {str(value)[:40]}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"{name}: unsupported annotation {tp!r}")  # programming error


def _numbers(value: Any) -> list[Any]:
    """``value`` itself, or the leaves of a (nested) tuple."""
    if isinstance(value, tuple):
        return [leaf for v in value for leaf in _numbers(v)]
    return [value]


def check_bounds(value: Any, meta: Mapping[str, Any], name: str) -> None:
    for v in _numbers(value):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        for op, bound, ok in (("ge", meta.get("ge"), lambda a, b: a >= b),
                              ("le", meta.get("le"), lambda a, b: a <= b),
                              ("gt", meta.get("gt"), lambda a, b: a > b),
                              ("lt", meta.get("lt"), lambda a, b: a < b)):
            if bound is not None and not ok(v, bound):
                raise ConfigError(f"{name}: {value!r} is out of range; "
                                  f"allowed: {range_text(meta)}")


def range_text(meta: Mapping[str, Any]) -> str:
    parts = []
    for op, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if meta.get(op) is not None:
            parts.append(f"{sym} {meta[op]}")
    return " and ".join(parts)


TUNABLE_SECTIONS = ("backbone", "anchors", "rpn", "roi", "train")


#: a listed value of ``anchors`` / ``anchors.shapes`` that the sweep resolves itself (shapes fitted
#: on the train split: :func:`pipeline.sweep.space.resolve_fit`)
FIT = "fit"


def check_sweep_space(cfg: Any) -> None:
    """Each ``sweep.space`` entry names a real ``section.key`` (or ``anchors``, whole anchor
    settings) and a valid distribution."""
    for key, spec in cfg.sweep.space.items():
        where = f"sweep.space.{key}"
        section, _, leaf = key.partition(".")
        fields = ({f.name for f in dataclasses.fields(getattr(cfg, section))}
                  if section in TUNABLE_SECTIONS else set())
        if leaf not in fields and key != "anchors":
            raise ConfigError(f"{where}: not a tunable parameter; use section.key with section one "
                              f"of {', '.join(TUNABLE_SECTIONS)}, or anchors (whole settings)")
        if not isinstance(spec, Mapping) or len(spec) != 1:
            kinds = " | ".join(SWEEP_DISTRIBUTIONS)
            raise ConfigError(f"{where}: expected one of {{{kinds}: ...}}")
        (kind, arg), = spec.items()
        if kind not in SWEEP_DISTRIBUTIONS:
            raise ConfigError(f"{where}: unknown distribution {kind!r}; allowed: "
                              f"{', '.join(SWEEP_DISTRIBUTIONS)}")
        if not isinstance(arg, (list, tuple)) or not arg:
            raise ConfigError(f"{where}.{kind}: expected a non-empty list, got {arg!r}")
        if kind not in LISTED and len(arg) != 2:
            raise ConfigError(f"{where}.{kind}: expected [low, high], got {arg!r}")
        if key == "anchors" and kind not in LISTED:
            raise ConfigError(f"{where}: whole anchor settings are listed: {{choice: [...]}} or "
                              f"{{grid: [...]}}")
        if kind == "grid" and cfg.sweep.search != "random":
            raise ConfigError(f"{where}.grid: a grid needs sweep.search=random ({cfg.sweep.search} "
                              f"samples every value itself: use choice)")
        for value in arg:  # every listed value / both ends must be valid
            if value == FIT and key in ("anchors", "anchors.shapes"):
                continue
            if key == "anchors":
                _validate_anchor_setting(cfg, value, where)
            else:
                _validate_value(cfg, key, value, where)


def _validate_anchor_setting(cfg: Any, value: Any, where: str) -> None:
    """A whole anchor setting: a mapping of ``anchors`` keys with valid values."""
    fields = [f.name for f in dataclasses.fields(cfg.anchors)]
    if not isinstance(value, Mapping) or not value or set(value) - set(fields):
        raise ConfigError(f"{where}: {value!r} is not an anchor setting; expected a mapping of "
                          f"{', '.join(fields)}, or {FIT}")
    for leaf, v in value.items():
        _validate_value(cfg, f"anchors.{leaf}", v, where)


def _validate_value(cfg: Any, key: str, value: Any, where: str) -> None:
    section, leaf = key.split(".", 1)
    cls = type(getattr(cfg, section))
    hints = typing.get_type_hints(cls)
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}[leaf]
    try:
        check_bounds(coerce(value, hints[leaf], key), meta, key)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


#: Where each kind of URI's credentials go instead of the URI (the scheme's own standard).
CREDENTIALS_GO = {
    "http": "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) "
            "in the environment",
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment, or an instance "
          "profile / IAM role",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS in the environment, or the instance's service account",
}
URI_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*)://[^/@\s]+@")


def check_no_credentials(flat: Mapping[str, Any]) -> None:
    """Refuse any parameter holding a URI with user info (``s3://KEY:SECRET@bucket``,
    ``http://user:password@host``): a URI travels into messages, Ray's pickled run and Tune
    state, MLflow and ``dvc.lock``; credentials go in the environment. The message shows the
    URI masked.

    Raises:
        ConfigError: naming the parameter and where its credentials go instead.
    """
    from pipeline.redaction import redact

    for key, value in flat.items():
        texts = [value] if isinstance(value, str) else \
            [v for v in value if isinstance(v, str)] if isinstance(value, (list, tuple)) else []
        for text in texts:
            found = URI_USERINFO.search(text)
            if found:
                scheme = found.group(1).lower()
                scheme = "http" if scheme == "https" else scheme
                where = CREDENTIALS_GO.get(scheme, "the environment (as the storage's own "
                                                   "client reads them)")
                raise ConfigError(f"{key}: {redact(text)}: credentials in a URI are refused "
                                  f"(they would be logged and pickled with the run); put them "
                                  f"in {where}")
