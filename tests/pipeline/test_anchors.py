"""pipeline.anchors: anchor types that never train under a setting, named and warned about."""

from __future__ import annotations

from pipeline import anchors
from pipeline.config import Config


def test_every_type_trains_at_the_defaults():
    assert anchors.untrained_types(Config()) == []
    assert anchors.warn_untrained(Config(), "train_rpn") is None


def test_allow_border_zero_leaves_the_two_large_elongated_types_untrained(capsys):
    cfg = Config().replace({"rpn.allow_border": 0.0})
    assert anchors.untrained_types(cfg) == [(0.5, 32.0), (2.0, 32.0)]
    text = anchors.warn_untrained(cfg, "train_rpn")
    assert text == "ratio 0.5 x scale 32 (724x362 px), ratio 2 x scale 32 (362x724 px)"
    err = capsys.readouterr().err
    assert err.startswith("train_rpn: warning: 2 anchor type(s) never lie inside the 640x640")
    assert text in err and "rpn.allow_border=-1" in err


def test_a_margin_that_fits_them_trains_them():
    # 724 px wide, centred at 312 or 328: inside a 640 px image widened by 50.04 px or more
    assert anchors.untrained_types(Config().replace({"rpn.allow_border": 51.0})) == []
    assert anchors.untrained_types(Config().replace({"rpn.allow_border": 40.0})) == \
        [(0.5, 32.0), (2.0, 32.0)]
