"""pipeline.ray_session: the one ``ray.init`` of the project, checked by its arguments.

``ray.init`` is replaced by a recorder (starting Ray costs tens of seconds; the slow tests of the
training stages and the sweep start it for real): what matters here is what the project asks
for, not Ray's defaults. One slow test starts the private Ray for real: a driver without its
token cannot attach.
"""

from __future__ import annotations

import os

import pytest
import ray

from pipeline import ray_session as RS


@pytest.fixture()
def ray_calls(monkeypatch):
    """``ray.init`` / ``ray.shutdown`` recorded, Ray never started; no ``$RAY_ADDRESS``.

    Each ``init`` call is recorded with the Ray variables of the environment during the call."""
    calls: list[tuple[str, dict]] = []

    def init(*args, **kwargs):
        assert not args, "ray.init takes keywords only here"
        calls.append(("init", dict(kwargs, env={k: os.environ.get(k) for k in (
            "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_USAGE_STATS_ENABLED")})))

    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append(("shutdown", {})))
    return calls


def test_local_ray_is_private_authenticated_with_its_dashboard_on_localhost(ray_calls):
    with RS.ray_session(None):
        assert [name for name, _ in ray_calls] == ["init"]
    assert [name for name, _ in ray_calls] == ["init", "shutdown"]  # stopped afterwards
    kwargs = ray_calls[0][1]
    assert "dashboard_host" in kwargs and kwargs["dashboard_host"] == "127.0.0.1"  # explicit
    assert kwargs["address"] == "local"  # a new Ray, never one `ray start` left running
    assert kwargs["resources"] is None  # no trial slots outside a sweep
    assert kwargs["runtime_env"] == {"worker_process_setup_hook": RS.SETUP_HOOK}
    assert kwargs["env"]["RAY_AUTH_MODE"] == "token" and len(kwargs["env"]["RAY_AUTH_TOKEN"]) == 64
    assert "RAY_AUTH_TOKEN" not in os.environ and "RAY_AUTH_MODE" not in os.environ  # put back
    with RS.ray_session(None):
        pass
    # one token per process (Ray caches it), unknown outside it
    assert ray_calls[2][1]["env"]["RAY_AUTH_TOKEN"] == kwargs["env"]["RAY_AUTH_TOKEN"]


def test_a_sweeps_local_ray_offers_its_trial_slots(ray_calls):
    with RS.ray_session(None, trial_slots=2):
        pass
    kwargs = ray_calls[0][1]
    assert kwargs["dashboard_host"] == "127.0.0.1" and kwargs["address"] == "local"
    assert kwargs["resources"] == {"trial_slot": 2}


def test_local_ray_is_authenticated_whatever_the_environment_says(ray_calls, monkeypatch):
    """Token auth is not the user's to turn off for the clusters the project starts; usage
    reporting is."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")  # the user's own choice
    with RS.ray_session(None):
        assert os.environ["RAY_AUTH_MODE"] == "token"
        assert os.environ["RAY_USAGE_STATS_ENABLED"] == "1"
    assert os.environ["RAY_AUTH_MODE"] == "disabled"


def test_a_ray_already_initialised_is_used_as_it_is(ray_calls, monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    with RS.ray_session(None, trial_slots=2):
        pass
    assert ray_calls == []  # neither started nor stopped here


def test_a_cluster_address_is_joined_with_the_token_of_the_environment(ray_calls, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "the-users-own-token")
    with RS.ray_session("10.0.0.5:6379"):
        pass
    (name, kwargs), _ = ray_calls
    assert kwargs["address"] == "10.0.0.5:6379" and "dashboard_host" not in kwargs
    assert kwargs["runtime_env"] == {"worker_process_setup_hook": RS.SETUP_HOOK}
    assert kwargs["env"]["RAY_AUTH_TOKEN"] == "the-users-own-token"
    assert kwargs["env"]["RAY_AUTH_MODE"] == "token"
    ray_calls.clear()
    with RS.ray_session("ray://head:10001"):  # Ray Client: no job-wide setup hook
        pass
    assert ray_calls[0][1]["address"] == "ray://head:10001"
    assert ray_calls[0][1]["runtime_env"] is None


def test_ray_address_of_the_environment_is_joined(ray_calls, monkeypatch, capsys):
    """``ray job submit`` sets ``$RAY_ADDRESS``: the stage joins that cluster, and a sweep says
    when no node offers a trial slot yet."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6380")
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    with RS.ray_session(None, trial_slots=2):
        pass
    assert ray_calls[0][1]["address"] == "127.0.0.1:6380"
    assert "no node of the Ray cluster at 127.0.0.1:6380 offers the resource 'trial_slot'" \
        in capsys.readouterr().err


@pytest.mark.slow
def test_a_driver_without_the_token_cannot_attach_to_a_stages_cluster(tmp_path):
    """For real: the private Ray a stage starts refuses a driver without its token (and one
    with another token); its own workers know their cluster (the setup hook)."""
    import subprocess
    import sys

    from tests.support.procs import subprocess_env

    attach = ("import ray; ray.init(address={!r}); "
              "print('ATTACHED', ray.cluster_resources()['CPU'])")
    with RS.ray_session(None):
        gcs = ray.get_runtime_context().gcs_address
        token = os.environ["RAY_AUTH_TOKEN"]

        @ray.remote
        def address() -> str | None:
            return os.environ.get("RAY_ADDRESS")

        assert ray.get(address.remote()) == gcs
        env = {k: v for k, v in subprocess_env().items() if k != "RAY_AUTH_TOKEN"}
        for extra in ({}, {"RAY_AUTH_TOKEN": "0" * 64}):
            done = subprocess.run([sys.executable, "-c", attach.format(gcs)],
                                  env={**env, **extra, "HOME": str(tmp_path)},
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode != 0 and "ATTACHED" not in done.stdout, (extra, done.stdout)
        done = subprocess.run([sys.executable, "-c", attach.format(gcs)],
                              env={**env, "RAY_AUTH_TOKEN": token}, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0 and "ATTACHED" in done.stdout, done.stderr[-2000:]
