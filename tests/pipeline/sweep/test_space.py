"""pipeline.sweep.space: the search space, decoding samples, each trial's config and resources,
the metric names, and the sweep settings the config checks."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import Config, ConfigError, load_config
from pipeline.evaluation import recall as R
from pipeline.evaluation.metrics import split_metrics
from pipeline.sweep import space as sweep_space
from tests.support import ROOT
from tests.support.factories import SEARCH_SPACE

PARAMS = ROOT / "params.yaml"

SPACE = SEARCH_SPACE


def test_search_space_samples_decode_to_valid_values():
    from ray.tune.search.variant_generator import generate_variants

    space = sweep_space.search_space(SPACE)
    # list choices travel as YAML text (Optuna takes only scalar categories)
    assert space["anchors.scales"].categories == ["[8, 16, 32]", "[4, 8, 16]"]
    seen_samples, seen_scales = set(), set()
    for _ in range(60):
        _, sampled = next(generate_variants(space))
        values = sweep_space.decode(SPACE, sampled)
        assert values["anchors.scales"] in ([8, 16, 32], [4, 8, 16])
        assert 0.6 <= values["rpn.pos_iou"] <= 0.8 and 1e-4 <= values["train.lr"] <= 1e-2
        assert values["train.lr_schedule"] in ("cosine", "constant")
        seen_samples.add(values["rpn.num_samples"])
        seen_scales.add(tuple(values["anchors.scales"]))
        Config().replace(values)  # every sample is a valid config
    assert seen_samples == {16, 17, 18}  # randint: both ends included
    assert len(seen_scales) == 2


def test_decode_refuses_a_value_outside_the_space():
    with pytest.raises(ConfigError, match="anchors.scales"):
        sweep_space.decode(SPACE, {**dict.fromkeys(SPACE, 1), "anchors.scales": "[1, 2]"})
    with pytest.raises(ConfigError, match="no value"):
        sweep_space.decode(SPACE, {})


def test_trial_config_trains_at_the_sweep_size_with_anchors_scaled():
    base = Config().replace({"data.image_size": 640, "sweep.image_size": 320, "sweep.epochs": 3,
                             "sweep.workers_per_trial": 2, "sweep.cpus_per_trial": 1.0,
                             "sweep.gpus_per_trial": 0.5, "rpn.min_size": 16.0})
    cfg = sweep_space.trial_config(base, {"anchors.scales": [4, 8, 16], "rpn.pos_iou": 0.65})
    assert cfg.data.image_size == 320
    assert cfg.anchors.scales == (2.0, 4.0, 8.0)  # same anchor / image proportion as at 640
    assert cfg.rpn.min_size == 8.0 and cfg.rpn.pos_iou == 0.65
    assert cfg.train.rpn_epochs == 3 and cfg.train.num_workers == 2
    assert cfg.train.use_gpu == "true" and cfg.train.gpus_per_worker == 0.25
    assert cfg.train.cpus_per_worker == 0.5 and cfg.train.checkpoint_every == 0
    assert sweep_space.worker_resources(base) == {"CPU": 0.5, "GPU": 0.25}
    # sweep.image_size 0: the prepared size, nothing rescaled
    same = sweep_space.trial_config(base.replace({"sweep.image_size": 0}),
                                    {"anchors.scales": [4, 8, 16]})
    assert same.data.image_size == 640 and same.anchors.scales == (4.0, 8.0, 16.0)
    assert same.train.use_gpu == "true"


def test_trial_config_refuses_an_invalid_combination():
    with pytest.raises(ConfigError, match="neg_iou"):
        sweep_space.trial_config(Config(), {"rpn.pos_iou": 0.5, "rpn.neg_iou": 0.6})


def test_metric_names_are_what_evaluate_reports():
    # a one-image recall table at every default budget: split_metrics names the metrics
    budgets = (50, 100, 300, 1000, 2000)
    rows = R.image_recall_rows(image_id="a", split="val", gt_boxes=torch.tensor([[0., 0, 9, 9]]),
                               labels=torch.tensor([1]), difficult=torch.tensor([False]),
                               best_iou=torch.full((1, 5), 0.8), budgets=budgets)
    summary = R.summarize(R.recall_table([rows]))
    values = split_metrics(summary, "val", budgets, None, [])
    names = sweep_space.metric_names(budgets)
    assert set(names) <= set(values)
    plain = ["AR@50", "AR@100", "AR@300", "AR@1000", "AR@2000", "recall@0.5/300", "recall@0.7/300"]
    assert names == plain + [f"{n}/mean_class" for n in plain]
    assert sweep_space.metric_names((100, 200)) == ["AR@100", "AR@200", "AR@100/mean_class",
                                                    "AR@200/mean_class"]


def test_the_class_mean_weighs_every_class_the_same():
    # class 1: 3 boxes all found; class 2: 1 box missed -> recall 0.75 over boxes, 0.5 over classes
    rows = R.image_recall_rows(image_id="a", split="val", gt_boxes=torch.tensor([[0., 0, 9, 9]] * 4),
                               labels=torch.tensor([1, 1, 1, 2]), difficult=torch.zeros(4, dtype=torch.bool),
                               best_iou=torch.tensor([[0.8], [0.8], [0.8], [0.1]]), budgets=[300])
    values = split_metrics(R.summarize(R.recall_table([rows]), class_names=["a", "b"]), "val",
                           [300], None, ["a", "b"])
    assert values["recall@0.5/300"] == 0.75 and values["recall@0.5/300/mean_class"] == 0.5
    assert values["AR@300/mean_class"] == pytest.approx((values["AR@300/a"] + 0.0) / 2)


@pytest.mark.parametrize("key, why", [
    ("rpn.pre_nms_top_n_train", "never runs the training proposal layer"),
    ("rpn.post_nms_top_n_train", "never runs the training proposal layer"),
    ("roi.fg_iou", "the RoI head never runs"),
    ("train.frcnn_epochs", "trials train the RPN alone"),
    ("train.rpn_epochs", "sweep.epochs"),
    ("train.loader_workers", "operational"),
])
def test_a_key_no_trial_reads_is_refused_naming_it_and_why(key, why):
    value = {"roi.fg_iou": 0.5}.get(key, 2)
    cfg = Config().replace({f"sweep.space.{key}": {"choice": [value]}})
    with pytest.raises(ConfigError, match=rf"sweep.space.{key}: a trial never reads it \(.*{why}"):
        sweep_space.check(cfg)
    shapes = Config().replace({"anchors.shapes": [[16, 16]],
                               "sweep.space.anchors.scales": {"choice": [[2, 4]]}})
    with pytest.raises(ConfigError, match="anchors.shapes is set"):
        sweep_space.check(shapes)


def test_whole_anchor_settings_and_fitted_shapes():
    space = {"anchors": {"grid": [{"scales": [8, 16, 32]}, {"shapes": [[20, 30]]}, "fit"]},
             "rpn.pos_iou": {"uniform": [0.6, 0.7]}}
    base = Config().replace({"sweep.space": space, "anchors.shapes": [[50, 50]]})
    calls = []
    resolved = sweep_space.resolve_fit(base, lambda: calls.append(1) or [(10.0, 12.0), (40, 30)])
    assert calls == [1]
    (kind, values), = resolved.sweep.space["anchors"].items()
    assert values[2] == {"shapes": [[10.0, 12.0], [40.0, 30.0]]}
    assert sweep_space.resolve_fit(Config().replace({"sweep.space": {"rpn.pos_iou": space[
        "rpn.pos_iou"]}}), lambda: 1 / 0).sweep.space == {"rpn.pos_iou": space["rpn.pos_iou"]}
    trials = [sweep_space.trial_config(resolved.replace({"sweep.image_size": 0}),
                                       {"anchors": v, "rpn.pos_iou": 0.65}) for v in values]
    assert trials[0].anchors.shapes is None and trials[0].anchors.scales == (8.0, 16.0, 32.0)
    assert trials[1].anchors.shapes == ((20.0, 30.0),) and trials[2].anchors.num_anchors == 2
    half = sweep_space.trial_config(resolved.replace({"sweep.image_size": 320}),
                                    {"anchors": values[1], "rpn.pos_iou": 0.65})
    assert half.anchors.shapes == ((10.0, 15.0),)                    # scaled with the image
    with pytest.raises(ConfigError, match="not an anchor setting"):
        Config().replace({"sweep.space": {"anchors": {"choice": [{"rpn": 1}]}}})
    with pytest.raises(ConfigError, match="would be overridden"):
        sweep_space.check(Config().replace({"sweep.space": {**space, "anchors.ratios": {
            "choice": [[1.0]]}}}))


def test_check_names_the_allowed_metrics():
    sweep_space.check(load_config([PARAMS]))  # params.yaml as shipped
    with pytest.raises(ConfigError, match=r"sweep.metric: 'AR@123'.*AR@300"):
        sweep_space.check(Config().replace({"sweep.metric": "AR@123",
                                            "sweep.space.train.lr": {"uniform": [0.1, 0.2]}}))
    with pytest.raises(ConfigError, match="sweep.space: empty"):
        sweep_space.check(Config())


@pytest.mark.parametrize("override, match", [
    ({"sweep.image_size": 16}, "sweep.image_size"),
    ({"sweep.cpus_per_trial": 0.0}, "both 0"),
    ({"sweep.name": "a/b"}, "sweep.name"),
    ({"sweep.workers_per_trial": 0}, "sweep.workers_per_trial"),
])
def test_sweep_config_checks(override, match):
    with pytest.raises(ConfigError, match=match):
        Config().replace(override)


def test_a_grid_runs_every_value_num_samples_times():
    from ray.tune.search.variant_generator import generate_variants

    space = {"anchors.scales": {"grid": [[8, 16, 32], [2, 4, 8, 16]]},
             "rpn.pos_iou": {"grid": [0.6, 0.7, 0.8]}, "train.lr": {"uniform": [1e-4, 1e-3]}}
    cfg = Config().replace({"sweep.space": space, "sweep.num_samples": 2})
    assert sweep_space.trial_count(cfg) == 2 * 2 * 3
    drawn = [sweep_space.decode(space, sampled)
             for _ in range(2) for _, sampled in generate_variants(sweep_space.search_space(space))]
    pairs = sorted((tuple(v["anchors.scales"]), v["rpn.pos_iou"]) for v in drawn)
    assert pairs == sorted([(s, p) for s in ((8, 16, 32), (2, 4, 8, 16)) for p in (0.6, 0.7, 0.8)] * 2)
    with pytest.raises(ConfigError, match="grid needs sweep.search=random"):
        Config().replace({"sweep.space": space, "sweep.search": "optuna"})
    with pytest.raises(ConfigError, match="pos_iou"):
        Config().replace({"sweep.space": {"rpn.pos_iou": {"grid": [0.7, 1.5]}}})


def test_a_whole_anchor_setting_that_no_trial_reads_is_refused():
    for setting, match in (({"stride": 8, "scales": [1]}, "anchors.stride"),
                           ({"scales": [1], "shapes": [[16, 16]]}, "give one or the other")):
        with pytest.raises(ConfigError, match=match):   # when the config is built, or checked
            cfg = Config().replace({"sweep.space": {"anchors": {"choice": [{"scales": [2]},
                                                                          setting]}}})
            sweep_space.check(cfg)
