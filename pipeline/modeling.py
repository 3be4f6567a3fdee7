"""Config -> model: the one builder, model files read back, the RPN stage's weights carried
into the full model, and the anchor types a config leaves untrained.

Untrained types: with ``rpn.allow_border >= 0`` an anchor wider or taller than the image never
lies inside it, so its type is never labelled and its classifier and regressor channels get no
gradient; at inference its untrained boxes crowd the top proposals
(:func:`detector.anchors.untrained_anchor_types`). :func:`warn_untrained` is the warning the
training stages, the sweep's trials and ``frcnn anchors`` give; :data:`UNTRAINED_TAG` the MLflow
tag of their runs."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from pipeline.config import Config
from pipeline.errors import DataError, MissingInputError


UNTRAINED_TAG = "untrained_anchor_types"  # the MLflow tag of a run that leaves types untrained


def anchor_generator(cfg: Config):
    """The detector's anchor generator for the configured anchors."""
    from detector.anchors import AnchorGenerator

    return AnchorGenerator(stride=cfg.anchors.stride, scales=cfg.anchors.scales,
                           ratios=cfg.anchors.ratios, shapes=cfg.anchors.shapes)


def untrained_types(cfg: Config) -> list[tuple[float, float]]:
    """``(ratio, scale)`` of each anchor type with no trainable position at
    ``data.image_size`` under ``rpn.allow_border`` (see the module)."""
    from detector.anchors import untrained_anchor_types

    return untrained_anchor_types(anchor_generator(cfg), cfg.data.image_size,
                                  cfg.rpn.allow_border)


def describe_types(cfg: Config, types: Sequence[tuple[float, float]]) -> str:
    """``"ratio 0.5 x scale 32 (724x362 px), ..."`` (or ``"shape 24x40 px"``)."""
    from detector.anchors import describe_anchor_types

    return describe_anchor_types(anchor_generator(cfg), types)


def warn_untrained(cfg: Config, who: str) -> str | None:
    """Print a warning naming the anchor types ``cfg`` leaves untrained; returns its text (the
    value of the :data:`UNTRAINED_TAG` tag), or None when every type can train."""
    types = untrained_types(cfg)
    if not types:
        return None
    text = describe_types(cfg, types)
    print(f"{who}: warning: {len(types)} anchor type(s) never lie inside the "
          f"{cfg.data.image_size}x{cfg.data.image_size} image with rpn.allow_border="
          f"{cfg.rpn.allow_border:g} and are never trained: {text}; use rpn.allow_border=-1 or "
          f"smaller anchors", file=sys.stderr, flush=True)
    return text


def model_settings(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of :class:`detector.FasterRCNN` besides ``num_classes``: ``image_size``
    and its settings objects, from the config's sections (``backbone`` -> ``backbone``,
    ``anchors`` -> ``anchors``, ``rpn`` -> ``matching`` and ``proposals``, ``roi`` ->
    ``roi_sampling``, ``roi_head`` and ``detection``, both ``reg_weight`` -> ``loss_weights``);
    each settings field takes the config key of its name."""
    import detector

    def pick(cls: type, section: Any) -> Any:
        return cls(**{f.name: getattr(section, f.name) for f in dataclasses.fields(cls)})

    return {"image_size": cfg.data.image_size,
            "backbone": pick(detector.BackboneSettings, cfg.backbone),
            "anchors": pick(detector.AnchorSettings, cfg.anchors),
            "matching": pick(detector.AnchorMatching, cfg.rpn),
            "proposals": pick(detector.ProposalSettings, cfg.rpn),
            "roi_sampling": pick(detector.RoISampling, cfg.roi),
            "roi_head": pick(detector.RoIHeadSettings, cfg.roi),
            "detection": pick(detector.DetectionSettings, cfg.roi),
            "loss_weights": detector.LossWeights(rpn_reg=cfg.rpn.reg_weight,
                                                 roi_reg=cfg.roi.reg_weight)}


def build_model(cfg: Config, *, num_classes: int, stage: str) -> nn.Module:
    """``detector.FasterRCNN`` for ``stage`` (``rpn``: RPN losses only), built from the config
    (random or ImageNet initialisation, ``backbone.weights``). Untrained anchor types are the
    stage's to report (:func:`warn_untrained`, once, with the run's tag): the detector's own
    warning of them is silenced here."""
    import warnings

    from detector import FasterRCNN, UntrainedAnchorWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedAnchorWarning)
        return FasterRCNN(num_classes, rpn_only=(stage == "rpn"), **model_settings(cfg))


#: what the RPN stage trains, and :func:`init_from_rpn` carries into the full model
RPN_STAGE_PREFIXES = ("backbone.", "rpn.")


def init_from_rpn(model: nn.Module, path: str | Path) -> dict[str, int]:
    """Copy the backbone and RPN weights (the tensors under :data:`RPN_STAGE_PREFIXES`) of the
    RPN stage's model file into ``model``; the Fast R-CNN head keeps ``model``'s own
    initialisation (the RPN stage never trains it: the file's copy is its initialisation too).

    Returns:
        ``{"loaded": n, "new": m}``: tensors copied (backbone and RPN), tensors left at their
        initialisation (the Fast R-CNN head).

    Raises:
        MissingInputError: no model file (run ``frcnn train --stage rpn`` first).
        DataError: a tensor's shape differs (the RPN was built with other anchors / sizes), or
            the file lacks backbone / RPN tensors the model has.
    """
    from detector.serialization import load_model
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: RPN model not found; run `frcnn train --stage rpn` "
                                f"first")
    rpn, _ = load_model(path, map_location="cpu")
    source = {k: v for k, v in rpn.state_dict().items() if k.startswith(RPN_STAGE_PREFIXES)}
    target = model.state_dict()
    mismatched = [f"{k}: {tuple(v.shape)} in {path} vs {tuple(target[k].shape)}"
                  for k, v in source.items() if k in target and v.shape != target[k].shape]
    if mismatched:
        raise DataError(f"{path}: weights do not fit the configured model (different anchors, "
                        f"image size or classes?): {'; '.join(mismatched[:5])}")
    missing = sorted(k for k in target if k.startswith(RPN_STAGE_PREFIXES) and k not in source)
    unknown = sorted(set(source) - set(target))
    if missing or unknown:
        raise DataError(f"{path}: not this model's backbone and RPN: {len(missing)} tensors "
                        f"missing, {len(unknown)} unknown, e.g. {(missing + unknown)[:3]}")
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
