"""VOC AP: hand-made cases, a loop-based reference of the devkit, and torchmetrics at IoU 0.5."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.evaluation.voc_ap import evaluate_detections, mean_ap, voc_ap
from tests.support.references import voc_eval_reference


def det(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def gt(boxes, labels, difficult=None):
    out = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
           "labels": torch.tensor(labels, dtype=torch.int64)}
    if difficult is not None:
        out["difficult"] = torch.tensor(difficult, dtype=torch.bool)
    return out


A, B, FAR = [0, 0, 10, 10], [20, 20, 30, 30], [100, 100, 110, 110]


def test_voc_ap_all_point_interpolation_by_hand():
    # Envelope of precision [1, 0.5, 2/3] is [1, 2/3, 2/3]: 0.5 * 1 + 0.5 * 2/3.
    assert voc_ap([0.5, 0.5, 1.0], [1.0, 0.5, 2 / 3]) == pytest.approx(0.5 + 1 / 3)
    assert voc_ap([0.25, 0.5], [1.0, 1.0]) == pytest.approx(0.5)
    assert voc_ap([], []) == 0.0
    # A later, higher precision lifts the earlier dip (the envelope), unlike a raw sum.
    assert voc_ap([0.5, 0.5, 1.0], [1.0, 0.5, 0.75]) == pytest.approx(0.5 + 0.5 * 0.75)


def test_tp_fp_then_tp():
    res = evaluate_detections([det([A, FAR, B], [0.9, 0.8, 0.7], [1, 1, 1])],
                              [gt([A, B], [1, 1])], num_classes=1)
    assert res[1].ap == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert res[1].recall.tolist() == [0.5, 0.5, 1.0]
    assert res[1].num_gt == 2 and res[1].num_detections == 3


def test_duplicate_detection_is_a_false_positive():
    res = evaluate_detections([det([A, [0, 0, 10, 11], B], [0.9, 0.8, 0.7], [1, 1, 1])],
                              [gt([A, B], [1, 1])], num_classes=1)
    assert res[1].precision.tolist() == pytest.approx([1.0, 0.5, 2 / 3])


def test_ranking_is_over_all_images():
    # The FP of image 1 outranks the TP of image 0's second box.
    res = evaluate_detections([det([A, B], [0.9, 0.5], [1, 1]), det([FAR], [0.7], [1])],
                              [gt([A, B], [1, 1]), gt([], [])], num_classes=1)
    assert res[1].precision.tolist() == pytest.approx([1.0, 0.5, 2 / 3])


def test_difficult_boxes_are_ignored_both_ways():
    # The detection on the difficult box is neither TP nor FP, and the box is not counted.
    res = evaluate_detections([det([B, A], [0.9, 0.8], [1, 1])],
                              [gt([A, B], [1, 1], difficult=[False, True])], num_classes=1)
    assert res[1].num_gt == 1 and res[1].num_detections == 1 and res[1].ap == 1.0
    # Missing a difficult box costs nothing either.
    res = evaluate_detections([det([A], [0.9], [1])],
                              [gt([A, B], [1, 1], difficult=[False, True])], num_classes=1)
    assert res[1].ap == 1.0


def test_wrong_class_and_classes_without_ground_truth():
    res = evaluate_detections([det([A, B], [0.9, 0.8], [2, 3])], [gt([A, B], [1, 2])],
                              num_classes=3)
    assert res[1].ap == 0.0                          # never detected
    assert res[2].ap == 0.0                          # detected at the wrong place
    assert math.isnan(res[3].ap) and res[3].num_gt == 0   # no ground truth: no AP
    assert mean_ap(res) == 0.0                      # NaN left out of the mean
    assert math.isnan(mean_ap({}))


def test_voc_takes_the_best_box_even_when_matched():
    # Two overlapping boxes of one class; the second detection's best box is the matched one,
    # so VOC counts it a FP (COCO would match it to the other box).
    g1, g2 = [0, 0, 10, 10], [0, 2, 10, 12]
    d2 = [0, 0.5, 10, 10.5]                          # IoU 0.9 with g1, 0.73 with g2
    res = evaluate_detections([det([g1, d2], [0.9, 0.8], [1, 1])], [gt([g1, g2], [1, 1])],
                              num_classes=1)
    assert res[1].recall.tolist() == [0.5, 0.5]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="one of each per image"):
        evaluate_detections([det([A], [0.9], [1])], [], num_classes=1)
    with pytest.raises(ValueError, match=r"labels must be in 1..2"):
        evaluate_detections([det([A], [0.9], [1])], [gt([A], [3])], num_classes=2)


# --------------------------------------------------------------------------------------------
# Against the devkit's loops (tests.support.references) and torchmetrics


def random_scene(gen, num_images, num_classes, *, overlapping=True, difficult_rate=0.15):
    """Ground truth and noisy detections (jittered copies plus clutter) for a few images."""
    dets, gts = [], []
    for _ in range(num_images):
        g = int(torch.randint(1, 8, (1,), generator=gen))
        if overlapping:
            xy = torch.rand(g, 2, generator=gen) * 120
        else:                                        # one box per 100-pixel cell: never overlap
            cells = torch.randperm(25, generator=gen)[:g]
            xy = torch.stack([cells % 5, cells // 5], 1).float() * 100 + 5
        wh = torch.rand(g, 2, generator=gen) * 50 + 20
        boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(1, num_classes + 1, (g,), generator=gen)
        difficult = torch.rand(g, generator=gen) < difficult_rate
        gts.append({"boxes": boxes, "labels": labels, "difficult": difficult})
        # Each box detected 0-2 times with jitter (some below IoU 0.5), sometimes mislabelled.
        copies = torch.randint(0, 3, (g,), generator=gen)
        src = torch.repeat_interleave(torch.arange(g), copies)
        jitter = (torch.rand(src.numel(), 4, generator=gen) - 0.5) * 20
        d_boxes = boxes[src] + jitter
        d_labels = labels[src].clone()
        flip = torch.rand(src.numel(), generator=gen) < 0.1
        d_labels[flip] = torch.randint(1, num_classes + 1, (int(flip.sum()),), generator=gen)
        c = int(torch.randint(0, 5, (1,), generator=gen))
        c_xy = torch.rand(c, 2, generator=gen) * 400
        clutter = torch.cat([c_xy, c_xy + torch.rand(c, 2, generator=gen) * 60 + 10], 1)
        d_boxes = torch.cat([d_boxes, clutter])
        d_labels = torch.cat([d_labels, torch.randint(1, num_classes + 1, (c,), generator=gen)])
        x1y1 = torch.minimum(d_boxes[:, :2], d_boxes[:, 2:] - 1)
        d_boxes = torch.cat([x1y1, d_boxes[:, 2:]], 1)
        dets.append({"boxes": d_boxes, "labels": d_labels,
                     "scores": torch.rand(d_boxes.shape[0], generator=gen)})
    return dets, gts


@pytest.mark.parametrize("seed", range(6))
def test_matches_loop_reference_of_the_devkit(seed):
    gen = torch.Generator().manual_seed(seed)
    dets, gts = random_scene(gen, num_images=6, num_classes=3)
    got = evaluate_detections(dets, gts, num_classes=3)
    ref = voc_eval_reference(dets, gts, num_classes=3)
    for k in ref:
        if math.isnan(ref[k]):
            assert math.isnan(got[k].ap)
        else:
            assert got[k].ap == pytest.approx(ref[k], abs=1e-9), k


@pytest.mark.parametrize("seed", range(3))
def test_agrees_with_torchmetrics_within_interpolation_difference(seed):
    """torchmetrics (COCO rules at IoU 0.5) samples the envelope at 101 recall points; VOC takes
    the area. For a non-increasing envelope the two differ by at most about 1/100. Scenes without
    difficult or overlapping boxes, so the matching rules coincide."""
    mean_average_precision = pytest.importorskip("torchmetrics.detection").MeanAveragePrecision
    gen = torch.Generator().manual_seed(100 + seed)
    dets, gts = random_scene(gen, num_images=8, num_classes=3, overlapping=False,
                             difficult_rate=0.0)
    ours = evaluate_detections(dets, gts, num_classes=3)
    metric = mean_average_precision(iou_type="bbox", iou_thresholds=[0.5], class_metrics=True)
    metric.update(dets, [{"boxes": g["boxes"], "labels": g["labels"]} for g in gts])
    theirs = metric.compute()
    classes = theirs["classes"].tolist()
    per_class = dict(zip(classes, theirs["map_per_class"].tolist()))
    for k, result in ours.items():
        if math.isnan(result.ap):
            continue
        assert abs(result.ap - per_class[k]) <= 0.011, (k, result.ap, per_class[k])
    assert abs(mean_ap(ours) - float(theirs["map"])) <= 0.011
