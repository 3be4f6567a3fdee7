"""pipeline.training.schedule: warm-up and learning-rate schedules, autocast dtype, the optimiser."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.training import schedule
from tests.support.factories import tiny_cfg


def test_lr_factor_warmup_then_schedules():
    kw = {"warmup_steps": 4, "total_steps": 20}
    assert schedule.lr_factor(0, schedule="constant", **kw) == pytest.approx(0.001)
    assert schedule.lr_factor(2, schedule="constant", **kw) == pytest.approx(0.5005)
    assert schedule.lr_factor(4, schedule="constant", **kw) == 1.0
    assert schedule.lr_factor(4, schedule="cosine", **kw) == 1.0
    assert schedule.lr_factor(12, schedule="cosine", **kw) == pytest.approx(0.5)
    assert schedule.lr_factor(19, schedule="cosine", **kw) < 0.01
    step = {"schedule": "step", "milestones": (8, 16), "gamma": 0.1, **kw}
    assert [schedule.lr_factor(s, **step) for s in (5, 8, 16)] == pytest.approx([1, 0.1, 0.01])
    with pytest.raises(ValueError, match="'linear'"):
        schedule.lr_factor(0, schedule="linear", **kw)


def test_amp_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert schedule.amp_dtype("auto", cpu) is None
    assert schedule.amp_dtype("auto", cuda) is torch.bfloat16
    assert schedule.amp_dtype("fp16", cuda) is torch.float16
    assert schedule.amp_dtype("off", cuda) is None


def test_make_optimizer_follows_train_settings():
    cfg = tiny_cfg(train__lr=0.02, train__momentum=0.8, train__weight_decay=0.001,
                   train__warmup_steps=2, train__lr_schedule="step", train__lr_step_epochs=[2],
                   train__lr_gamma=0.5, train__amp="fp16")
    weight, bias = torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(3))
    optimizer, scheduler, scaler, dtype = schedule.make_optimizer(
        cfg.train, [weight, bias], steps_per_epoch=3, total_steps=9, device=torch.device("cpu"))
    weights, biases = optimizer.param_groups
    assert isinstance(optimizer, torch.optim.SGD)
    assert weights["params"] == [weight] and biases["params"] == [bias]
    # no weight decay on biases (train.bias_decay false, as the original)
    assert (weights["momentum"], weights["weight_decay"], biases["weight_decay"]) == \
        (0.8, 0.001, 0.0)
    decayed = schedule.make_optimizer(tiny_cfg(train__bias_decay=True).train, [weight, bias],
                                      steps_per_epoch=1, total_steps=1,
                                      device=torch.device("cpu"))[0]
    assert [g["weight_decay"] for g in decayed.param_groups] == [0.0005, 0.0005]
    params = [weight, bias]
    assert dtype is torch.float16 and scaler is not None  # fp16 needs a gradient scaler
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # warm-up over 2 steps, then 0.02 until the milestone at epoch 2 (step 6), then halved
    assert lrs == pytest.approx([0.02 * 0.001, 0.02 * 0.5005, 0.02, 0.02, 0.02, 0.02, 0.01,
                                 0.01])
    off = schedule.make_optimizer(TrainConfig(), params, steps_per_epoch=1,
                                  total_steps=1, device=torch.device("cpu"))
    assert off[2] is None and off[3] is None  # amp auto on the CPU: full precision, no scaler
