"""Plots: files are valid PNGs of sensible size; drawn boxes land where they should."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from pipeline import plots


def _iou_curve() -> pd.DataFrame:
    iou = np.round(np.arange(10) * 0.05 + 0.5, 2)
    rows = [{"budget": b, "iou": t, "recall": max(0.0, 1.0 - t * f)}
            for b, f in ((-1, 0.9), (50, 1.2), (300, 1.0)) for t in iou]
    return pd.DataFrame(rows)


def test_recall_vs_iou_png(tmp_path):
    path = plots.plot_recall_vs_iou(_iou_curve(), tmp_path / "sub" / "recall_vs_iou.png",
                                    anchor_budget=-1)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 200 and img.height > 150
    assert not list((tmp_path / "sub").glob(".*.tmp"))       # no temporary file left


def test_recall_vs_proposals_png_with_anchor_lines(tmp_path):
    curve = pd.DataFrame({"budget": [50, 300, 1000], "recall@0.5": [0.4, 0.7, 0.9],
                          "recall@0.7": [0.2, 0.4, 0.6]})
    path = plots.plot_recall_vs_proposals(curve, tmp_path / "p.png",
                                          anchors={"recall@0.5": 0.95, "recall@0.7": 0.5})
    with Image.open(path) as img:
        assert img.format == "PNG"


def test_empty_curves_still_write_a_figure(tmp_path):
    plots.plot_recall_vs_iou(pd.DataFrame(columns=["budget", "iou", "recall"]), tmp_path / "a.png",
                             anchor_budget=-1)
    plots.plot_recall_vs_proposals(pd.DataFrame(columns=["budget", "recall@0.5"]),
                                   tmp_path / "b.png")
    assert (tmp_path / "a.png").stat().st_size > 0 and (tmp_path / "b.png").stat().st_size > 0


def test_draw_boxes_colours_where_the_boxes_are(tmp_path):
    image = np.zeros((100, 120, 3), dtype=np.uint8)
    out = plots.draw_boxes(image, gt_boxes=[[10, 10, 40, 40]], gt_labels=[1],
                           proposals=np.array([[60, 5, 110, 30]]),
                           det_boxes=[[60, 50, 100, 90]], det_scores=[0.87], det_labels=[2],
                           class_names=["cat", "dog"])
    assert out.size == (120, 100) and out.mode == "RGB"
    px = np.asarray(out)
    assert tuple(px[25, 10]) == plots.GT_COLOUR               # left edge of the ground truth
    assert tuple(px[20, 60]) == plots.PROPOSAL_COLOUR         # left edge of the proposal
    assert tuple(px[70, 100]) == plots.DETECTION_COLOUR       # right edge of the detection
    assert tuple(px[70, 80]) == (0, 0, 0)                     # inside: untouched
    assert image.sum() == 0                                   # input not modified
    path = plots.save_image(out, tmp_path / "drawn.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (120, 100)


def test_draw_boxes_accepts_nothing_to_draw():
    img = Image.new("RGB", (32, 32), (9, 9, 9))
    out = plots.draw_boxes(img)
    assert np.array_equal(np.asarray(out), np.asarray(img))
