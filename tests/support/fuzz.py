"""Fuzzing aids: counting the cases each fuzz test ran, and a guard on the files opened.

- :data:`FUZZ_CASES` counts the hypothesis examples each fuzz test ran, :data:`FUZZ_OUTCOMES`
  how they ended; ``tests/reliability/conftest.py`` prints the totals at the end of the run
  (``reliability fuzz: N cases ...``) so a run reports how much input it tried.
- :func:`watch_opens` records every file the process opens (Python's ``open`` audit event, which
  ``open()``, ``Path.read_bytes()``, PIL and the C-level ``io.open`` all raise) while it is
  active: the readers' tests assert that nothing outside the dataset folder was opened.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

from hypothesis import HealthCheck, settings

FUZZ_CASES: collections.Counter[str] = collections.Counter()
FUZZ_OUTCOMES: collections.Counter[str] = collections.Counter()  # how the cases ended

_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and args and isinstance(args[0], (str, bytes,
                                                                                   os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed: it does nothing outside watch_opens


@contextlib.contextmanager
def watch_opens() -> Iterator[list[str]]:
    """Collect the paths of the files opened inside the block (absolute or as given)."""
    global _opened
    previous, _opened = _opened, []
    try:
        yield _opened
    finally:
        _opened = previous


def opened_outside(opened: list[str], folder: Path) -> list[str]:
    """The opened paths that do not resolve inside ``folder`` (nor are Python's own files)."""
    root = folder.resolve()
    outside = []
    for name in opened:
        path = Path(name)
        if not path.is_absolute():
            path = Path.cwd() / path
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            path = path.resolve()
        if path.is_relative_to(root) or path.suffix in (".py", ".pyc", ".so"):
            continue
        if path.is_relative_to(Path(sys.prefix).resolve()) or path.is_relative_to(
                Path(sys.base_prefix).resolve()):
            continue  # lazily imported modules, locale and codec data
        outside.append(name)
    return outside


#: The fuzz tests' settings: many derandomised examples, no deadline (each case is timed
#: against :data:`CASE_SECONDS` instead)
FUZZ = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
CASE_SECONDS = 60.0  # one case taking longer than this counts as a hang (the worst take < 1 s)
