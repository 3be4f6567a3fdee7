"""pipeline.anchor_coverage: the best IoU on the stride grid, the anchor-only baseline, the
stride's ceiling, fitted shapes, and ``frcnn anchors``."""

from __future__ import annotations

import itertools

import pytest
import torch
import yaml

from detector.anchors import generate_anchors
from pipeline import anchor_coverage as C
from pipeline.cli import main
from pipeline.config import Config, load_config
from torchvision.ops import box_iou
from pipeline.annotations import GroundTruth
from tests.support.references import iou_loop


def anchor_recall(cfg, split, names):
    return {k: v for k, v in C.coverage_metrics(cfg, split, class_names=names).items()
            if k.startswith("anchors/")}


# --------------------------------------------------------------------------------------------
# The best IoU on the stride grid and the stride's ceiling


def _random_boxes(gen, n, size):
    xy = torch.rand(n, 2, generator=gen) * (size - 8)
    wh = torch.rand(n, 2, generator=gen) * (size / 2) + 4
    return torch.cat([xy, torch.minimum(xy + wh, torch.tensor(float(size)))], dim=1)


def test_grid_iou_is_the_best_over_every_anchor_position():
    gen = torch.Generator().manual_seed(0)
    boxes = _random_boxes(gen, 300, 160)
    sizes = [(12.0, 30.0), (40.0, 40.0), (90.0, 45.0)]
    got = C.grid_iou(boxes, sizes, stride=16, image_size=160)            # (300, 3)
    for j, shape in enumerate(sizes):
        anchors = generate_anchors((10, 10), 16, shapes=[shape])         # all 100 positions
        torch.testing.assert_close(got[:, j].float(), box_iou(boxes, anchors).max(dim=1).values,
                                   atol=1e-5, rtol=0)


