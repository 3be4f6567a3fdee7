"""The reliability tests' report: how many fuzz cases ran, and how they ended
(:mod:`tests.support.fuzz` counts them)."""

from __future__ import annotations

from tests.support.fuzz import FUZZ_CASES, FUZZ_OUTCOMES


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001
    if FUZZ_CASES:
        parts = ", ".join(f"{name} {n}" for name, n in sorted(FUZZ_CASES.items()))
        terminalreporter.write_line(
            f"reliability fuzz: {sum(FUZZ_CASES.values())} cases ({parts})")
    if FUZZ_OUTCOMES:
        terminalreporter.write_line("reliability fuzz outcomes: " + ", ".join(
            f"{name} {n}" for name, n in sorted(FUZZ_OUTCOMES.items())))
