"""Pictures: recall curves and the sweep's trials (matplotlib), boxes drawn on images (Pillow).

Curves take the frames of :func:`pipeline.evaluation.recall.recall_vs_iou` (``budget, iou,
recall``; the anchor baseline has ``budget == -1``) and
:func:`pipeline.evaluation.recall.recall_vs_proposals` (``budget, recall@0.5, recall@0.7``);
:func:`plot_lines` draws any set of :class:`Line` s (the sweep's metric per trial). Figures are
built on a bare ``matplotlib.figure.Figure`` (Agg canvas, no pyplot state), so they work headless
and in worker processes. Every file is written atomically (:func:`save_figure`,
:func:`save_image`).

Drawing: ground truth green, proposals thin blue (top ones only), detections red with
``class score`` labels. Boxes are ``(N, 4)`` x1y1x2y2 in the image's pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

from pipeline import files

GT_COLOUR = (0, 200, 0)
PROPOSAL_COLOUR = (40, 120, 255)
DETECTION_COLOUR = (230, 30, 30)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG, atomically."""
    path = Path(path)
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return path


def plot_recall_vs_iou(curve: pd.DataFrame, path: str | Path, *, anchor_budget: int,
                       title: str = "") -> Path:
    """Recall against the IoU threshold, one line per budget (anchors dashed).

    Args:
        curve: columns ``budget, iou, recall``.
        path: the PNG to write.
        anchor_budget: the budget of the anchor baseline's rows
            (:data:`pipeline.evaluation.recall.ANCHOR_BUDGET`); other negative budgets are the
            stride's ceiling (dotted).
    """
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    for budget, group in curve.sort_values(["budget", "iou"]).groupby("budget", sort=True):
        if int(budget) == anchor_budget:
            style = dict(linestyle="--", color="grey", label="all anchors")
        elif int(budget) < 0:  # the stride's ceiling: any anchor shape at a cell centre
            style = dict(linestyle=":", color="black", label="ceiling (stride)")
        else:
            style = dict(marker=".", label=f"top {int(budget)}")
        ax.plot(group["iou"], group["recall"], **style)
    ax.set(xlabel="IoU threshold", ylabel="recall", ylim=(0, 1.02), title=title or "Recall vs IoU")
    ax.grid(alpha=0.3)
    if len(curve):
        ax.legend(title="proposals")
    return save_figure(fig, path)


def plot_recall_vs_proposals(curve: pd.DataFrame, path: str | Path, *,
                             anchors: dict[str, float] | None = None, title: str = "") -> Path:
    """Recall against the number of proposals (log scale), one line per ``recall@t`` column.

    Args:
        curve: columns ``budget`` and ``recall@<t>`` (e.g. ``recall@0.5``, ``recall@0.7``).
        anchors: optional ``{column: recall of all anchors}``, drawn as horizontal dashed lines.
    """
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    columns = [c for c in curve.columns if c.startswith("recall@")]
    for column in columns:
        line, = ax.plot(curve["budget"], curve[column], marker="o", label=f"IoU {column[7:]}")
        if anchors and column in anchors:
            ax.axhline(anchors[column], linestyle="--", color=line.get_color(), alpha=0.6,
                       label=f"all anchors, IoU {column[7:]}")
    if len(curve) and (curve["budget"] > 0).all():
        ax.set_xscale("log")
    ax.set(xlabel="number of proposals", ylabel="recall", ylim=(0, 1.02),
           title=title or "Recall vs number of proposals")
    ax.grid(alpha=0.3, which="both")
    if columns:
        ax.legend()
    return save_figure(fig, path)


@dataclass(frozen=True)
class Line:
    """One line of :func:`plot_lines`: points ``(x, y)`` with a label and a style."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    linestyle: str = "-"
    width: float = 1.5


def plot_lines(lines: Sequence[Line], path: str | Path, *, xlabel: str, ylabel: str,
               title: str, integer_x: bool = False, max_legend: int = 20) -> Path:
    """One marked line per :class:`Line` (e.g. a metric per trial over epochs); a legend when
    there are at most ``max_legend`` lines; ``integer_x``: whole-number ticks (epochs)."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for line in lines:
        ax.plot(line.x, line.y, linestyle=line.linestyle, marker="o", linewidth=line.width,
                label=line.label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if 0 < len(lines) <= max_legend:
        ax.legend(fontsize="small")
    return save_figure(fig, path)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


def draw_boxes(image: Image.Image | np.ndarray, *, gt_boxes: np.ndarray | None = None,
               gt_labels: Sequence[int] | None = None, proposals: np.ndarray | None = None,
               det_boxes: np.ndarray | None = None, det_scores: Sequence[float] | None = None,
               det_labels: Sequence[int] | None = None,
               class_names: Sequence[str] = ()) -> Image.Image:
    """A copy of ``image`` with ground truth, proposals and detections drawn on it.

    Args:
        image: RGB ``PIL.Image`` or ``(H, W, 3)`` uint8 array.
        gt_boxes: ``(G, 4)``; gt_labels: G class ids (1..K, named by ``class_names[id - 1]``).
        proposals: ``(P, 4)``, drawn as given (pass the top few).
        det_boxes: ``(D, 4)``; det_scores, det_labels: D values each.
        class_names: names of ids 1..K.

    Returns:
        A new RGB image of the same size.
    """
    base = Image.fromarray(np.asarray(image, dtype=np.uint8)) if isinstance(image, np.ndarray) \
        else image
    out = base.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = max(1, round(max(out.size) / 320))
    font = _font(max(10, round(max(out.size) / 50)))

    def name(label: int) -> str:
        return class_names[label - 1] if 1 <= label <= len(class_names) else str(label)

    def boxes_of(b) -> np.ndarray:
        return np.zeros((0, 4)) if b is None else np.asarray(b, dtype=np.float64).reshape(-1, 4)

    for box in boxes_of(proposals):
        draw.rectangle(box.tolist(), outline=PROPOSAL_COLOUR, width=1)
    gts = boxes_of(gt_boxes)
    for i, box in enumerate(gts):
        draw.rectangle(box.tolist(), outline=GT_COLOUR, width=width + 1)
        if gt_labels is not None:
            draw.text((box[0] + 2, box[3] - 2), name(int(gt_labels[i])), fill=GT_COLOUR,
                      font=font, anchor="ld")
    dets = boxes_of(det_boxes)
    for i, box in enumerate(dets):
        draw.rectangle(box.tolist(), outline=DETECTION_COLOUR, width=width)
        text = name(int(det_labels[i])) if det_labels is not None else ""
        if det_scores is not None:
            text = f"{text} {float(det_scores[i]):.2f}".strip()
        if text:
            left, top, right, bottom = draw.textbbox((box[0], box[1]), text, font=font, anchor="lb")
            draw.rectangle((left, top, right, bottom), fill=DETECTION_COLOUR)
            draw.text((box[0], box[1]), text, fill=(255, 255, 255), font=font, anchor="lb")
    return out


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Write ``image`` as PNG (or JPEG for a ``.jpg``/``.jpeg`` path), atomically."""
    path = Path(path)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    with files.atomic_path(path) as tmp:
        image.save(tmp, format=fmt)
    return path
