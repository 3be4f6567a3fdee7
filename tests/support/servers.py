"""Real servers for the tests, on 127.0.0.1, started and stopped by the test itself.

- :func:`mlflow_server`: ``mlflow server`` with its basic-auth app (an account from the
  environment), a SQLite backend and proxied artifacts in a folder (what a team's tracking
  server looks like), one worker;
- :func:`moto_server`: an S3-compatible server (``moto_server`` from ``moto[server]``) with
  one bucket, and the AWS environment variables that point clients at it.

Each runs in its own session and is stopped by its process id (SIGTERM to its process group,
then SIGKILL), never by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tests.support import BIN
from tests.support.secrets import SECRETS
from tests.support.procs import free_ports


def wait_for(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    """Until ``url`` answers; fails with ``log``'s end when ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url}: no answer within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of ``proc`` (started with ``start_new_session``), then
    SIGKILL what is left after 20 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


#: The tracking server's account (MLflow's basic-auth app): the admin the server creates on
#: first start, from the environment, and the one every client of the tests logs in with
MLFLOW_USER = "frcnn-admin"
MLFLOW_PASSWORD = SECRETS["MLFLOW_TRACKING_PASSWORD"]   # a planted secret: searched for after


@dataclass(frozen=True)
class MlflowServer:
    url: str                  # http://127.0.0.1:PORT
    database: Path            # the backend's SQLite file
    artifacts: Path           # where the server keeps proxied artifacts

    def env(self) -> dict[str, str]:
        """The variables that log a client in (MLflow reads them; never in the URI)."""
        return {"MLFLOW_TRACKING_USERNAME": MLFLOW_USER,
                "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD}


@contextlib.contextmanager
def mlflow_server(folder: Path, *, port: int | None = None, timeout: float = 120
                  ) -> Iterator[MlflowServer]:
    """An authenticated server (``--app-name basic-auth``: every request needs the account of
    :meth:`MlflowServer.env`; other users get READ unless granted more). ``port``: a given
    port (a server restarted on the folder of one stopped: same URL, same store); default a
    free one."""
    folder.mkdir(parents=True, exist_ok=True)
    port, log = port or free_ports(1)[0], folder / "server.log"
    server = MlflowServer(f"http://127.0.0.1:{port}", folder / "mlflow.db", folder / "artifacts")
    # the auth app's own settings: its user database beside the store; the admin account comes
    # from the environment on first start (no password in a file)
    (folder / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{folder / 'auth.db'}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    # no job runners (MLflow 3 starts several huey consumers, ~270 MB each, for its gateway
    # jobs; nothing here uses them)
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true",
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
               MLFLOW_AUTH_CONFIG_PATH=str(folder / "auth.ini"),
               MLFLOW_AUTH_ADMIN_USERNAME=MLFLOW_USER, MLFLOW_AUTH_ADMIN_PASSWORD=MLFLOW_PASSWORD,
               MLFLOW_FLASK_SERVER_SECRET_KEY="tests-flask-secret-0123456789")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--app-name", "basic-auth",
         "--backend-store-uri", f"sqlite:///{server.database}",
         "--artifacts-destination", str(server.artifacts), "--host", "127.0.0.1", "--port",
         str(port), "--workers", "1"],
        cwd=folder, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        wait_for(f"{server.url}/health", proc, timeout, log)
        yield server
    finally:
        stop(proc)


@dataclass(frozen=True)
class S3Server:
    endpoint: str             # http://127.0.0.1:PORT
    bucket: str

    def client_args(self) -> dict[str, str]:
        """``boto3.client("s3", endpoint_url=..., **client_args())``: the region and any keys
        (moto accepts every key)."""
        return {"region_name": "us-east-1", "aws_access_key_id": "x",
                "aws_secret_access_key": "x"}

    def env(self, key_id: str = "testing-key-id", secret: str = "testing-secret-key"
            ) -> dict[str, str]:
        """The AWS variables that point pyarrow, boto3 and MLflow at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": key_id,
                "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
                "MLFLOW_S3_ENDPOINT_URL": self.endpoint}


@contextlib.contextmanager
def moto_server(folder: Path, bucket: str = "frcnn-test", *, timeout: float = 60
                ) -> Iterator[S3Server]:
    import boto3

    folder.mkdir(parents=True, exist_ok=True)
    (port,), log = free_ports(1), folder / "moto.log"
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            cwd=folder, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        server = S3Server(f"http://127.0.0.1:{port}", bucket)
        wait_for(f"{server.endpoint}/moto-api/", proc, timeout, log)
        boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                     aws_access_key_id="x", aws_secret_access_key="x").create_bucket(Bucket=bucket)
        yield server
    finally:
        stop(proc)
