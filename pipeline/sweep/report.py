"""A finished sweep's outputs: the trial table, the best trial as a params overlay, the plot.

Input: one :class:`TrialRecord` per trial (built by :func:`collect` from Tune's results).

- :func:`trial_table` -> one row per trial: ``trial_id``; every swept ``section.key`` as its own
  column (values as ``frcnn train`` would take them: lists for anchor sets); ``final_<m>`` for
  every reported metric ``m`` (its last value) and ``best_<metric>`` / ``best_epoch`` for
  ``sweep.metric`` (best over the trial's epochs), per class too (``final_AR@300/<class>``, ...);
  ``epochs`` (run); ``status`` (:data:`STATUSES`); ``wall_seconds`` (from the trial's start to
  its last report, Tune's ``time_total_s``, or the trial's own clock when longer),
  ``train_seconds`` (the training loop) and ``score_seconds`` (scoring recall after each epoch):
  the rest of ``wall_seconds`` is the trial's overhead; ``error`` (the message of an errored
  trial, else null); the anchor coverage of the trial's settings on ``sweep.split`` at
  ``data.image_size``, known without training (:mod:`pipeline.anchor_coverage`): ``anchors/AR``,
  ``anchors/recall@0.5``, ``anchors/recall@0.7``, the same for the stride's ``ceiling/...``, per
  class ``anchors/recall@0.5/<class>``, ``anchors/AR/<class>``, ``ceiling/...``; and
  ``untrained_anchor_types`` (the types that never train, empty when none). A whole ``anchors``
  setting is its YAML text (``{scales: [8, 16, 32]}``).
- :func:`best_overlay` -> ``{"anchors": {"scales": [...], "shapes": None}, "rpn": {...}, ...}``
  (a whole ``anchors`` setting as its keys, ``shapes`` null unless it gives them): the swept
  values of the trial with the best *final* ``sweep.metric`` (a trial stopped early competes
  with the value it was stopped at), in ``params.yaml``'s shape; :func:`overlay_yaml` writes it
  with a header saying where it came from.
- :func:`plot_trials` -> ``sweep.metric`` per trial over epochs (PNG).

Error texts are redacted (:func:`pipeline.redaction.redact`) before they reach the table, which
is also an MLflow artifact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import yaml

from pipeline import anchor_coverage, files, modeling, plots, storage, tracking
from pipeline.config import Config, ConfigError
from pipeline.annotations import GroundTruth
from pipeline.redaction import redact
from pipeline.sweep import space, trial
from pipeline.sweep.trial import ATTEMPTS, MARKERS

OUTPUTS = "outputs"  # E/outputs: copies of the outputs beside the sweep

FINISHED, STOPPED, ERRORED = "finished", "stopped early", "errored"
STATUSES = (FINISHED, STOPPED, ERRORED)


@dataclass
class TrialRecord:
    """One trial as the sweep saw it.

    ``history`` holds the trial's reports in order, one per epoch: ``{"epoch": finished epochs,
    <metric>: value, ...}``. ``finished``: the trial's training ran to its end (a trial that
    neither finished nor errored was stopped early by the scheduler).
    """

    trial_id: str
    sampled: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    finished: bool = False
    error: str | None = None
    wall_seconds: float = math.nan
    coverage: dict[str, Any] = field(default_factory=dict)
    attempts: int = 1                 # starts of the trial (2+: retried after a failure)

    @property
    def status(self) -> str:
        if self.error is not None:
            return ERRORED
        return FINISHED if self.finished else STOPPED


def _values(history: Sequence[Mapping[str, float]], name: str) -> list[tuple[int, float]]:
    """``(epoch, value)`` of every report that has a finite ``name``."""
    out = []
    for row in history:
        value = row.get(name)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out.append((int(row.get("epoch", len(out) + 1)), float(value)))
    return out


def trial_table(records: Sequence[TrialRecord], *, space_keys: Sequence[str],
                metrics: Sequence[str], metric: str, mode: str) -> pd.DataFrame:
    """The per-trial table (see the module docstring), rows in trial-id order."""
    rows = []
    for rec in sorted(records, key=lambda r: r.trial_id):
        row: dict[str, Any] = {"trial_id": rec.trial_id}
        # a whole anchors setting (a mapping) as its YAML text
        row.update({key: space.encode(value) if isinstance(value, Mapping) else value
                    for key in space_keys for value in [rec.sampled.get(key)]})
        for name in metrics:
            values = _values(rec.history, name)
            row[f"final_{name}"] = values[-1][1] if values else math.nan
        values = _values(rec.history, metric)
        if values:
            pick = max if mode == "max" else min
            epoch, value = pick(values, key=lambda ev: ev[1])
            row[f"best_{metric}"], row["best_epoch"] = value, epoch
        else:
            row[f"best_{metric}"], row["best_epoch"] = math.nan, -1
        epochs = [int(r["epoch"]) for r in rec.history if "epoch" in r]
        row["epochs"] = max(epochs, default=0)
        row["status"] = rec.status
        row["attempts"] = int(rec.attempts)
        row["wall_seconds"] = float(rec.wall_seconds)
        # the loop's clock less scoring: training alone
        score = (_values(rec.history, "score_seconds") or [(0, math.nan)])[-1][1]
        loop_clock = (_values(rec.history, "train_seconds") or [(0, math.nan)])[-1][1]
        row["train_seconds"], row["score_seconds"] = loop_clock - score, score
        row["error"] = rec.error
        row.update(rec.coverage)
        rows.append(row)
    coverage = list(dict.fromkeys(k for rec in records for k in rec.coverage))
    columns = (["trial_id", *space_keys, *(f"final_{m}" for m in metrics), f"best_{metric}",
                "best_epoch", "epochs", "status", "attempts", "wall_seconds", "train_seconds",
                "score_seconds", "error", *coverage])
    frame = pd.DataFrame(rows, columns=columns)
    return frame.astype({"trial_id": "string", "best_epoch": "int64", "epochs": "int64",
                         "attempts": "int64",
                         "status": "string", "wall_seconds": "float64",
                         "train_seconds": "float64", "score_seconds": "float64",
                         "error": "string"})


def best_trial(table: pd.DataFrame, *, metric: str, mode: str) -> pd.Series | None:
    """The row with the best ``final_<metric>`` among trials that reported it; None if none."""
    column = f"final_{metric}"
    scored = table[table["status"] != ERRORED].dropna(subset=[column])
    if scored.empty:
        return None
    index = scored[column].idxmax() if mode == "max" else scored[column].idxmin()
    return scored.loc[index]


def best_overlay(row: pd.Series, space_keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The swept values of ``row`` as a nested ``{section: {key: value}}`` params overlay."""
    tree: dict[str, dict[str, Any]] = {}
    for key, value in space.expand({k: _plain(k, row[k]) for k in space_keys}).items():
        section, leaf = key.split(".", 1)
        tree.setdefault(section, {})[leaf] = value
    return tree


