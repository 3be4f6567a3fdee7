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


def _sources() -> list[Path]:
    return sorted(p for folder in ("pipeline", "detector", "benchmarks", "tests")
                  for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def test_no_module_over_400_lines_and_no_function_over_80():
    """Modules a reader takes in whole, functions that fit on a screen, in the library, the
    benchmarks and the tests alike."""
    import ast

    long_modules, long_functions = [], []
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        name = str(path.relative_to(ROOT))
        if len(text.splitlines()) > 400:
            long_modules.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and node.end_lineno - node.lineno + 1 > 80:
                long_functions.append(f"{name}:{node.name}: "
                                      f"{node.end_lineno - node.lineno + 1} lines")
    assert long_modules == [], long_modules
    assert long_functions == [], long_functions
