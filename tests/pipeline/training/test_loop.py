"""pipeline.training.loop without Ray: one process, the real detector at 64 x 64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from detector import NonFiniteLossError, load_model
from pipeline.modeling import build_model
from pipeline.training import checkpoints, loop
from tests.support.factories import tiny_cfg, write_prepared

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rpn_stage_trains_logs_checkpoints_and_saves_a_loadable_model(prepared, tmp_path):
    cfg = tiny_cfg(train__rpn_epochs=2, train__checkpoint_every=2)
    logged: list[tuple[dict, int]] = []
    store = checkpoints.LocalCheckpoints(tmp_path / "ckpt", keep=2)
    result = loop.train(cfg, stage="rpn", train_path=prepared / "train.parquet",
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
    fresh = build_model(cfg, num_classes=2, stage="rpn")
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
    whole = loop.train(cfg, stage="rpn", train_path=path, num_classes=2,
                       report=checkpoints.LocalCheckpoints(tmp_path / "whole"))

    store = checkpoints.LocalCheckpoints(tmp_path / "cut")

    def report_then_die(metrics, folder, name):
        store(metrics, folder, name)
        raise _Stop

    with pytest.raises(_Stop):
        loop.train(cfg, stage="rpn", train_path=path, num_classes=2, report=report_then_die)
    assert store.latest().name == "checkpoint_e000_s0000002"  # mid-epoch 1 (3 steps)

    said: list[str] = []
    resumed = loop.train(cfg, stage="rpn", train_path=path, num_classes=2, report=store,
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
    loop.train(cfg, stage="rpn", train_path=prepared / "train.parquet", num_classes=2,
               report=store)
    first = store.latest()
    again = loop.train(cfg, stage="rpn", train_path=prepared / "train.parquet",
                       num_classes=2, report=store, resume=first)
    assert again.steps == 1 and again.images == 0
    assert (store.latest() / checkpoints.MODEL).is_file()


def test_frcnn_stage_starts_from_the_rpn_model(prepared, tmp_path):
    cfg = tiny_cfg(train__max_steps=2)
    store = checkpoints.LocalCheckpoints(tmp_path / "rpn")
    rpn = loop.train(cfg, stage="rpn", train_path=prepared / "train.parquet",
                     num_classes=2, report=store)
    rpn_file = store.latest() / checkpoints.MODEL
    said: list[str] = []
    logged: list[dict] = []
    result = loop.train(cfg, stage="frcnn", train_path=prepared / "train.parquet",
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
    loop.train(tiny_cfg(train__max_steps=1), stage="rpn",
               train_path=prepared / "train.parquet", num_classes=2, report=store)
    other = tiny_cfg(anchors__scales=[1, 2, 3])  # 6 anchors per cell instead of 4
    with pytest.raises(ValueError, match="do not fit"):
        loop.train(other, stage="frcnn", train_path=prepared / "train.parquet",
                   num_classes=2, init_model=store.latest() / checkpoints.MODEL)


class _NaNModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, images, targets):
        return {"rpn_cls": self.w * float("nan"), "rpn_reg": self.w * 0}


def test_non_finite_loss_names_the_step_and_the_epoch(prepared):
    with pytest.raises(NonFiniteLossError, match=r"train_rpn: non-finite loss at step 1 "
                                                 r"\(epoch 1\): \{'rpn_cls': nan, 'rpn_reg': 0.0\}"):
        loop.train(tiny_cfg(), stage="rpn", train_path=prepared / "train.parquet",
                   num_classes=2, model_fn=_NaNModel)


def test_real_model_diverging_mid_run_names_the_step_and_the_epoch(prepared):
    """The real detector: after 3 good steps (epoch 1 of 3 steps) its objectness weights turn
    NaN, as they do when training diverges; the loop's error names step 4 of epoch 2."""
    cfg = tiny_cfg(train__rpn_epochs=2)
    calls = []

    def diverging() -> nn.Module:
        model = build_model(cfg, num_classes=2, stage="rpn")

        def poison(module, args):
            calls.append(1)
            if len(calls) == 4:
                with torch.no_grad():
                    module.rpn.head.cls.bias.fill_(float("nan"))
        model.register_forward_pre_hook(poison)
        return model

    with pytest.raises(NonFiniteLossError) as caught:
        loop.train(cfg, stage="rpn", train_path=prepared / "train.parquet", num_classes=2,
                   model_fn=diverging)
    assert len(calls) == 4
    message = str(caught.value)
    assert message.startswith("train_rpn: non-finite loss at step 4 (epoch 2): "), message
    assert "'rpn_cls': nan" in message


def test_on_epoch_end_metrics_join_the_epoch_log_and_report(tmp_path):
    prepared = write_prepared(tmp_path / "prepared", size=64, num_images=4)
    cfg = tiny_cfg(train__rpn_epochs=2)
    calls, logged = [], []

    def hook(model: torch.nn.Module, epoch: int) -> dict[str, float]:
        calls.append((epoch, model.training))
        model.eval()
        return {"AR@300": epoch / 10}

    store = checkpoints.LocalCheckpoints(tmp_path / "ckpt")
    result = loop.train(cfg, stage="rpn", train_path=prepared / "train.parquet",
                        num_classes=2, report=store, on_epoch_end=hook,
                        log=lambda m, step: logged.append((dict(m), step)))
    assert calls == [(1, True), (2, True)]  # training mode again after the hook's eval()
    assert [r["AR@300"] for r in store.reports] == [0.1, 0.2]
    assert [r["epoch"] for r in store.reports] == [1, 2]
    epoch_logs = [(m["epoch/AR@300"], step) for m, step in logged if "epoch/AR@300" in m]
    assert epoch_logs == [(0.1, 1), (0.2, 2)]
    assert result.model.training


def test_an_input_that_ends_early_is_an_error_not_an_endless_epoch(prepared):
    """An input that delivers fewer batches than the epoch's steps (a reader bug, a table
    changed underneath) stops the run with the count, instead of starting the epoch again."""
    import itertools

    from pipeline.errors import DataError
    from pipeline.training.loader import TableInput

    cfg = tiny_cfg()
    real = TableInput(prepared / "train.parquet", batch_size=cfg.train.batch_size)

    class Short:
        shard_size, image_size = real.shard_size, real.image_size

        def epoch(self, epoch, start_step=0):
            return itertools.islice(iter(real.epoch(epoch, start_step)), 1)

    steps = -(-real.shard_size // cfg.train.batch_size)
    with pytest.raises(DataError, match=f"input of epoch 1 ended after 1 of its {steps} steps"):
        loop.train(cfg, stage="rpn", data=Short(), num_classes=2)

