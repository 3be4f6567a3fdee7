"""The evaluation's metrics: names, values per split, and the console summary.

Names (DVC's ``metrics/evaluate.json`` and MLflow, where :func:`pipeline.tracking.metric_name`
writes ``@`` as ``_at_``): ``recall@0.5/300``, ``recall@0.7/300``, ``AR@<N>`` for every budget,
``anchors/recall@0.5``, ``anchors/recall@0.7``, ``anchors/AR``, the same three as
``ceiling/...`` (the stride's ceiling, :mod:`pipeline.anchor_coverage`), ``mAP@0.5``,
``AP@0.5/<class>``, ``num_gt``, ``num_images``; per class: ``recall@0.5/300/<class>``,
``recall@0.7/300/<class>``, ``AR@300/<class>``, ``anchors/recall@0.5/<class>``,
``anchors/AR/<class>``, ``ceiling/recall@0.5/<class>``, ``ceiling/AR/<class>``; the means over
classes ``AR@<N>/mean_class``, ``recall@<t>/300/mean_class``; and the evaluate stage's
``detector_rpn/...``: the same recall figures for the full detector's own RPN. A value that
cannot be computed (no box, a budget not evaluated) is left out.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import pandas as pd

from pipeline.evaluation import recall as R
from pipeline.evaluation.voc_ap import ClassResult, mean_ap

if TYPE_CHECKING:  # a type only: core -> anchor_coverage -> metrics must not loop back
    from pipeline.evaluation.core import EvalResults

CURVE_THRESHOLDS = (0.5, 0.7)
HEADLINE_BUDGET = 300
DETECTOR_RPN = "detector_rpn"  # prefix of the recall of the full detector's own RPN
MEAN_CLASS = "mean_class"      # suffix of the means over classes



def split_metrics(summary: pd.DataFrame, split: str, budgets: Sequence[int],
                  ap: Mapping[int, ClassResult] | None, class_names: Sequence[str]
                  ) -> dict[str, float]:
    """The DVC / MLflow metrics of one split (see the module docstring for the names)."""
    out: dict[str, float] = {}

    def put(key: str, value: float) -> None:
        if not math.isnan(value):
            out[key] = round(float(value), 6)

    def value(budget: int, metric: str, t: float | None = None, cls: str = R.ALL) -> float:
        return R.lookup(summary, split=split, budget=budget, metric=metric, iou_threshold=t,
                        class_name=cls)

    anchors = R.ANCHOR_BUDGET
    for t in CURVE_THRESHOLDS:
        put(f"recall@{t:g}/{HEADLINE_BUDGET}", value(HEADLINE_BUDGET, "recall", t))
    for b in sorted(budgets):
        put(f"AR@{b}", value(b, "AR"))
    for prefix, budget in (("anchors", anchors), ("ceiling", R.CEILING_BUDGET)):
        for t in CURVE_THRESHOLDS:
            put(f"{prefix}/recall@{t:g}", value(budget, "recall", t))
        put(f"{prefix}/AR", value(budget, "AR"))
    if ap is not None:
        put("mAP@0.5", mean_ap(ap))
        for k, result in ap.items():
            name = class_names[k - 1] if k <= len(class_names) else str(k)
            put(f"AP@0.5/{name}", result.ap)
    classes = per_class_names(summary, split)
    if classes:  # every class weighs the same: a rare class counts as much as a frequent one
        for b in sorted(budgets):
            put(f"AR@{b}/{MEAN_CLASS}", _mean(value(b, "AR", cls=c) for c in classes))
        for t in CURVE_THRESHOLDS:
            put(f"recall@{t:g}/{HEADLINE_BUDGET}/{MEAN_CLASS}",
                _mean(value(HEADLINE_BUDGET, "recall", t, c) for c in classes))
    for cls in classes:
        for t in CURVE_THRESHOLDS:
            put(f"recall@{t:g}/{HEADLINE_BUDGET}/{cls}", value(HEADLINE_BUDGET, "recall", t, cls))
        put(f"AR@{HEADLINE_BUDGET}/{cls}", value(HEADLINE_BUDGET, "AR", cls=cls))
        for prefix, budget in (("anchors", anchors), ("ceiling", R.CEILING_BUDGET)):
            put(f"{prefix}/recall@0.5/{cls}", value(budget, "recall", 0.5, cls))
            put(f"{prefix}/AR/{cls}", value(budget, "AR", cls=cls))
    sel = summary[(summary["split"] == split) & (summary["size"] == R.ALL)
                  & (summary["class_name"] == R.ALL) & (summary["budget"] == anchors)
                  & (summary["metric"] == "AR")]
    if len(sel):
        out["num_gt"] = int(sel["num_gt"].iloc[0])
    return out


def _mean(values: Any) -> float:
    """Mean of finite values; NaN when there is none (a budget not evaluated)."""
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def per_class_names(summary: pd.DataFrame, split: str) -> list[str]:
    """The classes with boxes in ``split``, in the summary's order."""
    names = summary.loc[(summary["split"] == split) & (summary["class_name"] != R.ALL),
                        "class_name"]
    return list(dict.fromkeys(names.tolist()))


def metrics(results: EvalResults, split_names: Sequence[str], budgets: Sequence[int],
            class_names: Sequence[str]) -> dict[str, Any]:
    """Headline split's metrics at the top level, the others nested under their names."""
    out: dict[str, Any] = {}
    for i, split in enumerate(split_names):
        values = split_metrics(results.summary, split, budgets, results.ap.get(split), class_names)
        values["num_images"] = results.num_images.get(split, 0)
        if i == 0:
            out.update(values)
        else:
            out[split] = values
    return out


def add_prefixed(values: dict[str, Any], other: Mapping[str, Any], prefix: str) -> None:
    """Add ``other``'s proposal-recall metrics (``AR@<N>``, ``recall@<t>/300``, their class
    means) to ``values`` as ``<prefix>/<name>``, the headline split's at the top level and the
    others' under their split's name, as :func:`metrics` nests them."""
    for key, value in other.items():
        if isinstance(value, Mapping):
            add_prefixed(values.setdefault(key, {}), value, prefix)
        elif _overall_recall(key):
            values[f"{prefix}/{key}"] = value


def _overall_recall(key: str) -> bool:
    """``AR@<N>``, ``recall@<t>/300`` and their ``/mean_class``: not per class, not anchors."""
    if key.endswith(f"/{MEAN_CLASS}"):
        return True
    return (key.startswith("AR@") and "/" not in key) or (key.startswith("recall@")
                                                          and key.count("/") == 1)


def format_summary(values: Mapping[str, Any]) -> str:
    """The headline metrics, one per line (what ``frcnn evaluate`` prints at the end)."""
    width = max((len(k) for k in values), default=0)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in values.items()
                     if not isinstance(value, Mapping))
