"""The state of a training run that changes as it trains, and what the run returns.

:class:`LoopState` holds the counters and running sums; it saves and restores itself
(:meth:`LoopState.state_dict`), and a checkpoint keeps it beside the model, optimiser, schedule
and RNG states (:mod:`pipeline.training.loop`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn


@dataclass
class TrainResult:
    """What :func:`train` did, in this process.

    ``history`` holds one entry per epoch (the last one may be partial when ``max_steps``
    stopped the run): ``{"epoch", "steps", "loss", <loss terms>}``, means over all ranks.
    """

    model: nn.Module
    history: list[dict[str, float]]
    steps: int
    total_steps: int
    images: int
    train_seconds: float
    images_per_s: float
    resumed_from: dict[str, Any] | None = None
    final_losses: dict[str, float] = field(default_factory=dict)


@dataclass
class LoopState:
    """What changes as training runs: counters, the epoch's running loss sums, the history.

    ``epoch`` counts finished epochs, ``epoch_step`` optimiser steps done in the current epoch,
    ``step`` optimiser steps in all. :meth:`state_dict` is what a checkpoint keeps of it;
    ``images`` and ``last`` (this process's image count, the last step's losses) are not kept.
    """

    terms: tuple[str, ...]
    step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    epoch_sums: torch.Tensor = None  # type: ignore[assignment]  # (len(terms),) float64
    history: list[dict[str, float]] = field(default_factory=list)
    images: int = 0
    last: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.epoch_sums is None:
            self.epoch_sums = torch.zeros(len(self.terms), dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "epoch_step": self.epoch_step,
                "epoch_sums": self.epoch_sums.clone(), "history": list(self.history)}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        self.step, self.epoch, self.epoch_step = saved["step"], saved["epoch"], saved["epoch_step"]
        self.epoch_sums = saved["epoch_sums"].to(torch.float64)
        self.history = [dict(h) for h in saved["history"]]

    def add_step(self, values: torch.Tensor, images: int) -> None:
        """Count one optimiser step with its loss terms ``values`` (CPU) over ``images``."""
        self.step += 1
        self.epoch_step += 1
        self.epoch_sums += values.to(torch.float64)
        self.images += images
        self.last = {t: float(v) for t, v in zip(self.terms, values)}
        self.last["loss"] = float(values.sum())

    def close_epoch(self) -> dict[str, float]:
        """Append the epoch's means over all ranks to the history and start the next epoch."""
        means = _mean_over_ranks(self.epoch_sums, self.epoch_step)
        entry = {"epoch": self.epoch, "steps": self.epoch_step, "loss": float(means.sum())}
        entry.update({t: float(m) for t, m in zip(self.terms, means)})
        self.history.append(entry)
        self.epoch += 1
        self.epoch_step = 0
        self.epoch_sums.zero_()
        return entry


def _mean_over_ranks(sums: torch.Tensor, count: int) -> torch.Tensor:
    """Mean of per-rank sums over ``count`` steps each; all-reduced when distributed."""
    total = sums.clone()
    ranks = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
        ranks = torch.distributed.get_world_size()
    return total / max(1, count * ranks)
