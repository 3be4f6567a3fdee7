"""The sweep's search space, each trial's configuration, and the metric names a trial reports.

``sweep.space`` (``params.yaml``) maps a tunable ``section.key`` to one distribution, checked by
:mod:`pipeline.config` (every choice and both ends of a range must be valid values of the key):

- ``{choice: [v1, v2, ...]}``: one of the values; a value may itself be a list
  (``anchors.scales: {choice: [[8, 16, 32], [4, 8, 16]]}`` chooses among sets);
- ``{grid: [v1, v2, ...]}``: every value, each in its own trials (Tune's ``grid_search``: the
  trials are ``sweep.num_samples`` x the product of the grids' lengths); random search only;
- ``{uniform: [low, high]}``, ``{loguniform: [low, high]}``: a float;
- ``{randint: [low, high]}``: an integer, both ends included.

Whole anchor settings: the key ``anchors`` (no ``.key``) chooses among settings of the anchors
section, each a mapping of its keys or ``fit``::

    anchors: {grid: [{scales: [8, 16, 32]}, {scales: [2, 4, 8, 16]}, fit]}

A setting overrides the keys it gives, and sets ``anchors.shapes`` null unless it gives shapes
(so ``{scales: [4, 8, 16]}`` keeps the configured ratios and drops any configured shapes);
``fit`` is ``anchors.shapes`` fitted by :func:`pipeline.anchor_coverage.fit_shapes` on the train
split (never the split the trials are scored on), as many shapes as the configured anchors have
per cell, once when the sweep starts
(:func:`resolve_fit`). ``anchors.shapes`` choices may be ``fit`` too.

Every key must act on what a trial measures: a trial trains the RPN alone and scores its
proposals at every budget of ``eval.proposal_budgets``, so the keys of :func:`inert_reason`
(the training proposal layer, the RoI head, the settings the sweep sets itself, operational
settings) are refused before any work.

List-valued choices travel through Tune as their YAML text (``"[8, 16, 32]"``): Optuna's
categorical distributions take only scalars, and the text reads well in Tune's trial table.
:func:`decode` maps them back.

A trial trains the RPN with ``base.replace(sampled)`` adjusted by :func:`trial_config`: at
``sweep.image_size`` (0, the default: ``data.image_size``; the prepared images are resized for
the sweep otherwise), for ``sweep.epochs`` epochs, on ``sweep.workers_per_trial`` workers.
Sampled values are always in the frame of ``data.image_size`` (what ``frcnn train`` will use),
so a trial at another size scales the pixel-sized settings by ``sweep.image_size /
data.image_size``: anchor sizes (``anchors.scales`` x ``anchors.stride``, or ``anchors.shapes``)
and ``rpn.min_size``. The stride stays 16 pixels, though, so at a smaller size the anchor
centres are coarser relative to the objects and small anchors lose coverage most: such a sweep
under-rates small-scale settings (:func:`size_warning`). The counts (``rpn.num_samples``,
pre-NMS top-N) are not scaled.
"""

from __future__ import annotations

from typing import Any, Mapping

import yaml

from pipeline.config import Config, ConfigError
from pipeline.config.schema import operational_keys
from pipeline.config.validate import FIT, LISTED
from pipeline.evaluation.metrics import MEAN_CLASS

#: ``sweep.metric`` values besides ``AR@<N>``: proposal recall at IoU 0.5 / 0.7 of the top 300
#: proposals (when 300 is a budget), named as :func:`pipeline.evaluation.metrics.split_metrics` names them.
RECALL_AT_300 = ("recall@0.5/300", "recall@0.7/300")

