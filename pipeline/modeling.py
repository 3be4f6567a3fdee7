"""Config -> model: the one builder, model files read back, and the RPN stage's weights carried
into the full model."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.config import Config
from pipeline.errors import DataError, MissingInputError


def model_kwargs(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of :class:`detector.FasterRCNN` (besides ``num_classes``).

    ``anchors.x`` -> ``anchor_x``, ``rpn.x`` -> ``rpn_x``, ``roi.x`` -> ``roi_x``,
    ``backbone.x`` -> ``backbone_x``; plus ``image_size``. Tuples stay tuples; everything is a
    plain value, so the dict can be stored in a checkpoint and loaded with ``weights_only=True``.
    """
    kwargs: dict[str, Any] = {"image_size": cfg.data.image_size}
    for prefix, section in (("backbone", cfg.backbone), ("anchor", cfg.anchors), ("rpn", cfg.rpn),
                            ("roi", cfg.roi)):
        for f in dataclasses.fields(section):
            kwargs[f"{prefix}_{f.name}"] = getattr(section, f.name)
    return kwargs


def build_model(cfg: Config, *, num_classes: int, stage: str) -> nn.Module:
    """``detector.FasterRCNN`` for ``stage`` (``rpn``: RPN losses only), built from the config
    (random or ImageNet initialisation, ``backbone.weights``)."""
    from detector import FasterRCNN
    return FasterRCNN(num_classes, rpn_only=(stage == "rpn"), **model_kwargs(cfg))


def init_from_rpn(model: nn.Module, path: str | Path) -> dict[str, int]:
    """Copy the backbone and RPN weights of the RPN stage's model file into ``model``.

    Returns:
        ``{"loaded": n, "new": m}``: tensors copied, tensors left at their initialisation
        (the Fast R-CNN head).

    Raises:
        MissingInputError: no model file (run ``frcnn train --stage rpn`` first).
        DataError: a tensor's shape differs (the RPN was built with other anchors / sizes).
    """
    from detector.serialization import load_model
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: RPN model not found; run `frcnn train --stage rpn` "
                                f"first")
    rpn, _ = load_model(path, map_location="cpu")
    source = rpn.state_dict()
    target = model.state_dict()
    mismatched = [f"{k}: {tuple(v.shape)} in {path} vs {tuple(target[k].shape)}"
                  for k, v in source.items() if k in target and v.shape != target[k].shape]
    if mismatched:
        raise DataError(f"{path}: weights do not fit the configured model (different anchors, "
                        f"image size or classes?): {'; '.join(mismatched[:5])}")
    unknown = sorted(set(source) - set(target))
    if unknown:
        raise DataError(f"{path}: {len(unknown)} tensors have no place in the model, e.g. "
                        f"{unknown[:3]}")
    model.load_state_dict(source, strict=False)
    return {"loaded": len(source), "new": len(set(target) - set(source))}


def load_model_file(path: str | Path, stage: str, device: Any = "cpu"
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, meta)`` of a model file written by ``frcnn train --stage <stage>``.

    Raises:
        MissingInputError: naming the missing file and the stage that writes it.
        DataError: the file is not a readable model (see
            :func:`detector.serialization.load_model`).
    """
    from detector.serialization import load_model

    if not Path(path).is_file():
        raise MissingInputError(f"{path}: model not found; train it first "
                                f"(`frcnn train --stage {stage}`, DVC stage train_{stage})")
    try:
        return load_model(path, map_location=device)
    except ValueError as exc:
        raise DataError(str(exc)) from None
