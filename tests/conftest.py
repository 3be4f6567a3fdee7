"""Shared test fixtures and settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def bccd_dir() -> Path:
    """The real BCCD dataset (PASCAL VOC layout) beside the repository; skipped when absent."""
    path = SHARED_DATA / "bccd"
    if not (path / "Annotations").is_dir():
        pytest.skip(f"real dataset not found at {path} (expected ../shared/data/bccd)")
    return path