_RPN_ONLY = "trials train the RPN alone"
_OPERATIONAL = "operational: where and how a run executes, not what it learns"
#: ``sweep.space`` keys a trial never reads, and why
INERT = {
    "rpn.pre_nms_top_n_train": f"{_RPN_ONLY}, which never runs the training proposal layer",
    "rpn.post_nms_top_n_train": f"{_RPN_ONLY}, which never runs the training proposal layer",
    "rpn.post_nms_top_n_test": "recall is scored at every eval.proposal_budgets, which set how "
                               "many proposals are kept",
    "anchors.stride": "the backbone fixes it (16)",
    "train.frcnn_epochs": _RPN_ONLY,
    "train.rpn_epochs": "sweep.epochs sets a trial's epochs",
    "train.num_workers": "sweep.workers_per_trial sets a trial's workers",
    "train.use_gpu": "sweep.gpus_per_trial sets a trial's devices",
    "train.cpus_per_worker": "sweep.cpus_per_trial sets a trial's resources",
    "train.gpus_per_worker": "sweep.gpus_per_trial sets a trial's resources",
    "train.checkpoint_every": "trials report at epoch ends",
    "eval.splits": "trials score sweep.split",
    "eval.num_pictures": "trials draw no pictures",
    **{key: _OPERATIONAL for key in operational_keys()
       if key.split(".")[0] in ("train", "eval") and key not in (
           "train.use_gpu", "train.cpus_per_worker", "train.gpus_per_worker",
           "train.checkpoint_every")},
}


def key_params() -> list[str]:
    """``section.key`` of every parameter a sweep's results depend on: ``data.image_size`` and
    the model, training, evaluation and sweep sections, less the operational parameters and
    the ones a trial never reads (:data:`INERT`). The sweep's resume key
    (:func:`pipeline.sweep.data.inputs_key`) and ``dvc.yaml``'s params of ``sweep`` are this
    list (checked in ``tests/test_layout.py``)."""
    left_out = {*operational_keys(), *INERT}
    tree = Config().to_dict()
    return ["data.image_size", *(f"{section}.{key}" for section in
                                 ("backbone", "anchors", "rpn", "roi", "train", "eval", "sweep")
                                 for key in tree[section] if f"{section}.{key}" not in left_out)]


def metric_names(budgets: tuple[int, ...] | list[int]) -> list[str]:
    """What a trial reports each epoch and ``sweep.metric`` may name, for ``eval.proposal_budgets``.

    ``AR@<N>`` for every budget, ``recall@0.5/300`` and ``recall@0.7/300`` when 300 is a budget,
    and each of them as the mean over classes (``AR@<N>/mean_class``, ``recall@0.5/300/
    mean_class``: every class weighs the same), as
    :func:`pipeline.evaluation.metrics.split_metrics` names them. Trials also report each class's
    ``AR@300/<class>`` and ``recall@<t>/300/<class>`` (not a choice for ``sweep.metric``).
    """
    names = [f"AR@{int(b)}" for b in sorted(budgets)]
    if 300 in budgets:
        names += list(RECALL_AT_300)
    return names + [f"{name}/{MEAN_CLASS}" for name in names]


def inert_reason(key: str, cfg: Config) -> str | None:
    """Why a trial never reads ``sweep.space`` key ``key`` under ``cfg``; None when it does."""
    if key in INERT:
        return INERT[key]
    if key.startswith("roi."):
        return f"{_RPN_ONLY}; the RoI head never runs"
    if key in ("anchors.scales", "anchors.ratios") and cfg.anchors.shapes:
        return "anchors.shapes is set, and replaces scales x ratios"
    if key == "anchors":
        for setting in next(iter(cfg.sweep.space[key].values())):
            if isinstance(setting, Mapping) and "stride" in setting:
                return f"anchors.stride in {encode(setting)}: {INERT['anchors.stride']}"
            if isinstance(setting, Mapping) and setting.get("shapes") and (
                    {"scales", "ratios"} & set(setting)):
                return (f"{encode(setting)} gives shapes, which replace its scales x ratios: "
                        f"give one or the other")
    return None