def _plain(key: str, value: Any) -> Any:
    """A table cell as params.yaml takes it: NumPy values plain, an anchors setting a mapping."""
    if hasattr(value, "tolist"):  # NumPy arrays (list columns) and scalars -> plain
        value = value.tolist()
    if key == "anchors" and isinstance(value, str):
        value = yaml.safe_load(value)
    return value


def overlay_yaml(overlay: Mapping[str, Any], header: Sequence[str]) -> str:
    """The overlay as YAML, ``header`` lines first as comments."""
    lines = [f"# {line}" for line in header]
    return "\n".join(lines) + "\n" + yaml.dump(dict(overlay), Dumper=_OverlayDumper,
                                               sort_keys=False, width=10**6)


class _OverlayDumper(yaml.SafeDumper):
    """Sections and keys as blocks, every list inline (``shapes: [[17.8, 25.0], ...]``), no
    aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_OverlayDumper.add_representer(list, lambda dumper, value: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", value, flow_style=True))


def plot_trials(records: Sequence[TrialRecord], path: str | Path, *, metric: str,
                best_id: str | None = None, title: str = "") -> Path:
    """``metric`` over epochs, one line per trial: finished solid, stopped early dashed,
    errored dotted; the best trial drawn thicker."""
    styles = {FINISHED: "-", STOPPED: "--", ERRORED: ":"}
    lines = []
    for rec in sorted(records, key=lambda r: r.trial_id):
        values = _values(rec.history, metric)
        if values:
            best = rec.trial_id == best_id
            epochs, ys = zip(*values)
            lines.append(plots.Line(f"{rec.trial_id} ({rec.status}{', best' if best else ''})",
                                    epochs, ys, styles[rec.status], 3 if best else 1.5))
    return plots.plot_lines(lines, path, xlabel="epoch", ylabel=metric,
                            title=title or f"{metric} per trial", integer_x=True)


# --------------------------------------------------------------------------------------------
# From Tune's results to the outputs


def trial_coverage(cfg: Config, sampled: Mapping[str, Any], split: GroundTruth,
                   classes: Sequence[str]) -> dict[str, Any]:
    """The anchor coverage columns of a trial's settings (empty when they are invalid)."""
    try:
        trial_cfg = cfg.replace(space.expand(sampled))   # at data.image_size
    except ConfigError:
        return {}
    untrained = modeling.untrained_types(trial_cfg)
    return {**anchor_coverage.coverage_metrics(trial_cfg, split, class_names=classes),
            modeling.UNTRAINED_TAG: modeling.describe_types(trial_cfg, untrained)}


