"""Plain activities (no session), end to end on both backends: the API.md contract.

Results and errors, retries, the four timeouts, activity_info(), cancellation by the
caller, the sync client, load balancing over workers (S06), and the delivery faults D03
(unknown name), D04 (malformed stream entries) and D05 (unencodable or oversized data).
Workers run in-process here: no test in this file kills one.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Protocol

import msgpack
import pytest
import pytest_asyncio
import redis.asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster

import sessionq
from sessionq import (
    ActivityCancelledError,
    ActivityError,
    ActivityNotRegisteredError,
    ActivityOptions,
    ActivityTimeoutError,
    ApplicationError,
    Client,
    Codec,
    RetryPolicy,
    SerializationError,
    SyncClient,
    Worker,
)
from sessionq.codec import default_codec
from sessionq.connection import is_cluster_url, split_cluster_url
from sessionq.envelope import encode_task
from sessionq.keys import QueueKeys
from tests import activities as shared
from tests.helpers import wait_for

NO_RETRY = RetryPolicy(maximum_attempts=1)
FAST_RETRY = RetryPolicy(initial_interval=0.01, backoff_coefficient=1.0, maximum_attempts=3)


# --- activities only this file uses ------------------------------------------------------


@sessionq.activity
def echo_sync(x: Any) -> Any:
    return x


@sessionq.activity(name="greet")
def greet_by_another_name(greeting: str, *, name: str, punctuation: str = "!") -> str:
    return f"{greeting}, {name}{punctuation}"


def raise_value_error_deep_inside(msg: str) -> None:
    """A helper the activity calls, so the remote traceback must name both frames."""
    raise ValueError(msg)


@sessionq.activity
async def explode(msg: str) -> None:
    raise_value_error_deep_inside(msg)


@sessionq.activity
def explode_sync(msg: str) -> None:
    raise_value_error_deep_inside(msg)


class FlakyError(RuntimeError):
    """Raised by `flaky`; a type of its own so non_retryable_error_types can name it."""


@sessionq.activity
def flaky(path: str, failures: int, error: str = "FlakyError") -> int:
    """Append this attempt's number to `path`; raise `error` for the first `failures` attempts."""
    attempt = sessionq.activity_info().attempt
    with open(path, "a") as f:
        f.write(f"{attempt}\n")
    if attempt <= failures:
        raise {"FlakyError": FlakyError, "KeyError": KeyError}[error](f"attempt {attempt} failed")
    return attempt


def log_event(path: str, event: str) -> None:
    with open(path, "a") as f:
        f.write(event + "\n")


@sessionq.activity
def stall_sync(path: str, poll: float, succeed_from: int = 0) -> int:
    """Log "start N", then poll is_cancelled() every `poll` s for up to 10 s ("cancelled N" or
    "finished N"). Attempts from `succeed_from` on (if set) return at once."""
    attempt = sessionq.activity_info().attempt
    log_event(path, f"start {attempt}")
    if succeed_from and attempt >= succeed_from:
        return attempt
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if sessionq.is_cancelled():
            log_event(path, f"cancelled {attempt}")
            return -1
        time.sleep(poll)
    log_event(path, f"finished {attempt}")
    return attempt


@sessionq.activity
async def heartbeat_then_stall(beats: int, marker: str) -> str:
    """Heartbeat `beats` times every 50 ms, then go silent (a stuck activity)."""
    for _ in range(beats):
        sessionq.heartbeat()
        await asyncio.sleep(0.05)
    Path(f"{marker}.stalled").write_text("")
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        Path(f"{marker}.cancelled").write_text("")
        raise
    return "never"


