"""pipeline.evaluation.metrics: the metrics of a split, the headline and nested splits, the
console summary."""

from __future__ import annotations

import torch

from pipeline.evaluation import metrics as M
from pipeline.evaluation import recall as R


def test_metrics_of_a_perfect_model(perfect):
    values = perfect.values
    for key in ("recall@0.5/300", "recall@0.7/300", "AR@100", "AR@300", "AR@1000", "mAP@0.5"):
        assert values[key] == 1.0, key
    assert values["AP@0.5/cat"] == 1.0 and values["AP@0.5/dog"] == 1.0
    assert 0.0 <= values["anchors/AR"] <= 1.0 and "anchors/recall@0.5" in values
    assert values["num_images"] == 7 and values["num_gt"] == sum(i % 5 for i in range(7))
    assert values["val"]["AR@300"] == 1.0 and values["val"]["num_images"] == 3


def test_split_metrics_leave_out_what_cannot_be_computed():
    # one box, best IoU 0.8 at budgets 100 and 2000: no 300 budget, no anchor rows, no
    # detections; AR = 7 of the 10 thresholds 0.50:0.05:0.95
    rows = R.image_recall_rows(image_id="a", split="val", gt_boxes=torch.tensor([[0., 0, 9, 9]]),
                               labels=torch.tensor([1]), difficult=torch.tensor([False]),
                               best_iou=torch.full((1, 2), 0.8), budgets=(100, 2000))
    values = M.split_metrics(R.summarize(R.recall_table([rows])), "val", (100, 2000), None, [])
    assert values == {"AR@100": 0.7, "AR@2000": 0.7,                # one class: its mean
                      "AR@100/mean_class": 0.7, "AR@2000/mean_class": 0.7}


def test_format_summary_lists_the_headline_values_in_columns(perfect):
    assert M.format_summary({"AR@300": 1.0, "mAP@0.5": 0.5, "val": {"AR@300": 0.2}}) == \
        "AR@300   1.0\nmAP@0.5  0.5"                 # nested splits are not shown
    lines = M.format_summary(perfect.values).splitlines()
    assert len(lines) == len([v for v in perfect.values.values() if not isinstance(v, dict)])
    assert ["AR@300", "1.0"] in [line.split() for line in lines]


def test_per_class_metrics_name_each_class(perfect):
    values = perfect.values
    for cls in ("cat", "dog"):
        for key in (f"recall@0.5/300/{cls}", f"recall@0.7/300/{cls}", f"AR@300/{cls}"):
            assert values[key] == 1.0, key
        assert 0.0 <= values[f"anchors/recall@0.5/{cls}"] <= 1.0
        assert 0.0 <= values[f"anchors/AR/{cls}"] <= 1.0
    assert "AR@300/cat" in values["val"] or "AR@300/dog" in values["val"]
