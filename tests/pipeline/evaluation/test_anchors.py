"""pipeline.evaluation.anchors: the anchor-only recall per class, and ``frcnn anchors``."""

from __future__ import annotations

import pytest
import torch

from pipeline.cli import main
from pipeline.config import Config
from pipeline.evaluation.anchors import anchor_recall
from pipeline.prepared import GroundTruth


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
