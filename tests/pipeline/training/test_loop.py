"""pipeline.train_loop without Ray: one process, the real detector at 64 x 64."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from detector import load_model
from pipeline import checkpoints, train_loop
from pipeline.config import Config
from tests.pipeline.test_data import write_prepared

TINY = {
    "data.image_size": 64, "anchors.scales": [1, 2], "rpn.min_size": 4.0,
    "rpn.pre_nms_top_n_train": 100, "rpn.post_nms_top_n_train": 50,
    "rpn.pre_nms_top_n_test": 100, "rpn.post_nms_top_n_test": 50,
    "rpn.num_samples": 32, "roi.num_samples": 16, "roi.hidden_dim": 32, "roi.pool_size": 2,
    "train.num_workers": 1, "train.batch_size": 2, "train.loader_workers": 0,
    "train.warmup_steps": 1, "train.lr": 0.01,
}


def tiny_cfg(**overrides) -> Config:
    return Config().replace({**TINY, **{k.replace("__", "."): v for k, v in overrides.items()}})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("data") / "prepared", size=64, num_images=6)


def test_lr_factor_warmup_then_schedules():
    kw = {"warmup_steps": 4, "total_steps": 20}
    assert train_loop.lr_factor(0, schedule="constant", **kw) == pytest.approx(0.001)
    assert train_loop.lr_factor(2, schedule="constant", **kw) == pytest.approx(0.5005)
    assert train_loop.lr_factor(4, schedule="constant", **kw) == 1.0
    assert train_loop.lr_factor(4, schedule="cosine", **kw) == 1.0
    assert train_loop.lr_factor(12, schedule="cosine", **kw) == pytest.approx(0.5)
    assert train_loop.lr_factor(19, schedule="cosine", **kw) < 0.01
    step = {"schedule": "step", "milestones": (8, 16), "gamma": 0.1, **kw}
    assert [train_loop.lr_factor(s, **step) for s in (5, 8, 16)] == pytest.approx([1, 0.1, 0.01])


def test_amp_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert train_loop.amp_dtype("auto", cpu) is None
    assert train_loop.amp_dtype("auto", cuda) is torch.bfloat16
    assert train_loop.amp_dtype("fp16", cuda) is torch.float16
    assert train_loop.amp_dtype("off", cuda) is None


def test_rpn_stage_trains_logs_checkpoints_and_saves_a_loadable_model(prepared, tmp_path):
    cfg = tiny_cfg(train__rpn_epochs=2, train__checkpoint_every=2)
    logged: list[tuple[dict, int]] = []
    store = checkpoints.LocalCheckpoints(tmp_path / "ckpt", keep=2)
    result = train_loop.train(cfg, stage="rpn", train_path=prepared / "train.parquet",
                              num_classes=2, report=store, log=lambda m, s: logged.append((m, s)),
                              model_meta={"classes": ["class1", "class2"]})
    # 6 images / batch 2 = 3 steps per epoch, 2 epochs
    assert result.steps == result.total_steps == 6 and result.images == 12
    assert [h["epoch"] for h in result.history] == [0, 1]
    assert set(result.history[0]) == {"epoch", "steps", "loss", "rpn_cls", "rpn_reg"}
    steps = [s for m, s in logged if "loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert {"rpn_cls", "rpn_reg", "loss", "lr", "images_per_s"} <= set(logged[0][0])
    assert [s for m, s in logged if "epoch/loss" in m] == [1, 2]
    lrs = [m["lr"] for m, _ in logged if "lr" in m]
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[1]  # warm-up then cosine decay
    # checkpoints: step 2 (checkpoint_every), epoch ends at steps 3 and 6; step 4 as well
    names = [p.name for p in store.checkpoints()]
    assert names == ["checkpoint_e001_s0000004", "checkpoint_e002_s0000006"]
    last = store.latest()
    progress = checkpoints.read_progress(last)
    assert progress["done"] and progress["step"] == 6 and len(progress["history"]) == 2
    state = checkpoints.read_state(last)  # weights_only=True
    assert state["optimizer"] is None and state["step"] == 6
    model, meta = load_model(last / checkpoints.MODEL)
    assert meta["classes"] == ["class1", "class2"] and meta["stage"] == "rpn"
    assert model.config["rpn_only"] and model.config["image_size"] == 64
    for key, value in result.model.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    # the RPN stage leaves the Fast R-CNN head untouched (frozen)
    torch.manual_seed(cfg.train.seed)  # what train() does before building the model
    fresh = train_loop.build_model(cfg, num_classes=2, stage="rpn")
    assert torch.equal(model.roi_heads.fc6.weight, fresh.roi_heads.fc6.weight)
    assert not torch.equal(model.rpn.state_dict()[next(iter(model.rpn.state_dict()))],
                           fresh.rpn.state_dict()[next(iter(fresh.rpn.state_dict()))])


class _Stop(Exception):
    pass


def test_interrupted_run_resumes_where_it_stopped(prepared, tmp_path):
    """Stopped after its first checkpoint (mid-epoch), a run resumed from it ends with the same
    weights as a run that was never interrupted."""
    cfg = tiny_cfg(train__rpn_epochs=2, train__checkpoint_every=2, train__hflip=0.5)
    path = prepared / "train.parquet"
    whole = train_loop.train(cfg, stage="rpn", train_path=path, num_classes=2,
                             report=checkpoints.LocalCheckpoints(tmp_path / "whole"))

    store = checkpoints.LocalCheckpoints(tmp_path / "cut")

    def report_then_die(metrics, folder, name):
        store(metrics, folder, name)
        raise _Stop

    with pytest.raises(_Stop):
        train_loop.train(cfg, stage="rpn", train_path=path, num_classes=2, report=report_then_die)
    assert store.latest().name == "checkpoint_e000_s0000002"  # mid-epoch 1 (3 steps)

    said: list[str] = []
    resumed = train_loop.train(cfg, stage="rpn", train_path=path, num_classes=2, report=store,
                               resume=store.latest(), say=said.append)
    assert said[0].startswith(f"train_rpn: resuming from checkpoint {store.latest().parent}")
    assert "(epoch 0, step 2)" in said[0]
    assert resumed.resumed_from["step"] == 2
    assert resumed.steps == 6 and resumed.images == 4 * 2  # only the 4 remaining steps
    for (a, b) in zip(whole.history, resumed.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    for key, value in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-4, atol=1e-5)


def test_resuming_a_finished_run_reports_its_model_again(prepared, tmp_path):
    cfg = tiny_cfg(train__max_steps=1)
    store = checkpoints.LocalCheckpoints(tmp_path / "ckpt")
    train_loop.train(cfg, stage="rpn", train_path=prepared / "train.parquet", num_classes=2,
                     report=store)
    first = store.latest()
    again = train_loop.train(cfg, stage="rpn", train_path=prepared / "train.parquet",
                             num_classes=2, report=store, resume=first)
    assert again.steps == 1 and again.images == 0
    assert (store.latest() / checkpoints.MODEL).is_file()


def test_frcnn_stage_starts_from_the_rpn_model(prepared, tmp_path):
    cfg = tiny_cfg(train__max_steps=2)
    store = checkpoints.LocalCheckpoints(tmp_path / "rpn")
    rpn = train_loop.train(cfg, stage="rpn", train_path=prepared / "train.parquet",
                           num_classes=2, report=store)
    rpn_file = store.latest() / checkpoints.MODEL
    said: list[str] = []
    logged: list[dict] = []
    result = train_loop.train(cfg, stage="frcnn", train_path=prepared / "train.parquet",
                              num_classes=2, init_model=rpn_file, say=said.append,
                              log=lambda m, s: logged.append(m))
    assert "initialised" in said[0] and str(rpn_file) in said[0]
    assert {"rpn_cls", "rpn_reg", "roi_cls", "roi_reg"} <= set(logged[0])
    assert all(math.isfinite(v) for v in result.history[-1].values())
    # one step later the weights moved away from the RPN's, starting from them
    first_key = "backbone.features.0.weight"
    start = rpn.model.state_dict()[first_key]
    assert not torch.equal(result.model.state_dict()[first_key], start)
    assert (result.model.state_dict()[first_key] - start).abs().max() < 0.1


def test_frcnn_init_refuses_a_model_of_another_shape(prepared, tmp_path):
    store = checkpoints.LocalCheckpoints(tmp_path / "rpn")
    train_loop.train(tiny_cfg(train__max_steps=1), stage="rpn",
                     train_path=prepared / "train.parquet", num_classes=2, report=store)
    other = tiny_cfg(anchors__scales=[1, 2, 3])  # 6 anchors per cell instead of 4
    with pytest.raises(ValueError, match="do not fit"):
        train_loop.train(other, stage="frcnn", train_path=prepared / "train.parquet",
                         num_classes=2, init_model=store.latest() / checkpoints.MODEL)


class _NaNModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, images, targets):
        return {"rpn_cls": self.w * float("nan"), "rpn_reg": self.w * 0}


def test_non_finite_loss_names_the_step(prepared):
    with pytest.raises(FloatingPointError, match="step 1"):
        train_loop.train(tiny_cfg(), stage="rpn", train_path=prepared / "train.parquet",
                         num_classes=2, model_fn=_NaNModel)


def test_metrics_json_round_trip_of_progress(tmp_path):
    checkpoints.write(tmp_path, {"x": torch.ones(2)}, {"step": 3, "history": []})
    assert json.loads((tmp_path / checkpoints.PROGRESS).read_text())["step"] == 3
    assert torch.equal(checkpoints.read_state(tmp_path)["x"], torch.ones(2))
