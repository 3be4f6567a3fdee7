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
