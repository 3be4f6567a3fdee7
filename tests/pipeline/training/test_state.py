"""pipeline.training.state: the loop's counters and running sums, saved and restored."""

from __future__ import annotations

import pytest
import torch

from pipeline.training.state import LoopState


def _state() -> LoopState:
    state = LoopState(("rpn_cls", "rpn_reg"))
    state.add_step(torch.tensor([1.0, 0.5]), images=2)
    state.add_step(torch.tensor([3.0, 1.5]), images=2)
    return state


def test_steps_are_counted_and_the_last_losses_kept():
    state = _state()
    assert (state.step, state.epoch, state.epoch_step, state.images) == (2, 0, 2, 4)
    assert state.last == {"rpn_cls": 3.0, "rpn_reg": 1.5, "loss": 4.5}
    assert state.epoch_sums.dtype == torch.float64


def test_closing_an_epoch_appends_its_means_and_starts_the_next():
    state = _state()
    entry = state.close_epoch()
    assert entry == {"epoch": 0, "steps": 2, "loss": pytest.approx(3.0), "rpn_cls": 2.0,
                     "rpn_reg": 1.0}
    assert state.history == [entry]
    assert (state.step, state.epoch, state.epoch_step) == (2, 1, 0)
    assert torch.equal(state.epoch_sums, torch.zeros(2, dtype=torch.float64))


def test_state_dict_round_trip_mid_epoch():
    """What a checkpoint keeps: counters, the running sums, the history (copies, not views);
    this process's image count and last losses are not kept."""
    state = _state()
    state.close_epoch()
    state.add_step(torch.tensor([2.0, 2.0]), images=2)
    saved = state.state_dict()
    state.add_step(torch.tensor([9.0, 9.0]), images=2)  # after the checkpoint: not in it
    restored = LoopState(("rpn_cls", "rpn_reg"))
    restored.load_state_dict(saved)
    assert (restored.step, restored.epoch, restored.epoch_step) == (3, 1, 1)
    assert restored.epoch_sums.tolist() == [2.0, 2.0] and restored.history == state.history
    assert restored.images == 0 and restored.last == {}
