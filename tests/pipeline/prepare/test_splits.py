"""pipeline.prepare.splits: seeded, exact, order-free train / val / test assignment."""

from __future__ import annotations

import pytest

from pipeline.errors import DataError
from pipeline.prepare.splits import assign_splits
from pipeline.prepared_table import SPLITS


def test_assign_splits_is_seeded_exact_and_order_free():
    ids = [f"im{i:03d}" for i in range(100)]
    splits = assign_splits(ids, val_fraction=0.15, test_fraction=0.1, seed=0)
    counts = {s: sum(v == s for v in splits.values()) for s in SPLITS}
    assert counts == {"train": 75, "val": 15, "test": 10}
    assert assign_splits(list(reversed(ids)), val_fraction=0.15, test_fraction=0.1, seed=0) == splits
    assert assign_splits(ids, val_fraction=0.15, test_fraction=0.1, seed=1) != splits
    tiny = assign_splits(["a", "b", "c"], val_fraction=0.01, test_fraction=0.0, seed=0)
    assert sorted(tiny.values()) == ["train", "train", "val"]  # a non-zero fraction gets one
    with pytest.raises(DataError, match="non-empty train split"):
        assign_splits(["a", "b"], val_fraction=0.1, test_fraction=0.1, seed=0)
