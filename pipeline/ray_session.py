"""Starting or joining Ray: the one place that calls ``ray.init`` (training stages and sweeps).

:func:`ray_session` connects to ``train.ray_address`` (``auto``, ``ray://host:port`` or a GCS
address) or to ``$RAY_ADDRESS`` (which ``ray job submit`` sets); with neither, it starts a private
local Ray for the command and stops it afterwards:

- ``address="local"``: a new Ray even when ``ray start`` left one running on this machine (a
  plain ``ray.init()`` would join that one);
- **token authentication** (``RAY_AUTH_MODE=token``) with a token made for this process
  (``RAY_AUTH_TOKEN``, in the environment of this process and the cluster's own processes, for
  the command's lifetime; Ray reads it once per process, so every cluster one process starts
  shares it), or the one the user set: a driver without it cannot attach to a stage's cluster. Ray 2.60's
  GCS and raylets listen on every interface whatever the node address (measured), so the token
  is what keeps others on the network out; the dashboard, when it runs, listens on 127.0.0.1;
- no usage reporting (``RAY_USAGE_STATS_ENABLED=0``, unless the user set it);
- every worker of the job runs :func:`point_at_own_cluster` (Ray's public
  ``worker_process_setup_hook``), which sets ``RAY_ADDRESS`` to its own cluster's GCS: Ray
  Train's placement-group cleaner, which frees a finished trial's worker resources, finds the
  cluster through it; without it, a second Ray instance on the same machine makes the cleaner
  look at the wrong cluster, the resources leak, and later trials wait for them forever.

A cluster the user started (``train.ray_address``, ``$RAY_ADDRESS``) is joined with the token
of the environment (``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``, as Ray reads it; with a token
set, ``RAY_AUTH_MODE`` defaults to ``token``).

A sweep asks for ``trial_slots``: a local Ray then offers that many units of the custom
resource ``trial_slot`` (each trial holds one); a cluster offers what its nodes declare.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import sys
from typing import Iterator

#: The environment of the private local clusters the stages start (the test suite's clusters
#: use it too); their token is made per cluster.
LOCAL_RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
DASHBOARD_HOST = "127.0.0.1"
#: Run in every worker process of the project's Ray jobs (see :func:`point_at_own_cluster`)
SETUP_HOOK = "pipeline.ray_session.point_at_own_cluster"


def point_at_own_cluster() -> None:
    """Ray's ``worker_process_setup_hook``: ``RAY_ADDRESS`` in this worker set to the GCS of the
    cluster it belongs to (Ray Train's own actors look the cluster up through it)."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


@contextlib.contextmanager
def ray_session(address: str | None, *, trial_slots: int | None = None) -> Iterator[None]:
    """Inside the block Ray is initialised (see the module docstring); a Ray this call started
    is shut down at the end, and the environment it set put back. Nothing happens when Ray is
    already initialised in this process."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    saved = {name: os.environ.get(name) for name in (*LOCAL_RAY_ENV, "RAY_AUTH_TOKEN")}
    try:
        if address is None:
            _start_local(trial_slots)
        else:
            _join(address, trial_slots)
        try:
            yield
        finally:
            ray.shutdown()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _start_local(trial_slots: int | None) -> None:
    import ray

    os.environ["RAY_AUTH_MODE"] = LOCAL_RAY_ENV["RAY_AUTH_MODE"]  # the clusters we start: always
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", LOCAL_RAY_ENV["RAY_USAGE_STATS_ENABLED"])
    # this process's own token (Ray reads it once per process: every cluster this process
    # starts gets the same one, unknown outside it), or the one the user set
    os.environ.setdefault("RAY_AUTH_TOKEN", local_token())
    ray.init(address="local", dashboard_host=DASHBOARD_HOST,
             resources={"trial_slot": trial_slots} if trial_slots else None,
             runtime_env={"worker_process_setup_hook": SETUP_HOOK})


@functools.lru_cache(maxsize=1)
def local_token() -> str:
    """The token of the private clusters this process starts (made once per process: Ray reads
    a token once per process, so a process that also joins another cluster in-process must use
    the same one there)."""
    return secrets.token_hex(32)


def _join(address: str, trial_slots: int | None) -> None:
    import ray

    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    ray.init(address=address, runtime_env=None if address.startswith("ray://")
             else {"worker_process_setup_hook": SETUP_HOOK})
    if trial_slots and ray.cluster_resources().get("trial_slot", 0) < 1:
        print(f"ray: no node of the Ray cluster at {address} offers the resource 'trial_slot' "
              f"yet; trials wait for one (cluster.yaml's GPU workers declare it; `ray start ... "
              f"--resources '{{\"trial_slot\": N}}'` on other nodes)", file=sys.stderr, flush=True)