def collect(cfg: Config, grid: Any, experiment: str, *, split: GroundTruth,
            classes: Sequence[str]) -> list[TrialRecord]:
    """One :class:`TrialRecord` per trial of Tune's ``ResultGrid``, with the anchor coverage
    of its settings on ``split`` (the sweep's split at ``data.image_size``)."""
    records = []
    for result in grid:
        trial_id = Path(str(result.path).rstrip("/")).name
        frame = result.metrics_dataframe
        history = []
        if frame is not None and len(frame) and "epoch" in frame:
            # one row per epoch (a re-reported end after a resume counts once)
            frame = frame.dropna(subset=["epoch"]).drop_duplicates("epoch", keep="last")
            history = frame.to_dict("records")
        error = None
        if result.error is not None:
            lines = [ln for ln in str(result.error).strip().splitlines() if ln.strip()]
            error = redact(lines[-1] if lines else type(result.error).__name__)[:500]
        try:
            sampled = space.decode(cfg.sweep.space, result.config or {})
            flat = cfg.replace(space.expand(sampled)).flat()
            sampled = {k: flat.get(k, v) for k, v in sampled.items()}  # canonical: lists, floats
        except ConfigError:
            sampled = {k: (result.config or {}).get(k) for k in cfg.sweep.space}
        marker = storage.read_json(f"{experiment}/{MARKERS}/{trial_id}.json")
        attempts = storage.read_json(f"{experiment}/{ATTEMPTS}/{trial_id}.json")
        # Tune's clock, or the trial's own when longer (a trial that finished before an
        # interruption and only re-reported its end after the resume)
        clocks = [history[-1].get("time_total_s") if history else None,
                  marker.get("wall_seconds")]
        clocks = [float(c) for c in clocks if c is not None and math.isfinite(c)]
        wall = max(clocks, default=math.nan)
        records.append(TrialRecord(
            trial_id=trial_id, sampled=sampled, history=history,
            finished=bool(marker.get("finished")), error=error, wall_seconds=float(wall),
            coverage=trial_coverage(cfg, sampled, split, classes),
            attempts=max(1, int(attempts.get("attempts", 1)))))
    return records


def write_outputs(cfg: Config, records: list[TrialRecord], experiment: str,
                  parent: tracking.RunHandle | None = None) -> dict[str, Any]:
    """The table, the best-params overlay and the plot; copies in ``E/outputs``; parent run
    metrics and artifacts. Returns ``{"best_trial", "best_value", "counts"}``."""
    metric, mode = cfg.sweep.metric, cfg.sweep.mode
    keys = list(cfg.sweep.space)
    names = space.metric_names(cfg.eval.proposal_budgets)
    per_class = sorted({k for rec in records for row in rec.history for k in row
                        if k.startswith(trial.PER_CLASS_PREFIXES) and k not in names})
    table = trial_table(records, space_keys=keys, metrics=names + per_class,
                        metric=metric, mode=mode)
    best = best_trial(table, metric=metric, mode=mode)
    best_id = None if best is None else str(best["trial_id"])
    paths = [Path(cfg.sweep.table_path), Path(cfg.sweep.plot_path)]
    files.write_parquet(paths[0], table)
    plot_trials(records, paths[1], metric=metric, best_id=best_id,
                             title=f"{metric} on {cfg.sweep.split} per trial ({cfg.sweep.name})")
    counts = table["status"].value_counts().to_dict()
    value = math.nan
    if best is not None:
        value = float(best[f"final_{metric}"])
        header = [f"Best trial of sweep {cfg.sweep.name!r} ({len(table)} trials): "
                  f"{best_id}, {metric} on {cfg.sweep.split} = {value:.4f} ({mode}).",
                  f"Apply: frcnn train --stage rpn --params params.yaml --params "
                  f"{cfg.sweep.best_params_path}"]
        path = Path(cfg.sweep.best_params_path)
        files.write_text(path, overlay_yaml(best_overlay(best, keys),
                                                      header))
        paths.append(path)
    for path in paths:
        storage.write_bytes(f"{experiment}/{OUTPUTS}/{path.name}", path.read_bytes())
    if parent is not None:
        metrics = {f"trials_{s.replace(' ', '_')}": float(counts.get(s, 0))
                   for s in STATUSES}
        if best is not None:
            metrics[f"best/{metric}"] = value
            parent.set_tags({"best_trial": best_id})
        parent.log_metrics(metrics)
        for path in paths:
            parent.log_artifact(path, "sweep")
    print(table.drop(columns=["error"]).to_string(index=False), flush=True)
    retried = {str(r["trial_id"]): int(r["attempts"]) for _, r in table.iterrows()
               if r["attempts"] > 1}
    if retried:
        print("sweep: retried after a failure (or resumed after an interruption): "
              + ", ".join(f"{t} ({n} attempts)" for t, n in retried.items()), flush=True)
    return {"best_trial": best_id, "best_value": value, "counts": counts, "retried": retried}


def end_children(parent: tracking.RunHandle, records: list[TrialRecord],
                 metrics: Sequence[str]) -> None:
    """Each child run ends with its trial's status (a stopped or killed trial cannot do it) and
    its final values of ``metrics``."""
    status = {FINISHED: tracking.FINISHED, STOPPED: tracking.KILLED, ERRORED: tracking.FAILED}
    outcomes = {}
    for rec in records:
        final = {name: values[-1][1] for name in metrics if (values := _values(rec.history, name))}
        outcomes[rec.trial_id] = (status[rec.status], rec.status, rec.error, final)
    tracking.end_children(parent, outcomes)
