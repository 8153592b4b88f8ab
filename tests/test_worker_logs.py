"""What a `sessionq worker` process logs about its work (issue Operability): one line per
activity outcome, one per retry, a final failure at WARNING with the activity's traceback,
session opened/ended lines, `--log-format json`, and `-v` raising sessionq's level only.

Every test runs the real command in a subprocess and reads what it wrote.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from sessionq import ActivityError, Client, RetryPolicy
from sessionq.keys import QueueKeys
from tests import activities as acts
from tests.helpers import wait_for
from tests.test_cli import cli_worker  # noqa: F401 - the fixture

TWICE = RetryPolicy(maximum_attempts=2, initial_interval=0.05)


async def run_some_work(client: Client, task_queue: str) -> dict[str, str]:
    """A plain activity that completes, one that fails twice, a session with one activity;
    the ids, to find them in the log."""
    done = await client.start_activity(acts.echo, 1, task_queue=task_queue)
    await done.result()
    failing = await client.start_activity(acts.fail, "boom", task_queue=task_queue, retry_policy=TWICE)
    with pytest.raises(ActivityError):
        await failing.result()
    async with client.create_session(task_queue) as session:
        inside = await session.start_activity(acts.whoami)
        await inside.result()
    return {
        "done": done.activity_id,
        "failing": failing.activity_id,
        "session": session.session_id,
        "inside": inside.activity_id,
    }


def lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


async def test_worker_logs_each_outcome_retry_and_session(
    cli_worker: Any, client: Client, task_queue: str  # noqa: F811
) -> None:  # fmt: skip
    worker = await cli_worker("tests.activities:ALL", identity="logs-w1")
    ids = await run_some_work(client, task_queue)
    await wait_for(lambda: f"session {ids['session']} ended" in worker.output(), message="no end line")
    out = worker.output()

    (done,) = lines_with(out, ids["done"][:12])
    assert " INFO " in done and "activity echo" in done and f"on {task_queue}" in done
    assert "attempt 1: completed in" in done and " ms" in done

    retry, final = lines_with(out, ids["failing"][:12])[:2]
    assert " INFO " in retry and "attempt 1: failed (ValueError: boom)" in retry and "retrying in" in retry
    assert " WARNING " in final and "attempt 2: failed after" in final and "no attempt left" in final
    traceback = out.split(final, 1)[1].split("\n\n", 1)[0]
    assert 'tests/activities.py", line' in traceback and "raise ValueError(msg)" in traceback
    assert "sessionq/execution.py" not in traceback, "sessionq's own frames are noise to the user"

    (inside,) = lines_with(out, ids["inside"][:12])
    assert f"session {ids['session'][:12]}" in inside and "completed in" in inside
    assert lines_with(out, f"session {ids['session']} opened (execution timeout in")
    assert lines_with(out, f"session {ids['session']} ended: completed")


async def test_session_end_lines_name_the_real_reason(
    cli_worker: Any, client: Client, task_queue: str, key_prefix: str,  # noqa: F811
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    """A session that ends in Redis is logged with the reason Redis recorded, not a generic
    "session failed": one the caller failed on purpose, one the worker's SIGTERM failed."""
    worker = await cli_worker("tests.activities:ALL", identity="logs-w4")
    first = await client.create_session(task_queue)
    await first._end("fail", "the caller gave up on it")  # what the library does on a hopeless session
    await wait_for(lambda: f"session {first.session_id} ended" in worker.output(), message="no end line")
    (line,) = lines_with(worker.output(), f"session {first.session_id} ended")
    assert line.endswith("ended: failed (the caller gave up on it)"), line

    # An earlier version's entry has no reason: its mode says it.
    third = await client.create_session(task_queue)
    own = QueueKeys(key_prefix, task_queue).stream("logs-w4")
    await redis_client.xadd(own, {"t": "c", "s": third.session_id, "r": "expire"})
    await wait_for(lambda: f"session {third.session_id} ended" in worker.output(), message="no end line")
    (line,) = lines_with(worker.output(), f"session {third.session_id} ended")
    assert line.endswith("ended: failed (execution timeout passed)"), line

    second = await client.create_session(task_queue)
    worker.signal(signal.SIGTERM)
    assert await asyncio.wait_for(worker.process.wait(), 30) == 0, worker.output()
    (line,) = lines_with(worker.output(), f"session {second.session_id} ended")
    assert line.endswith("ended: failed (worker logs-w4 shut down)"), line


