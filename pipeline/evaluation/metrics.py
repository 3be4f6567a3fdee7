"""The evaluation's metrics: names, values per split, and the console summary.

Names (DVC's ``metrics/evaluate.json`` and MLflow, where :func:`pipeline.tracking.metric_name`
writes ``@`` as ``_at_``): ``recall@0.5/300``, ``recall@0.7/300``, ``AR@<N>`` for every budget,
``anchors/recall@0.5``, ``anchors/recall@0.7``, ``anchors/AR``, ``mAP@0.5``,
``AP@0.5/<class>``, ``num_gt``, ``num_images``; per class (:data:`PER_CLASS`):
``recall@0.5/300/<class>``, ``recall@0.7/300/<class>``, ``AR@300/<class>``,
``anchors/recall@0.5/<class>``, ``anchors/AR/<class>``. A value that cannot be computed (no box,
a budget not evaluated) is left out.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import pandas as pd

from pipeline.evaluation import recall as R
from pipeline.evaluation.core import EvalResults
from pipeline.evaluation.voc_ap import ClassResult, mean_ap

CURVE_THRESHOLDS = (0.5, 0.7)
HEADLINE_BUDGET = 300



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
    for t in CURVE_THRESHOLDS:
        put(f"anchors/recall@{t:g}", value(anchors, "recall", t))
    put("anchors/AR", value(anchors, "AR"))
    if ap is not None:
        put("mAP@0.5", mean_ap(ap))
        for k, result in ap.items():
            name = class_names[k - 1] if k <= len(class_names) else str(k)
            put(f"AP@0.5/{name}", result.ap)
    for cls in per_class_names(summary, split):
        for t in CURVE_THRESHOLDS:
            put(f"recall@{t:g}/{HEADLINE_BUDGET}/{cls}", value(HEADLINE_BUDGET, "recall", t, cls))
        put(f"AR@{HEADLINE_BUDGET}/{cls}", value(HEADLINE_BUDGET, "AR", cls=cls))
        put(f"anchors/recall@0.5/{cls}", value(anchors, "recall", 0.5, cls))
        put(f"anchors/AR/{cls}", value(anchors, "AR", cls=cls))
    sel = summary[(summary["split"] == split) & (summary["size"] == R.ALL)
                  & (summary["class_name"] == R.ALL) & (summary["budget"] == anchors)
                  & (summary["metric"] == "AR")]
    if len(sel):
        out["num_gt"] = int(sel["num_gt"].iloc[0])
    return out


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


def format_summary(values: Mapping[str, Any]) -> str:
    """The headline metrics, one per line (what ``frcnn evaluate`` prints at the end)."""
    width = max((len(k) for k in values), default=0)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in values.items()
                     if not isinstance(value, Mapping))