def check(cfg: Config) -> None:
    """Sweep settings that :mod:`pipeline.config` cannot check alone.

    Raises:
        ConfigError: a key of the space that no trial reads (naming it and why), a whole
            ``anchors`` setting beside ``anchors.<key>`` entries, ``sweep.metric`` not reported
            (naming what is), or an empty space.
    """
    if not cfg.sweep.space:
        raise ConfigError("sweep.space: empty; name at least one section.key to sweep")
    for key in cfg.sweep.space:
        reason = inert_reason(key, cfg)
        if reason:
            raise ConfigError(f"sweep.space.{key}: a trial never reads it ({reason}); remove it "
                              f"from the space")
    if "anchors" in cfg.sweep.space:
        also = [k for k in cfg.sweep.space if k.startswith("anchors.")]
        if also:
            raise ConfigError(f"sweep.space.anchors: chooses whole anchor settings; "
                              f"{', '.join(also)} would be overridden by it: put them in its "
                              f"choices")
    allowed = metric_names(list(cfg.eval.proposal_budgets))
    if cfg.sweep.metric not in allowed:
        raise ConfigError(f"sweep.metric: {cfg.sweep.metric!r} is not reported by a trial; "
                          f"allowed (from eval.proposal_budgets): {', '.join(allowed)}")


def size_warning(cfg: Config) -> str | None:
    """The warning of a sweep whose trials run at another size than training; None when the
    sizes agree."""
    size, full = trial_image_size(cfg), cfg.data.image_size
    if size == full:
        return None
    return (f"sweep: warning: trials train and score at {size} px but training runs at {full} px "
            f"(sweep.image_size): anchors scale by {size / full:g} while the stride stays 16 px, "
            f"so anchor centres are {full / size:g}x coarser relative to the objects and small "
            f"anchors lose most coverage: the sweep under-rates small-scale settings. The "
            f"anchors/... and ceiling/... columns are at {full} px; sweep.image_size: 0 scores "
            f"at {full} px")


def expand(sampled: Mapping[str, Any]) -> dict[str, Any]:
    """Decoded values -> ``{"section.key": value}`` overrides: a whole ``anchors`` setting
    becomes its keys, with ``anchors.shapes`` null unless it gives shapes."""
    out: dict[str, Any] = {}
    for key, value in sampled.items():
        if key == "anchors":
            out["anchors.shapes"] = None
            out.update({f"anchors.{k}": v for k, v in dict(value).items()})
        else:
            out[key] = value
    return out


def resolve_fit(cfg: Config, fit: Any) -> Config:
    """``cfg`` with every ``fit`` choice of the space replaced by ``{shapes: fit()}`` (``anchors``)
    or ``fit()`` (``anchors.shapes``); ``fit()`` is called once, only when the space has one."""
    space, shapes = {}, None
    for key, spec in cfg.sweep.space.items():
        (kind, arg), = spec.items()
        if key in ("anchors", "anchors.shapes") and kind in LISTED and FIT in arg:
            if shapes is None:
                shapes = [[float(w), float(h)] for w, h in fit()]
            value = {"shapes": shapes} if key == "anchors" else shapes
            arg = [value if v == FIT else v for v in arg]
        space[key] = {kind: arg}
    return cfg if shapes is None else cfg.replace({"sweep.space": space})


# --------------------------------------------------------------------------------------------
# Tune search space


def encode(value: Any) -> Any:
    """A choice as Tune carries it: lists and mappings become their YAML flow text, scalars
    stay."""
    if isinstance(value, (list, tuple)):
        return yaml.safe_dump(list(value), default_flow_style=True, width=10**6).strip()
    if isinstance(value, Mapping):
        return yaml.safe_dump(dict(value), default_flow_style=True, sort_keys=False,
                              width=10**6).strip()
    return value


