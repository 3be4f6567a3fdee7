"""Fixtures of the sweep tests: a project with data prepared at 128 x 128, the sweep's config."""

from __future__ import annotations

from typing import Any, Callable

import pytest

from pipeline.config import Config, load_config
from tests.support import ROOT
from tests.support.factories import write_prepared


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """A project folder with 6 training images prepared at 128 x 128 (the working folder)."""
    write_prepared(tmp_path / "data" / "prepared", size=128, num_images=6)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _sweep_cfg(**overrides: Any) -> Config:
    return load_config([ROOT / "params.yaml"]).replace({
        "data.image_size": 128, "sweep.image_size": 64, "sweep.max_train_images": 4,
        **overrides})


@pytest.fixture()
def sweep_cfg() -> Callable[..., Config]:
    """``sweep_cfg(**{"section.key": value})``: the project's params for data at 128 x 128 and
    trials at 64 x 64 on its first 4 images."""
    return _sweep_cfg
