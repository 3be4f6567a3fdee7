"""FasterRCNN: shapes at 640, training / eval / propose contracts, rpn_only, autocast, errors."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

from detector import (AnchorMatching, AnchorSettings, BackboneSettings, FasterRCNN, LossWeights,
                      NonFiniteLossError, ProposalSettings, RoIHeadSettings)
from tests.support.detections import same_detections

SMALL = dict(image_size=64, anchors=AnchorSettings(scales=(1.0, 2.0, 4.0)),
             roi_head=RoIHeadSettings(hidden_dim=32), proposals=ProposalSettings(min_size=4.0),
             matching=AnchorMatching(allow_border=-1.0))
TINY_HEAD = RoIHeadSettings(hidden_dim=8)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def targets(device: str = "cpu") -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 30.0, 60.0, 50.0]], device=device),
         "labels": torch.tensor([1, 3], device=device)},
        {"boxes": torch.zeros(0, 4, device=device),
         "labels": torch.zeros(0, dtype=torch.int64, device=device)},
    ]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: torch on one thread


@pytest.fixture()
def small_model() -> FasterRCNN:
    """A fresh model for each test (cheap at 64 px): tests move it between devices and modes."""
    torch.manual_seed(0)
    return FasterRCNN(3, **SMALL)


def test_full_size_shapes_at_640() -> None:
    torch.manual_seed(0)
    model = FasterRCNN(20).eval()  # the default configuration, 640 x 640
    images = torch.rand(1, 3, 640, 640)
    with torch.no_grad():
        features = model._features(images)
        assert features.shape == (1, 512, 40, 40)
        scores, offsets = model.rpn.head(features)
        assert scores.shape == (1, 18, 40, 40) and offsets.shape == (1, 36, 40, 40)
        assert model.rpn.anchor_generator(features.shape[-2:], features.device).shape == (14_400, 4)
        proposals, _ = model.rpn(features, (640, 640))
        assert proposals.boxes.shape == (1, 300, 4)
        dets = model.roi_heads(features, proposals.boxes, proposals.valid, (640, 640))
    assert len(dets) == 1 and dets[0]["boxes"].shape[0] <= 100
    assert model.roi_heads.fc6.in_features == 512 * 7 * 7 and model.roi_heads.fc6.out_features == 4096
    assert model.roi_heads.cls_score.out_features == 21 and model.roi_heads.bbox_pred.out_features == 84


@pytest.mark.parametrize("device", DEVICES)
def test_training_returns_the_four_losses_and_trains_everything(device: str) -> None:
    torch.manual_seed(0)
    model = FasterRCNN(3, **SMALL).to(device).train()
    losses = model(torch.rand(2, 3, 64, 64, device=device), targets(device))
    assert set(losses) == {"rpn_cls", "rpn_reg", "roi_cls", "roi_reg"}
    assert all(v.dim() == 0 and v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_eval_returns_detections_and_propose_returns_proposals(device: str, small_model: FasterRCNN) -> None:
    model = small_model.to(device).eval()
    images = torch.rand(2, 3, 64, 64, device=device)
    with torch.no_grad():
        dets = model(images)
    assert len(dets) == 2
    for d in dets:
        n = d["boxes"].shape[0]
        assert d["boxes"].shape == (n, 4) and d["scores"].shape == (n,) and d["labels"].shape == (n,)
        assert d["labels"].dtype == torch.int64 and ((d["labels"] >= 1) & (d["labels"] <= 3)).all()
        assert n <= 100 and (d["scores"] > 0.05).all()
    props = model.propose(images)
    assert len(props) == 2
    for boxes, scores in props:
        assert boxes.shape == (scores.shape[0], 4) and 0 < scores.shape[0] <= 300
        assert (scores[:-1] >= scores[1:]).all() and not scores.requires_grad
    small_model.cpu()


def test_batch_gives_each_image_its_own_results(small_model: FasterRCNN) -> None:
    model = small_model.eval()
    # class scores spread well apart (an untrained head gives ~1/(K+1) to every class, so
    # near-ties that NMS could break either way)
    torch.nn.init.normal_(model.roi_heads.cls_score.weight, std=1.0)
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        together = model(images)
        alone = [model(images[i : i + 1])[0] for i in range(3)]
    for a, b in zip(together, alone):
        assert len(a["boxes"]) > 0 and same_detections(a, b), (a, b)
    alone_proposals = [model.propose(images[i : i + 1])[0] for i in range(3)]
    for (a, sa), (b, sb) in zip(model.propose(images), alone_proposals):
        assert same_detections({"boxes": a, "scores": sa}, {"boxes": b, "scores": sb})


def test_rpn_only_trains_the_rpn_alone_and_freezes_nothing() -> None:
    torch.manual_seed(0)
    model = FasterRCNN(3, rpn_only=True, **SMALL).train()
    losses = model(torch.rand(2, 3, 64, 64), targets())
    assert set(losses) == {"rpn_cls", "rpn_reg"}
    sum(losses.values()).backward()
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.roi_heads.parameters())  # head not run
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("roi_heads"))
    assert any(k.startswith("roi_heads.fc6") for k in model.state_dict())  # whole model saved
    full = FasterRCNN(3, **SMALL)
    full.load_state_dict(model.state_dict())  # the frcnn stage starts from it
    model.eval()
    with torch.no_grad():
        assert len(model(torch.rand(1, 3, 64, 64))) == 1
    assert len(model.propose(torch.rand(1, 3, 64, 64))) == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_runs_under_autocast(device: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = FasterRCNN(3, **SMALL).to(device)
    images = torch.rand(2, 3, 64, 64, device=device)
    with torch.autocast(device, dtype=dtype):
        losses = model(images, targets(device))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    if device != "cpu" or dtype != torch.float16:  # CPU fp16 convolution backward: minutes
        sum(losses.values()).backward()
    model.eval()
    with torch.autocast(device, dtype=dtype), torch.no_grad():
        dets = model(images)
        props = model.propose(images)
    assert dets[0]["boxes"].dtype == torch.float32 and props[0][0].dtype == torch.float32


def test_non_finite_losses_are_returned_for_the_training_loop_to_check() -> None:
    """The model does not check its losses (the pipeline's loop does, naming the step): a NaN
    comes back as a value, and NonFiniteLossError stays importable for the loop to raise."""
    model = FasterRCNN(3, **SMALL).train()
    with torch.no_grad():
        model.rpn.head.cls.bias.fill_(float("nan"))
    losses = model(torch.rand(1, 3, 64, 64), targets()[:1])
    assert torch.isnan(losses["rpn_cls"])
    assert issubclass(NonFiniteLossError, FloatingPointError)


def test_bad_inputs_are_refused(small_model: FasterRCNN) -> None:
    model = small_model.train()
    with pytest.raises(ValueError, match="image_size=64"):
        model(torch.rand(1, 3, 96, 96), targets()[:1])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(3, 64, 64), targets()[:1])
    with pytest.raises(ValueError, match="one target dict per image"):
        model(torch.rand(2, 3, 64, 64))
    bad = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([4])}]
    with pytest.raises(ValueError, match="label 4"):
        model(torch.rand(1, 3, 64, 64), bad)
    bad = [{"boxes": torch.tensor([[5.0, 0.0, 5.0, 10.0]]), "labels": torch.tensor([1])}]
    with pytest.raises(ValueError, match="x2 > x1"):
        model(torch.rand(1, 3, 64, 64), bad)


def test_untrained_anchor_types_are_named_in_a_warning_and_listed_on_the_model() -> None:
    with pytest.warns(UserWarning, match=r"2 anchor type\(s\) never lie inside a 640x640 image "
                      r"with matching.allow_border=0.0.*ratio 0.5 x scale 32 \(724x362 px\), "
                      r"ratio 2 x scale 32 \(362x724 px\)") as record:
        model = FasterRCNN(2, matching=AnchorMatching(allow_border=0.0), roi_head=TINY_HEAD)
    assert record[0].filename == __file__  # points at the caller
    assert model.untrained_anchor_types == [(0.5, 32.0), (2.0, 32.0)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        default = FasterRCNN(2, roi_head=TINY_HEAD)
        wider = FasterRCNN(2, matching=AnchorMatching(allow_border=64.0), roi_head=TINY_HEAD)
    assert default.config["matching"]["allow_border"] == -1.0
    assert default.rpn.matching.allow_border == -1.0
    assert default.untrained_anchor_types == [] and wider.untrained_anchor_types == []
    with pytest.warns(UserWarning, match="9 anchor type"):  # 128..512 px anchors, 64 px images
        tiny = FasterRCNN(2, image_size=64, matching=AnchorMatching(allow_border=0.0),
                          roi_head=TINY_HEAD)
    assert len(tiny.untrained_anchor_types) == 9


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_classes=0), "num_classes"), (dict(anchors=AnchorSettings(stride=8)), "stride"),
    (dict(roi_head=RoIHeadSettings(pool="max")), "pool"),
    (dict(anchors=AnchorSettings(ratios=())), "ratio"),
    (dict(roi_head=RoIHeadSettings(dropout=1.0)), "dropout"),
    (dict(backbone=BackboneSettings(freeze_blocks=6)), "freeze_blocks")])
def test_bad_configuration_is_refused(kwargs: dict, match: str) -> None:
    kwargs = {"num_classes": 2, **SMALL, **kwargs}
    with pytest.raises(ValueError, match=match):
        FasterRCNN(**kwargs)


def test_settings_must_be_settings_objects() -> None:
    with pytest.raises(TypeError, match="anchors must be a AnchorSettings, got dict"):
        FasterRCNN(2, anchors={"scales": (1.0,)})


def test_config_rebuilds_the_model(small_model: FasterRCNN) -> None:
    cfg = small_model.config
    assert cfg["num_classes"] == 3 and cfg["image_size"] == 64 and cfg["detection"]["nms_iou"] == 0.3
    assert set(cfg) == {"num_classes", "image_size", "rpn_only", "backbone", "anchors", "matching",
                        "proposals", "roi_sampling", "roi_head", "detection", "loss_weights"}
    assert cfg["roi_head"]["dropout"] == 0.5 and cfg["backbone"]["freeze_blocks"] == 2
    rebuilt = FasterRCNN.from_config(cfg)
    assert rebuilt.config == cfg
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in small_model.state_dict().items()}


def test_a_flat_config_of_an_earlier_version_rebuilds_the_same_model() -> None:
    """Model files of earlier versions hold the constructor's former flat keywords."""
    flat = {"num_classes": 2, "image_size": 64, "anchor_scales": [1.0, 2.0, 4.0],
            "roi_hidden_dim": 32, "rpn_min_size": 4.0, "rpn_allow_border": -1.0,
            "roi_reg_weight": 2.0, "backbone_freeze_blocks": 3}
    model = FasterRCNN.from_config(flat)
    assert model.config == FasterRCNN(
        2, **{**SMALL, "loss_weights": LossWeights(roi_reg=2.0),
              "backbone": BackboneSettings(freeze_blocks=3)}).config


def test_pipeline_settings_build_the_model() -> None:
    """The pipeline's config -> settings bridge fits the constructor contract: every settings
    object built from the config section of the same names."""
    config = pytest.importorskip("pipeline.config")
    modeling = pytest.importorskip("pipeline.modeling")
    cfg = config.Config().replace({"roi.hidden_dim": 16, "rpn.pos_iou": 0.65,
                                   "roi.reg_weight": 2.0})
    kwargs = modeling.model_settings(cfg)
    inspect.signature(FasterRCNN).bind(4, **kwargs)  # every name known, keyword-only
    model = FasterRCNN(4, **kwargs)
    assert model.config["matching"]["pos_iou"] == 0.65
    assert model.config["roi_head"]["hidden_dim"] == 16
    assert model.config["loss_weights"] == {"rpn_reg": 1.0, "roi_reg": 2.0}


def counted_forward(model: FasterRCNN, images: torch.Tensor, boxes_per_image: int):
    """Operators and host syncs (:class:`benchmarks.op_count.OpCounter`) of one training forward."""
    from benchmarks.op_count import OpCounter
    g = torch.Generator().manual_seed(0)
    s = images.shape[-1]
    tgts = []
    for _ in range(images.shape[0]):
        xy = torch.rand(boxes_per_image, 2, generator=g) * s / 2
        tgts.append({"boxes": torch.cat((xy, xy + s / 4 + torch.rand(boxes_per_image, 2) * s / 4), 1),
                     "labels": torch.randint(1, 4, (boxes_per_image,), generator=g)})
    with OpCounter() as counts:
        model(images, tgts)
    return counts


def test_training_forward_is_batched_with_one_nms_per_image_as_only_growing_sync() -> None:
    """No Python loop over anchors or boxes, and per image only what NMS needs: the operator
    count does not change with the boxes per image or the number of anchors, grows by a few
    operators per image, and the host syncs are one NMS per image plus one read (the target
    check, where the targets are: the CPU here; the losses are not read back)."""
    torch.manual_seed(0)
    kw = dict(SMALL, roi_head=RoIHeadSettings(hidden_dim=16),
              proposals=ProposalSettings(min_size=4.0, pre_nms_top_n_train=300,
                                         post_nms_top_n_train=50))
    model = FasterRCNN(3, **kw).train()
    base = counted_forward(model, torch.rand(1, 3, 64, 64), 1)
    assert base.sync_names == {"aten::_local_scalar_dense": 1, "torchvision::nms": 1}
    more_boxes = counted_forward(model, torch.rand(1, 3, 64, 64), 12)
    assert more_boxes.by_name == base.by_name
    more_anchors = counted_forward(FasterRCNN(3, **dict(kw, image_size=128)).train(),
                                   torch.rand(1, 3, 128, 128), 1)  # 4x the anchors
    assert more_anchors.by_name == base.by_name
    batch = counted_forward(model, torch.rand(4, 3, 64, 64), 3)
    assert batch.sync_names == {"aten::_local_scalar_dense": 1, "torchvision::nms": 4}
    assert batch.total - base.total <= 3 * 20  # a few operators per image, none per box
