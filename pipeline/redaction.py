"""Credentials out of every text the pipeline logs or prints.

:func:`redact` masks the user-info of URIs (``http://user:pass@host`` -> ``http://***@host``,
``s3://KEY:SECRET@bucket`` -> ``s3://***@bucket``) and the value of every environment variable
whose name looks secret (``*SECRET*``, ``*PASSWORD*``, ``*TOKEN*``, ``*API_KEY*``,
``*ACCESS_KEY*``, ...; values of 8+ characters). :mod:`pipeline.tracking` applies it to
everything it sends to MLflow (parameters, tags, text artifacts, error texts); the stages apply
it to URIs in their messages and to the files they log.
"""

from __future__ import annotations

import os
import re

# scheme://user:password@host or scheme://token@host: everything between :// and @
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/@\s]+@")
_SECRET_NAMES = re.compile(r"(?i)(secret|password|passwd|token|credential|api_?key|access_?key"
                           r"|private_?key)")


def redact(text: str) -> str:
    """``text`` with URI credentials and secret environment values masked (see the module)."""
    text = _USERINFO.sub(r"\1***@", text)
    for name, value in _environ_snapshot().items():
        if len(value) >= 8 and _SECRET_NAMES.search(name) and value in text:
            text = text.replace(value, f"***{name}***")
    return text


def _environ_snapshot() -> dict[str, str]:
    """The environment now, safe while other threads change it (MLflow's telemetry thread
    deletes a variable of its own: ``os.environ.items()`` then raises KeyError mid-way)."""
    values = {name: os.environ.get(name) for name in list(os.environ)}
    return {name: value for name, value in values.items() if value is not None}
