"""Prometheus metrics of a worker (``pip install 'sessionq[metrics]'``).

Off unless asked for: `Worker(metrics_registry=...)` puts them in a registry the user
serves, `sessionq worker --metrics-port N` in prometheus_client's default one, served on
/metrics. Every series is labelled with the worker's task queue and identity, so several
Workers of one process can share a registry.

    sessionq_activities_started_total{queue,worker,activity}
    sessionq_activities_finished_total{queue,worker,activity,outcome}
        outcome: completed, failed, timed_out, cancelled, ended_with_its_session,
        not_started, interrupted (by the worker's stop), or the error's kind
        (ActivityNotRegisteredError...)
    sessionq_activity_duration_seconds{queue,worker,activity}   histogram, all attempts
    sessionq_activities_running{queue,worker}
    sessionq_session_slots_used{queue,worker}
    sessionq_session_slots_total{queue,worker}                  0: no limit
    sessionq_sessions_opened_total{queue,worker}
    sessionq_sessions_ended_total{queue,worker,outcome}         completed | failed
    sessionq_heartbeat_age_seconds{queue,worker}                since the last beat that got through
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .activity import ActivityInfo
    from .envelope import RemoteError

OUTCOMES = {
    "ApplicationError": "failed",
    "ActivityTimeoutError": "timed_out",
    "ActivityCancelledError": "cancelled",
    "SessionFailedError": "ended_with_its_session",
    "Interrupted": "interrupted",
}
"""The outcome label of a finished activity, by the kind of error it ended with."""


DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, float("inf"),
)  # fmt: skip
"""Seconds: prometheus-client's defaults (5 ms to 10 s), then up to an hour, since session
activities (a download, a training step, a transcode) often take minutes."""


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ConfigurationError(
            "metrics", "need prometheus-client: pip install 'sessionq[metrics]'"
        ) from None
    return prometheus_client


class _Families:
    """The metric families of one registry (made once: a name may be registered once)."""

    def __init__(self, registry: Any) -> None:
        p = _prometheus()
        base = ("queue", "worker")

        def make(kind: Any, name: str, text: str, *labels: str, **more: Any) -> Any:
            return kind(name, text, [*base, *labels], registry=registry, **more)

        self.started = make(p.Counter, "sessionq_activities_started", "Executions started.", "activity")
        self.finished = make(
            p.Counter, "sessionq_activities_finished", "Activity executions finished, by outcome.",
            "activity", "outcome",
        )  # fmt: skip
        self.duration = make(
            p.Histogram, "sessionq_activity_duration_seconds", "How long an execution took, all attempts.",
            "activity", buckets=DURATION_BUCKETS,
        )  # fmt: skip
        self.running = make(p.Gauge, "sessionq_activities_running", "Activities running now.")
        self.slots_used = make(p.Gauge, "sessionq_session_slots_used", "Sessions open on the worker.")
        self.slots_total = make(p.Gauge, "sessionq_session_slots_total", "The session limit (0: no limit).")
        self.opened = make(p.Counter, "sessionq_sessions_opened", "Sessions opened on the worker.")
        self.ended = make(p.Counter, "sessionq_sessions_ended", "Sessions ended, by outcome.", "outcome")
        self.heartbeat_age = make(
            p.Gauge, "sessionq_heartbeat_age_seconds", "Seconds since the last successful heartbeat."
        )


_families: weakref.WeakKeyDictionary[Any, _Families] = weakref.WeakKeyDictionary()
"""By registry (weak: a registry made anew after one was dropped gets its own families)."""


class WorkerMetrics:
    """One worker's series in `registry`."""

    def __init__(self, registry: Any, queue: str, worker: str) -> None:
        if registry not in _families:
            _families[registry] = _Families(registry)
        self.f = _families[registry]
        self.labels = (queue, worker)

    def watch(
        self,
        running: Callable[[], float],
        slots_used: Callable[[], float],
        slots_total: float | None,
        last_beat: Callable[[], float | None],
    ) -> None:
        """Gauges read when scraped: what runs, the sessions held (slots_total None: sessions
        are off, no slot gauges), the heartbeat's age."""
        self.f.running.labels(*self.labels).set_function(running)
        if slots_total is not None:
            self.f.slots_used.labels(*self.labels).set_function(slots_used)
            self.f.slots_total.labels(*self.labels).set(slots_total)

        def age() -> float:
            beat = last_beat()
            return float("nan") if beat is None else time.monotonic() - beat

        self.f.heartbeat_age.labels(*self.labels).set_function(age)

    def close(self) -> None:
        """The worker stopped: drop its gauges (they would read a stopped worker's state)."""
        for gauge in (self.f.running, self.f.slots_used, self.f.slots_total, self.f.heartbeat_age):
            with contextlib.suppress(KeyError):
                gauge.remove(*self.labels)

    def started(self, info: ActivityInfo) -> None:
        self.f.started.labels(*self.labels, info.name).inc()

    def finished(
        self, info: ActivityInfo, seconds: float, error: RemoteError | None, started: bool = True
    ) -> None:
        if error is None:
            outcome = "completed"
        elif not started:
            outcome = "not_started"
        else:
            outcome = OUTCOMES.get(error.kind, error.kind)
        self.f.finished.labels(*self.labels, info.name, outcome).inc()
        if started:
            self.f.duration.labels(*self.labels, info.name).observe(seconds)

    def session_opened(self) -> None:
        self.f.opened.labels(*self.labels).inc()

    def session_ended(self, outcome: str) -> None:
        self.f.ended.labels(*self.labels, outcome).inc()
