"""pipeline.training.checkpoints: names, the files of a checkpoint, the local store.

Truncated and corrupt checkpoint files: ``tests/reliability/test_corrupt_files.py``; a copy
failing half-way: ``tests/reliability/test_atomic_outputs.py``.
"""

from __future__ import annotations

import json
import random

import torch

from pipeline.training import checkpoints


def test_names_sort_in_training_order():
    names = [checkpoints.checkpoint_name(e, s) for e, s in ((0, 2), (1, 3), (1, 10), (12, 99))]
    assert names[0] == "checkpoint_e000_s0000002" and names == sorted(names)


def test_progress_and_state_round_trip(tmp_path):
    checkpoints.write(tmp_path, {"x": torch.ones(2)}, {"step": 3, "history": []})
    assert json.loads((tmp_path / checkpoints.PROGRESS).read_text())["step"] == 3
    assert checkpoints.read_progress(tmp_path) == {"step": 3, "history": []}
    assert torch.equal(checkpoints.read_state(tmp_path)["x"], torch.ones(2))


def test_rng_state_restores_torch_and_python(tmp_path):
    torch.manual_seed(1)
    random.seed(1)
    checkpoints.write(tmp_path, {"rng": checkpoints.rng_state()}, {})
    expected = (torch.rand(3), random.random())
    checkpoints.set_rng_state(checkpoints.read_state(tmp_path)["rng"])  # weights_only
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_local_checkpoints_keep_the_last_complete_ones(tmp_path):
    store = checkpoints.LocalCheckpoints(tmp_path / "store", keep=2)
    assert store.latest() is None
    for step in (1, 2, 3):
        source = tmp_path / f"src{step}"
        checkpoints.write(source, {"step": step}, {"step": step})
        store({"step": float(step)}, source, checkpoints.checkpoint_name(0, step))
    store({"step": 4.0}, None, checkpoints.checkpoint_name(0, 4))  # another rank: no folder
    assert [p.name for p in store.checkpoints()] == ["checkpoint_e000_s0000002",
                                                     "checkpoint_e000_s0000003"]
    assert checkpoints.read_state(store.latest())["step"] == 3
    assert [r["step"] for r in store.reports] == [1.0, 2.0, 3.0, 4.0]
