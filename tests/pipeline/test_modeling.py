"""pipeline.modeling: config -> model, the RPN stage's weights carried into the full model, and
anchor shapes through the model and its files."""

from __future__ import annotations

import pytest
import torch

from detector.serialization import load_model, save_model
from pipeline.errors import DataError
from pipeline.modeling import build_model, init_from_rpn
from tests.support.factories import tiny_cfg


def test_init_from_rpn_copies_the_backbone_and_rpn_and_leaves_the_head(tmp_path):
    cfg = tiny_cfg()
    torch.manual_seed(0)
    rpn = build_model(cfg, num_classes=2, stage="rpn")
    with torch.no_grad():
        for p in rpn.parameters():
            p.add_(1.0)                                      # "trained": unlike any fresh model
    path = save_model(tmp_path / "rpn.pt", rpn, stage="rpn")
    torch.manual_seed(1)
    full = build_model(cfg, num_classes=2, stage="frcnn")
    head_before = {k: v.clone() for k, v in full.roi_heads.state_dict().items()}
    counts = init_from_rpn(full, path)
    got, src = full.state_dict(), rpn.state_dict()
    copied = [k for k in got if k.startswith(("backbone.", "rpn."))]
    assert counts == {"loaded": len(copied), "new": len(got) - len(copied)}
    assert all(torch.equal(got[k], src[k]) for k in copied)
    assert all(torch.equal(v, head_before[k]) for k, v in full.roi_heads.state_dict().items())
    other = build_model(tiny_cfg(anchors__scales=(1.0,)), num_classes=2, stage="frcnn")
    with pytest.raises(DataError, match="different anchors"):
        init_from_rpn(other, path)


def test_anchor_shapes_go_through_the_model_its_file_and_the_rpn(tmp_path):
    cfg = tiny_cfg(anchors__shapes=((12.0, 20.0), (30.0, 18.0)))
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=2, stage="frcnn")
    gen = model.rpn.anchor_generator
    assert gen.num_per_cell == 2 and gen.sizes == ((12.0, 20.0), (30.0, 18.0))
    assert model.rpn.head.cls.out_channels == 4 and model.rpn.head.reg.out_channels == 8
    side = cfg.data.image_size // 16
    anchors = gen((side, side), torch.device("cpu"))
    assert anchors.shape == (side * side * 2, 4)
    torch.testing.assert_close(anchors[1], torch.tensor([8 - 15.0, 8 - 9.0, 8 + 15.0, 8 + 9.0]))
    # training targets and proposals work on them
    images = torch.rand(2, 3, cfg.data.image_size, cfg.data.image_size)
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 24.0]]), "labels": torch.tensor([1])}] * 2
    losses = model.train()(images, targets)
    assert set(losses) == {"rpn_cls", "rpn_reg", "roi_cls", "roi_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    proposals = model.eval().propose(images)
    assert len(proposals) == 2 and proposals[0][0].shape[1] == 4
    # the model file rebuilds the same anchors
    back, _ = load_model(save_model(tmp_path / "m.pt", model, stage="frcnn"))
    assert back.rpn.anchor_generator.sizes == gen.sizes
    assert back.config["anchor_shapes"] == ((12.0, 20.0), (30.0, 18.0))
