"""Deterministic train / val / test assignment.

The split is a seeded permutation of the *sorted* image ids the dataset lists (refused images
included, so fixing or breaking one annotation moves no other image). The first
``round(n * val_fraction)`` permuted ids go to val, the next ``round(n * test_fraction)`` to test,
the rest to train; a non-zero fraction gets at least one image. Rejected images then simply leave
their split. A dataset that defines its own split (VOC ``ImageSets/Main`` with
``data.split=imagesets``) keeps it instead.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.errors import DataError


def assign_splits(image_ids: Sequence[str], *, val_fraction: float, test_fraction: float,
                  seed: int) -> dict[str, str]:
    """``{image_id: "train" | "val" | "test"}``, the same for the same ids, fractions and seed.

    Raises:
        DataError: the fractions leave no image for training.
    """
    ids = sorted(set(image_ids))
    n = len(ids)
    n_val = _count(n, val_fraction)
    n_test = _count(n, test_fraction)
    if n - n_val - n_test < 1:
        raise DataError(f"{n} image(s) cannot be split into val {val_fraction}, test "
                        f"{test_fraction} and a non-empty train split")
    order = np.random.default_rng(seed).permutation(n)
    splits = {}
    for rank, i in enumerate(order):
        splits[ids[i]] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return splits


def _count(n: int, fraction: float) -> int:
    return 0 if fraction <= 0 else max(1, round(n * fraction))
