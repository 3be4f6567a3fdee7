"""The code passes ``ruff check`` with the project's settings (``[tool.ruff]`` in pyproject.toml):
pyflakes (unused imports and names, undefined names) and pycodestyle errors and warnings."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT


def test_ruff_check_passes():
    ruff = Path(sys.executable).parent / "ruff"
    exe = str(ruff) if ruff.is_file() else shutil.which("ruff")
    if exe is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    done = subprocess.run([exe, "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
