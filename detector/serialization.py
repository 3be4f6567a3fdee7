"""Saving and rebuilding a :class:`detector.FasterRCNN`: weights, constructor keywords, metadata.

A checkpoint is one ``torch.save`` file holding ``{"state_dict", "config", "meta"}``: the model's
state dict, its configuration (``model.config``: ``num_classes``, ``image_size`` and each
settings object as a dict) and free
metadata (plain Python values: numbers, strings, None, lists, tuples and dicts of them), so that
it loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detector.backbone import vgg16_blocks
from detector.model import FasterRCNN
from detector.settings import complete_config

__all__ = ["load_model", "save_model"]

_KEYS = ("state_dict", "config", "meta")
_PLAIN = (str, int, float, bool, type(None))


def _unwrap(model: nn.Module) -> nn.Module:
    """The FasterRCNN inside a DDP / DataParallel (``.module``) or compiled (``._orig_mod``) wrapper."""
    while not isinstance(model, FasterRCNN):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"save_model needs a detector.FasterRCNN, got {type(model).__name__}")
        model = inner
    return model


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be strings, got {k!r}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}; checkpoint metadata must be plain "
                    f"Python values (numbers, strings, None, lists, tuples, dicts)")


def save_model(path: str | os.PathLike, model: nn.Module, **meta: Any) -> Path:
    """Write ``model`` (unwrapped from DDP / compile) and ``meta`` to ``path``, atomically.

    The file is written to a temporary file in the same folder and moved over ``path`` with
    ``os.replace``, so a reader never sees half a checkpoint. Parent folders are created.

    Returns:
        the path written.
    """
    model = _unwrap(model)
    _check_plain(meta, "meta")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"state_dict": model.state_dict(), "config": dict(model.config), "meta": meta}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_model(path: str | os.PathLike,
               map_location: str | torch.device = "cpu") -> tuple[FasterRCNN, dict[str, Any]]:
    """Rebuild the model saved by :func:`save_model`; returns ``(model, meta)``.

    The model is built with backbone weights ``"none"`` (the saved weights replace them; nothing
    is downloaded) while ``model.config`` keeps the saved value; when that value is not
    ``"none"``, the first ``freeze_blocks`` conv blocks are frozen as the constructor froze
    them. Settings a checkpoint lacks (saved before they existed) take their defaults; a flat
    config of earlier versions is read too (:meth:`FasterRCNN.from_config`). It is returned in
    training mode on ``map_location``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is truncated, corrupt, not a checkpoint, or its weights do not fit
            its config (the message names the path and the problem).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable checkpoint, truncated or corrupt "
                         f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or any(k not in payload for k in _KEYS):
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: not a detector checkpoint (expected keys {list(_KEYS)}, "
                         f"found {found})")
    config = dict(payload["config"])
    if "num_classes" not in config:
        raise ValueError(f"{path}: checkpoint config has no num_classes")
    try:
        saved = complete_config(config)                 # every setting, defaults filled
        model = FasterRCNN.from_config({**saved, "backbone": {**saved["backbone"],
                                                              "weights": "none"}})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: cannot rebuild the model from its config ({exc})") from exc
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit the saved config ({exc})") from exc
    model.config["backbone"] = saved["backbone"]
    if saved["backbone"]["weights"] != "none":  # as FasterRCNN.__init__ after loading them
        vgg16_blocks(model.backbone.features, saved["backbone"]["freeze_blocks"]
                     ).requires_grad_(False)
    return model.to(map_location), dict(payload["meta"])
