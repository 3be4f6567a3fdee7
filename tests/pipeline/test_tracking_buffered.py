"""pipeline.tracking.buffered: step metrics off the training step, nothing lost while the
tracking server is away."""

from __future__ import annotations

import threading
import time

from pipeline import tracking
from pipeline.tracking.buffered import MetricsBuffer
from tests.support.factories import tiny_cfg
from tests.support.servers import mlflow_server

HANG_GUARD = 60.0  # seconds; a hang, not a schedule


class FlakyStore:
    """A ``send`` that refuses while ``down`` is set; records what arrived and from which
    thread."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.points: list[tuple[str, float, int, int]] = []
        self.threads: set[str] = set()

    def __call__(self, points):
        self.threads.add(threading.current_thread().name)
        if self.down.is_set():
            raise ConnectionError("Connection refused")
        self.points.extend(points)


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {HANG_GUARD:.0f} s: {what}")
        time.sleep(0.01)


def handle() -> tracking.RunHandle:
    return tracking.open_run("http://user:s3cret@127.0.0.1:1", "run0")


def test_points_logged_while_the_store_is_down_arrive_in_order_and_it_says_so_once():
    store, said = FlakyStore(), []
    buffer = MetricsBuffer(handle(), interval=0.01, retry_seconds=0.01, send=store,
                           say=said.append)
    buffer.log({"loss": 1.0}, 1)
    wait_until(lambda: len(store.points) == 1, "the first point sent")
    store.down.set()
    for step in range(2, 6):
        buffer.log({"loss": float(step), "lr": 0.1, "flag": True}, step)
    wait_until(lambda: not buffer.reachable, "a failed send")
    for step in range(6, 9):  # still down: more steps, more kept points
        buffer.log({"loss": float(step), "lr": 0.1}, step)
    store.down.clear()
    assert buffer.close()
    assert [(n, s) for n, _, _, s in store.points if n == "loss"] == \
        [("loss", s) for s in range(1, 9)]
    assert not any(n == "flag" for n, *_ in store.points)  # booleans are not metrics
    assert buffer.sent == len(store.points) == 1 + 2 * 7 and buffer.pending == 0
    assert store.threads == {"mlflow-metrics"}  # never the caller's thread
    assert [line.split(" ", 3)[2] for line in said] == ["unreachable", "reachable"]
    assert all("s3cret" not in line for line in said)  # the URI's password masked


def test_a_full_buffer_drops_its_oldest_points_and_counts_them():
    store, said = FlakyStore(), []
    store.down.set()
    buffer = MetricsBuffer(handle(), interval=0.01, retry_seconds=0.01, max_points=5,
                           send=store, say=said.append)
    for step in range(1, 9):
        buffer.log({"loss": float(step)}, step)
    store.down.clear()
    assert not buffer.close()  # something was lost
    assert buffer.dropped == 3
    assert [s for *_, s in store.points] == [4, 5, 6, 7, 8]
    assert sum("metric points dropped: more than 5 waiting" in line for line in said) == 1
    assert said[-1] == "tracking: 3 metric point(s) in all were dropped"


def test_a_batch_the_store_refuses_for_good_is_dropped_and_later_ones_still_go():
    """A 4xx answer (here an invalid value) is not an outage: that batch is dropped, said,
    counted; the points logged after it arrive."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    store, said = FlakyStore(), []
    refuse = threading.Event()
    refuse.set()

    def send(points):
        if refuse.is_set():
            refuse.clear()
            raise MlflowException("bad value", error_code=INVALID_PARAMETER_VALUE)  # a 400
        store(points)

    buffer = MetricsBuffer(handle(), interval=0.01, retry_seconds=0.01, send=send,
                           say=said.append)
    buffer.log({"loss": 1.0}, 1)
    wait_until(lambda: not refuse.is_set(), "the refused send")
    buffer.log({"loss": 2.0}, 2)
    assert not buffer.close() and buffer.dropped == 1 and buffer.reachable
    assert [s for *_, s in store.points] == [2]
    assert said[0].startswith("tracking: metric points dropped: refused by http://")


def test_close_gives_up_after_its_timeout_and_says_what_was_lost():
    store, said = FlakyStore(), []
    store.down.set()
    buffer = MetricsBuffer(handle(), interval=0.01, retry_seconds=0.01, close_timeout=0.2,
                           send=store, say=said.append)
    buffer.log({"loss": 1.0, "lr": 0.1}, 1)
    assert not buffer.close()
    assert "2 metric point(s) could not be sent" in said[-1]


def test_training_goes_on_while_the_tracking_server_is_killed_and_restarted(
        tmp_path, prepared, monkeypatch):
    """A real ``mlflow server`` killed after step 3 and started again (same port, same store)
    at step 8 of a 12-step run: every step trains, and every step's metrics reach the run."""
    from pipeline.training import loop

    # MLflow's client retries a refused connection for minutes by default; here the outage
    # should reach the buffer at once
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    cfg = tiny_cfg(train__rpn_epochs=4, train__log_every=1)  # 3 steps an epoch, 12 steps
    folder = tmp_path / "server"
    servers = [mlflow_server(folder)]
    server = servers[0].__enter__()
    port = int(server.url.rsplit(":", 1)[1])
    for name, value in server.env().items():   # the server's account
        monkeypatch.setenv(name, value)
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(server.url)
        experiment = client.create_experiment("buffered")
        run = tracking.open_run(server.url, client.create_run(experiment).info.run_id)
        said: list[str] = []
        buffer = MetricsBuffer(run, interval=0.05, retry_seconds=0.1, say=said.append)
        trained_while_down: list[int] = []

        def log(metrics, step):
            buffer.log(metrics, step)
            if "loss" not in metrics:
                return
            if step == 3:
                servers[0].__exit__(None, None, None)   # SIGTERM, waited for
            elif 3 < step < 8:
                if step == 4:  # logged after the kill: the buffer's next send fails
                    wait_until(lambda: not buffer.reachable, "the buffer seeing the outage")
                trained_while_down.append(step)
            elif step == 8:
                servers[0] = mlflow_server(folder, port=port)
                servers[0].__enter__()

        result = loop.train(cfg, stage="rpn", train_path=prepared / "train.parquet",
                            num_classes=2, log=log)
        assert buffer.close()
        assert result.steps == 12 and trained_while_down == [4, 5, 6, 7]
        history = client.get_metric_history(run.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(1, 13))
        assert sum("unreachable" in line for line in said) == 1
        assert sum("reachable again" in line for line in said) == 1
    finally:
        servers[0].__exit__(None, None, None)