@sessionq.activity
async def keep_heartbeating(seconds: float) -> float:
    """Run longer than its heartbeat_timeout, but heartbeat all along: must not time out."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        sessionq.heartbeat({"elapsed": time.monotonic() - started})
        await asyncio.sleep(0.05)
    return time.monotonic() - started


@sessionq.activity
def heartbeat_sync_until_cancelled(marker: str) -> str:
    """A plain-def activity that learns of its cancellation from heartbeat() raising."""
    Path(f"{marker}.started").write_text("")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            sessionq.heartbeat()
        except ActivityCancelledError:
            Path(f"{marker}.cancelled").write_text("")
            raise
        time.sleep(0.01)
    return "never cancelled"


@sessionq.activity
def describe_sync() -> dict[str, Any]:
    info = sessionq.activity_info()
    return {
        "activity_id": info.activity_id,
        "name": info.name,
        "attempt": info.attempt,
        "task_queue": info.task_queue,
        "worker_id": info.worker_id,
        "session": info.session,
        "session_info": sessionq.get_session_info(),
    }


@sessionq.activity
async def unencodable_result() -> object:
    return object()


@sessionq.activity
async def sized_result(size: int) -> bytes:
    return b"x" * size


ACTIVITIES = [
    *shared.ALL,
    echo_sync,
    greet_by_another_name,
    explode,
    explode_sync,
    flaky,
    stall_sync,
    heartbeat_then_stall,
    keep_heartbeating,
    heartbeat_sync_until_cancelled,
    describe_sync,
    unencodable_result,
    sized_result,
]


# --- fixtures --------------------------------------------------------------------------


class StartWorker(Protocol):
    async def __call__(self, identity: str = "w1", **options: Any) -> Worker: ...


@pytest_asyncio.fixture
async def start_worker(redis_url: str, key_prefix: str, task_queue: str) -> AsyncIterator[StartWorker]:
    """Factory for in-process workers on the test's queue; all are stopped at teardown."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(identity: str = "w1", **options: Any) -> Worker:
            settings: dict[str, Any] = {
                "task_queue": task_queue,
                "activities": ACTIVITIES,
                "identity": identity,
                "heartbeat_timeout": 1.0,
                "shutdown_grace": 1.0,
                "prefix": key_prefix,
            }
            settings.update(options)
            target = settings.pop("redis", redis_url)
            return await stack.enter_async_context(Worker(target, **settings))

        yield start


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "marker")


async def keys_under(redis_client: redis.asyncio.Redis, prefix: str) -> set[bytes]:
    return {key async for key in redis_client.scan_iter(match=f"{prefix}:*", count=1000)}


