"""The sweep's search space, each trial's configuration, and the metric names a trial reports.

``sweep.space`` (``params.yaml``) maps a tunable ``section.key`` to one distribution, checked by
:mod:`pipeline.config` (every choice and both ends of a range must be valid values of the key):

- ``{choice: [v1, v2, ...]}``: one of the values; a value may itself be a list
  (``anchors.scales: {choice: [[8, 16, 32], [4, 8, 16]]}`` chooses among sets);
- ``{grid: [v1, v2, ...]}``: every value, each in its own trials (Tune's ``grid_search``: the
  trials are ``sweep.num_samples`` x the product of the grids' lengths); random search only;
- ``{uniform: [low, high]}``, ``{loguniform: [low, high]}``: a float;
- ``{randint: [low, high]}``: an integer, both ends included.

List-valued choices travel through Tune as their YAML text (``"[8, 16, 32]"``): Optuna's
categorical distributions take only scalars, and the text reads well in Tune's trial table.
:func:`decode` maps them back.

A trial trains the RPN with ``base.replace(sampled)`` adjusted by :func:`trial_config`: at
``sweep.image_size`` (the prepared images are resized for the sweep), for ``sweep.epochs``
epochs, on ``sweep.workers_per_trial`` workers. Sampled values are always in the frame of
``data.image_size`` (what ``frcnn train`` will use), so a trial at another size scales the
pixel-sized settings by ``sweep.image_size / data.image_size``: anchor sizes
(``anchors.scales`` x ``anchors.stride``) and ``rpn.min_size``. An anchor then covers the same
part of the picture as it will at full size, and the best trial's values apply unchanged.
The counts (``rpn.num_samples``, pre/post-NMS top-N) are not scaled; at a smaller size there are
fewer anchors (``(S / stride)^2`` per scale and ratio) to choose from.
"""

from __future__ import annotations

from typing import Any, Mapping

import yaml

from pipeline.config import Config, ConfigError

#: ``sweep.metric`` values besides ``AR@<N>``: proposal recall at IoU 0.5 / 0.7 of the top 300
#: proposals (when 300 is a budget), named as :func:`pipeline.evaluation.metrics.split_metrics` names them.
RECALL_AT_300 = ("recall@0.5/300", "recall@0.7/300")


def metric_names(budgets: tuple[int, ...] | list[int]) -> list[str]:
    """What a trial reports each epoch and ``sweep.metric`` may name, for ``eval.proposal_budgets``.

    ``AR@<N>`` for every budget, and ``recall@0.5/300`` and ``recall@0.7/300`` when 300 is a
    budget (as :func:`pipeline.evaluation.metrics.split_metrics` names them).
    """
    names = [f"AR@{int(b)}" for b in sorted(budgets)]
    if 300 in budgets:
        names += list(RECALL_AT_300)
    return names


def check(cfg: Config) -> None:
    """Sweep settings that :mod:`pipeline.config` cannot check alone.

    Raises:
        ConfigError: ``sweep.metric`` is not reported (naming what is), or the space is empty.
    """
    allowed = metric_names(list(cfg.eval.proposal_budgets))
    if cfg.sweep.metric not in allowed:
        raise ConfigError(f"sweep.metric: {cfg.sweep.metric!r} is not reported by a trial; "
                          f"allowed (from eval.proposal_budgets): {', '.join(allowed)}")
    if not cfg.sweep.space:
        raise ConfigError("sweep.space: empty; name at least one section.key to sweep")


# --------------------------------------------------------------------------------------------
# Tune search space


def encode(value: Any) -> Any:
    """A choice as Tune carries it: lists become their YAML flow text, scalars stay."""
    if isinstance(value, (list, tuple)):
        return yaml.safe_dump(list(value), default_flow_style=True).strip()
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
        if kind in ("choice", "grid"):
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
    requested = base.replace(dict(sampled))
    size = trial_image_size(base)
    factor = size / base.data.image_size
    sweep = base.sweep
    overrides: dict[str, Any] = {
        "data.image_size": size,
        "anchors.scales": [s * factor for s in requested.anchors.scales],
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


def worker_resources(cfg: Config) -> dict[str, float]:
    """Ray resources of each of a trial's workers: the trial's share split evenly, plus
    ``train.worker_resources``."""
    sweep = cfg.sweep
    resources = {**cfg.train.worker_resources,
                 "CPU": sweep.cpus_per_trial / sweep.workers_per_trial}
    if sweep.gpus_per_trial > 0:
        resources["GPU"] = sweep.gpus_per_trial / sweep.workers_per_trial
    return resources
