"""Proposal recall: the vectorised table against a loop-based reference, AR by hand, buckets."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.evaluation import recall as R
from tests.support.references import best_iou_reference, random_boxes


@pytest.mark.parametrize("seed, num_gt, num_props", [(0, 7, 60), (1, 1, 5), (2, 12, 33),
                                                     (3, 4, 1), (4, 9, 120)])
def test_best_iou_matches_loop_reference(seed, num_gt, num_props):
    gen = torch.Generator().manual_seed(seed)
    gt, props = random_boxes(gen, num_gt), random_boxes(gen, num_props)
    budgets = [1, 3, 10, 50, 100]            # some larger than the number of proposals
    got = R.best_iou_at_budgets(gt, props, budgets)
    assert got.shape == (num_gt, len(budgets)) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), best_iou_reference(gt, props, budgets),
                               atol=1e-5, rtol=0)
    # More proposals never lower the best IoU.
    assert bool((got[:, 1:] >= got[:, :-1]).all())


def test_best_iou_budget_order_is_kept_and_overlong_budget_uses_all():
    gen = torch.Generator().manual_seed(5)
    gt, props = random_boxes(gen, 3), random_boxes(gen, 8)
    got = R.best_iou_at_budgets(gt, props, [100, 2, 8])
    ref = best_iou_reference(gt, props, [100, 2, 8])
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[:, 0], got[:, 2])


def test_best_iou_edge_cases():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    assert R.best_iou_at_budgets(gt, torch.zeros(0, 4), [5, 10]).tolist() == [[0.0, 0.0]]
    assert R.best_iou_at_budgets(torch.zeros(0, 4), gt, [5]).shape == (0, 1)
    exact = R.best_iou_at_budgets(gt, torch.tensor([[20.0, 20, 30, 30], [0.0, 0, 10, 10]]), [1, 2])
    assert exact.tolist() == [[0.0, 1.0]]
    with pytest.raises(ValueError, match="budgets must be >= 1"):
        R.best_iou_at_budgets(gt, gt, [0])


def test_check_budgets():
    assert R.check_budgets([300, 50, 1000]) == (50, 300, 1000)
    for bad, msg in (([], "at least one"), ([0, 5], ">= 1"), ([5, 5], "distinct")):
        with pytest.raises(ValueError, match=msg):
            R.check_budgets(bad)


def test_iou_thresholds_are_exactly_ten_from_050_to_095():
    assert len(R.IOU_THRESHOLDS) == 10
    assert R.IOU_THRESHOLDS[0] == 0.5 and R.IOU_THRESHOLDS[-1] == 0.95
    assert np.allclose(np.diff(R.IOU_THRESHOLDS), 0.05)


def test_recall_and_ar_hand_computed():
    ious = [0.5, 0.72, 0.95, 0.3]
    # t = 0.50: 3/4; 0.55..0.70: 2/4; 0.75..0.95: 1/4 (0.95 counts at 0.95).
    expected = [0.75] + [0.5] * 4 + [0.25] * 5
    assert R.recall_at(ious).tolist() == expected
    assert R.average_recall(ious) == pytest.approx(0.4)
    assert R.average_recall([1.0, 1.0]) == 1.0
    assert R.average_recall([0.49, 0.0]) == 0.0
    assert R.average_recall([0.7]) == pytest.approx(0.5)     # 0.50..0.70: 5 of 10 thresholds
    assert R.recall_at(torch.tensor([0.7], dtype=torch.float32), [0.7]).tolist() == [1.0]
    assert np.isnan(R.recall_at([], [0.5])).all()


def test_size_buckets_boundaries_and_reference_frame():
    areas = [32 ** 2 - 1, 32 ** 2, 96 ** 2 - 1, 96 ** 2]
    assert R.size_bucket(areas).tolist() == ["small", "medium", "medium", "large"]
    # At 320 x 320 a 16 x 16 box is the same object as 32 x 32 at 640.
    assert R.size_bucket([16 ** 2 - 1, 16 ** 2, 48 ** 2], 320).tolist() == \
        ["small", "medium", "large"]


def _rows(image_id, boxes, budgets, best, split="test", labels=None, difficult=None):
    boxes = torch.tensor(boxes, dtype=torch.float32)
    g = boxes.shape[0]
    return R.image_recall_rows(
        image_id=image_id, split=split, gt_boxes=boxes,
        labels=torch.tensor(labels if labels is not None else [1] * g),
        difficult=torch.tensor(difficult if difficult is not None else [False] * g),
        best_iou=torch.tensor(best, dtype=torch.float32).reshape(g, len(budgets)),
        budgets=budgets)


def test_recall_table_layout_and_dtypes():
    table = R.recall_table([
        _rows("a", [[0, 0, 10, 20], [5, 5, 6, 7]], [50, 300], [[0.1, 0.6], [0.2, 0.9]],
              labels=[2, 3], difficult=[False, True]),
        _rows("b", [], [50, 300], []),                                  # no ground truth
        _rows("b", [[1, 1, 2, 2]], [R.ANCHOR_BUDGET], [[0.4]]),
    ])
    assert tuple(table.columns) == R.TABLE_COLUMNS
    assert len(table) == 5
    first = table.iloc[:4]
    assert first["gt_index"].tolist() == [0, 0, 1, 1]                  # ground-truth-major
    assert first["budget"].tolist() == [50, 300, 50, 300]
    assert first["best_iou"].tolist() == pytest.approx([0.1, 0.6, 0.2, 0.9])
    assert first["label"].tolist() == [2, 2, 3, 3]
    assert first["difficult"].tolist() == [False, False, True, True]
    assert first["area"].tolist() == [200.0, 200.0, 2.0, 2.0]
    assert table.iloc[4]["budget"] == -1 and table.iloc[4]["image_id"] == "b"
    assert str(table["best_iou"].dtype) == "float32" and str(table["budget"].dtype) == "int32"
    empty = R.recall_table([])
    assert tuple(empty.columns) == R.TABLE_COLUMNS and len(empty) == 0


def test_recall_table_roundtrips_parquet(tmp_path):
    table = R.recall_table([_rows("a", [[0, 0, 10, 20]], [50], [[0.5]])])
    table.to_parquet(tmp_path / "t.parquet", index=False)
    back = pd.read_parquet(tmp_path / "t.parquet")
    assert tuple(back.columns) == R.TABLE_COLUMNS and back["best_iou"].tolist() == [0.5]


def test_summarize_by_budget_size_and_anchor_baseline():
    small, large = [0, 0, 10, 10], [0, 0, 200, 200]
    table = R.recall_table([
        _rows("a", [small, large], [50, 300], [[0.3, 0.55], [0.8, 0.96]]),
        _rows("a", [small, large], [R.ANCHOR_BUDGET], [[0.1], [0.75]]),
        _rows("v", [large], [50, 300], [[0.0, 0.5]], split="val"),
    ])
    summary = R.summarize(table, num_proposals={("test", 50): 50, ("test", -1): 14400})
    assert tuple(summary.columns) == R.SUMMARY_COLUMNS
    get = lambda **kw: R.lookup(summary, **kw)                          # noqa: E731
    assert get(split="test", budget=50, metric="recall", iou_threshold=0.5) == 0.5
    assert get(split="test", budget=300, metric="recall", iou_threshold=0.5) == 1.0
    assert get(split="test", budget=300, metric="recall", iou_threshold=0.95) == 0.5
    assert get(split="test", budget=300, metric="AR") == \
        pytest.approx(R.average_recall([.55, .96]))
    assert get(split="test", budget=300, metric="AR", size="small") == \
        pytest.approx(R.average_recall([0.55]))
    assert get(split="test", budget=300, metric="AR", size="large") == 1.0
    assert math.isnan(get(split="test", budget=300, metric="AR", size="medium"))  # no boxes
    assert get(split="val", budget=300, metric="recall", iou_threshold=0.5) == 1.0
    anchors = summary[summary["budget"] == R.ANCHOR_BUDGET]
    assert set(anchors["proposals"]) == {"anchors"} and set(anchors["num_proposals"]) == {14400}
    assert set(summary.loc[summary["budget"] > 0, "proposals"]) == {"rpn"}
    assert get(split="test", budget=-1, metric="recall", iou_threshold=0.7) == 0.5
    per_group = summary[(summary["split"] == "test") & (summary["budget"] == 50)
                        & (summary["size"] == "all") & (summary["class_name"] == "all")]
    assert per_group["metric"].value_counts().to_dict() == {"recall": 10, "AR": 1}
    assert per_group["num_gt"].unique().tolist() == [2]
    assert len(R.summarize(R.empty_recall_table())) == 0


def test_plot_frames():
    table = R.recall_table([
        _rows("a", [[0, 0, 50, 50]] * 2, [50, 300], [[0.3, 0.55], [0.8, 0.96]]),
        _rows("a", [[0, 0, 50, 50]] * 2, [R.ANCHOR_BUDGET], [[0.1], [0.75]]),
    ])
    summary = R.summarize(table)
    iou = R.recall_vs_iou(summary, "test")
    assert list(iou.columns) == ["budget", "iou", "recall"]
    assert sorted(iou["budget"].unique()) == [-1, 50, 300] and len(iou) == 30
    wide = R.iou_curve_columns(iou)
    assert list(wide.columns) == ["iou", "top50", "top300", "anchors"] and len(wide) == 10
    assert wide["iou"].tolist() == list(R.IOU_THRESHOLDS)
    assert wide["top300"].tolist() == [1.0] * 2 + [0.5] * 8        # best IoUs 0.55 and 0.96
    assert wide["anchors"].tolist() == [0.5] * 6 + [0.0] * 4        # 0.1 and 0.75
    props = R.recall_vs_proposals(summary, "test")
    assert list(props.columns) == ["budget", "recall@0.5", "recall@0.7"]
    assert props["budget"].tolist() == [50, 300]
    assert props["recall@0.5"].tolist() == [0.5, 1.0] and props["recall@0.7"].tolist() == [0.5, 0.5]


def test_summarize_per_class_over_all_sizes():
    """Per-class rows: every class with boxes, over all sizes, each the recall of its own boxes
    only (hand-computed); the class-free rows are unchanged by them."""
    boxes = [[0, 0, 10, 10], [0, 0, 200, 200], [5, 5, 50, 50]]
    rows = R.image_recall_rows(image_id="a", split="test", gt_boxes=torch.tensor(boxes, dtype=torch.float32),
                               labels=torch.tensor([1, 2, 1]), difficult=torch.zeros(3, dtype=torch.bool),
                               best_iou=torch.tensor([[0.3], [0.9], [0.6]]), budgets=[300])
    summary = R.summarize(R.recall_table([rows]), class_names=["cat", "dog"])
    get = lambda **kw: R.lookup(summary, split="test", budget=300, **kw)    # noqa: E731
    assert get(metric="recall", iou_threshold=0.5, class_name="cat") == 0.5     # 0.6 of 0.3, 0.6
    assert get(metric="recall", iou_threshold=0.5, class_name="dog") == 1.0
    assert get(metric="AR", class_name="cat") == pytest.approx(R.average_recall([0.3, 0.6]))
    assert get(metric="recall", iou_threshold=0.5) == pytest.approx(2 / 3)      # all classes
    per_class = summary[summary["class_name"] != "all"]
    assert set(per_class["size"]) == {"all"} and set(per_class["class_name"]) == {"cat", "dog"}
    assert per_class.groupby("class_name")["num_gt"].first().to_dict() == {"cat": 2, "dog": 1}
    unnamed = R.summarize(R.recall_table([rows]))                               # no names: ids
    assert set(unnamed["class_name"]) == {"all", "1", "2"}