def search_space(space: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``sweep.space`` -> Tune's ``param_space`` (``{"section.key": domain}``)."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.items():
        (kind, arg), = spec.items()
        if kind == "choice":
            out[key] = tune.choice([encode(v) for v in arg])
        elif kind == "grid":
            out[key] = tune.grid_search([encode(v) for v in arg])
        elif kind == "uniform":
            out[key] = tune.uniform(float(arg[0]), float(arg[1]))
        elif kind == "loguniform":
            out[key] = tune.loguniform(float(arg[0]), float(arg[1]))
        elif kind == "randint":
            out[key] = tune.randint(int(arg[0]), int(arg[1]) + 1)  # Tune's high is exclusive
        else:  # pipeline.config refuses other kinds first
            raise ConfigError(f"sweep.space.{key}: unknown distribution {kind!r}")
    return out


def trial_count(cfg: Config) -> int:
    """How many trials the sweep runs: ``sweep.num_samples`` x the length of every grid."""
    count = cfg.sweep.num_samples
    for spec in cfg.sweep.space.values():
        (kind, arg), = spec.items()
        count *= len(arg) if kind == "grid" else 1
    return count


def decode(space: Mapping[str, Mapping[str, Any]], sampled: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's Tune config -> ``{"section.key": value}`` as written in ``sweep.space``.

    Keys outside the space (none, normally) are ignored.

    Raises:
        ConfigError: a sampled choice is not one of the space's (the space changed under a
            resumed sweep).
    """
    out: dict[str, Any] = {}
    for key, spec in space.items():
        if key not in sampled:
            raise ConfigError(f"sweep.space.{key}: the trial has no value for it (was the space "
                              f"changed under a resumed sweep?)")
        (kind, arg), = spec.items()
        value = sampled[key]
        if kind in LISTED:
            encoded = [encode(v) for v in arg]
            if value not in encoded:
                raise ConfigError(f"sweep.space.{key}: trial value {value!r} is not one of "
                                  f"{encoded}")
            value = arg[encoded.index(value)]
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# Trial configuration


def trial_image_size(cfg: Config) -> int:
    """The side the trials train at: ``sweep.image_size``, or ``data.image_size`` when 0."""
    return cfg.sweep.image_size or cfg.data.image_size


def trial_config(base: Config, sampled: Mapping[str, Any]) -> Config:
    """The configuration one trial trains with (see the module docstring).

    Args:
        base: the sweep's resolved config.
        sampled: ``{"section.key": value}`` from :func:`decode`, in ``data.image_size``'s frame.

    Raises:
        ConfigError: the sampled values are invalid together (e.g. ``rpn.neg_iou`` above
            ``rpn.pos_iou``); the trial then ends as errored.
    """
    requested = base.replace(expand(sampled))
    size = trial_image_size(base)
    factor = size / base.data.image_size
    sweep = base.sweep
    overrides: dict[str, Any] = {
        "data.image_size": size,
        "anchors.scales": [s * factor for s in requested.anchors.scales],
        "anchors.shapes": (None if requested.anchors.shapes is None else
                           [[w * factor, h * factor] for w, h in requested.anchors.shapes]),
        "rpn.min_size": requested.rpn.min_size * factor,
        "train.rpn_epochs": sweep.epochs,
        "train.num_workers": sweep.workers_per_trial,
        "train.use_gpu": "true" if sweep.gpus_per_trial > 0 else "false",
        # reports only at epoch ends: every Tune result then carries the recall metrics
        "train.checkpoint_every": 0,
    }
    if sweep.cpus_per_trial > 0:
        overrides["train.cpus_per_worker"] = sweep.cpus_per_trial / sweep.workers_per_trial
    if sweep.gpus_per_trial > 0:
        overrides["train.gpus_per_worker"] = sweep.gpus_per_trial / sweep.workers_per_trial
    return requested.replace(overrides)


def trial_resources(cfg: Config) -> dict[str, float]:
    """Ray resources of a trial's Tune trainable: one ``trial_slot`` (which bounds how many
    run at once); with one worker the trainable trains itself, so it also holds the worker's
    resources (:func:`worker_resources`), which a multi-worker trial's workers hold instead."""
    if cfg.sweep.workers_per_trial > 1:
        return {"trial_slot": 1}
    return {"trial_slot": 1, **worker_resources(cfg)}


def worker_resources(cfg: Config) -> dict[str, float]:
    """Ray resources of each of a trial's workers: the trial's share split evenly, plus
    ``train.worker_resources``."""
    sweep = cfg.sweep
    resources = {**cfg.train.worker_resources,
                 "CPU": sweep.cpus_per_trial / sweep.workers_per_trial}
    if sweep.gpus_per_trial > 0:
        resources["GPU"] = sweep.gpus_per_trial / sweep.workers_per_trial
    return resources