async def test_worker_log_format_json_carries_each_records_fields(
    cli_worker: Any, client: Client, task_queue: str  # noqa: F811
) -> None:  # fmt: skip
    worker = await cli_worker("tests.activities:ALL", "--log-format", "json", identity="logs-w2")
    ids = await run_some_work(client, task_queue)
    await wait_for(lambda: f"session {ids['session']} ended" in worker.output(), message="no end line")
    records = [json.loads(line) for line in worker.output().splitlines() if line.strip()]
    by_id = {r["activity_id"]: r for r in records if "activity_id" in r and r["outcome"] != "retrying"}
    done, failed, inside = by_id[ids["done"]], by_id[ids["failing"]], by_id[ids["inside"]]
    assert (done["level"], done["logger"], done["activity"], done["queue"]) == (
        "INFO", "sessionq.activity", "echo", task_queue,
    )  # fmt: skip
    assert done["outcome"] == "completed" and done["attempt"] == 1 and done["duration_ms"] >= 0
    assert done["time"].endswith("Z") and done["worker"] == "logs-w2" and done["session"] is None
    assert (failed["level"], failed["outcome"], failed["attempt"]) == ("WARNING", "failed", 2)
    assert "raise ValueError(msg)" in failed["message"]
    assert inside["session"] == ids["session"]
    assert any(r.get("event") == "session_ended" and r.get("outcome") == "completed" for r in records)


async def test_verbose_raises_sessionq_logging_only(
    cli_worker: Any, client: Client, task_queue: str, tmp_path: Path  # noqa: F811
) -> None:  # fmt: skip
    """-v shows sessionq's DEBUG lines, not redis-py's or asyncio's."""
    worker = await cli_worker("tests.activities:ALL", "-v", identity="logs-w3")
    await run_some_work(client, task_queue)
    await wait_for(lambda: " DEBUG " in worker.output(), message="no DEBUG line from sessionq")
    debug = lines_with(worker.output(), " DEBUG ")
    others = [line for line in debug if " DEBUG   sessionq" not in line]
    assert not others, others[:5]


async def test_a_worker_whose_queue_mates_register_other_activities_warns_and_inspect_shows_it(
    redis_url: str, key_prefix: str, task_queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A session placed on a worker that lacks the caller's activity fails it
    (ActivityNotRegisteredError, which says so); the start of the odd worker says so first."""
    from sessionq import Worker
    from tests.test_cli import collect_in_process

    settings: dict[str, Any] = {"task_queue": task_queue, "prefix": key_prefix}
    full = Worker(redis_url, activities=acts.ALL, identity="full", **settings)
    partial = Worker(redis_url, activities=[acts.whoami, acts.echo], identity="partial", **settings)
    async with full, partial:
        doc = await collect_in_process(redis_url, key_prefix, "queues", task_queue=task_queue)
    warned = [r.getMessage() for r in caplog.records if "register other activities" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("worker partial:"), warned
    assert "full also runs " in warned[0] and "sleep_for" in warned[0], warned[0]
    assert [q["activities_differ"] for q in doc["queues"]] == [True]


def test_the_json_log_format_keeps_a_line_whatever_its_fields_hold() -> None:
    from sessionq.cli.common import JsonFormatter

    record = logging.LogRecord("sessionq", logging.INFO, __file__, 1, "odd %s", ("fields",), None)
    record.__dict__.update(tuple_keys={(1, 2): 3}, ratio=float("nan"), fine=[1, "two"])
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "odd fields" and line["fine"] == [1, "two"]
    assert line["tuple_keys"] == "{(1, 2): 3}" and line["ratio"] == "nan"
