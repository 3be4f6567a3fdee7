"""A Ray cluster of several nodes on this machine, started and stopped by the test.

Each node is a ``ray start ... --block`` process in a session of its own: the head (GCS,
dashboard) and worker nodes joining it, every one with its own ports, CPUs and custom resources
(which is how a test places work on a node), all on 127.0.0.1 under the test's ``--temp-dir``,
with token authentication (a token made for the cluster, in every node's environment; a driver
joins with :meth:`RayCluster.env`, as a user joins with the token of the environment).
Stopping a node kills its session's processes (its raylet, its workers): what losing a machine
does; the whole cluster is stopped the same way, node by node, never by ``ray stop``.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

from tests.support import BIN
from tests.support.procs import free_ports, kill_session, session_pids, subprocess_env


@dataclass
class RayCluster:
    address: str                      # 127.0.0.1:<GCS port>: train.ray_address
    dashboard: str                    # http://127.0.0.1:<port>: `ray job submit --address`
    folder: Path                      # the nodes' logs
    temp_dir: Path                    # Ray's --temp-dir (short: Unix socket paths are limited)
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """What a driver needs in its environment to join: token authentication, the token."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def add_node(self, name: str, *, cpus: float, resources: Mapping[str, float],
                 env: Mapping[str, str] | None = None, head: bool = False) -> None:
        """Start a node named ``name`` (also a resource ``{name: 1}`` on it, to find it)."""
        agent, agent_grpc, env_agent, metrics = free_ports(4)
        cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
               f"--num-cpus={cpus}", "--resources", json.dumps({**resources, name: 1}),
               f"--dashboard-agent-listen-port={agent}",
               f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
               "--disable-usage-stats"]
        if head:
            gcs = self.address.rsplit(":", 1)[1]
            dash = self.dashboard.rsplit(":", 1)[1]
            client, = free_ports(1)
            cmd += ["--head", f"--port={gcs}", f"--dashboard-port={dash}",
                    "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                    f"--ray-client-server-port={client}", f"--temp-dir={self.temp_dir}"]
        else:
            cmd += [f"--address={self.address}"]
        log = open(self.folder / f"{name}.log", "w")
        self.nodes[name] = subprocess.Popen(cmd, env=subprocess_env(**(env or {}), **self.env()),
                                            stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def node_of(self, pid: int) -> str | None:
        """The node whose session holds process ``pid``."""
        for name, proc in self.nodes.items():
            if pid in session_pids(proc.pid):
                return name
        return None

    def processes(self, name: str, marker: str) -> list[int]:
        """PIDs on node ``name`` whose command line contains ``marker`` (e.g.
        ``"RayTrainWorker"``, the title Ray gives a Train worker)."""
        found = []
        for pid in session_pids(self.nodes[name].pid):
            with contextlib.suppress(OSError):
                if marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                    found.append(pid)
        return found

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of the node: its raylet and workers die as with a lost host."""
        kill_session(self.nodes.pop(name), grace=0.0)

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        """Until the dashboard lists ``count`` alive nodes."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, ValueError, KeyError):
                request = urllib.request.Request(f"{self.dashboard}/nodes?view=summary",
                                                 headers={"Authorization": f"Bearer {self.token}"})
                with urllib.request.urlopen(request, timeout=5) as r:
                    summary = json.loads(r.read())["data"]["summary"]
                alive = [n for n in summary if n.get("raylet", {}).get("state") == "ALIVE"]
                if len(alive) >= count:
                    return
            for name, proc in self.nodes.items():
                assert proc.poll() is None, \
                    f"node {name} exited:\n{(self.folder / f'{name}.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{count} Ray nodes not up in {timeout:.0f} s"
            time.sleep(1)


@contextlib.contextmanager
def ray_cluster(folder: Path, *, head_cpus: float, head_resources: Mapping[str, float],
                env: Mapping[str, str] | None = None, token: str | None = None
                ) -> Iterator[RayCluster]:
    """A head node on 127.0.0.1 (more nodes: :meth:`RayCluster.add_node`); every node still
    running at the end is stopped by its session. ``token``: the cluster's (default a new one;
    a process that joins in-process must have it in its environment before Ray reads it)."""
    folder.mkdir(parents=True, exist_ok=True)
    gcs, dash = free_ports(2)
    cluster = RayCluster(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", folder,
                         Path(tempfile.mkdtemp(prefix="rt", dir="/tmp")),
                         **({"token": token} if token else {}))
    try:
        cluster.add_node("head", cpus=head_cpus, resources=head_resources, env=env, head=True)
        cluster.wait_for_nodes(1)
        yield cluster
    finally:
        for name in [n for n in cluster.nodes if n != "head"] + ["head"]:
            if name in cluster.nodes:
                kill_session(cluster.nodes.pop(name), grace=10.0)
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
