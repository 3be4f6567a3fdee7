"""The evaluate stage's files: recall tables, curves (CSV + PNG), pictures, the metrics JSON.

All written atomically (:mod:`pipeline.files`); paths from ``eval.reports_dir`` (``R``) and
``eval.metrics_path``, mirrored by ``dvc.yaml``:

- ``R/proposal_recall.parquet``: one row per (split, image, ground-truth box, budget), columns
  :data:`pipeline.evaluation.recall.TABLE_COLUMNS`; budgets from ``eval.proposal_budgets``, plus
  one row per box with ``budget = -1``: the best IoU over **all** anchors of the image
  (unranked, raw: neither clipped nor filtered), the anchor baseline.
- ``R/recall_summary.parquet``: :data:`pipeline.evaluation.recall.SUMMARY_COLUMNS`: recall at
  IoU 0.50:0.05:0.95 and AR per (split, budget, size bucket); ``num_proposals`` is the mean
  number of proposals the RPN actually returned at that budget (the anchor count for
  ``budget = -1``).
- ``R/plots/recall_vs_iou.csv`` (``iou, top<N>...`` one column per budget, ``anchors``: one
  line each in DVC's line template), ``R/plots/recall_vs_proposals.csv`` (``budget,
  recall@0.5, recall@0.7``), with PNGs of the same names: the first split of ``eval.splits``
  (the headline split, ``test`` by default).
- ``R/pictures/<split>_<image_id>.png``: ``eval.num_pictures`` images of the headline split
  with ground truth (green), the top proposals (blue) and the top detections (red).
- ``eval.metrics_path`` (DVC metrics): the headline split's metrics at the top level, every
  other split nested under its name (:mod:`pipeline.evaluation.metrics`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline import files, plots, storage
from pipeline.config import Config
from pipeline.evaluation import recall as R
from pipeline.evaluation.core import EvalResults
from pipeline.evaluation.metrics import CURVE_THRESHOLDS



@dataclass(frozen=True)
class OutputPaths:
    """Where the stage writes (from ``eval.reports_dir`` and ``eval.metrics_path``)."""

    reports: Path
    metrics: Path

    @property
    def recall_table(self) -> Path:
        return self.reports / "proposal_recall.parquet"

    @property
    def recall_summary(self) -> Path:
        return self.reports / "recall_summary.parquet"

    @property
    def plots(self) -> Path:
        return self.reports / "plots"

    @property
    def pictures(self) -> Path:
        return self.reports / "pictures"

    @classmethod
    def from_config(cls, cfg: Config) -> "OutputPaths":
        return cls(Path(cfg.eval.reports_dir), Path(cfg.eval.metrics_path))


def write_outputs(results: EvalResults, values: Mapping[str, Any], paths: OutputPaths,
                  headline_split: str, class_names: Sequence[str]) -> list[Path]:
    """Write every output file; return their paths (for MLflow)."""
    written = []
    files.write_parquet(paths.recall_table, results.table)
    files.write_parquet(paths.recall_summary, results.summary)
    written += [paths.recall_table, paths.recall_summary]

    iou_curve = R.recall_vs_iou(results.summary, headline_split)
    prop_curve = R.recall_vs_proposals(results.summary, headline_split, CURVE_THRESHOLDS)
    anchors = {f"recall@{t:g}": R.lookup(results.summary, split=headline_split,
                                         budget=R.ANCHOR_BUDGET, metric="recall", iou_threshold=t)
               for t in CURVE_THRESHOLDS}
    for name, frame in (("recall_vs_iou", R.iou_curve_columns(iou_curve)),
                        ("recall_vs_proposals", prop_curve)):
        files.write_text(paths.plots / f"{name}.csv", frame.to_csv(index=False, float_format="%.6g"))
        written.append(paths.plots / f"{name}.csv")
    title = f"{headline_split} split"
    written.append(plots.plot_recall_vs_iou(iou_curve, paths.plots / "recall_vs_iou.png",
                                            anchor_budget=R.ANCHOR_BUDGET,
                                            title=f"Recall vs IoU ({title})"))
    written.append(plots.plot_recall_vs_proposals(
        prop_curve, paths.plots / "recall_vs_proposals.png",
        anchors={k: v for k, v in anchors.items() if not math.isnan(v)},
        title=f"Recall vs number of proposals ({title})"))

    with files.atomic_dir(paths.pictures) as tmp:
        for pic in results.pictures:
            drawn = plots.draw_boxes(pic.image, gt_boxes=pic.gt_boxes, gt_labels=pic.gt_labels,
                                     proposals=pic.proposals, det_boxes=pic.det_boxes,
                                     det_scores=pic.det_scores, det_labels=pic.det_labels,
                                     class_names=class_names)
            plots.save_image(drawn, tmp / f"{pic.split}_{_safe_name(pic.image_id)}.png")
    written += sorted(paths.pictures.glob("*.png"))

    storage.write_json(paths.metrics, dict(values))
    written.append(paths.metrics)
    return written


def _safe_name(text: str) -> str:
    return re.sub(r"[^\w.\-]", "_", text)[:120]


def artifact_dir(path: Path, paths: OutputPaths) -> str:
    """MLflow artifact folder: ``reports/...`` mirrors the reports folder; ``metrics`` else."""
    if paths.reports.resolve() in path.resolve().parents:
        rel = path.resolve().parent.relative_to(paths.reports.resolve())
        return "/".join(("reports",) + rel.parts)
    return "metrics"