def events_in(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def attempts_in(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


# --- results ---------------------------------------------------------------------------

VALUES: list[Any] = [
    b"\x00\xffraw bytes",
    "unicode \u2603",
    "",
    0,
    -(2**63),
    2**64 - 1,
    3.25,
    True,
    False,
    None,
    [],
    {},
    [1, "two", [3.0, [None, b"four"]]],
    {"a": {"b": [1, {"c": None}]}, "bytes": b"\x01", "list": [True, False]},
]


async def test_async_and_sync_activities_return_every_basic_type(
    start_worker: StartWorker, client: Client, task_queue: str
) -> None:
    await start_worker()
    for activity in (shared.echo, echo_sync):
        for value in VALUES:
            got = await client.execute_activity(activity, value, task_queue=task_queue)
            assert got == value and type(got) is type(value), (activity, value, got)


async def test_activity_called_by_name_string_and_with_kwargs(
    start_worker: StartWorker, client: Client, task_queue: str
) -> None:
    await start_worker("w-by-name")
    assert await client.execute_activity("whoami", task_queue=task_queue) == "w-by-name"
    assert await client.execute_activity("whoami_sync", task_queue=task_queue) == "w-by-name"
    assert await client.execute_activity("echo", {"k": [1]}, task_queue=task_queue) == {"k": [1]}
    # The explicit name= of @activity is what travels, by function or by string.
    by_function = await client.execute_activity(
        greet_by_another_name, "Hello", task_queue=task_queue, kwargs={"name": "Ada"}
    )
    by_name = await client.execute_activity(
        "greet", "Hi", task_queue=task_queue, kwargs={"name": "Bob", "punctuation": "?"}
    )
    assert (by_function, by_name) == ("Hello, Ada!", "Hi, Bob?")


async def test_start_activity_handle_and_concurrent_results(
    start_worker: StartWorker, client: Client, task_queue: str
) -> None:
    await start_worker()
    handles = [await client.start_activity(shared.echo, i, task_queue=task_queue) for i in range(20)]
    assert len({h.activity_id for h in handles}) == 20
    assert await asyncio.gather(*(h.result() for h in handles)) == list(range(20))
    assert all(h.done() for h in handles)


# --- remote errors and retries ---------------------------------------------------------


@pytest.mark.parametrize("activity", [explode, explode_sync], ids=["async", "sync"])
async def test_remote_error_carries_type_message_and_traceback(
    start_worker: StartWorker, client: Client, task_queue: str, activity: Any
) -> None:
    await start_worker()
    with pytest.raises(ActivityError) as caught:
        await client.execute_activity(activity, "disk full", task_queue=task_queue, retry_policy=NO_RETRY)
    error = caught.value
    assert isinstance(error.cause, ApplicationError)
    assert error.__cause__ is error.cause
    assert error.cause.type == "ValueError"
    assert error.cause.message == "disk full"
    assert activity.__name__ in error.cause.traceback
    assert "raise_value_error_deep_inside" in error.cause.traceback
    assert "ValueError: disk full" in error.cause.traceback
    frames = re.findall(r'File "([^"]+)"', error.cause.traceback)
    assert frames and frames[0].endswith("test_activities.py"), f"not the activity's frame first: {frames}"
    noise = ("sessionq/execution.py", "sessionq/threads.py", "asyncio/", "concurrent/futures/")
    assert not [f for f in frames if f.endswith(noise) or any(n in f for n in noise[2:])], frames
    assert error.activity_name == activity.__name__
    assert error.attempt == 1
    assert "disk full" in str(error)


async def test_retry_policy_retries_until_success(
    start_worker: StartWorker, client: Client, task_queue: str, tmp_path: Path
) -> None:
    await start_worker()
    log = tmp_path / "attempts"
    result = await client.execute_activity(flaky, str(log), 2, task_queue=task_queue, retry_policy=FAST_RETRY)
    assert result == 3
    assert attempts_in(log) == [1, 2, 3]


async def test_retry_policy_gives_up_after_maximum_attempts(
    start_worker: StartWorker, client: Client, task_queue: str, tmp_path: Path
) -> None:
    await start_worker()
    log = tmp_path / "attempts"
    policy = RetryPolicy(initial_interval=0.01, maximum_attempts=4)
    with pytest.raises(ActivityError) as caught:
        await client.execute_activity(flaky, str(log), 99, task_queue=task_queue, retry_policy=policy)
    assert attempts_in(log) == [1, 2, 3, 4]
    assert caught.value.attempt == 4
    assert caught.value.cause.type.endswith("FlakyError")
    assert caught.value.cause.message == "attempt 4 failed"


async def test_maximum_attempts_one_runs_exactly_once(
    start_worker: StartWorker, client: Client, task_queue: str, tmp_path: Path
) -> None:
    await start_worker()
    log = tmp_path / "attempts"
    with pytest.raises(ActivityError):
        await client.execute_activity(flaky, str(log), 1, task_queue=task_queue, retry_policy=NO_RETRY)
    assert attempts_in(log) == [1]


async def test_non_retryable_error_types_fail_at_once(
    start_worker: StartWorker, client: Client, task_queue: str, tmp_path: Path
) -> None:
    await start_worker()
    policy = RetryPolicy(initial_interval=0.01, maximum_attempts=5, non_retryable_error_types=["KeyError"])
    stopped, retried = tmp_path / "stopped", tmp_path / "retried"
    with pytest.raises(ActivityError) as caught:
        await client.execute_activity(
            flaky, str(stopped), 9, "KeyError", task_queue=task_queue, retry_policy=policy
        )
    assert caught.value.cause.type == "KeyError"
    assert attempts_in(stopped) == [1]
    # The same policy still retries an error type it does not name.
    assert (
        await client.execute_activity(flaky, str(retried), 1, task_queue=task_queue, retry_policy=policy) == 2
    )
    assert attempts_in(retried) == [1, 2]


# --- timeouts --------------------------------------------------------------------------


async def test_start_to_close_timeout_cancels_async_activity(
    start_worker: StartWorker, client: Client, task_queue: str, marker: str
) -> None:
    await start_worker()
    started = time.monotonic()
    with pytest.raises(ActivityTimeoutError) as caught:
        await client.execute_activity(
            shared.sleep_for, 30, marker, task_queue=task_queue,
            start_to_close_timeout=0.3, retry_policy=NO_RETRY,
        )  # fmt: skip
    assert caught.value.timeout_type == "start_to_close"
    assert time.monotonic() - started < 5
    await wait_for(
        lambda: Path(f"{marker}.cancelled").exists(), 5, message="activity never got CancelledError"
    )


async def test_start_to_close_timeout_is_retried_per_policy(
    start_worker: StartWorker, client: Client, task_queue: str, tmp_path: Path
) -> None:
    await start_worker()
    log = tmp_path / "log"
    with pytest.raises(ActivityTimeoutError) as caught:
        await client.execute_activity(
            stall_sync, str(log), 0.01, task_queue=task_queue,
            start_to_close_timeout=0.2, retry_policy=RetryPolicy(initial_interval=0.05, maximum_attempts=2),
        )  # fmt: skip
    assert caught.value.timeout_type == "start_to_close"
    # Both attempts ran, and each saw is_cancelled() turn true when its time was up.
    await wait_for(lambda: len(events_in(log)) >= 4, 5, message=f"attempts incomplete: {events_in(log)}")
    assert sorted(events_in(log)) == ["cancelled 1", "cancelled 2", "start 1", "start 2"]


async def test_timed_out_sync_attempt_stays_cancelled_while_the_retry_runs(
    start_worker: StartWorker, client: Client, task_queue: str, tmp_path: Path
) -> None:
    """A plain-def attempt cannot be killed; it must still see is_cancelled() once it timed out,
    even after the retry that replaced it started (and here succeeded)."""
    await start_worker()
    log = tmp_path / "log"
    result = await client.execute_activity(
        stall_sync, str(log), 0.3, 2, task_queue=task_queue,
        start_to_close_timeout=0.2, retry_policy=RetryPolicy(initial_interval=0.01, maximum_attempts=2),
    )  # fmt: skip
    assert result == 2
    await wait_for(
        lambda: "cancelled 1" in events_in(log),
        3,
        message=f"attempt 1 never saw is_cancelled(): {events_in(log)}",
    )
    assert "finished 1" not in events_in(log)


async def test_heartbeat_timeout_fails_a_silent_activity(
    start_worker: StartWorker, client: Client, task_queue: str, marker: str
) -> None:
    await start_worker()
    handle = await client.start_activity(
        heartbeat_then_stall, 4, marker, task_queue=task_queue, heartbeat_timeout=0.3, retry_policy=NO_RETRY
    )
    with pytest.raises(ActivityTimeoutError) as caught:
        await asyncio.wait_for(handle.result(), 10)
    assert caught.value.timeout_type == "heartbeat"
    assert Path(f"{marker}.stalled").exists()
    await wait_for(lambda: Path(f"{marker}.cancelled").exists(), 5, message="stalled activity not cancelled")


async def test_heartbeat_timeout_spares_an_activity_that_heartbeats(
    start_worker: StartWorker, client: Client, task_queue: str
) -> None:
    await start_worker()
    ran = await client.execute_activity(
        keep_heartbeating, 1.0, task_queue=task_queue, heartbeat_timeout=0.3, retry_policy=NO_RETRY
    )
    assert ran >= 1.0


async def test_schedule_to_close_timeout_on_the_caller_side(client: Client, task_queue: str) -> None:
    # No worker at all: only the caller's own deadline can end the wait.
    started = time.monotonic()
    with pytest.raises(ActivityTimeoutError) as caught:
        await client.execute_activity(shared.echo, 1, task_queue=task_queue, schedule_to_close_timeout=0.3)
    elapsed = time.monotonic() - started
    assert caught.value.timeout_type == "schedule_to_close"
    assert 0.25 <= elapsed < 2, elapsed


async def test_schedule_to_start_timeout_when_no_worker_picks_it_up_in_time(
    start_worker: StartWorker,
    client: Client,
    task_queue: str,
    redis_client: redis.asyncio.Redis,
    key_prefix: str,
    tmp_path: Path,
) -> None:
    runs = tmp_path / "runs"
    handle = await client.start_activity(
        shared.mark, str(runs), task_queue=task_queue, schedule_to_start_timeout=0.2
    )
    tasks_key = f"{key_prefix}:{{{task_queue}}}:tasks"
    [(entry_id, _)] = await redis_client.xrange(tasks_key)
    enqueued_ms = int(entry_id.split(b"-")[0])

    async def redis_clock_past_deadline() -> bool:
        seconds, micros = await redis_client.time()
        return seconds * 1000 + micros / 1000 > enqueued_ms + 300

    await wait_for(redis_clock_past_deadline, 5, message="Redis clock did not advance")
    await start_worker()  # the worker arrives too late for it
    with pytest.raises(ActivityTimeoutError) as caught:
        await asyncio.wait_for(handle.result(), 10)
    assert caught.value.timeout_type == "schedule_to_start"
    assert not runs.exists(), "an activity past its schedule_to_start_timeout must not run"
    # In time, the same activity runs.
    assert await client.execute_activity(
        shared.mark, str(runs), task_queue=task_queue, schedule_to_start_timeout=5
    )


# --- activity_info ---------------------------------------------------------------------


async def test_activity_info_inside_async_and_sync_activities(
    start_worker: StartWorker, client: Client, task_queue: str
) -> None:
    await start_worker("info-worker")
    handle = await client.start_activity(shared.describe, task_queue=task_queue)
    info = await handle.result()
    assert info == {
        "activity_id": handle.activity_id,
        "name": "describe",
        "attempt": 1,
        "task_queue": task_queue,
        "worker_id": "info-worker",
        "session_id": None,
    }
    handle = await client.start_activity(describe_sync, task_queue=task_queue)
    info = await handle.result()
    assert info == {
        "activity_id": handle.activity_id,
        "name": "describe_sync",
        "attempt": 1,
        "task_queue": task_queue,
        "worker_id": "info-worker",
        "session": None,
        "session_info": None,
    }


async def test_activity_info_outside_an_activity_raises() -> None:
    with pytest.raises(RuntimeError):
        sessionq.activity_info()
    with pytest.raises(RuntimeError):
        sessionq.heartbeat()
    assert sessionq.get_session_info() is None


# --- cancellation ----------------------------------------------------------------------


@pytest.mark.parametrize("activity", [shared.sleep_for, shared.sleep_sync], ids=["async", "sync"])
async def test_cancel_running_plain_activity(
    start_worker: StartWorker, client: Client, task_queue: str, marker: str, activity: Any
) -> None:
    await start_worker()
    handle = await client.start_activity(activity, 30, marker, task_queue=task_queue, retry_policy=NO_RETRY)
    await wait_for(lambda: Path(f"{marker}.started").exists(), 10, message="activity never started")
    started = time.monotonic()
    await handle.cancel()
    with pytest.raises(ActivityCancelledError):
        await handle.result()
    # async: CancelledError inside the activity; sync: is_cancelled() turned true.
    await wait_for(lambda: Path(f"{marker}.cancelled").exists(), 5, message="worker did not cancel it")
    assert time.monotonic() - started < 5
    # The worker's slot is free again and it keeps serving.
    assert await client.execute_activity(shared.echo, "still here", task_queue=task_queue) == "still here"


async def test_cancel_sync_activity_makes_heartbeat_raise(
    start_worker: StartWorker, client: Client, task_queue: str, marker: str
) -> None:
    await start_worker()
    handle = await client.start_activity(
        heartbeat_sync_until_cancelled, marker, task_queue=task_queue, retry_policy=NO_RETRY
    )
    await wait_for(lambda: Path(f"{marker}.started").exists(), 10, message="activity never started")
    await handle.cancel()
    with pytest.raises(ActivityCancelledError):
        await handle.result()
    await wait_for(lambda: Path(f"{marker}.cancelled").exists(), 5, message="heartbeat() did not raise")


# --- D03: unknown activity -------------------------------------------------------------


async def test_d03_unknown_activity_name_fails_fast_and_worker_keeps_serving(
    start_worker: StartWorker, client: Client, task_queue: str
) -> None:
    await start_worker()
    started = time.monotonic()
    with pytest.raises(ActivityNotRegisteredError) as caught:
        await client.execute_activity(
            "no_such_activity", 1, task_queue=task_queue, schedule_to_close_timeout=10
        )
    assert time.monotonic() - started < 2
    assert "no_such_activity" in str(caught.value)
    assert await client.execute_activity(shared.echo, "ok", task_queue=task_queue) == "ok"


# --- D04: malformed stream entries -----------------------------------------------------

GARBAGE_TASKS: list[dict[bytes, bytes]] = [
    {b"d": b"\xc1garbage"},  # 0xc1 is never valid msgpack
    {b"no_d_field": b"hello"},
    {b"d": msgpack.packb([1, 2, 3])},  # valid msgpack, not a task
    {b"d": msgpack.packb({"i": "x", "n": "echo"})},  # a task with fields missing
]


async def dead_entries(
    redis_client: redis.asyncio.Redis, key_prefix: str, queue: str
) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in await redis_client.xrange(f"{key_prefix}:{{{queue}}}:dead")]


async def test_d04_malformed_entries_in_tasks_stream_are_moved_aside(
    start_worker: StartWorker,
    client: Client,
    task_queue: str,
    key_prefix: str,
    redis_client: redis.asyncio.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks_key = f"{key_prefix}:{{{task_queue}}}:tasks"
    # Good and bad entries interleaved, all queued before any worker reads them.
    handles = [await client.start_activity(shared.echo, "before", task_queue=task_queue)]
    for i, garbage in enumerate(GARBAGE_TASKS):
        await redis_client.xadd(tasks_key, garbage)
        handles.append(await client.start_activity(shared.echo, f"between-{i}", task_queue=task_queue))
    await start_worker()
    handles.append(await client.start_activity(shared.echo, "after", task_queue=task_queue))
    results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 10)
    assert results == ["before", *(f"between-{i}" for i in range(len(GARBAGE_TASKS))), "after"]

    dead = await wait_for(
        lambda: _dead_count_at_least(redis_client, key_prefix, task_queue, len(GARBAGE_TASKS)),
        5,
        message="malformed entries not moved to the dead stream",
    )
    assert len(dead) == len(GARBAGE_TASKS)
    moved = sorted(({k: v for k, v in e.items() if k.startswith(b"f:")} for e in dead), key=repr)
    expected = sorted(({b"f:" + k: v for k, v in g.items()} for g in GARBAGE_TASKS), key=repr)
    assert moved == expected
    assert all(e[b"_stream"] == tasks_key.encode() and e[b"_error"] for e in dead)
    # Nothing is left in the queue, pending or not: the garbage does not come back.
    assert await wait_for(lambda: _stream_empty(redis_client, tasks_key), 5, message="tasks stream not empty")
    assert "malformed entry" in caplog.text


async def test_a_result_batch_redis_refuses_is_reported_once_not_resent(
    start_worker: StartWorker,
    client: Client,
    task_queue: str,
    key_prefix: str,
    redis_client: redis.asyncio.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A batch of results Redis answers with an error (WRONGTYPE: a caller's inbox key was
    overwritten by hand) is logged once, saying what to check, and not resent (each resend
    would push the same results again); the worker goes on serving."""
    keys = QueueKeys(key_prefix, task_queue)
    await redis_client.set(keys.inbox("ghost"), "not a list")
    payload = encode_task(
        default_codec, activity_id="a-ghost", name="echo", args=(1,), kwargs={}, client_id="ghost",
        session_id=None, options=ActivityOptions(),
    )  # fmt: skip
    await redis_client.xadd(keys.tasks, {"d": payload})
    worker = await start_worker("w-refused")
    refusal = "Redis refused 1 result(s) for inbox"
    await wait_for(lambda: refusal in caplog.text, message="the refusal was not reported")
    assert worker.outbox.empty, "the refused batch was queued to be sent again"
    assert await redis_client.xlen(keys.tasks) == 0, "the task was not acknowledged and deleted"
    still = await client.execute_activity(shared.echo, "still serving", task_queue=task_queue)
    assert still == "still serving"


async def _dead_count_at_least(
    redis_client: redis.asyncio.Redis, key_prefix: str, queue: str, n: int
) -> list[dict[bytes, bytes]] | None:
    dead = await dead_entries(redis_client, key_prefix, queue)
    return dead if len(dead) >= n else None


async def _stream_empty(redis_client: redis.asyncio.Redis, key: str) -> bool:
    pending = await redis_client.xpending(key, "workers")
    return await redis_client.xlen(key) == 0 and pending["pending"] == 0


async def test_d04_malformed_entries_in_worker_stream_are_moved_aside(
    start_worker: StartWorker,
    client: Client,
    task_queue: str,
    key_prefix: str,
    redis_client: redis.asyncio.Redis,
    marker: str,
) -> None:
    worker = await start_worker("w-own")
    own_stream = f"{key_prefix}:{{{task_queue}}}:w:{worker.worker_id}"
    handle = await client.start_activity(
        shared.sleep_for, 30, marker, task_queue=task_queue, retry_policy=NO_RETRY
    )
    await wait_for(lambda: Path(f"{marker}.started").exists(), 10, message="activity never started")
    garbage: list[dict[bytes, bytes]] = [
        {b"t": b"a", b"d": b"\xc1garbage"},  # a session activity that does not decode
        {b"t": b"zz"},  # an unknown entry type
        {b"no_type": b"1"},
    ]
    # One transaction, so the worker reads the garbage and the cancel after it in one batch.
    async with redis_client.pipeline(transaction=True) as pipe:
        for fields in garbage:
            pipe.xadd(own_stream, fields)
        pipe.xadd(own_stream, {b"t": b"x", b"i": handle.activity_id.encode()})
        await pipe.execute()
    # The cancel request behind the garbage was not lost.
    await wait_for(lambda: Path(f"{marker}.cancelled").exists(), 5, message="cancel behind garbage was lost")
    with pytest.raises(ActivityCancelledError):
        await asyncio.wait_for(handle.result(), 5)
    dead = await wait_for(
        lambda: _dead_count_at_least(redis_client, key_prefix, task_queue, len(garbage)),
        5,
        message="malformed own-stream entries not moved aside",
    )
    moved = sorted(({k: v for k, v in e.items() if k.startswith(b"f:")} for e in dead), key=repr)
    assert moved == sorted(({b"f:" + k: v for k, v in g.items()} for g in garbage), key=repr)
    assert all(e[b"_stream"] == own_stream.encode() for e in dead)
    assert await client.execute_activity(shared.whoami, task_queue=task_queue) == "w-own"


@pytest.mark.parametrize(
    "garbage",
    [{b"t": b"o"}, {b"t": b"c"}, {b"t": b"o", b"s": b"sid", b"x": b"not-a-number"}],
    ids=["open-without-session", "end-without-session", "open-with-bad-timeout"],
)
async def test_d04_malformed_control_entry_does_not_swallow_the_rest_of_the_batch(
    start_worker: StartWorker,
    client: Client,
    task_queue: str,
    key_prefix: str,
    redis_client: redis.asyncio.Redis,
    marker: str,
    garbage: dict[bytes, bytes],
) -> None:
    worker = await start_worker("w-ctl")
    own_stream = f"{key_prefix}:{{{task_queue}}}:w:{worker.worker_id}"
    handle = await client.start_activity(
        shared.sleep_for, 30, marker, task_queue=task_queue, retry_policy=NO_RETRY
    )
    await wait_for(lambda: Path(f"{marker}.started").exists(), 10, message="activity never started")
    async with redis_client.pipeline(transaction=True) as pipe:
        pipe.xadd(own_stream, garbage)
        pipe.xadd(own_stream, {b"t": b"x", b"i": handle.activity_id.encode()})
        await pipe.execute()
    await wait_for(lambda: Path(f"{marker}.cancelled").exists(), 5, message="cancel behind garbage was lost")
    with pytest.raises(ActivityCancelledError):
        await asyncio.wait_for(handle.result(), 5)
    dead = await wait_for(
        lambda: _dead_count_at_least(redis_client, key_prefix, task_queue, 1), 5, message="not moved aside"
    )
    assert [{k: v for k, v in e.items() if k.startswith(b"f:")} for e in dead] == [
        {b"f:" + k: v for k, v in garbage.items()}
    ]
    assert await client.execute_activity(shared.whoami, task_queue=task_queue) == "w-ctl"


# --- D05: serialization ----------------------------------------------------------------


async def test_d05_unencodable_argument_raises_before_anything_is_written(
    client: Client, task_queue: str, key_prefix: str, redis_client: redis.asyncio.Redis
) -> None:
    for args, kwargs in [((object(),), None), ((1, [2, {"deep": object()}]), None), ((), {"x": object()})]:
        with pytest.raises(SerializationError):
            await client.execute_activity(shared.echo, *args, task_queue=task_queue, kwargs=kwargs)
    assert await keys_under(redis_client, key_prefix) == set()


async def test_d05_oversized_argument_raises_before_anything_is_written(
    redis_url: str, client: Client, task_queue: str, key_prefix: str, redis_client: redis.asyncio.Redis
) -> None:
    with pytest.raises(SerializationError, match="limit"):
        await client.execute_activity(shared.echo, b"x" * (1024 * 1024 + 1), task_queue=task_queue)
    async with Client(redis_url, prefix=key_prefix, codec=Codec(max_payload_size=1000)) as small:
        with pytest.raises(SerializationError, match="1,000"):
            await small.start_activity(shared.echo, "y" * 1001, task_queue=task_queue)
    assert await keys_under(redis_client, key_prefix) == set()


async def test_d05_nothing_is_added_to_a_live_queue(
    start_worker: StartWorker,
    client: Client,
    task_queue: str,
    key_prefix: str,
    redis_client: redis.asyncio.Redis,
) -> None:
    await start_worker()
    assert await client.execute_activity(shared.echo, 1, task_queue=task_queue) == 1
    tasks_key = f"{key_prefix}:{{{task_queue}}}:tasks"
    info_before = await redis_client.xinfo_stream(tasks_key)
    keys_before = await keys_under(redis_client, key_prefix)
    with pytest.raises(SerializationError):
        await client.start_activity(shared.echo, {1: object()}, task_queue=task_queue)
    with pytest.raises(SerializationError):
        await client.start_activity(shared.echo, b"z" * (2 * 1024 * 1024), task_queue=task_queue)
    info_after = await redis_client.xinfo_stream(tasks_key)
    assert info_after["last-generated-id"] == info_before["last-generated-id"]
    assert {k for k in await keys_under(redis_client, key_prefix) if b":alive:" not in k} <= keys_before


async def test_d05_sets_and_tuples_are_encoded_as_lists(
    start_worker: StartWorker, client: Client, task_queue: str
) -> None:
    await start_worker()
    assert sorted(await client.execute_activity(shared.echo, {3, 1, 2}, task_queue=task_queue)) == [1, 2, 3]
    assert await client.execute_activity(shared.echo, (1, (2, 3)), task_queue=task_queue) == [1, [2, 3]]


async def test_d05_unencodable_or_oversized_result_is_a_serialization_error(
    start_worker: StartWorker, client: Client, task_queue: str
) -> None:
    await start_worker()
    with pytest.raises(SerializationError, match="unencodable_result"):
        await client.execute_activity(unencodable_result, task_queue=task_queue, retry_policy=NO_RETRY)
    with pytest.raises(SerializationError, match="limit"):
        await client.execute_activity(
            sized_result, 2 * 1024 * 1024, task_queue=task_queue, retry_policy=NO_RETRY
        )
    # The worker survived both and still answers.
    assert len(await client.execute_activity(sized_result, 1000, task_queue=task_queue)) == 1000


# --- SyncClient and redis instances ------------------------------------------------------


async def test_sync_client_from_a_thread(
    start_worker: StartWorker, task_queue: str, redis_url: str, key_prefix: str
) -> None:
    await start_worker("w-sync")

    def blocking_code() -> tuple[Any, ...]:
        with SyncClient(redis_url, prefix=key_prefix) as sync_client:
            direct = sync_client.execute_activity(shared.echo, [1, b"2"], task_queue=task_queue)
            by_name = sync_client.execute_activity("whoami_sync", task_queue=task_queue)
            handle = sync_client.start_activity(
                greet_by_another_name, "Hey", task_queue=task_queue, kwargs={"name": "Cy"}
            )
            greeting = handle.result()
            with pytest.raises(ActivityError) as caught:
                sync_client.execute_activity(
                    explode, "sync boom", task_queue=task_queue, retry_policy=NO_RETRY
                )
            return direct, by_name, greeting, caught.value.cause.message

    assert await asyncio.to_thread(blocking_code) == ([1, b"2"], "w-sync", "Hey, Cy!", "sync boom")


def user_redis(url: str, decode_responses: bool) -> Any:
    """A client as a user would build it: a Redis, or a RedisCluster on the cluster backend."""
    if not is_cluster_url(url):
        return redis.asyncio.Redis.from_url(url, decode_responses=decode_responses)
    _, nodes = split_cluster_url(url)
    startup_nodes = [ClusterNode(host, port) for host, port in nodes]
    return RedisCluster(startup_nodes=startup_nodes, decode_responses=decode_responses)


@pytest.mark.parametrize("decode_responses", [False, True], ids=["bytes", "decode_responses"])
async def test_client_and_worker_accept_a_redis_instance(
    start_worker: StartWorker, task_queue: str, redis_url: str, key_prefix: str, decode_responses: bool
) -> None:
    worker_redis = user_redis(redis_url, decode_responses)
    client_redis = user_redis(redis_url, decode_responses)
    try:
        await start_worker("w-instance", redis=worker_redis)
        async with Client(client_redis, prefix=key_prefix) as c:
            assert await c.execute_activity(shared.echo, b"\xff\x00", task_queue=task_queue) == b"\xff\x00"
            assert await c.execute_activity("whoami", task_queue=task_queue) == "w-instance"
            with pytest.raises(ActivityError):
                await c.execute_activity(explode, "x", task_queue=task_queue, retry_policy=NO_RETRY)
    finally:
        await worker_redis.aclose()
        await client_redis.aclose()


# --- S06: load balancing ---------------------------------------------------------------


async def test_s06_plain_activities_are_load_balanced_over_all_workers(
    start_worker: StartWorker, client: Client, task_queue: str
) -> None:
    workers = [await start_worker(f"lb{i}", max_concurrent_activities=2) for i in range(4)]
    handles = [await client.start_activity(shared.sleep_for, 0.05, task_queue=task_queue) for _ in range(40)]
    ran_on = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 30)
    counts = {w.worker_id: ran_on.count(w.worker_id) for w in workers}
    assert sum(counts.values()) == 40
    assert all(n > 0 for n in counts.values()), counts