def test_ceiling_by_hand_and_against_a_search_over_anchor_shapes():
    # a 32 x 32 box centred on a cell centre (24, 24): an anchor equal to it, IoU 1
    # a 20 x 20 box centred at (16, 16), 8 px from the centres (8, 8) .. (24, 24) on both axes:
    # the best anchor surrounds it, 36 x 36: IoU 400 / 1296 = 0.309 (SPEC: out of reach at 0.5)
    boxes = torch.tensor([[8.0, 8.0, 40.0, 40.0], [6.0, 6.0, 26.0, 26.0]])
    got = C.ceiling_iou(boxes, stride=16, image_size=64)
    assert got.tolist() == pytest.approx([1.0, 400 / 1296])
    # any box: no anchor shape at any cell centre does better (a fine search of shapes)
    gen = torch.Generator().manual_seed(1)
    boxes = _random_boxes(gen, 60, 96)
    ceiling = C.ceiling_iou(boxes, stride=16, image_size=96)
    side = torch.logspace(0, 2.3, 120, dtype=torch.float64)
    shapes = torch.cartesian_prod(side, side)                           # 14,400 shapes, 1..200 px
    searched = C.grid_iou(boxes, shapes, stride=16, image_size=96).max(dim=1).values
    assert (searched <= ceiling + 1e-9).all()
    assert (ceiling - searched).max() < 0.02                            # the search comes close
    # by hand with the loop IoU: box 0 of the random set against its four corner anchors
    b = boxes[0].tolist()
    cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    gx, gy = (min(int(cx // 16), 5) + 0.5) * 16, (min(int(cy // 16), 5) + 0.5) * 16
    w, h, dx, dy = b[2] - b[0], b[3] - b[1], abs(cx - gx), abs(cy - gy)
    corners = [(aw, ah) for aw in (w - 2 * dx, w + 2 * dx) for ah in (h - 2 * dy, h + 2 * dy)
               if aw > 0 and ah > 0]
    best = max(iou_loop(b, [gx - aw / 2, gy - ah / 2, gx + aw / 2, gy + ah / 2])
               for aw, ah in corners)
    assert float(ceiling[0]) == pytest.approx(best, abs=1e-6)


def test_ceiling_metrics_per_class_beside_the_anchor_baseline(tmp_path):
    cfg = Config().replace({"data.image_size": 64, "anchors.scales": [1], "anchors.ratios": [1]})
    split = GroundTruth("test", tmp_path / "x.parquet", ["a"],
                        [torch.tensor([[16.0, 16.0, 32.0, 32.0], [6.0, 6.0, 26.0, 26.0]])],
                        [torch.tensor([1, 2])], [torch.tensor([False, False])])
    values = C.coverage_metrics(cfg, split, class_names=["cat", "dog"])
    assert values["ceiling/recall@0.5/cat"] == 1.0 and values["ceiling/AR/cat"] == 1.0
    assert values["ceiling/recall@0.5/dog"] == 0.0                  # 0.309 at best
    assert values["ceiling/recall@0.5"] == 0.5
    assert values["anchors/recall@0.5/dog"] == 0.0


def test_anchor_recall_hand_computed(tmp_path):
    """64 px image, one 16 x 16 anchor per cell (centres 8, 24, 40, 56): a box that is an anchor
    has IoU 1; the whole image has IoU 256 / 4096 with its best anchor, recall 0."""
    cfg = Config().replace({"data.image_size": 64, "anchors.scales": [1], "anchors.ratios": [1]})
    split = GroundTruth("test", tmp_path / "x.parquet", ["a"],
                        [torch.tensor([[16.0, 16.0, 32.0, 32.0], [0.0, 0.0, 64.0, 64.0]])],
                        [torch.tensor([1, 2])], [torch.tensor([False, False])])
    values = anchor_recall(cfg, split, ["cat", "dog"])
    assert values["anchors/recall@0.5"] == 0.5 and values["anchors/recall@0.7"] == 0.5
    assert values["anchors/recall@0.5/cat"] == 1.0 and values["anchors/AR/cat"] == 1.0
    assert values["anchors/recall@0.5/dog"] == 0.0 and values["anchors/AR/dog"] == 0.0
    assert values["anchors/AR"] == pytest.approx(0.5)
    assert all(key.startswith("anchors/") for key in values)


def test_frcnn_anchors_prints_types_counts_and_recall_per_class(prepared, monkeypatch, capsys):
    monkeypatch.chdir(prepared.parent)
    args = ["--set", f"data.out_dir={prepared}", "--set", "data.image_size=64",
            "--set", "anchors.scales=[1,8]", "--set", "rpn.allow_border=0"]
    assert main(["anchors", *args, "--split", "val"]) == 0
    out, err = capsys.readouterr()
    assert "ratio 1 x scale 1 (16x16 px)" in out and "ratio 1 x scale 8 (128x128 px)" in out
    lines = {line.split("  ")[1].strip(): line.split()[-1] for line in out.splitlines()
             if line.startswith("  ratio")}
    assert lines["ratio 1 x scale 1 (16x16 px)"] == "16" and lines["ratio 1 x scale 8 (128x128 px)"] == "0"
    assert "never trained: ratio 0.5 x scale 8" in err
    assert "anchors/recall@0.5/class1" in out or "anchors/recall@0.5/class2" in out


def test_bccd_overlay_anchors_reach_the_platelets_the_default_ones_miss(bccd_dir):
    """The numbers overlays/bccd.yaml documents: anchor-only recall@0.5 of the 69 test
    platelets, from the annotations stretched to 640 x 640 (no images needed)."""
    from pipeline.config import load_config
    from pipeline.prepare.voc import read_voc
    from tests.support import ROOT

    reading = read_voc(bccd_dir, use_imagesets=True)
    items = [i for i in reading.items if reading.splits[i.image_id] == "test"]
    scale = torch.tensor([640 / 640, 640 / 480] * 2)                  # 640 x 480 -> 640 x 640
    split = GroundTruth("test", bccd_dir, [i.image_id for i in items],
                        [torch.tensor(i.boxes, dtype=torch.float32) * scale for i in items],
                        [torch.tensor(i.labels) for i in items],
                        [torch.tensor(i.difficult) for i in items])
    names = list(reading.classes)
    assert names == ["Platelets", "RBC", "WBC"]
    assert sum(int((lab == 1).sum()) for lab in split.labels) == 69
    default = anchor_recall(load_config([ROOT / "params.yaml"]), split, names)
    overlay = anchor_recall(load_config([ROOT / "params.yaml", ROOT / "overlays" / "bccd.yaml"]),
                            split, names)
    assert default["anchors/recall@0.5/Platelets"] == pytest.approx(1 / 69, abs=1e-6)
    assert overlay["anchors/recall@0.5/Platelets"] == pytest.approx(65 / 69, abs=1e-6)
    assert (default["anchors/recall@0.5/RBC"], overlay["anchors/recall@0.5/RBC"]) == \
        pytest.approx((0.985, 1.0), abs=1e-3)
    assert (default["anchors/AR"], overlay["anchors/AR"]) == pytest.approx((0.479, 0.499),
                                                                           abs=1e-3)


# --------------------------------------------------------------------------------------------
# Fitting anchor shapes


def _crafted_set(gen):
    """At 320 px: 300 boxes of a frequent class, half 64 x 32 and half 32 x 64, and 12 of a rare
    class, 20 x 20, centred on cell centres (so a 20 x 20 anchor fits each exactly)."""
    centres = (torch.randint(3, 17, (300, 2), generator=gen) + 0.5) * 16
    wh = torch.tensor([[64.0, 32.0], [32.0, 64.0]]).repeat(150, 1)
    frequent = torch.cat([centres - wh / 2, centres + wh / 2], dim=1)
    small = (torch.randint(1, 19, (12, 2), generator=gen) + 0.5) * 16
    rare = torch.cat([small - 10, small + 10], dim=1)
    return torch.cat([frequent, rare]), torch.tensor([1] * 300 + [2] * 12)


def _class_recall(boxes, labels, shapes, label):
    best = C.grid_iou(boxes[labels == label], shapes, stride=16, image_size=320).max(dim=1).values
    return float((best >= 0.5).double().mean())


def test_fit_covers_a_rare_small_class_that_kmeans_trades_away():
    boxes, labels = _crafted_set(torch.Generator().manual_seed(0))
    fitted = C.fit_shapes(boxes, labels, num=2, stride=16, image_size=320)
    kmeans = C.kmeans_shapes(boxes[:, 2:] - boxes[:, :2], 2).tolist()
    assert _class_recall(boxes, labels, kmeans, 2) == 0.0           # both centres on the big ones
    assert _class_recall(boxes, labels, fitted, 2) == 1.0           # one shape for the rare class
    assert any(abs(w - 20) <= 3 and abs(h - 20) <= 3 for w, h in fitted), fitted
    assert _class_recall(boxes, labels, fitted, 1) >= 0.5           # and one of the frequent kinds
    # three shapes: the known answer, one per kind of box, everything covered
    three = C.fit_shapes(boxes, labels, num=3, stride=16, image_size=320)
    for want in ((20, 20), (64, 32), (32, 64)):
        assert any(abs(w - want[0]) <= 3 and abs(h - want[1]) <= 3 for w, h in three), three
    # a held-out draw of the same kinds of boxes: the same trade
    held, held_labels = _crafted_set(torch.Generator().manual_seed(1))
    assert _class_recall(held, held_labels, fitted, 2) == 1.0
    assert _class_recall(held, held_labels, kmeans, 2) == 0.0


def test_fit_is_never_worse_than_the_setting_it_starts_from():
    gen = torch.Generator().manual_seed(2)
    boxes = _random_boxes(gen, 200, 320)
    labels = torch.randint(1, 4, (200,), generator=gen)
    current = list(itertools.product([32.0, 64.0, 128.0], [32.0, 64.0, 128.0]))
    fitted = C.fit_shapes(boxes, labels, num=9, stride=16, image_size=320, current=current)
    classes = torch.unique(labels, return_inverse=True)[1]

    def score(shapes):
        best = C.grid_iou(boxes, shapes, stride=16, image_size=320).max(dim=1).values
        return float(C.balanced_score(best, classes, 3))
    assert len(fitted) == 9 and score(fitted) >= score(current)


def test_frcnn_anchors_fit_writes_an_overlay_that_params_accepts(prepared, tmp_path, monkeypatch,
                                                                capsys):
    monkeypatch.chdir(prepared.parent)
    out = tmp_path / "fitted.yaml"
    args = ["--set", f"data.out_dir={prepared}", "--set", "data.image_size=64"]
    assert main(["anchors", *args, "--split", "val", "--fit", "--num", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fitted 3 shapes on train" in printed and "ceiling/AR" in printed
    assert "current" in printed and "k-means" in printed and "fitted" in printed
    shapes = yaml.safe_load(out.read_text())["anchors"]["shapes"]
    assert len(shapes) == 3 and all(len(s) == 2 and min(s) > 0 for s in shapes)
    cfg = load_config([out], overrides=[f"data.out_dir={prepared}", "data.image_size=64"])
    assert cfg.anchors.shapes == tuple(tuple(s) for s in shapes) and cfg.anchors.num_anchors == 3
    assert main(["anchors", "--params", str(out), *args, "--split", "val"]) == 0
    assert "shape " in capsys.readouterr().out
    assert main(["anchors", *args, "--fit", "--num", "0", "--out", str(out)]) == 2
