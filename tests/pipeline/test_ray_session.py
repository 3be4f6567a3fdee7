"""pipeline.ray_session: the one ``ray.init`` of the project, checked by its arguments.

``ray.init`` is replaced by a recorder (starting Ray costs tens of seconds; the slow tests of the
training stages and the sweep start it for real): what matters here is what the project asks
for, not Ray's defaults.
"""

from __future__ import annotations

import os

import pytest
import ray

from pipeline import ray_session as RS


@pytest.fixture()
def ray_calls(monkeypatch):
    """``ray.init`` / ``ray.shutdown`` recorded, Ray never started; no ``$RAY_ADDRESS``.

    Each ``init`` call is recorded with ``RAY_GCS_SERVER_PORT`` as it was during the call."""
    calls: list[tuple[str, dict]] = []

    def init(*args, **kwargs):
        assert not args, "ray.init takes keywords only here"
        calls.append(("init", dict(kwargs, gcs_port_env=os.environ.get("RAY_GCS_SERVER_PORT"))))

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_GCS_SERVER_PORT", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append(("shutdown", {})))
    return calls


def test_local_ray_is_private_with_its_dashboard_on_localhost(ray_calls):
    with RS.ray_session(None):
        assert [name for name, _ in ray_calls] == ["init"]
    assert [name for name, _ in ray_calls] == ["init", "shutdown"]  # stopped afterwards
    kwargs = ray_calls[0][1]
    assert "dashboard_host" in kwargs and kwargs["dashboard_host"] == "127.0.0.1"  # explicit
    assert kwargs["address"] == "local"  # a new Ray, never one `ray start` left running
    assert kwargs["resources"] is None  # no trial slots outside a sweep
    gcs = kwargs["runtime_env"]["env_vars"]["RAY_ADDRESS"]
    host, port = gcs.rsplit(":", 1)
    assert host and port == kwargs["gcs_port_env"]  # the GCS port the new Ray is told to take
    assert "RAY_GCS_SERVER_PORT" not in os.environ  # and the variable is put back


def test_a_sweeps_local_ray_offers_its_trial_slots(ray_calls):
    with RS.ray_session(None, trial_slots=2):
        pass
    kwargs = ray_calls[0][1]
    assert kwargs["dashboard_host"] == "127.0.0.1" and kwargs["address"] == "local"
    assert kwargs["resources"] == {"trial_slot": 2}
    assert "RAY_ADDRESS" in kwargs["runtime_env"]["env_vars"]


def test_local_ray_environment_policy_yields_to_the_users(ray_calls, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")  # the user's own choice
    with RS.ray_session(None):
        assert os.environ["RAY_AUTH_MODE"] == RS.LOCAL_RAY_ENV["RAY_AUTH_MODE"] == "disabled"
        assert os.environ["RAY_USAGE_STATS_ENABLED"] == "1"


def test_a_ray_already_initialised_is_used_as_it_is(ray_calls, monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    with RS.ray_session(None, trial_slots=2):
        pass
    assert ray_calls == []  # neither started nor stopped here


def test_a_cluster_address_is_joined(ray_calls, monkeypatch):
    from ray._private import services

    monkeypatch.setattr(services, "canonicalize_bootstrap_address_or_die",
                        lambda address: "10.0.0.5:6379")
    with RS.ray_session("auto"):
        pass
    (name, kwargs), _ = ray_calls
    assert kwargs["address"] == "auto" and "dashboard_host" not in kwargs
    assert kwargs["runtime_env"] == {"env_vars": {"RAY_ADDRESS": "10.0.0.5:6379"}}
    ray_calls.clear()
    with RS.ray_session("ray://head:10001"):  # Ray Client: no GCS address to hand on
        pass
    assert ray_calls[0][1]["address"] == "ray://head:10001"
    assert ray_calls[0][1]["runtime_env"] is None


def test_ray_address_of_the_environment_is_joined(ray_calls, monkeypatch, capsys):
    """``ray job submit`` sets ``$RAY_ADDRESS``: the stage joins that cluster, and a sweep says
    when no node offers a trial slot yet."""
    from ray._private import services

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6380")
    monkeypatch.setattr(services, "canonicalize_bootstrap_address_or_die", lambda a: a)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    with RS.ray_session(None, trial_slots=2):
        pass
    assert ray_calls[0][1]["address"] == "127.0.0.1:6380"
    assert "no node of the Ray cluster at 127.0.0.1:6380 offers the resource 'trial_slot'" \
        in capsys.readouterr().err
