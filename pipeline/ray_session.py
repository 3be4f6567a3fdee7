"""Starting or joining Ray: the one place that calls ``ray.init`` (training stages and sweeps).

:func:`ray_session` connects to ``train.ray_address`` (``auto``, ``ray://host:port`` or a GCS
address) or to ``$RAY_ADDRESS`` (which ``ray job submit`` sets); with neither, it starts a private
local Ray for the command and stops it afterwards:

- ``address="local"``: a new Ray even when ``ray start`` left one running on this machine (a
  plain ``ray.init()`` would join that one);
- :data:`LOCAL_RAY_ENV`: no token authentication and no usage reporting for that private cluster
  (set only where the user has not set them);
- the dashboard, when it runs, listens on 127.0.0.1 only;
- every worker gets ``RAY_ADDRESS`` (the cluster's GCS address) in its environment: Ray Train's
  placement-group cleaner, which frees a finished trial's worker resources, finds the cluster
  through it; without it, a second Ray instance on the same machine makes the cleaner fail, the
  resources leak, and later trials wait for them forever.

A sweep asks for ``trial_slots``: a local Ray then offers that many units of the custom
resource ``trial_slot`` (each trial holds one); a cluster offers what its nodes declare.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from typing import Iterator

#: The environment of the private local clusters the stages start (the test suite's clusters
#: use it too).
LOCAL_RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
DASHBOARD_HOST = "127.0.0.1"


@contextlib.contextmanager
def ray_session(address: str | None, *, trial_slots: int | None = None) -> Iterator[None]:
    """Inside the block Ray is initialised (see the module docstring); a Ray this call started
    is shut down at the end. Nothing happens when Ray is already initialised in this process."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        _start_local(trial_slots)
    else:
        _join(address, trial_slots)
    try:
        yield
    finally:
        ray.shutdown()


def _start_local(trial_slots: int | None) -> None:
    import ray
    from ray._private import services  # the node IP as Ray itself determines it

    for name, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(name, value)
    port = _free_port()
    gcs = f"{services.get_node_ip_address()}:{port}"
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # the port a new local Ray's GCS takes
    try:
        ray.init(address="local", dashboard_host=DASHBOARD_HOST,
                 resources={"trial_slot": trial_slots} if trial_slots else None,
                 runtime_env={"env_vars": {"RAY_ADDRESS": gcs}})
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous


def _join(address: str, trial_slots: int | None) -> None:
    import ray
    from ray._private import services

    gcs = None if address.startswith("ray://") else \
        services.canonicalize_bootstrap_address_or_die(address)
    ray.init(address=address, runtime_env={"env_vars": {"RAY_ADDRESS": gcs}} if gcs else None)
    if trial_slots and ray.cluster_resources().get("trial_slot", 0) < 1:
        print(f"ray: no node of the Ray cluster at {address} offers the resource 'trial_slot' "
              f"yet; trials wait for one (cluster.yaml's GPU workers declare it; `ray start ... "
              f"--resources '{{\"trial_slot\": N}}'` on other nodes)", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]
