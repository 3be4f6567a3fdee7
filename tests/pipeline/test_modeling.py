"""pipeline.modeling: config -> model, the RPN stage's weights carried into the full model,
anchor shapes through the model and its files, and the anchor types a config leaves untrained."""

from __future__ import annotations

import pytest
import torch

from detector.serialization import load_model, save_model
from pipeline import modeling
from pipeline.config import Config
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
    assert back.config["anchors"]["shapes"] == ((12.0, 20.0), (30.0, 18.0))


# --------------------------------------------------------------------------------------------
# Anchor types a config leaves untrained


def test_every_type_trains_at_the_defaults():
    assert modeling.untrained_types(Config()) == []
    assert modeling.warn_untrained(Config(), "train_rpn") is None


def test_allow_border_zero_leaves_the_two_large_elongated_types_untrained(capsys):
    cfg = Config().replace({"rpn.allow_border": 0.0})
    assert modeling.untrained_types(cfg) == [(0.5, 32.0), (2.0, 32.0)]
    text = modeling.warn_untrained(cfg, "train_rpn")
    assert text == "ratio 0.5 x scale 32 (724x362 px), ratio 2 x scale 32 (362x724 px)"
    err = capsys.readouterr().err
    assert err.startswith("train_rpn: warning: 2 anchor type(s) never lie inside the 640x640")
    assert text in err and "rpn.allow_border=-1" in err


def test_a_margin_that_fits_them_trains_them():
    # 724 px wide, centred at 312 or 328: inside a 640 px image widened by 50.04 px or more
    assert modeling.untrained_types(Config().replace({"rpn.allow_border": 51.0})) == []
    assert modeling.untrained_types(Config().replace({"rpn.allow_border": 40.0})) == \
        [(0.5, 32.0), (2.0, 32.0)]


def test_explicit_shapes_are_types_too(capsys):
    cfg = Config().replace({"anchors.shapes": [[24, 40], [700, 300]], "rpn.allow_border": 0.0})
    assert modeling.untrained_types(cfg) == [(300 / 700, (700 * 300) ** 0.5 / 16)]
    assert modeling.warn_untrained(cfg, "train_rpn") == "shape 700x300 px"
