"""The pipeline's subprocesses: their environment, the processes of their session, stopping them.

Tests start ``frcnn`` / ``dvc repro`` / ``ray start`` with ``start_new_session=True``, so that
everything the command starts (Ray's GCS, raylet, workers, DataLoader processes) shares its
session, and :func:`kill_session` can stop exactly those processes and no other Ray on the
machine (never ``ray stop``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from pipeline.ray_session import LOCAL_RAY_ENV
from tests.support import BIN

#: Variables of the test run that must not leak into a pipeline command: a store, a DVC stage
#: or a Ray cluster of the outer environment.
STRIPPED = ("MLFLOW_TRACKING_URI", "DVC_STAGE", "RAY_ADDRESS")


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment for a pipeline command: :data:`STRIPPED` removed, the local
    Ray policy (:data:`pipeline.ray_session.LOCAL_RAY_ENV`), unbuffered output, no DVC
    analytics, the virtual environment's scripts first on ``PATH``; then ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in STRIPPED}
    env.update(LOCAL_RAY_ENV)
    env.update(PYTHONUNBUFFERED="1", DVC_NO_ANALYTICS="1",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    env.update(extra)
    return env


def session_pids(sid: int) -> list[int]:
    """PIDs of the processes in session ``sid`` (the PID of the process that started it)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            # the fields after "(comm)": state ppid pgrp session ...
            if int(stat.read_text().rsplit(")", 1)[1].split()[3]) == sid:
                pids.append(int(stat.parent.name))
    return pids


def kill_session(proc: subprocess.Popen, *, grace: float = 0.0, timeout: float = 60.0) -> None:
    """Stop every process of the session ``proc`` leads, then reap ``proc`` (and read what is
    left of its pipes).

    ``grace`` > 0: SIGTERM first, and up to ``grace`` seconds to exit; then SIGKILL (what a lost
    node or ``kill -9`` does).
    """
    steps = ([(signal.SIGTERM, grace)] if grace > 0 else []) + [(signal.SIGKILL, 5.0)]
    for sig, wait in steps:
        pids = session_pids(proc.pid)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, or it stays in the session as a zombie
            if not session_pids(proc.pid):
                break
            time.sleep(0.1)
    proc.communicate(timeout=timeout)


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 now (held open together while chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
