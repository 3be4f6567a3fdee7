"""Fixtures of the evaluation tests: a small prepared set to score, and a perfect model's scores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.evaluation.core import EvalResults, evaluate_model
from pipeline.evaluation.metrics import metrics
from pipeline.prepared_table import split_path
from pipeline.annotations import GroundTruth, read_ground_truth
from tests.support.factories import write_prepared
from tests.support.fakes import perfect_model


@dataclass(frozen=True)
class EvalSet:
    """A prepared set to score: random images with 0-4 random boxes each, some difficult."""

    folder: Path
    size: int = 64
    classes: tuple[str, ...] = ("cat", "dog")

    def split(self, name: str) -> GroundTruth:
        return read_ground_truth(split_path(self.folder, name), name)


@dataclass(frozen=True)
class Scored:
    """What the evaluation made of a perfect model on :class:`EvalSet` (test, then val)."""

    data: EvalSet
    splits: list[GroundTruth]
    budgets: tuple[int, ...]
    results: EvalResults
    values: dict


@pytest.fixture()
def eval_set(tmp_path: Path) -> EvalSet:
    """7 test and 3 val images at 64 x 64, classes cat and dog."""
    return EvalSet(write_prepared(tmp_path / "prepared", splits={"test": 7, "val": 3},
                                  classes=("cat", "dog"), content="noise"))


@pytest.fixture()
def perfect(eval_set: EvalSet) -> Scored:
    """A perfect model (:func:`tests.support.fakes.perfect_model`) scored on ``eval_set``'s test
    and val splits at every default budget, with 2 pictures."""
    splits = [eval_set.split(s) for s in ("test", "val")]
    model = perfect_model(splits)
    budgets = (50, 100, 300, 1000, 2000)
    results = evaluate_model(rpn_model=model, detector=model, splits=splits, budgets=budgets,
                             num_classes=2, image_size=eval_set.size, batch_size=2,
                             num_pictures=2, progress=False, class_names=list(eval_set.classes))
    values = metrics(results, ["test", "val"], budgets, list(eval_set.classes))
    return Scored(eval_set, splits, budgets, results, values)
