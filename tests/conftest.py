"""Shared test fixtures and settings (the scaffolding behind them: :mod:`tests.support`).

Fixtures: ``prepared`` (a tiny prepared set of drawn rectangles at 64 x 64), ``tiny_cfg`` (the
real detector at 64 x 64: :func:`tests.support.factories.tiny_cfg`), ``one_thread`` (torch on one
thread), ``dvc_repo`` (a factory of fresh git + DVC repositories), ``bccd_dir`` (the real BCCD
dataset bundled in ``examples/bccd``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pytest

from pipeline.ray_session import LOCAL_RAY_ENV
from tests.support import ROOT
from tests.support.dvc_repo import DvcRepo, make_dvc_repo

__all__ = ["BCCD", "ROOT"]

BCCD = ROOT / "examples" / "bccd"

# No telemetry; token authentication: the policy of the local clusters the stages start.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
for _name, _value in LOCAL_RAY_ENV.items():
    os.environ.setdefault(_name, _value)


@pytest.fixture(scope="session")
def bccd_dir() -> Path:
    """The real BCCD dataset (PASCAL VOC layout) bundled in ``examples/bccd``."""
    assert (BCCD / "Annotations").is_dir(), f"{BCCD}: the bundled BCCD set is missing"
    return BCCD


@pytest.fixture()
def prepared(tmp_path: Path) -> Path:
    """``tmp_path/prepared``: 6 training images, 2 val and 2 test, 64 x 64, classes ``class1``
    and ``class2`` (:func:`tests.support.factories.write_prepared`)."""
    from tests.support.factories import write_prepared

    return write_prepared(tmp_path / "prepared")


@pytest.fixture()
def bucket(monkeypatch):
    """``mem://...`` URIs served by an in-memory pyarrow filesystem that is not the local one
    (fsspec's memory filesystem behind ``pyarrow.fs.PyFileSystem``), as :mod:`pipeline.storage`
    reaches ``s3://``; yields that filesystem."""
    import fsspec
    import pyarrow.fs

    from pipeline import storage

    memory = fsspec.filesystem("memory")
    fs = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(memory))
    real = storage.fs_of

    def fs_of(uri: str):
        if uri.startswith("mem://"):
            return fs, uri[len("mem://"):]
        return real(uri)

    monkeypatch.setattr(storage, "fs_of", fs_of)
    yield fs
    memory.rm("/", recursive=True)  # the memory filesystem is shared by the process


@pytest.fixture()
def tiny_cfg():
    """The defaults with :data:`tests.support.factories.TINY` (``.replace({...})`` for more)."""
    from tests.support import factories

    return factories.tiny_cfg()


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Torch on one thread: on a shared 2-core machine two threads cost far more CPU for the
    same work."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def dvc_repo(tmp_path: Path) -> Callable[..., DvcRepo]:
    """``dvc_repo(overrides)``: a fresh git + DVC repository at ``tmp_path/repo``
    (:func:`tests.support.dvc_repo.make_dvc_repo`)."""
    def make(overrides: Mapping[str, Any] | None = None) -> DvcRepo:
        return make_dvc_repo(tmp_path / "repo", overrides)
    return make
