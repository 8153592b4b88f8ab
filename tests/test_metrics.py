"""Prometheus metrics of a live worker (issue Operability): `sessionq worker
--metrics-port N` serves /metrics, and what it says follows the work done; a Worker given
a registry of the user's fills that one instead.
"""

from __future__ import annotations

import asyncio
import gc
import urllib.request
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from sessionq import ActivityError, Client, RetryPolicy, Worker
from tests import activities as acts
from tests.helpers import wait_for
from tests.test_cli import cli_worker, free_port  # noqa: F401 - the fixture

ONCE = RetryPolicy(maximum_attempts=1)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(port: int) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()

    return await asyncio.to_thread(get)


async def test_a_live_worker_serves_metrics_that_follow_its_work(
    cli_worker: Any, client: Client, task_queue: str  # noqa: F811
) -> None:  # fmt: skip
    port = free_port()
    await cli_worker(
        "tests.activities:ALL", "--metrics-port", str(port), "--metrics-addr", "127.0.0.1",
        "--max-sessions", "3", "--heartbeat-timeout", "1", identity="metrics-w1",
    )  # fmt: skip
    for i in range(3):
        await client.execute_activity(acts.echo, i, task_queue=task_queue)
    with pytest.raises(ActivityError):
        await client.execute_activity(acts.fail, "boom", task_queue=task_queue, retry_policy=ONCE)
    session = await client.create_session(task_queue)
    await session.execute_activity(acts.whoami)
    base = {"queue": task_queue, "worker": "metrics-w1"}

    page = samples(await scrape(port))
    finished = "sessionq_activities_finished_total"
    assert value(page, "sessionq_activities_started_total", **base, activity="echo") == 3
    assert value(page, finished, **base, activity="echo", outcome="completed") == 3
    assert value(page, finished, **base, activity="fail", outcome="failed") == 1
    assert value(page, "sessionq_activity_duration_seconds_count", **base, activity="whoami") == 1
    hour = value(page, "sessionq_activity_duration_seconds_bucket", **base, activity="whoami", le="3600.0")
    assert hour == 1, "the duration buckets reach an hour (session activities take minutes)"
    assert value(page, "sessionq_session_slots_used", **base) == 1
    assert value(page, "sessionq_session_slots_total", **base) == 3
    assert value(page, "sessionq_sessions_opened_total", **base) == 1
    assert 0 <= value(page, "sessionq_heartbeat_age_seconds", **base) < 1.0

    await session.complete()

    async def ended() -> bool:
        page = samples(await scrape(port))
        return value(page, "sessionq_sessions_ended_total", **base, outcome="completed") == 1

    await wait_for(ended, message="the session's end never showed")
    assert value(samples(await scrape(port)), "sessionq_session_slots_used", **base) == 0


async def test_a_worker_fills_a_registry_of_the_users_and_two_workers_can_share_one(
    redis_url: str, key_prefix: str, task_queue: str, client: Client
) -> None:
    registry = CollectorRegistry()
    settings: dict[str, Any] = {"task_queue": task_queue, "prefix": key_prefix, "metrics_registry": registry}
    async with (
        Worker(redis_url, activities=acts.ALL, identity="a", **settings),
        Worker(redis_url, activities=acts.ALL, identity="b", **settings),
    ):
        for i in range(4):
            await client.execute_activity(acts.echo, i, task_queue=task_queue)
        finished = [
            registry.get_sample_value(
                "sessionq_activities_finished_total",
                {"queue": task_queue, "worker": w, "activity": "echo", "outcome": "completed"},
            )
            or 0
            for w in ("a", "b")
        ]
    assert sum(finished) == 4


async def test_a_registry_made_after_another_was_dropped_gets_its_own_series(
    redis_url: str, key_prefix: str, task_queue: str, client: Client
) -> None:
    for round_ in range(3):
        registry = CollectorRegistry()
        async with Worker(redis_url, task_queue=task_queue, activities=acts.ALL, prefix=key_prefix,
                          identity=f"r{round_}", metrics_registry=registry):  # fmt: skip
            await client.execute_activity(acts.echo, round_, task_queue=task_queue)
            labels = {"queue": task_queue, "worker": f"r{round_}", "activity": "echo"}
            assert registry.get_sample_value("sessionq_activities_started_total", labels) == 1
        del registry
        gc.collect()
