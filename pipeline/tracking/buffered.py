"""Step metrics to MLflow off the training step: buffered, sent in batches by a thread, kept
while the store is unreachable.

A training step only appends to a list (:meth:`MetricsBuffer.log`, no I/O); a daemon thread
sends what has gathered every ``interval`` seconds in one ``log_batch`` per 1,000 points. When
the store cannot be reached (a tracking server restarting, a network hiccup) the points stay,
the thread says so once and retries every ``retry_seconds``; when the store answers again it
sends everything it kept, in step order with the timestamps of when each point was logged,
and says how many. Training never waits on it: only :meth:`MetricsBuffer.close` (the end of a
run) waits, at most ``close_timeout`` seconds, for the points still pending.

At most ``max_points`` points are kept (a day of a step logged every second is ~0.5 M points of
a dozen metrics); beyond that the oldest go. A batch the store refuses for good (a 4xx answer:
a deleted run, an invalid value) is dropped rather than retried. Every loss is counted in
:attr:`MetricsBuffer.dropped`, said when it first happens and totalled by :meth:`close`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable, Mapping

from pipeline.redaction import redact
from pipeline.tracking.runs import RunHandle, metric_name

BATCH = 1000  # MLflow's limit of metrics per log_batch request


class MetricsBuffer:
    """``log(metrics, step)`` for a training loop: the values reach ``run`` asynchronously.

    Args:
        run: the MLflow run the points go to.
        interval: seconds between sends while the store is reachable.
        retry_seconds: seconds between tries while it is not.
        close_timeout: how long :meth:`close` waits for pending points.
        max_points: the most points kept while the store is unreachable.
        say: one line per change of the store's state (unreachable, back).
        send: ``send(points)`` delivers ``[(name, value, timestamp ms, step)]`` (default: the
            run's :meth:`RunHandle.log_metric_points`); raises when the store is unreachable.
    """

    def __init__(self, run: RunHandle, *, interval: float = 1.0, retry_seconds: float = 5.0,
                 close_timeout: float = 120.0, max_points: int = 2_000_000,
                 say: Callable[[str], None] = print,
                 send: Callable[[list[tuple[str, float, int, int]]], None] | None = None
                 ) -> None:
        self.run = run
        self.interval = interval
        self.retry_seconds = retry_seconds
        self.close_timeout = close_timeout
        self.say = say
        self.sent = 0
        self.dropped = 0
        self._send = send or run.log_metric_points
        self._pending: deque[tuple[str, float, int, int]] = deque(maxlen=max_points)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._abandoned = False
        self._failing_since: float | None = None
        self._thread = threading.Thread(target=self._serve, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def log(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Queue ``metrics`` at ``step`` (names made MLflow-valid, booleans skipped); returns at
        once."""
        now = int(time.time() * 1000)
        points = [(metric_name(redact(k)), float(v), now, int(step))
                  for k, v in metrics.items() if not isinstance(v, bool)]
        with self._lock:
            lost = len(points) - (self._pending.maxlen - len(self._pending))
            self._pending.extend(points)  # a full deque drops its oldest
        if lost > 0:
            self._drop(lost, f"more than {self._pending.maxlen} waiting for "
                             f"{redact(self.run.tracking_uri)}; the oldest go first")

    __call__ = log

    @property
    def reachable(self) -> bool:
        """False from a failed send until the next one that succeeds."""
        return self._failing_since is None

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def close(self) -> bool:
        """Send what is pending (waiting at most ``close_timeout`` s) and stop the thread.
        Returns whether every point was delivered; says how many were not."""
        self._closing = True
        self._wake.set()
        self._thread.join(self.close_timeout)
        self._abandoned = True  # the thread stops at its next wake: what is left is lost
        left = self.pending
        if left or self._thread.is_alive():
            self.say(f"tracking: {left} metric point(s) could not be sent to "
                     f"{redact(self.run.tracking_uri)} within {self.close_timeout:.0f} s; "
                     f"they are lost (the training itself is not)")
            return False
        if self.dropped:
            self.say(f"tracking: {self.dropped} metric point(s) in all were dropped")
        return not self.dropped

    def __enter__(self) -> "MetricsBuffer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._abandoned:
            wait = self.retry_seconds if self._failing_since is not None else self.interval
            self._wake.wait(wait)
            self._wake.clear()
            if self._abandoned:
                return
            delivered = self._flush()
            if self._closing and (delivered or self.pending == 0):
                return
            if self._closing and self._failing_since is not None:
                continue  # close() bounds the wait; keep trying until then

    def _flush(self) -> bool:
        """Send everything pending, a batch at a time; False when the store refused."""
        while True:
            with self._lock:
                batch = [self._pending.popleft() for _ in range(min(BATCH, len(self._pending)))]
            if not batch:
                return True
            try:
                self._send(batch)
            except Exception as exc:  # connection refused, timeouts, 5xx after MLflow's retries
                if _refused_for_good(exc):  # 4xx: the store answered no; retrying cannot help
                    self._drop(len(batch), f"refused by {redact(self.run.tracking_uri)} "
                                           f"({redact(str(exc).splitlines()[0])[:200]})")
                    continue
                self._put_back(batch)
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    first = str(exc).splitlines()[0] if str(exc) else ""
                    self.say(f"tracking: {redact(self.run.tracking_uri)} unreachable "
                             f"({type(exc).__name__}: {redact(first)[:200]}); training goes on, "
                             f"metrics are kept and sent when it is back")
                return False
            self.sent += len(batch)
            if self._failing_since is not None:
                down = time.monotonic() - self._failing_since
                self._failing_since = None
                self.say(f"tracking: {redact(self.run.tracking_uri)} reachable again after "
                         f"{down:.0f} s; sending the metrics kept meanwhile")

    def _put_back(self, batch: list[tuple[str, float, int, int]]) -> None:
        """Return an unsent batch to the front (oldest first); a full buffer loses its newest."""
        with self._lock:
            over = len(self._pending) + len(batch) - self._pending.maxlen
            self._pending.extendleft(reversed(batch))
        if over > 0:
            self._drop(over, f"more than {self._pending.maxlen} waiting for "
                             f"{redact(self.run.tracking_uri)}")

    def _drop(self, count: int, why: str) -> None:
        """Count ``count`` points lost; the first loss is said (once)."""
        if not self.dropped:
            self.say(f"tracking: metric points dropped: {why}")
        self.dropped += count


def _refused_for_good(exc: Exception) -> bool:
    """An MLflow error the store answered with a 4xx other than 429 (a deleted run, an
    invalid value): sending the same batch again would fail again."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    status = exc.get_http_status_code()
    return 400 <= status < 500 and status != 429
