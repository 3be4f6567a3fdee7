"""Optimisation settings of a training run: SGD, the learning-rate schedule, mixed precision.

All from ``train.*``: SGD with momentum and weight decay (not on biases unless
``train.bias_decay``, as the original); a linear warm-up over ``warmup_steps``
from ``lr * WARMUP_FACTOR`` to ``lr``, then ``cosine`` (to 0 at the last step), ``step`` (times
``lr_gamma`` at each of ``lr_step_epochs``) or ``constant``; autocast in bf16 / fp16 (``amp:
auto`` is bf16 on CUDA, off on CPU; fp16 adds a gradient scaler).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from pipeline.config import TrainConfig

WARMUP_FACTOR = 0.001


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str,
              milestones: tuple[int, ...] = (), gamma: float = 0.1) -> float:
    """Multiplier of ``train.lr`` for optimiser step ``step`` (0-based).

    Warm-up: linear from :data:`WARMUP_FACTOR` to 1 over ``warmup_steps``; then ``constant``,
    ``step`` (``gamma`` per milestone passed, milestones in steps) or ``cosine`` (from 1 at the
    end of the warm-up to 0 at ``total_steps``).
    """
    warm = 1.0
    if step < warmup_steps:
        warm = WARMUP_FACTOR + (1.0 - WARMUP_FACTOR) * step / warmup_steps
    if schedule == "constant":
        return warm
    if schedule == "step":
        return warm * gamma ** sum(step >= m for m in milestones)
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, max(0.0, (step - warmup_steps) / span))
        return warm * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"train.lr_schedule: unknown schedule {schedule!r}")


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """``train.amp`` -> the autocast dtype, or None for full precision."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[setting]


def param_groups(params: Sequence[torch.nn.Parameter], weight_decay: float, bias_decay: bool
                 ) -> list[dict[str, Any]]:
    """SGD parameter groups: weights (``ndim > 1``) with ``weight_decay``; biases with it too
    only when ``bias_decay``. Empty groups are left out."""
    weights = [p for p in params if p.ndim > 1]
    biases = [p for p in params if p.ndim <= 1]
    groups = [{"params": weights, "weight_decay": weight_decay},
              {"params": biases, "weight_decay": weight_decay if bias_decay else 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(tcfg: TrainConfig, params: Sequence[torch.nn.Parameter], *,
                   steps_per_epoch: int, total_steps: int, device: torch.device
                   ) -> tuple[torch.optim.Optimizer, Any, torch.amp.GradScaler | None,
                              torch.dtype | None]:
    """``(SGD, its LambdaLR schedule, a GradScaler for fp16 or None, the autocast dtype or
    None)`` for the trainable ``params``; one-dimensional parameters (biases) get no weight
    decay unless ``train.bias_decay``."""
    optimizer = torch.optim.SGD(param_groups(params, tcfg.weight_decay, tcfg.bias_decay),
                                lr=tcfg.lr, momentum=tcfg.momentum)
    milestones = tuple(e * steps_per_epoch for e in tcfg.lr_step_epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, warmup_steps=tcfg.warmup_steps, total_steps=total_steps, schedule=tcfg.lr_schedule,
        milestones=milestones, gamma=tcfg.lr_gamma))
    dtype = amp_dtype(tcfg.amp, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return optimizer, scheduler, scaler, dtype
