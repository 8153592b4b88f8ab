"""No runaway or duplicate run (D09, D10, D03, D04): activities run as often, as many at
once, and as long as promised, whatever an activity or a caller does.

The concurrency limit is hard; an activity cannot stop its worker (sys.exit(), Ctrl-C,
an exception that cannot be encoded, a blocked event loop); a cancelled activity never
starts later; ApplicationError's type and non_retryable are honoured; a graceful stop
takes nothing new and leaves no thread holding the process; stopped workers leave the
consumer group; malformed input is refused with an answer. Workers that could crash run
as real processes, so a crash would show as a dead process, not a dead test run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import pytest_asyncio
import redis.asyncio

import sessionq
from sessionq import ActivityError, Client, ConfigurationError, RetryPolicy, SessionOptions, Worker
from sessionq.keys import QueueKeys
from tests import activities as acts
from tests.helpers import SpawnWorker, wait_for

HB = 2.0
ONCE = RetryPolicy(maximum_attempts=1)


@pytest_asyncio.fixture
async def workers(redis_url: str, key_prefix: str, task_queue: str) -> AsyncIterator[Any]:
    async with contextlib.AsyncExitStack() as stack:

        async def start(identity: str = "w1", **options: Any) -> Worker:
            settings: dict[str, Any] = {
                "task_queue": task_queue, "activities": acts.ALL, "identity": identity,
                "heartbeat_timeout": HB, "shutdown_grace": 1.0, "prefix": key_prefix, "enable_sessions": True,
            }  # fmt: skip
            settings.update(options)
            return await stack.enter_async_context(Worker(redis_url, **settings))

        yield start


def runs(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


# --- 10. the concurrency limit is hard ---------------------------------------------------------


async def test_d09_a_session_activity_and_a_plain_one_never_exceed_the_limit(
    workers: Any, client: Client, task_queue: str, tmp_path: Path
) -> None:
    """Concurrency 1: the shared-stream read waits (blocked) for a plain activity while a
    session activity takes the only slot; the plain one must wait for it, not run beside it."""
    await workers(max_concurrent_activities=1)
    spans = tmp_path / "spans"
    session = await client.create_session(task_queue)
    pinned = await session.start_activity(acts.span, str(spans), 0.5)
    await wait_for(spans.exists, message="the session activity never started")
    plain = await client.execute_activity(acts.span, str(spans), 0.5, task_queue=task_queue)
    assert (await pinned.result(), plain) == ("w1", "w1")
    running, most = 0, 0
    for line in spans.read_text().splitlines():
        running += 1 if line.startswith("start") else -1
        most = max(most, running)
    assert most == 1, f"{most} activities ran at once on a worker with concurrency 1"
    await session.complete()


# --- 11. an activity cannot end its worker ------------------------------------------------------


@pytest.mark.parametrize("how", ["sys.exit", "SystemExit", "KeyboardInterrupt"])
async def test_d10_an_activity_that_exits_fails_only_itself(
    how: str, spawn_worker: SpawnWorker, client: Client, task_queue: str
) -> None:
    worker = await spawn_worker(identity="w1", heartbeat_timeout=HB)
    for activity in (acts.exit_with, acts.exit_with_sync):
        with pytest.raises(ActivityError) as caught:
            await asyncio.wait_for(
                client.execute_activity(activity, how, task_queue=task_queue, retry_policy=ONCE), 10
            )
        assert caught.value.cause.type == ("SystemExit" if how != "KeyboardInterrupt" else how)
    assert worker.returncode is None, "the worker died"
    assert await client.execute_activity(acts.whoami, task_queue=task_queue) == "w1"


@pytest.mark.parametrize("kind", ["huge", "surrogate", "str-raises"])
async def test_d10_an_exception_that_cannot_be_encoded_still_answers_its_caller(
    kind: str, workers: Any, client: Client, task_queue: str
) -> None:
    await workers()
    with pytest.raises(ActivityError) as caught:
        await asyncio.wait_for(
            client.execute_activity(acts.raise_unencodable, kind, task_queue=task_queue, retry_policy=ONCE),
            10,
        )
    cause = caught.value.cause
    if kind == "huge":
        assert "more characters cut" in cause.message and len(cause.message) < 100_000
    elif kind == "surrogate":
        assert cause.message.startswith("bad ")
    else:
        assert "str() raised" in cause.message
    assert await client.execute_activity(acts.whoami, task_queue=task_queue) == "w1"


async def test_d10_an_activity_that_blocks_the_event_loop_runs_once_and_its_worker_lives(
    spawn_worker: SpawnWorker, client: Client, task_queue: str, tmp_path: Path,
    redis_client: redis.asyncio.Redis, keys: QueueKeys,
) -> None:  # fmt: skip
    """time.sleep(3) in an async activity, heartbeat_timeout 1 s, another worker watching:
    the blocked worker is not declared dead (its heartbeat has a thread of its own), so the
    activity is not handed to the next worker, and the stall is reported once, by name."""
    blocker, _ = await asyncio.gather(
        spawn_worker(identity="w1", heartbeat_timeout=1.0),
        spawn_worker(identity="w2", heartbeat_timeout=1.0, enable_sessions=False),
    )
    session = await client.create_session(task_queue)
    assert session.info.worker_id == "w1"
    registered = await redis_client.hget(keys.worker("w1"), "registered")
    marker = tmp_path / "runs"
    assert await asyncio.wait_for(session.execute_activity(acts.block_loop, 3.0, str(marker)), 15) == "w1"
    assert runs(marker) == ["w1"]
    assert await redis_client.hget(keys.worker("w1"), "registered") == registered, "w1 was declared dead"
    assert session.state is sessionq.SessionState.OPEN
    await wait_for(
        lambda: "blocked the event loop" in blocker.output_tail(), message="the stall was not logged"
    )
    assert "block_loop" in blocker.output_tail()
    await session.complete()


# --- 14. a cancelled activity never starts later -----------------------------------------------


async def test_d09_cancelling_a_queued_plain_activity_means_it_never_runs(
    redis_url: str, key_prefix: str, task_queue: str, workers: Any, client: Client, tmp_path: Path
) -> None:
    """Cancelled while it waits in the queue (no worker free), it must not run afterwards."""
    charges = tmp_path / "charges"
    handle = await client.start_activity(acts.mark, str(charges), task_queue=task_queue)
    await handle.cancel()
    with pytest.raises(sessionq.ActivityCancelledError):
        await handle.result()
    await workers()
    # A later activity has run: the cancelled one, queued before it, had its chance.
    assert await client.execute_activity(acts.echo, "after", task_queue=task_queue) == "after"
    assert runs(charges) == [], "the cancelled activity ran anyway"


async def test_d09_cancelling_a_plain_activity_waiting_for_a_slot_means_it_never_runs(
    workers: Any, client: Client, task_queue: str, tmp_path: Path
) -> None:
    """Read by a worker whose only slot is busy, the cancelled activity never starts there."""
    await workers(max_concurrent_activities=1)
    busy = await client.start_activity(acts.sleep_for, 1.0, str(tmp_path / "busy"), task_queue=task_queue)
    await wait_for((tmp_path / "busy.started").exists, message="never started")
    charges = tmp_path / "charges"
    handle = await client.start_activity(acts.mark, str(charges), task_queue=task_queue)
    await asyncio.sleep(0.3)  # let the worker read it and hold it for the slot: the set-up
    await handle.cancel()
    await busy.result()
    assert await client.execute_activity(acts.echo, "after", task_queue=task_queue) == "after"
    assert runs(charges) == [], "the cancelled activity ran anyway"


# --- 15. ApplicationError's type and non_retryable ----------------------------------------------


async def test_d03_an_application_error_keeps_its_type_and_is_not_retried_when_non_retryable(
    workers: Any, client: Client, task_queue: str, tmp_path: Path
) -> None:
    await workers()
    attempts = tmp_path / "attempts"
    with pytest.raises(ActivityError) as caught:
        await client.execute_activity(
            acts.refuse, str(attempts), "BadInput", task_queue=task_queue,
            retry_policy=RetryPolicy(maximum_attempts=3, initial_interval=0.01),
        )  # fmt: skip
    assert caught.value.cause.type == "BadInput"
    assert caught.value.cause.non_retryable is True
    assert len(runs(attempts)) == 1, "a non-retryable error was retried"


# --- 16. graceful stop -------------------------------------------------------------------------


async def test_d10_a_stopping_worker_takes_over_nothing_and_leaves_no_thread_behind(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, tmp_path: Path,
    redis_client: redis.asyncio.Redis, keys: QueueKeys,
) -> None:  # fmt: skip
    """During its grace a stopping worker claims no dead worker's work; a def activity that
    ignores its cancellation does not keep the worker (or its process) from stopping."""
    worker = Worker(
        redis_url, task_queue=task_queue, activities=acts.ALL, identity="w1", heartbeat_timeout=1.0,
        shutdown_grace=1.5, prefix=key_prefix,
    )  # fmt: skip
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(worker)
        stubborn = await client.start_activity(
            acts.ignore_cancel, 4.0, str(tmp_path / "stubborn"), task_queue=task_queue
        )
        await wait_for((tmp_path / "stubborn.started").exists, message="never started")
        worker.stop()
        started = time.monotonic()
        await wait_for(lambda: _no_shared_poll(worker), message="the worker kept reading the task stream")
        # During the grace, a dead worker's delivered-but-unfinished entry appears (its
        # consumer has no heartbeat): housekeeping passes run, and must leave it alone.
        orphan = await client.start_activity(acts.mark, str(tmp_path / "orphan"), task_queue=task_queue)
        [(entry_id, _)] = await redis_client.xrevrange(keys.tasks, count=1)
        await redis_client.xreadgroup("workers", "ghost", {keys.tasks: ">"}, count=1)
        # (fakeredis may hand it to the stopping worker's abandoned blocking read first: move it)
        await redis_client.xclaim(keys.tasks, "workers", "ghost", 0, [entry_id])
        # Its takeover mark (as a reaper leaves) and an audit, both due: the stopping worker's
        # sweep takes the audit (and must claim nothing in it), and leaves the mark to others.
        await redis_client.zadd(keys.beats, {"o:ghost": 0, "scan": 0})

        async def audit_handed_out() -> bool:
            return bool(await redis_client.zscore(keys.beats, "scan"))

        await wait_for(audit_handed_out, timeout=1.0, message="the stopping worker's sweep did not run")
        # (the same sweep would have handed out, and so moved, the mark)
        handed = await redis_client.zscore(keys.beats, "o:ghost")
        assert handed == 0, "the stopping worker was handed the mark"
        await worker.wait_stopped()
        assert time.monotonic() - started < 1.5 + 5, "the stop waited for the stubborn thread"
    assert not (tmp_path / "stubborn.finished").exists(), "the test proved nothing: the thread had ended"
    assert runs(tmp_path / "orphan") == [], "a stopping worker took over a dead worker's activity"
    owners = {p["consumer"] for p in await redis_client.xpending_range(keys.tasks, "workers", "-", "+", 10)}
    assert b"ghost" in owners, "the dead worker's entry changed hands during the grace"
    del stubborn, orphan  # left to another worker: the stubborn one was cut by the stop


def _no_shared_poll(worker: Worker) -> bool:
    return all(t.done() for t in worker._tasks if t.get_name() == "sessionq-poll-shared")


# --- 17. consumers of stopped workers ------------------------------------------------------------


async def test_d11_stopped_and_dead_workers_leave_the_consumer_group(
    redis_url: str, key_prefix: str, task_queue: str, workers: Any, client: Client,
    redis_client: redis.asyncio.Redis, keys: QueueKeys, spawn_worker: SpawnWorker,
) -> None:  # fmt: skip
    for round_ in range(3):
        async with Worker(
            redis_url, task_queue=task_queue, activities=acts.ALL, identity=f"gone-{round_}",
            heartbeat_timeout=HB, prefix=key_prefix,
        ):  # fmt: skip
            assert await client.execute_activity(acts.whoami, task_queue=task_queue) == f"gone-{round_}"
    consumers = await redis_client.xinfo_consumers(keys.tasks, "workers")
    assert consumers == [], f"stopped workers stayed in the group: {[c['name'] for c in consumers]}"

    async def consumers_now() -> set[bytes]:
        return {c["name"] for c in await redis_client.xinfo_consumers(keys.tasks, "workers")}

    # A SIGKILLed worker (nothing pending): whoever reaps it drops its consumer (the audit,
    # which would too, is put off for the test).
    killed = await spawn_worker(identity="killed", heartbeat_timeout=0.5)
    await wait_for(lambda: _has(consumers_now(), b"killed"), message="the worker never read the stream")
    await killed.kill()

    async def last_read_over() -> bool:
        """fakeredis keeps a dead client's blocked XREADGROUP (Redis drops it with the
        connection) and serves it when the stream changes, which makes the consumer again
        after the reap: wait until its read, begun before the kill, has timed out (it blocks
        a second at most, read_block_ms)."""
        for consumer in await redis_client.xinfo_consumers(keys.tasks, "workers"):
            if consumer["name"] == b"killed":
                return int(consumer["idle"]) > 1500
        return True

    await wait_for(last_read_over, timeout=10, message="the killed worker's last read never ended")
    await workers("live", heartbeat_timeout=0.5)
    await redis_client.zadd(keys.beats, {"scan": time.time() * 1000 + 3_600_000})
    gone = "the dead consumer stayed in the group"
    await wait_for(lambda: _lacks(consumers_now(), b"killed"), timeout=10, message=gone)
    # A consumer no registration knows of (a worker of an older version, a read by hand): the
    # queue's periodic audit drops it once it is long silent.
    await redis_client.xreadgroup("workers", "ghost", {keys.tasks: ">"}, count=1)
    await redis_client.zadd(keys.beats, {"scan": 0})  # due now
    unknown = "the unknown consumer stayed in the group"
    await wait_for(lambda: _lacks(consumers_now(), b"ghost"), timeout=20, message=unknown)


async def _has(names: Awaitable[set[bytes]], name: bytes) -> bool:
    return name in await names


async def _lacks(names: Awaitable[set[bytes]], name: bytes) -> bool:
    return name not in await names


# --- 18. malformed entries -----------------------------------------------------------------


async def test_d04_an_entry_with_wrongly_typed_options_is_moved_aside_and_its_caller_answered(
    workers: Any, client: Client, task_queue: str, redis_client: redis.asyncio.Redis, keys: QueueKeys
) -> None:
    await workers()
    inbox = client.inbox(task_queue)
    for bad_options in (["abc", None, None, None, None], [None, None, None, "x", None]):
        future = await inbox.expect("a-bad")
        payload = msgpack.packb(
            {"i": "a-bad", "n": "echo", "a": [1], "k": {}, "t": 1, "c": client.client_id, "s": None,
             "o": bad_options},
            use_bin_type=True,
        )  # fmt: skip
        await redis_client.xadd(keys.tasks, {"d": payload})
        message = await asyncio.wait_for(future, 10)
        assert message.error is not None and message.error.kind == "SerializationError"
        assert "dead" in message.error.message
    assert await redis_client.xlen(keys.dead) == 2
    # The worker is whole: an activity with a heartbeat timeout still gets its checks.
    with pytest.raises(sessionq.ActivityTimeoutError):
        await client.execute_activity(acts.sleep_for, 5, task_queue=task_queue, heartbeat_timeout=0.3)


# --- 20. an empty Redis URL -----------------------------------------------------------------------


def test_s19_an_empty_redis_url_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="redis"):
        Client("")
    with pytest.raises(ConfigurationError, match="redis"):
        Worker("", task_queue="q", activities=acts.ALL)


def test_s19_the_session_options_refuse_a_bad_owner_timeout() -> None:
    with pytest.raises(ConfigurationError, match="owner_timeout"):
        SessionOptions(owner_timeout=0)
    assert SessionOptions(owner_timeout=None).owner_timeout is None


# --- found in review: what an activity, a caller or a worker's reading could still get wrong ---


def peak_overlap(path: Path) -> int:
    running, most = 0, 0
    for line in sorted(path.read_text().splitlines(), key=lambda text: float(text.split()[1])):
        running += 1 if line.startswith("start") else -1
        most = max(most, running)
    return most


async def test_d10_an_activity_that_raises_cancelled_error_itself_fails_and_is_answered(
    workers: Any, client: Client, task_queue: str, redis_client: redis.asyncio.Redis, keys: QueueKeys
) -> None:
    """Nobody cancelled it: its own CancelledError is an application error like any other,
    not the worker going away (which would leave its caller, or its session, hanging)."""
    await workers(max_concurrent_sessions=1)
    with pytest.raises(ActivityError) as caught:
        await asyncio.wait_for(
            client.execute_activity(acts.raise_cancelled, task_queue=task_queue, retry_policy=ONCE), 10
        )
    assert "CancelledError" in caught.value.cause.type
    session = await client.create_session(task_queue)
    with pytest.raises(ActivityError):
        await asyncio.wait_for(session.execute_activity(acts.raise_cancelled, retry_policy=ONCE), 10)
    assert await session.execute_activity(acts.whoami) == "w1"  # the session is whole
    await session.complete()
    assert int(await redis_client.hget(keys.worker("w1"), "open") or 0) == 0


async def test_d10_a_result_its_caller_cannot_decode_fails_only_that_call(
    workers: Any, client: Client, task_queue: str
) -> None:
    """A dict with tuple keys encodes but does not decode back: that call gets
    SerializationError, and the calls whose results shared its batch get theirs."""
    await workers()
    calls = [client.execute_activity(acts.echo, i, task_queue=task_queue) for i in range(5)]
    calls.insert(2, client.execute_activity(acts.tuple_keys, task_queue=task_queue))
    outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
    assert isinstance(outcomes[2], sessionq.SerializationError)
    assert [o for i, o in enumerate(outcomes) if i != 2] == [0, 1, 2, 3, 4]


async def test_d09_cancelling_the_task_that_awaits_an_activity_cancels_it_on_the_worker(
    workers: Any, client: Client, task_queue: str, tmp_path: Path
) -> None:
    await workers()
    session = await client.create_session(task_queue)
    for name, call in (
        ("plain", lambda m: client.execute_activity(acts.sleep_for, 30, m, task_queue=task_queue)),
        ("pinned", lambda m: session.execute_activity(acts.sleep_for, 30, m)),
    ):
        marker = str(tmp_path / name)
        task = asyncio.ensure_future(call(marker))
        await wait_for(Path(f"{marker}.started").exists, message=f"{name} never started")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_for(Path(f"{marker}.cancelled").exists, message=f"{name} kept running on the worker")
    await session.complete()


async def test_d09_a_def_activity_retried_after_its_timeout_never_runs_beside_its_old_attempt(
    workers: Any, client: Client, task_queue: str, tmp_path: Path
) -> None:
    """Its first attempt times out but, never looking at is_cancelled(), runs on in its
    thread: the retry waits for it, so the limit (2) holds."""
    await workers(max_concurrent_activities=2)
    spans = tmp_path / "spans"
    timed_out = client.execute_activity(
        acts.ignore_cancel_span, str(spans), 1.0, task_queue=task_queue, start_to_close_timeout=0.3,
        retry_policy=RetryPolicy(maximum_attempts=2, initial_interval=0.01),
    )  # fmt: skip
    other = client.execute_activity(acts.span, str(spans), 1.5, task_queue=task_queue)
    await asyncio.wait_for(asyncio.gather(timed_out, other, return_exceptions=True), 15)
    assert peak_overlap(spans) <= 2, "more activities ran at once than the worker's limit"


async def test_d09_a_worker_reads_no_more_plain_activities_than_it_has_free_slots(
    workers: Any, client: Client, task_queue: str, tmp_path: Path
) -> None:
    """Two queued activities, a worker with one slot and an idle one: the second activity
    must not wait behind the first on the busy worker."""
    await workers("busy", max_concurrent_activities=1)
    first = await client.start_activity(acts.sleep_for, 3.0, str(tmp_path / "first"), task_queue=task_queue)
    await wait_for((tmp_path / "first.started").exists, message="never started")
    second = await client.start_activity(acts.whoami, task_queue=task_queue)
    await asyncio.sleep(0.3)  # the busy worker's read has had its chance to take it: the set-up
    await workers("idle")
    assert await asyncio.wait_for(second.result(), 2.5) == "idle"
    assert not first.done()
    await first.result()


async def test_s19_worker_and_client_failures_are_sessionq_errors(
    redis_url: str, key_prefix: str, task_queue: str, redis_client: redis.asyncio.Redis, keys: QueueKeys
) -> None:
    with pytest.raises(ConfigurationError, match="not a valid Redis URL"):
        Client("redis://localhost:notaport/0")
    await redis_client.set(keys.tasks, "not a stream")  # a key of the wrong type where the queue goes
    worker = Worker(redis_url, task_queue=task_queue, activities=acts.ALL, prefix=key_prefix)
    with pytest.raises(sessionq.SessionqError):
        await asyncio.wait_for(worker.run(), 20)


# --- found in the second review --------------------------------------------------------------


async def test_d10_a_cancelled_error_raised_by_a_retry_still_fails_only_that_activity(
    workers: Any, client: Client, task_queue: str, redis_client: redis.asyncio.Redis, keys: QueueKeys
) -> None:
    """Attempt 1 times out (its cancellation is consumed for the retry), attempt 2 raises
    CancelledError itself: still an application error, not the worker going away."""
    await workers(max_concurrent_sessions=1)
    policy = RetryPolicy(maximum_attempts=2, initial_interval=0.01)
    with pytest.raises(ActivityError):
        await asyncio.wait_for(
            client.execute_activity(
                acts.slow_then_cancelled,
                5,
                task_queue=task_queue,
                start_to_close_timeout=0.3,
                retry_policy=policy,
            ),
            10,
        )
    session = await client.create_session(task_queue)
    with pytest.raises(ActivityError):
        await asyncio.wait_for(
            session.execute_activity(
                acts.slow_then_cancelled, 5, start_to_close_timeout=0.3, retry_policy=policy
            ),
            10,
        )
    assert await redis_client.hget(keys.session(session.session_id), "state") == b"OPEN"
    await session.complete()


async def test_s19_two_workers_of_one_process_cannot_share_an_identity(
    redis_url: str, key_prefix: str, task_queue: str, workers: Any
) -> None:
    await workers("twin")
    with pytest.raises(ConfigurationError, match="identity"):
        async with Worker(
            redis_url, task_queue=task_queue, activities=acts.ALL, identity="twin", prefix=key_prefix
        ):
            pass


async def test_d08_a_worker_whose_registration_lost_its_fields_keeps_its_session_limit(
    workers: Any, client: Client, task_queue: str, redis_client: redis.asyncio.Redis, keys: QueueKeys
) -> None:
    """The worker's hash deleted by hand (or evicted): no session may pass it for unlimited;
    the placement that finds it so makes it register again, limit and all."""
    worker = await workers(max_concurrent_sessions=2)  # heartbeats every 3.3 s: the creates come first
    first = await client.create_session(task_queue)  # one slot left: the worker is in the free set
    await redis_client.delete(keys.worker("w1"))
    outcomes = await asyncio.gather(
        *(client.create_session(task_queue, SessionOptions(creation_timeout=6)).open() for _ in range(3)),
        return_exceptions=True,
    )
    granted = [o for o in outcomes if isinstance(o, sessionq.Session)]
    assert len(worker.sessions) <= 2, f"{len(worker.sessions)} sessions held with max_concurrent_sessions=2"
    await wait_for(
        lambda: redis_client.hexists(keys.worker("w1"), "max_sessions"), message="never registered"
    )
    for session in (first, *granted):
        await session.complete()


async def test_d08_a_full_worker_whose_record_was_deleted_registers_again(
    workers: Any, client: Client, task_queue: str, redis_client: redis.asyncio.Redis, keys: QueueKeys
) -> None:
    """No placement looks at a worker with no free slot: the queue's audit finds its record
    gone and has it register again (its heartbeat alone checks no record, to stay cheap).
    The session the lost record counted fails then, with a TTL: nothing else would ever end
    it (a worker ends its own sessions; they have no deadline entry)."""
    await workers(max_concurrent_sessions=1, heartbeat_timeout=0.5)
    held = await client.create_session(task_queue, SessionOptions(execution_timeout=3600))
    await redis_client.delete(keys.worker("w1"))
    await redis_client.zadd(keys.beats, {"scan": 0})  # the audit is due now
    whole = lambda: redis_client.hexists(keys.worker("w1"), "max_sessions")  # noqa: E731
    await wait_for(whole, timeout=10, message="the worker never registered again")
    record = keys.session(held.session_id)
    state, reason = await redis_client.hmget(record, "state", "reason")
    assert (state, reason) == (b"FAILED", b"worker w1 registered anew (its record in Redis was lost)")
    assert await redis_client.pttl(record) > 0
    with pytest.raises(sessionq.SessionFailedError):
        await held.execute_activity(acts.whoami)


async def test_d08_a_worker_reaped_by_an_earlier_version_registers_again(
    workers: Any, client: Client, task_queue: str, redis_client: redis.asyncio.Redis, keys: QueueKeys
) -> None:
    """An earlier version's reap (during a rolling upgrade) removes the record, the
    membership and the heartbeat key, but not the heartbeat deadline: the worker's next
    beat must still see it was reaped, and register again."""
    await workers(max_concurrent_sessions=1, heartbeat_timeout=0.5)
    await redis_client.delete(keys.worker("w1"), keys.alive("w1"))
    await redis_client.srem(keys.workers, "w1")
    await redis_client.zrem(keys.free, "w1")
    assert await redis_client.zscore(keys.beats, "w:w1") is not None
    back = lambda: redis_client.sismember(keys.workers, "w1")  # noqa: E731
    await wait_for(back, timeout=5, message="the reaped worker never registered again")
    session = await client.create_session(task_queue, SessionOptions(creation_timeout=5))
    assert session.info.worker_id == "w1"
    await session.complete()


async def test_d11_the_last_worker_gone_leaves_no_index_and_the_next_takes_over_at_once(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, tmp_path: Path,
    redis_client: redis.asyncio.Redis, keys: QueueKeys,
) -> None:  # fmt: skip
    """The only worker stops while a plain activity runs past its grace: nobody is left to
    take it over, and nothing of the index is left without a TTL. The next worker to come
    takes it over at once (its first audit), not an audit period later."""
    marker = tmp_path / "long"
    async with Worker(
        redis_url, task_queue=task_queue, activities=acts.ALL, identity="first", heartbeat_timeout=10,
        shutdown_grace=0.2, prefix=key_prefix,
    ):  # fmt: skip
        handle = await client.start_activity(acts.attempt_after, 30, str(marker), task_queue=task_queue)
        await wait_for(Path(f"{marker}.started.1").exists, message="the activity never started")
    assert not await redis_client.exists(keys.beats), "the index outlived the queue's last worker"
    async with Worker(
        redis_url, task_queue=task_queue, activities=acts.ALL, identity="next", heartbeat_timeout=10,
        prefix=key_prefix,
    ):  # fmt: skip
        taken = Path(f"{marker}.started.2").exists
        await wait_for(taken, timeout=5, message="the next worker took nothing over")
        await handle.cancel()


async def test_d08_a_session_redis_no_longer_knows_is_dropped_by_its_worker(
    workers: Any, client: Client, task_queue: str, redis_client: redis.asyncio.Redis, keys: QueueKeys
) -> None:
    """Redis came back from a snapshot older than the session: the worker must not hold on
    to it (its slot would be counted twice once Redis grants the slot again)."""
    worker = await workers(max_concurrent_sessions=1, heartbeat_timeout=1.0)
    session = await client.create_session(task_queue, SessionOptions(owner_timeout=None))
    await redis_client.delete(keys.session(session.session_id))  # what the old snapshot lacks
    await redis_client.srem(keys.worker_sessions("w1"), session.session_id)
    await redis_client.hset(keys.worker("w1"), "open", 0)
    await wait_for(lambda: not worker.sessions.open, timeout=15, message="the worker kept the lost session")


async def test_s19_a_worker_stopped_before_it_runs_or_failing_to_start_ends_cleanly(
    redis_url: str, key_prefix: str, task_queue: str
) -> None:
    early = Worker(redis_url, task_queue=task_queue, activities=acts.ALL, identity="early", prefix=key_prefix)
    early.stop()
    await asyncio.wait_for(early.run(), 5)  # returns at once: the stop came first
    broken = Worker("redis://127.0.0.1:1/0", task_queue=task_queue, activities=acts.ALL, prefix=key_prefix)
    with pytest.raises(sessionq.SessionqError):
        await asyncio.wait_for(broken.run(), 20)
    await asyncio.wait_for(broken.wait_stopped(), 1)


async def test_d09_cancelling_an_activity_leaves_its_session_idle(
    workers: Any, client: Client, task_queue: str, tmp_path: Path
) -> None:
    await workers()
    session = await client.create_session(task_queue)
    handle = await session.start_activity(acts.sleep_for, 30, str(tmp_path / "m"))
    await handle.cancel()
    assert not session.busy, "the cancelled activity still counts as outstanding"
    await session.complete()
