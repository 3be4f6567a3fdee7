"""A fresh git + DVC repository holding the project's code, ``dvc.yaml`` and tiny parameters.

What a clone looks like to ``dvc repro``: ``pipeline/``, ``detector/``, ``.dvc/``, ``dvc.yaml``,
``.gitignore`` and ``.dvcignore`` copied (no caches, no bytecode), ``params.yaml`` the project's
with ``section.key`` overrides, everything committed. Commands run with
:func:`tests.support.procs.subprocess_env` plus ``PYTHONPATH`` on the copy (``frcnn`` runs the
copied code) and a git identity; the MLflow store is the default, ``mlflow.db`` in the copy.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pytest
import yaml

from tests.support import BIN, ROOT
from tests.support.procs import subprocess_env

COPIED_FOLDERS = ("pipeline", "detector", ".dvc")
COPIED_FILES = ("dvc.yaml", ".gitignore", ".dvcignore")


@dataclass(frozen=True)
class DvcRepo:
    path: Path
    env: dict[str, str]

    @property
    def dvc_exe(self) -> str:
        return str(BIN / "dvc")

    def run(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        """Run a command in the repository; it must succeed (the output is in the message)."""
        done = subprocess.run(args, cwd=self.path, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done

    def dvc(self, *args: str, timeout: float = 900) -> str:
        """``dvc <args>``, which must succeed; its stdout."""
        return self.run(self.dvc_exe, *args, timeout=timeout).stdout

    def popen(self, *args: str, log: Any) -> subprocess.Popen:
        """Start ``dvc <args>`` in a session of its own (for :func:`procs.kill_session`),
        output to ``log``."""
        return subprocess.Popen([self.dvc_exe, *args], cwd=self.path, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def params(self) -> dict[str, Any]:
        return yaml.safe_load((self.path / "params.yaml").read_text())

    def write_params(self, params: Mapping[str, Any]) -> None:
        (self.path / "params.yaml").write_text(yaml.safe_dump(dict(params), sort_keys=False))


def make_dvc_repo(folder: Path, overrides: Mapping[str, Any] | None = None) -> DvcRepo:
    """A fresh repository at ``folder`` (see the module docstring); ``overrides``:
    ``{"section.key": value}`` over the project's ``params.yaml``. Skips the test without git
    or dvc."""
    if not (BIN / "dvc").is_file() or shutil.which("git") is None:
        pytest.skip("needs git and dvc (in the virtual environment)")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "tmp", "cache")
    for name in COPIED_FOLDERS:
        shutil.copytree(ROOT / name, folder / name, ignore=ignore)
    for name in COPIED_FILES:
        shutil.copy(ROOT / name, folder / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in (overrides or {}).items():
        section, leaf = key.split(".", 1)
        params[section][leaf] = value
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    repo = DvcRepo(folder, subprocess_env(
        PYTHONPATH=str(folder), GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com"))
    for args in (["git", "init", "-q"], ["git", "add", "-A"],
                 ["git", "commit", "-q", "-m", "fresh clone"]):
        repo.run(*args, timeout=60)
    return repo
