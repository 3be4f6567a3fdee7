"""Config loading: params.yaml, overlays, --set overrides, validation errors."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, load_config, parse_override
from tests.support import ROOT


def test_params_yaml_loads_and_matches_spec_defaults():
    cfg = load_config([ROOT / "params.yaml"])
    assert cfg.data.image_size == 640
    assert cfg.anchors.scales == (8.0, 16.0, 32.0) and cfg.anchors.num_anchors == 9
    assert (cfg.rpn.pos_iou, cfg.rpn.neg_iou, cfg.rpn.num_samples) == (0.7, 0.3, 256)
    assert (cfg.rpn.pre_nms_top_n_train, cfg.rpn.post_nms_top_n_test) == (12000, 300)


def test_the_gpu_profile_loads_over_params_yaml():
    """overlays/gpu.yaml, the README's cluster profile: one worker per GPU, GPUs asked for
    explicitly (``auto`` is refused on a cluster), no custom resource pinning one per node."""
    cfg = load_config([ROOT / "params.yaml", ROOT / "overlays" / "gpu.yaml"])
    t = cfg.train
    assert (t.use_gpu, t.gpus_per_worker, t.num_workers, t.ray_address) == ("true", 1, 8, "auto")
    assert t.worker_resources == {} and cfg.sweep.gpus_per_trial == 1
    assert t.storage_path.startswith("s3://") and cfg.sweep.storage_path.startswith("s3://")
    assert (cfg.rpn.pos_iou, cfg.data.image_size) == (0.7, 640)   # the rest from params.yaml


def test_overlay_later_file_wins(tmp_path):
    overlay = tmp_path / "best.yaml"
    overlay.write_text("rpn:\n  pos_iou: 0.65\n")
    cfg = load_config([ROOT / "params.yaml", overlay])
    assert cfg.rpn.pos_iou == 0.65 and cfg.rpn.neg_iou == 0.3


@pytest.mark.parametrize("item, fragment", [
    ("rpn.bogus=1", "unknown key rpn.bogus"),
    ("nosuch.key=1", "unknown section 'nosuch'"),
    ("rpn.pos_iou=1.5", "rpn.pos_iou: 1.5 is out of range"),
    ("rpn.num_samples=many", "rpn.num_samples: expected an integer"),
    ("data.resize=crop", "allowed: stretch, letterbox"),
    ("anchors.scales=[]", "anchors.scales: expected a non-empty list"),
    ("rpn.neg_iou=0.9", "must be <= rpn.pos_iou"),
    ("data.source=ftp://x", "data.source"),
])
def test_bad_override_names_key_and_allowed(item, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("(", r"\(")):
        load_config([ROOT / "params.yaml"], [item])


def test_override_types_parsed_as_yaml():
    assert parse_override("anchors.scales=[4, 8]") == ("anchors.scales", [4, 8])
    cfg = load_config([ROOT / "params.yaml"], ["anchors.scales=[4, 8]", "train.ray_address=auto"])
    assert cfg.anchors.scales == (4.0, 8.0) and cfg.train.ray_address == "auto"


def test_flat_round_trip():
    cfg = load_config([ROOT / "params.yaml"])
    assert cfg.replace(cfg.flat()) == cfg
    assert cfg.replace(cfg.flat() | {"rpn.pos_iou": 0.6}).rpn.pos_iou == 0.6


@pytest.mark.parametrize("overrides, fragment", [
    (["data.split=imagesets"], "data.split: imagesets needs data.source=voc:PATH"),
    (["data.source=voc:x", "data.image_root=images"], "data.image_root: only used with"),
    (["data.classes=[a, b]"], "data.classes: not used with data.source=synthetic"),
    (["data.source=voc:x", "data.classes=[a, a]"], "data.classes: names must be distinct"),
])
def test_data_source_combinations_are_checked(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        load_config([ROOT / "params.yaml"], overrides)


def test_data_split_and_classes_accepted_where_they_apply():
    cfg = load_config([ROOT / "params.yaml"],
                      ["data.source=voc:x", "data.split=imagesets", "data.classes=[RBC, WBC]"])
    assert cfg.data.split == "imagesets" and cfg.data.classes == ("RBC", "WBC")
    assert load_config([ROOT / "params.yaml"]).data.split == "random"


def test_config_error_is_the_pipelines_and_a_value_error():
    from pipeline import errors

    assert ConfigError is errors.ConfigError
    assert issubclass(ConfigError, errors.PipelineError) and issubclass(ConfigError, ValueError)


def test_the_original_works_training_choices_are_parameters_with_its_defaults():
    cfg = load_config([ROOT / "params.yaml"])
    assert cfg.rpn.allow_border == -1.0          # every anchor type trains (torchvision, detectron2)
    assert cfg.roi.dropout == 0.5 and cfg.backbone.freeze_blocks == 2
    assert cfg.train.bias_decay is False and cfg.train.worker_resources == {}
    from pipeline.modeling import model_settings
    settings = model_settings(cfg)
    assert (settings["roi_head"].dropout, settings["backbone"].freeze_blocks,
            settings["matching"].allow_border) == (0.5, 2, -1.0)


@pytest.mark.parametrize("item, fragment", [
    ("roi.dropout=1.0", "roi.dropout: 1.0 is out of range"),
    ("backbone.freeze_blocks=6", "backbone.freeze_blocks: 6 is out of range"),
    ("train.worker_resources={node_a: -1}", "train.worker_resources: 'node_a': -1 must be"),
])
def test_new_training_parameters_are_checked(item, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config([ROOT / "params.yaml"], [item])


def test_anchors_stride_is_the_backbones_and_nothing_else():
    """``anchors.stride`` is validated in the config (one clear error), and the one value it
    takes is the backbone's feature stride."""
    import typing

    from detector.backbone import VGG16Backbone
    from pipeline.config import AnchorConfig, Config, ConfigError

    assert typing.get_args(typing.get_type_hints(AnchorConfig)["stride"]) == \
        (VGG16Backbone.stride,)
    with pytest.raises(ConfigError, match=r"anchors.stride: 8 is not allowed; allowed: 16"):
        Config().replace({"anchors.stride": 8})
