"""Worker sessions, end to end on both backends: the SEMANTICS.md checklist, ids S01-S19.

Covered here: S01-S10, S13-S15, S18 and S19, plus the races where session bugs live: two
creators for the last slot, a FIFO line of waiters, many creators over several workers
at their limit. Workers run in-process (no test here kills one) except for S18, which
needs two real worker processes on one host. Worker deaths (S11, S12, S16, S17) live in
their own files.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

import sessionq
from sessionq import (
    ActivityCancelledError,
    ActivityError,
    Client,
    ConfigurationError,
    RetryPolicy,
    Session,
    SessionAlreadyOpenError,
    SessionCompletedError,
    SessionCreationTimeoutError,
    SessionFailedError,
    SessionOptions,
    SessionState,
    SyncClient,
    Worker,
)
from sessionq.keys import QueueKeys
from tests import activities as acts
from tests.helpers import SpawnWorker, commands_sent_by, wait_for, with_client_name

pytestmark = pytest.mark.cluster  # these behaviours also run on the Redis Cluster backend

PROMPT = 0.15
"""Longest a waiting creator may take to get a freed slot (typically 1-10 ms here; the
original polled with a 1-10 s backoff)."""
NO_RETRY = RetryPolicy(maximum_attempts=1)
LONG_WAIT = SessionOptions(creation_timeout=30)


# --- helpers -------------------------------------------------------------------------------


def make_worker(
    redis_url: str,
    prefix: str,
    task_queue: str,
    identity: str,
    *,
    enable_sessions: bool = True,
    max_sessions: int | None = None,
    concurrency: int = 100,
    heartbeat_timeout: float = 10.0,
) -> Worker:
    """An in-process worker; `async with` it to run it.

    No test here kills a worker, so the heartbeat timeout is roomy: on a loaded machine the
    in-process fakeredis server can starve a worker's heartbeat for a second or two, and a
    worker wrongly declared dead would fail unrelated assertions.
    """
    options: dict[str, Any] = {}
    if max_sessions is not None:
        options["max_concurrent_sessions"] = max_sessions
    return Worker(
        redis_url,
        task_queue=task_queue,
        activities=acts.ALL,
        enable_sessions=enable_sessions,
        max_concurrent_activities=concurrency,
        identity=identity,
        heartbeat_timeout=heartbeat_timeout,
        shutdown_grace=2.0,
        prefix=prefix,
        **options,
    )


@contextlib.asynccontextmanager
async def running(*workers: Worker) -> AsyncIterator[list[Worker]]:
    """Run several workers for the block."""
    async with contextlib.AsyncExitStack() as stack:
        for worker in workers:
            await stack.enter_async_context(worker)
        yield list(workers)


async def open_count(r: redis.asyncio.Redis, keys: QueueKeys, worker_id: str) -> int:
    """The worker's open-session count as Redis has it (`worker:<id>` hash, `open` field)."""
    value = await r.hget(keys.worker(worker_id), "open")
    return int(value) if value is not None else 0


async def waiting_tickets(r: redis.asyncio.Redis, keys: QueueKeys) -> list[bytes]:
    return list(await r.zrange(keys.waiters, 0, -1))


def spawn_creator(
    client: Client, task_queue: str, options: SessionOptions = LONG_WAIT
) -> asyncio.Task[Session]:
    """create_session in a task of its own, as another caller would (not inside a session)."""
    return asyncio.create_task(client.create_session(task_queue, options).open())


async def until_queued(r: redis.asyncio.Redis, keys: QueueKeys, count: int) -> None:
    """Wait until `count` creators have their ticket in the waiters list (their order is fixed)."""

    async def queued() -> bool:
        return int(await r.zcard(keys.waiters)) >= count

    await wait_for(queued, timeout=5, message=f"{count} ticket(s) in the waiters list")


async def scan_keys(r: redis.asyncio.Redis, prefix: str) -> list[bytes]:
    return [key async for key in r.scan_iter(match=f"{prefix}:*", count=1000)]


async def cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()


async def open_count_is(r: redis.asyncio.Redis, keys: QueueKeys, worker_id: str, count: int) -> bool:
    return await open_count(r, keys, worker_id) == count


async def stream_read(r: redis.asyncio.Redis, keys: QueueKeys, worker_id: str) -> bool:
    """True once the worker has read every entry of its own stream (it trims what it read)."""
    return bool(await r.xlen(keys.stream(worker_id)) <= 1)


async def worker_settled(r: redis.asyncio.Redis, keys: QueueKeys, worker_id: str, finished: int) -> bool:
    """The worker's published counters: nothing running and `finished` activities done."""
    running_now, done = await r.hmget(keys.worker(worker_id), "running", "done")
    return running_now == b"0" and done is not None and int(done) >= finished


async def state_is(r: redis.asyncio.Redis, keys: QueueKeys, session_id: str, state: bytes) -> bool:
    return bool(await r.hget(keys.session(session_id), "state") == state)


# --- S01: only session workers take sessions -------------------------------------------------


@pytest.mark.parametrize("sessions_option", ["default", "disabled"])
async def test_s01_worker_without_sessions_takes_none(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, keys: QueueKeys,
    redis_client: redis.asyncio.Redis, sessions_option: str,
) -> None:  # fmt: skip
    """A worker with enable_sessions off (the default) runs plain activities but takes no
    session: create_session raises SessionCreationTimeoutError once creation_timeout passed."""
    worker = (
        Worker(redis_url, task_queue=task_queue, activities=acts.ALL, identity="plain", prefix=key_prefix)
        if sessions_option == "default"
        else make_worker(redis_url, key_prefix, task_queue, "plain", enable_sessions=False)
    )
    async with worker:
        assert await client.execute_activity(acts.whoami, task_queue=task_queue) == "plain"
        start = time.monotonic()
        with pytest.raises(SessionCreationTimeoutError):
            await client.create_session(task_queue, SessionOptions(creation_timeout=0.5))
        took = time.monotonic() - start
        assert 0.45 <= took < 0.5 + 2.0, took
        assert await open_count(redis_client, keys, "plain") == 0
        assert await waiting_tickets(redis_client, keys) == []


async def test_s01_session_worker_takes_sessions(
    redis_url: str, key_prefix: str, task_queue: str, client: Client
) -> None:
    """Beside a plain worker, the session worker is the one that gets every session."""
    plain = make_worker(redis_url, key_prefix, task_queue, "plain", enable_sessions=False)
    holder = make_worker(redis_url, key_prefix, task_queue, "holder")
    async with running(plain, holder):
        for _ in range(5):
            async with client.create_session(task_queue, SessionOptions(creation_timeout=2)) as session:
                assert session.info.worker_id == "holder"
                assert await session.execute_activity(acts.whoami) == "holder"


# --- S02: max_concurrent_sessions per worker -------------------------------------------------


async def test_s02_limit_caps_open_sessions_of_a_worker(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    """A worker with max_concurrent_sessions=2 holds two sessions; a third creator waits
    and times out."""
    async with make_worker(redis_url, key_prefix, task_queue, "w1", max_sessions=2) as worker:
        first = await client.create_session(task_queue, SessionOptions(creation_timeout=2))
        second = await client.create_session(task_queue, SessionOptions(creation_timeout=2))
        assert {first.info.worker_id, second.info.worker_id} == {"w1"}
        with pytest.raises(SessionCreationTimeoutError):
            await client.create_session(task_queue, SessionOptions(creation_timeout=0.4))
        assert await open_count(redis_client, keys, "w1") == 2
        await wait_for(lambda: worker.open_sessions == 2, timeout=2, message="worker holds 2 sessions")
        await first.complete()
        await second.complete()
        assert await open_count(redis_client, keys, "w1") == 0


async def test_s02_default_limit_is_unlimited(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    """Without max_concurrent_sessions one worker takes many sessions at once."""
    async with make_worker(redis_url, key_prefix, task_queue, "w1"):
        sessions = await asyncio.gather(
            *(client.create_session(task_queue, SessionOptions(creation_timeout=5)).open() for _ in range(60))
        )
        assert {s.info.worker_id for s in sessions} == {"w1"}
        assert await open_count(redis_client, keys, "w1") == 60
        await asyncio.gather(*(s.complete() for s in sessions))
        assert await open_count(redis_client, keys, "w1") == 0


async def test_s02_concurrent_creators_never_exceed_the_limit(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    """36 creators at once over 3 workers with max_concurrent_sessions=2: all get a session
    in turn, and no worker ever holds more than 2 (as Redis counts them, as the workers
    count them, and as the set of sessions held at one moment shows)."""
    limit, creators = 2, 36
    workers = [make_worker(redis_url, key_prefix, task_queue, f"w{i}", max_sessions=limit) for i in (1, 2, 3)]
    held: dict[str, set[str]] = {w.worker_id: set() for w in workers}
    peaks: Counter[str] = Counter()
    redis_peak: Counter[str] = Counter()
    worker_peak: Counter[str] = Counter()

    async def one_caller(n: int) -> str:
        caller = Client(redis_url, prefix=key_prefix) if n % 3 == 0 else client  # several inboxes too
        try:
            session = await caller.create_session(task_queue, SessionOptions(creation_timeout=20))
            w = session.info.worker_id
            held[w].add(session.session_id)
            peaks[w] = max(peaks[w], len(held[w]))
            redis_peak[w] = max(redis_peak[w], await open_count(redis_client, keys, w))
            assert await session.execute_activity(acts.sleep_for, 0.02) == w
            held[w].discard(session.session_id)
            await session.complete()
            return w
        finally:
            if caller is not client:
                await caller.close()

    async def sample(stop: asyncio.Event) -> None:
        while not stop.is_set():  # stopped, not cancelled: never abandon a Redis call halfway
            for worker in workers:
                w = worker.worker_id
                redis_peak[w] = max(redis_peak[w], await open_count(redis_client, keys, w))
                worker_peak[w] = max(worker_peak[w], worker.open_sessions)
            await asyncio.sleep(0.005)

    async with running(*workers):
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample(stop))
        try:
            used = await asyncio.gather(*(one_caller(n) for n in range(creators)))
        finally:
            stop.set()
            await sampler
        assert len(used) == creators
        assert set(used) == set(held), Counter(used)
        assert max(peaks.values()) <= limit, peaks
        assert max(redis_peak.values()) <= limit, redis_peak
        assert max(worker_peak.values()) <= limit, worker_peak
        assert max(peaks.values()) == limit, "the test never filled a worker: it proves nothing"
        for worker in workers:
            assert await open_count(redis_client, keys, worker.worker_id) == 0


# --- S03 / S04 / S07: waiting for a slot -------------------------------------------------------


async def test_s03_waiting_creator_gets_the_slot_when_a_session_ends(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    """A creator facing a full worker waits (its ticket queued in Redis) and gets the slot
    within moments of complete(), on that same worker."""
    async with make_worker(redis_url, key_prefix, task_queue, "w1", max_sessions=1):
        holder = await client.create_session(task_queue)
        waiter = spawn_creator(client, task_queue)
        await until_queued(redis_client, keys, 1)
        assert not waiter.done()
        start = time.monotonic()
        await holder.complete()
        session = await asyncio.wait_for(waiter, 5)
        assert time.monotonic() - start < PROMPT
        assert session.info.worker_id == "w1"
        assert await session.execute_activity(acts.whoami) == "w1"
        assert await waiting_tickets(redis_client, keys) == []
        assert await open_count(redis_client, keys, "w1") == 1
        await session.complete()


async def test_s03_waiting_creator_does_not_poll_redis(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    """While it waits, a creator sends Redis next to nothing (one claim, a blocking read, and
    its client's lease renewed once a second): it is woken by the grant, not by polling."""
    name = f"{key_prefix}-waiter"
    async with make_worker(redis_url, key_prefix, task_queue, "w1", max_sessions=1):
        holder = await client.create_session(task_queue)
        waiter_client = Client(with_client_name(redis_url, name), prefix=key_prefix)
        try:
            with commands_sent_by(name) as sent:
                waiter = spawn_creator(waiter_client, task_queue)
                await until_queued(redis_client, keys, 1)
                before = len(sent)
                assert "EVALSHA" in sent, f"the counter missed the claim: it would prove nothing ({sent})"
                await holder.execute_activity(acts.sleep_for, 1.0)  # one second passes while it waits
                during = sent[before:]
                assert not waiter.done()
                polls = [c for c in during if c not in ("CLIENT", "HELLO", "AUTH", "SELECT")]
                assert len(polls) <= 4, f"the waiting creator sent {during} in 1 s"
                start = time.monotonic()
                await holder.complete()
                session = await asyncio.wait_for(waiter, 5)
                assert time.monotonic() - start < PROMPT
                await session.complete()
        finally:
            await waiter_client.close()


async def test_s03_a_session_worker_that_starts_serves_the_waiting_creator(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    """A creator waiting on a queue with no session worker gets its session as soon as one
    starts, without waiting for its creation_timeout."""
    waiter = spawn_creator(client, task_queue)
    await until_queued(redis_client, keys, 1)
    async with make_worker(redis_url, key_prefix, task_queue, "late"):
        session = await asyncio.wait_for(waiter, 5)
        assert session.info.worker_id == "late"
        assert await session.execute_activity(acts.whoami) == "late"
        await session.complete()


async def test_s03_two_creators_race_for_the_last_slot(
    redis_url: str, key_prefix: str, task_queue: str, keys: QueueKeys, redis_client: redis.asyncio.Redis
) -> None:
    """Two callers create at the same instant with one free slot: exactly one wins, the
    other waits (never a second session on the full worker) and gets the slot once the
    winner completes. Repeated, as races need."""
    callers = [Client(redis_url, prefix=key_prefix) for _ in range(2)]
    try:
        async with make_worker(redis_url, key_prefix, task_queue, "w1", max_sessions=1):
            for _ in range(5):
                tasks = [spawn_creator(c, task_queue) for c in callers]
                done, pending = await asyncio.wait(tasks, timeout=5, return_when=asyncio.FIRST_COMPLETED)
                assert len(done) == 1 and len(pending) == 1, "not exactly one winner"
                (winner_task,), (loser_task,) = tuple(done), tuple(pending)
                await until_queued(redis_client, keys, 1)
                assert not loser_task.done()
                assert await open_count(redis_client, keys, "w1") == 1
                winner = winner_task.result()
                await winner.complete()
                loser = await asyncio.wait_for(loser_task, 5)
                assert loser.info.worker_id == "w1" and loser.session_id != winner.session_id
                assert await open_count(redis_client, keys, "w1") == 1
                await loser.complete()
                assert await open_count(redis_client, keys, "w1") == 0
    finally:
        for c in callers:
            await c.close()


async def test_s03_two_creators_race_for_the_last_slot_loser_times_out(
    redis_url: str, key_prefix: str, task_queue: str, keys: QueueKeys, redis_client: redis.asyncio.Redis
) -> None:
    """Two callers race for one slot with a short creation_timeout: one session, one
    SessionCreationTimeoutError, and the worker counts one open session."""
    callers = [Client(redis_url, prefix=key_prefix) for _ in range(2)]
    try:
        async with make_worker(redis_url, key_prefix, task_queue, "w1", max_sessions=1):
            outcomes = await asyncio.gather(
                *(c.create_session(task_queue, SessionOptions(creation_timeout=0.5)).open() for c in callers),
                return_exceptions=True,
            )
            sessions = [o for o in outcomes if isinstance(o, Session)]
            errors = [o for o in outcomes if not isinstance(o, Session)]
            assert len(sessions) == 1, outcomes
            assert len(errors) == 1 and isinstance(errors[0], SessionCreationTimeoutError), outcomes
            assert await open_count(redis_client, keys, "w1") == 1
            assert await waiting_tickets(redis_client, keys) == []
            await sessions[0].complete()
            assert await open_count(redis_client, keys, "w1") == 0
    finally:
        for c in callers:
            await c.close()


async def test_s03_freed_slots_go_to_waiters_first_come_first_served(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    """Ten creators queue for a full worker. Each complete() wakes exactly the next one in
    the order they came, promptly; the others keep waiting."""
    async with make_worker(redis_url, key_prefix, task_queue, "w1", max_sessions=1):
        holder = await client.create_session(task_queue)
        waiters: list[asyncio.Task[Session]] = []
        for n in range(10):
            waiters.append(spawn_creator(client, task_queue))
            await until_queued(redis_client, keys, n + 1)
        for n, waiter in enumerate(waiters):
            assert not any(w.done() for w in waiters[n:])
            start = time.monotonic()
            await holder.complete()
            holder = await asyncio.wait_for(waiter, 5)
            assert time.monotonic() - start < PROMPT, f"waiter {n} took {time.monotonic() - start:.3f}s"
            assert not any(w.done() for w in waiters[n + 1 :]), f"waiter {n} was not the only one woken"
            assert len(await waiting_tickets(redis_client, keys)) == 9 - n
            assert await open_count(redis_client, keys, "w1") == 1
        await holder.complete()
        assert await open_count(redis_client, keys, "w1") == 0


async def test_s04_creation_times_out_when_no_slot_frees(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    """A full worker that frees nothing within creation_timeout: the creator gets
    SessionCreationTimeoutError after the timeout, leaves the line, and a slot freed later
    is not given to it."""
    async with make_worker(redis_url, key_prefix, task_queue, "w1", max_sessions=1):
        holder = await client.create_session(task_queue)
        start = time.monotonic()
        with pytest.raises(SessionCreationTimeoutError):
            await client.create_session(task_queue, SessionOptions(creation_timeout=timedelta(seconds=0.5)))
        took = time.monotonic() - start
        assert 0.45 <= took < 2.5, took
        assert await waiting_tickets(redis_client, keys) == []
        await holder.complete()
        assert await open_count(redis_client, keys, "w1") == 0
        assert await redis_client.scard(keys.worker_sessions("w1")) == 0


async def test_s04_cancelled_creator_leaves_the_line_without_taking_a_slot(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    """A waiting create_session that its caller cancels gives up its ticket: the next freed
    slot goes to the creator behind it."""
    async with make_worker(redis_url, key_prefix, task_queue, "w1", max_sessions=1):
        holder = await client.create_session(task_queue)
        quitter = spawn_creator(client, task_queue)
        await until_queued(redis_client, keys, 1)
        patient = spawn_creator(client, task_queue)
        await until_queued(redis_client, keys, 2)
        quitter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await quitter
        assert len(await waiting_tickets(redis_client, keys)) == 1
        await holder.complete()
        session = await asyncio.wait_for(patient, 5)
        assert await open_count(redis_client, keys, "w1") == 1
        await session.complete()
        assert await open_count(redis_client, keys, "w1") == 0


async def test_s04_creator_cancelled_as_the_slot_frees_leaks_no_slot(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    """A creator cancelled at the very moment its slot is granted does not keep the slot:
    the worker ends up with no open session, and the next creator gets it at once."""
    async with make_worker(redis_url, key_prefix, task_queue, "w1", max_sessions=1):
        for _ in range(5):
            holder = await client.create_session(task_queue)
            quitter = spawn_creator(client, task_queue)
            await until_queued(redis_client, keys, 1)
            await asyncio.gather(holder.complete(), cancel(quitter), return_exceptions=True)
            await asyncio.gather(quitter, return_exceptions=True)
            await wait_for(
                lambda: open_count_is(redis_client, keys, "w1", 0), timeout=2, message="no slot leaked"
            )
            assert await waiting_tickets(redis_client, keys) == []
            again = await client.create_session(task_queue, SessionOptions(creation_timeout=0.5))
            await again.complete()


@pytest.mark.parametrize("worker_full", [False, True], ids=["slot-free", "worker-full"])
async def test_s04_creator_cancelled_while_its_claim_runs_leaks_nothing(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, keys: QueueKeys,
    redis_client: redis.asyncio.Redis, worker_full: bool,
) -> None:  # fmt: skip
    """A creator cancelled after Redis ran its claim but before the answer reached it (e.g.
    under asyncio.wait_for) gives back what the claim took: the slot it got, or its place in
    the line, so the next creator is served."""
    caller = Client(redis_url, prefix=key_prefix)
    claimed, release = asyncio.Event(), asyncio.Event()
    run_script = caller.scripts.run

    async def answer_late(name: str, *args: Any, **kwargs: Any) -> Any:
        result = await run_script(name, *args, **kwargs)
        if name == "create_session":
            claimed.set()
            await release.wait()  # the caller is cancelled here, with the claim made in Redis
        return result

    caller.scripts.run = answer_late  # type: ignore[method-assign]
    try:
        async with make_worker(redis_url, key_prefix, task_queue, "w1", max_sessions=1):
            holder = await client.create_session(task_queue) if worker_full else None
            quitter = spawn_creator(caller, task_queue)
            await wait_for(claimed.is_set, timeout=5, message="the claim ran in Redis")
            quitter.cancel()
            release.set()
            with pytest.raises(asyncio.CancelledError):
                await quitter
            assert await waiting_tickets(redis_client, keys) == []
            if holder is not None:
                await holder.complete()
            assert await open_count(redis_client, keys, "w1") == 0
            again = await client.create_session(task_queue, SessionOptions(creation_timeout=0.5))
            await again.complete()
    finally:
        await caller.close()


async def test_s07_complete_releases_the_slot_at_once(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    """Once complete() returns, Redis counts the slot free and a new session opens on the
    worker without waiting."""
    async with make_worker(redis_url, key_prefix, task_queue, "w1", max_sessions=1):
        for _ in range(5):
            async with client.create_session(task_queue) as session:
                assert await session.execute_activity(acts.whoami) == "w1"
                assert await open_count(redis_client, keys, "w1") == 1
            assert await open_count(redis_client, keys, "w1") == 0
        session = await client.create_session(task_queue, SessionOptions(creation_timeout=0.1))
        await session.complete()
        assert await open_count(redis_client, keys, "w1") == 0
        again = await client.create_session(task_queue, SessionOptions(creation_timeout=0.1))
        assert again.info.worker_id == "w1"
        await again.complete()


async def test_s07_complete_hands_the_slot_over_while_an_activity_still_runs(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, keys: QueueKeys,
    redis_client: redis.asyncio.Redis, tmp_path: Path,
) -> None:  # fmt: skip
    """complete() on a busy session does not wait for its activity to wind down: the
    waiting creator gets the slot at once."""
    marker = str(tmp_path / "slow")
    async with make_worker(redis_url, key_prefix, task_queue, "w1", max_sessions=1):
        holder = await client.create_session(task_queue)
        busy = await holder.start_activity(acts.sleep_sync, 30, marker)
        await wait_for(lambda: Path(marker + ".started").exists(), timeout=5, message="activity started")
        waiter = spawn_creator(client, task_queue)
        await until_queued(redis_client, keys, 1)
        start = time.monotonic()
        await holder.complete()
        session = await asyncio.wait_for(waiter, 5)
        assert time.monotonic() - start < PROMPT
        assert session.info.worker_id == "w1"
        with pytest.raises(ActivityCancelledError):
            await busy.result()
        assert await session.execute_activity(acts.whoami) == "w1"
        await session.complete()


async def test_s07_sync_client_with_block_runs_and_completes_the_session(
    redis_url: str, key_prefix: str, task_queue: str, keys: QueueKeys, redis_client: redis.asyncio.Redis
) -> None:
    """`with sync_client.create_session(...) as s:` pins activities to one worker and
    completes the session (slot released) when the block ends."""

    def blocking_caller() -> tuple[str, list[str], Any, SessionState]:
        with SyncClient(redis_url, prefix=key_prefix) as sync_client:
            with sync_client.create_session(task_queue, SessionOptions(creation_timeout=5)) as s:
                ran_on = [s.execute_activity(acts.whoami_sync) for _ in range(3)]
                inside = sessionq.get_session_info()
            return s.info.worker_id, ran_on, inside is s.info, s.info.state

    async with make_worker(redis_url, key_prefix, task_queue, "w1", max_sessions=1):
        worker_id, ran_on, info_inside, state = await asyncio.to_thread(blocking_caller)
        assert worker_id == "w1" and ran_on == ["w1"] * 3
        assert info_inside is True
        assert state is SessionState.COMPLETED
        assert await open_count(redis_client, keys, "w1") == 0


# --- S05 / S06: where activities run -----------------------------------------------------------


async def test_s05_every_session_activity_runs_on_the_session_worker(
    redis_url: str, key_prefix: str, task_queue: str, client: Client
) -> None:
    """Over several workers and sessions, each of many activities (async and sync) runs on
    the worker the session was created with."""
    workers = [make_worker(redis_url, key_prefix, task_queue, f"w{i}") for i in (1, 2, 3)]

    async def one_session() -> tuple[str, list[str]]:
        async with client.create_session(task_queue, SessionOptions(creation_timeout=5)) as session:
            ran_on = await asyncio.gather(
                *(session.execute_activity(acts.whoami if i % 2 else acts.whoami_sync) for i in range(20))
            )
            return session.info.worker_id, list(ran_on)

    async with running(*workers):
        results = await asyncio.gather(*(asyncio.create_task(one_session()) for _ in range(6)))
    for worker_id, ran_on in results:
        assert set(ran_on) == {worker_id}
    assert {worker_id for worker_id, _ in results} == {"w1", "w2", "w3"}


async def test_s05_local_files_stay_reachable_within_the_session(
    redis_url: str, key_prefix: str, task_queue: str, client: Client
) -> None:
    """The seed's use case: a file written by one activity is read by the next one of the
    session, because both run on the same worker."""
    workers = [make_worker(redis_url, key_prefix, task_queue, f"w{i}") for i in (1, 2, 3)]
    async with running(*workers):
        for n in range(6):
            name = f"{uuid.uuid4().hex}.txt"  # never left over from another run, on any worker
            async with client.create_session(task_queue) as session:
                await session.execute_activity(acts.write_local, name, f"data {n}")
                assert await session.execute_activity(acts.read_local, name) == f"data {n}"


async def test_s05_session_is_created_on_a_worker_of_the_given_task_queue(
    redis_url: str, key_prefix: str, task_queue: str, client: Client
) -> None:
    """A session worker of another task queue never gets the session."""
    other_queue = task_queue + "x"
    ours = make_worker(redis_url, key_prefix, task_queue, "ours")
    theirs = make_worker(redis_url, key_prefix, other_queue, "theirs")
    async with running(theirs, ours):
        for _ in range(4):
            async with client.create_session(task_queue) as session:
                assert session.info.worker_id == "ours"
                assert await session.execute_activity(acts.whoami) == "ours"
            async with client.create_session(other_queue) as session:
                assert session.info.worker_id == "theirs"


async def test_s05_sessions_spread_over_idle_workers_least_loaded_first(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    """New sessions go to the worker with the fewest open sessions: three idle workers get
    one each, then two each; a worker whose sessions end is chosen next."""
    workers = [make_worker(redis_url, key_prefix, task_queue, f"w{i}", max_sessions=5) for i in (1, 2, 3)]
    async with running(*workers):
        first = [await client.create_session(task_queue) for _ in range(3)]
        assert sorted(s.info.worker_id for s in first) == ["w1", "w2", "w3"]
        second = [await client.create_session(task_queue) for _ in range(3)]
        assert sorted(s.info.worker_id for s in second) == ["w1", "w2", "w3"]
        assert [await open_count(redis_client, keys, w) for w in ("w1", "w2", "w3")] == [2, 2, 2]
        emptied = first[0].info.worker_id
        for s in first + second:
            if s.info.worker_id == emptied:
                await s.complete()
        nxt = await client.create_session(task_queue)
        assert nxt.info.worker_id == emptied
        for s in [*first, *second, nxt]:
            await s.complete()


async def test_s06_plain_activities_still_spread_over_all_workers(
    redis_url: str, key_prefix: str, task_queue: str, client: Client
) -> None:
    """While a session holds one worker, plain activities keep being shared by all workers
    of the queue, the session's worker included."""
    workers = [make_worker(redis_url, key_prefix, task_queue, f"w{i}", concurrency=2) for i in (1, 2, 3)]
    async with running(*workers), client.create_session(task_queue) as session:
        ran_on = await asyncio.gather(
            *(client.execute_activity(acts.sleep_for, 0.05, task_queue=task_queue) for _ in range(30))
        )
        counts = Counter(ran_on)
        assert set(counts) == {"w1", "w2", "w3"}, counts
        assert min(counts.values()) >= 3, counts
        assert counts[session.info.worker_id] >= 3, counts
        assert await session.execute_activity(acts.whoami) == session.info.worker_id


# --- S08 / S09 / S10: ending a session ---------------------------------------------------------


async def test_s08_complete_cancels_a_running_async_activity(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, tmp_path: Path
) -> None:
    """complete() cancels the session's running async activity: it gets CancelledError on
    the worker, and its caller gets ActivityCancelledError at once."""
    marker = str(tmp_path / "slow")
    async with make_worker(redis_url, key_prefix, task_queue, "w1"):
        session = await client.create_session(task_queue)
        handle = await session.start_activity(acts.sleep_for, 30, marker)
        await wait_for(lambda: Path(marker + ".started").exists(), timeout=5, message="activity started")
        await session.complete()
        with pytest.raises(ActivityCancelledError):
            await asyncio.wait_for(handle.result(), 2)
        await wait_for(
            lambda: Path(marker + ".cancelled").exists(), timeout=2, message="the activity saw CancelledError"
        )
        assert Path(marker + ".cancelled").read_text() == "w1"


async def test_s08_complete_cancels_a_running_sync_activity(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, tmp_path: Path
) -> None:
    """A plain-def activity of the session sees is_cancelled() turn true after complete()."""
    marker = str(tmp_path / "slow")
    async with make_worker(redis_url, key_prefix, task_queue, "w1"):
        session = await client.create_session(task_queue)
        handle = await session.start_activity(acts.sleep_sync, 30, marker)
        await wait_for(lambda: Path(marker + ".started").exists(), timeout=5, message="activity started")
        await session.complete()
        with pytest.raises(ActivityCancelledError):
            await asyncio.wait_for(handle.result(), 2)
        await wait_for(
            lambda: Path(marker + ".cancelled").exists(), timeout=2, message="the activity saw is_cancelled()"
        )


async def test_s08_activities_queued_for_a_completed_session_never_start(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, keys: QueueKeys,
    redis_client: redis.asyncio.Redis, tmp_path: Path,
) -> None:  # fmt: skip
    """With one activity slot busy, the session's other activities wait on the worker.
    complete() cancels the running one and the waiting ones never start; every caller
    gets ActivityCancelledError."""
    running_marker = str(tmp_path / "running")
    queued_markers = [str(tmp_path / f"queued{i}") for i in range(3)]
    ran_file = tmp_path / "ran.txt"
    # Its maintenance pass (every heartbeat_timeout / 3) trims what it read and publishes counters.
    worker = make_worker(redis_url, key_prefix, task_queue, "w1", concurrency=1, heartbeat_timeout=3.0)
    async with worker:
        session = await client.create_session(task_queue)
        first = await session.start_activity(acts.sleep_for, 30, running_marker)
        await wait_for(lambda: Path(running_marker + ".started").exists(), timeout=5, message="first started")
        queued = [await session.start_activity(acts.sleep_for, 30, m) for m in queued_markers]
        queued.append(await session.start_activity(acts.mark, str(ran_file)))
        await wait_for(
            lambda: stream_read(redis_client, keys, "w1"),
            timeout=5,
            message="the worker read the queued activities",
        )
        await session.complete()
        for handle in [first, *queued]:
            with pytest.raises(ActivityCancelledError):
                await asyncio.wait_for(handle.result(), 2)
        await wait_for(
            lambda: worker_settled(redis_client, keys, "w1", finished=5),
            timeout=5,
            message="the worker dealt with all five activities",
        )
    assert Path(running_marker + ".cancelled").exists()
    assert not any(Path(m + ".started").exists() for m in queued_markers)
    assert not ran_file.exists()


async def test_s09_complete_is_idempotent(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    """Completing a session again changes nothing: the other session's slot stays counted."""
    async with make_worker(redis_url, key_prefix, task_queue, "w1"):
        kept = await client.create_session(task_queue)
        session = await client.create_session(task_queue)
        assert await open_count(redis_client, keys, "w1") == 2
        for _ in range(3):
            await session.complete()
        async with session:  # leaving the block completes it once more
            pass
        assert session.info.state is SessionState.COMPLETED
        assert await redis_client.hget(keys.session(session.session_id), "state") == b"COMPLETED"
        assert await open_count(redis_client, keys, "w1") == 1
        assert await kept.execute_activity(acts.whoami) == "w1"
        await kept.complete()
        assert await open_count(redis_client, keys, "w1") == 0


async def test_s09_complete_is_safe_on_a_failed_session(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    """A session that failed (its execution timeout passed) can still be completed in
    `finally`: no error, it stays FAILED, and no other slot is given back by mistake."""
    async with make_worker(redis_url, key_prefix, task_queue, "w1"):
        kept = await client.create_session(task_queue)
        session = await client.create_session(task_queue, SessionOptions(execution_timeout=0.3))
        await wait_for(
            lambda: state_is(redis_client, keys, session.session_id, b"FAILED"),
            timeout=5,
            message="session failed after its execution timeout",
        )
        try:
            with pytest.raises(SessionFailedError):
                await session.execute_activity(acts.whoami)
        finally:
            await session.complete()
            await session.complete()
        assert session.info.state is SessionState.FAILED
        assert await state_is(redis_client, keys, session.session_id, b"FAILED")
        assert await open_count(redis_client, keys, "w1") == 1
        await kept.complete()


async def test_s10_execute_after_complete_raises_session_completed(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, tmp_path: Path
) -> None:
    """After complete() (or the end of `async with`) the session refuses new activities
    with SessionCompletedError, and nothing reaches the worker."""
    ran_file = tmp_path / "ran.txt"
    async with make_worker(redis_url, key_prefix, task_queue, "w1"):
        explicit = await client.create_session(task_queue)
        await explicit.complete()
        async with client.create_session(task_queue) as by_block:
            assert await by_block.execute_activity(acts.whoami) == "w1"
        for session in (explicit, by_block):
            with pytest.raises(SessionCompletedError):
                await session.execute_activity(acts.mark, str(ran_file))
            with pytest.raises(SessionCompletedError):
                await session.start_activity(acts.mark, str(ran_file))
        async with client.create_session(task_queue) as probe:  # the worker is fine and caught up
            assert await probe.execute_activity(acts.whoami) == "w1"
    assert not ran_file.exists()


# --- S13 / S14: errors that leave sessions alone ----------------------------------------------


async def test_s13_failing_activity_leaves_the_session_open(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    """An activity that raises gives its caller ActivityError (with the remote type and
    message); the session stays OPEN and keeps running activities on the same worker."""
    workers = [make_worker(redis_url, key_prefix, task_queue, f"w{i}") for i in (1, 2, 3)]
    async with running(*workers), client.create_session(task_queue) as session:
        for n in range(3):
            with pytest.raises(ActivityError) as caught:
                await session.execute_activity(acts.fail, f"boom {n}", retry_policy=NO_RETRY)
            assert caught.value.cause.type == "ValueError"
            assert caught.value.cause.message == f"boom {n}"
            assert session.info.state is SessionState.OPEN
            assert await state_is(redis_client, keys, session.session_id, b"OPEN")
            assert await session.execute_activity(acts.whoami) == session.info.worker_id
        assert await open_count(redis_client, keys, session.info.worker_id) == 1


async def test_s14_create_session_inside_an_open_session_raises(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    """Inside `async with session`, create_session raises SessionAlreadyOpenError (awaited,
    as a context manager, or from a task started there) without taking a slot; after the
    block a new session opens."""
    async with make_worker(redis_url, key_prefix, task_queue, "w1"):
        async with client.create_session(task_queue) as outer:
            with pytest.raises(SessionAlreadyOpenError):
                await client.create_session(task_queue, SessionOptions(creation_timeout=1))
            with pytest.raises(SessionAlreadyOpenError):
                async with client.create_session(task_queue, SessionOptions(creation_timeout=1)):
                    pytest.fail("a nested session was opened")
            with pytest.raises(SessionAlreadyOpenError):
                await asyncio.create_task(client.create_session(task_queue).open())
            assert await open_count(redis_client, keys, "w1") == 1
            assert outer.info.state is SessionState.OPEN
            assert await outer.execute_activity(acts.whoami) == "w1"
        async with client.create_session(task_queue) as after:
            assert after.info.state is SessionState.OPEN


# --- S15: what a session says about itself ---------------------------------------------------


async def test_s15_info_names_the_session_its_worker_and_its_state(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    """session.info gives the session id, the worker's host name and id, and the state
    (OPEN, then COMPLETED); the worker's activities see the same session id."""
    async with make_worker(redis_url, key_prefix, task_queue, "w1"):
        session = await client.create_session(task_queue)
        info = session.info
        assert isinstance(info.session_id, str) and info.session_id
        assert info.hostname == socket.gethostname()
        assert info.worker_id == "w1"
        assert info.state is SessionState.OPEN
        assert isinstance(info.recreate_token, bytes) and info.recreate_token
        assert await redis_client.hget(keys.session(info.session_id), "worker") == b"w1"
        described = await session.execute_activity(acts.describe)
        assert described["session_id"] == info.session_id
        assert described["worker_id"] == info.worker_id
        await session.complete()
        assert info.state is SessionState.COMPLETED


async def test_s15_activity_started_while_counts_are_published_is_counted(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, keys: QueueKeys,
    redis_client: redis.asyncio.Redis, tmp_path: Path,
) -> None:  # fmt: skip
    """The per-session activity count inspect shows is not lost when an activity starts
    while the worker publishes counts: the next pass publishes it."""
    publishing, go_on = asyncio.Event(), asyncio.Event()
    async with (
        make_worker(redis_url, key_prefix, task_queue, "w1", heartbeat_timeout=1.0) as worker,
        client.create_session(task_queue) as session,
    ):
        publish = worker.scripts.publish_counts

        async def held_publish(k: QueueKeys, counts: dict[str, int], field: str = "activities") -> None:
            await publish(k, counts, field)
            if not go_on.is_set():  # hold the first publish open until an activity started
                publishing.set()
                await go_on.wait()

        # Held before the first activity runs: the pass that publishes its count is the one held.
        worker.scripts.publish_counts = held_publish  # type: ignore[method-assign]
        assert await session.execute_activity(acts.whoami) == "w1"
        await asyncio.wait_for(publishing.wait(), 10)
        marker = str(tmp_path / "m")
        long = await session.start_activity(acts.sleep_for, 30, marker)
        await wait_for(lambda: Path(marker + ".started").exists(), message="activity never started")
        go_on.set()

        async def counted() -> bool:
            return await redis_client.hget(keys.session(session.session_id), "activities") == b"2"

        await wait_for(counted, timeout=10, message="the second activity was never counted")
        await long.cancel()


async def test_s15_session_ids_are_unique(
    redis_url: str, key_prefix: str, task_queue: str, client: Client
) -> None:
    """Many sessions, opened at once and one after another, never share an id."""
    async with make_worker(redis_url, key_prefix, task_queue, "w1"):
        ids: list[str] = []
        for _ in range(3):
            batch = await asyncio.gather(*(client.create_session(task_queue).open() for _ in range(50)))
            ids += [s.session_id for s in batch]
            await asyncio.gather(*(s.complete() for s in batch))
    assert len(ids) == 150 and len(set(ids)) == 150


async def test_s15_get_session_info_inside_the_session_and_none_elsewhere(
    redis_url: str, key_prefix: str, task_queue: str, client: Client
) -> None:
    """get_session_info() is the session inside `async with` and inside its activities on
    the worker; None before, after, and in plain activities."""
    async with make_worker(redis_url, key_prefix, task_queue, "w1"):
        assert sessionq.get_session_info() is None
        assert await client.execute_activity(acts.session_id, task_queue=task_queue) is None
        async with client.create_session(task_queue) as session:
            assert sessionq.get_session_info() is session.info
            assert await session.execute_activity(acts.session_id) == session.session_id
            assert (await session.execute_activity(acts.describe))["session_id"] == session.session_id
        assert sessionq.get_session_info() is None
        assert await client.execute_activity(acts.session_id, task_queue=task_queue) is None
        awaited = await client.create_session(task_queue)
        assert await awaited.execute_activity(acts.session_id) == awaited.session_id
        await awaited.complete()
        assert sessionq.get_session_info() is None


# --- S18: the limit is per worker process ------------------------------------------------------


async def test_s18_two_worker_processes_each_take_their_own_limit(
    spawn_worker: SpawnWorker, redis_url: str, key_prefix: str, task_queue: str, client: Client,
    keys: QueueKeys, redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    """Two worker processes on one host, limits 1 and 2: together they hold 3 sessions
    (1 + 2, by worker), and a fourth creator times out."""
    one, two = await asyncio.gather(
        spawn_worker(identity="p1", max_sessions=1, heartbeat_timeout=10),
        spawn_worker(identity="p2", max_sessions=2, heartbeat_timeout=10),
    )
    assert one.pid != two.pid
    sessions = await asyncio.gather(
        *(client.create_session(task_queue, SessionOptions(creation_timeout=5)).open() for _ in range(3))
    )
    assert Counter(s.info.worker_id for s in sessions) == {one.worker_id: 1, two.worker_id: 2}
    assert {s.info.hostname for s in sessions} == {socket.gethostname()}
    for s in sessions:
        assert await s.execute_activity(acts.whoami) == s.info.worker_id
    with pytest.raises(SessionCreationTimeoutError):
        await client.create_session(task_queue, SessionOptions(creation_timeout=0.5))
    assert await open_count(redis_client, keys, one.worker_id) == 1
    assert await open_count(redis_client, keys, two.worker_id) == 2
    for s in sessions:
        await s.complete()


# --- S19: invalid options ----------------------------------------------------------------------


BAD_SESSION_OPTIONS = [
    ("creation_timeout", 0),
    ("creation_timeout", -1),
    ("creation_timeout", timedelta(0)),
    ("creation_timeout", "60"),
    ("creation_timeout", float("nan")),
    ("execution_timeout", 0),
    ("execution_timeout", -0.5),
    ("execution_timeout", timedelta(seconds=-1)),
    ("execution_timeout", [10]),
    ("execution_timeout", True),
]


@pytest.mark.parametrize(("field", "value"), BAD_SESSION_OPTIONS, ids=lambda v: repr(v))
async def test_s19_invalid_session_options_raise_configuration_error(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, redis_client: redis.asyncio.Redis,
    field: str, value: Any,
) -> None:  # fmt: skip
    """Non-positive or non-duration timeouts raise ConfigurationError naming the field;
    nothing is written to Redis."""
    with pytest.raises(ConfigurationError) as caught:
        await client.create_session(task_queue, SessionOptions(**{field: value}))
    assert caught.value.field == field
    assert field in str(caught.value)
    assert await scan_keys(redis_client, key_prefix) == []


BAD_WORKER_OPTIONS = [
    ("max_concurrent_sessions", -1),
    ("max_concurrent_sessions", 1.5),
    ("max_concurrent_sessions", "2"),
    ("max_concurrent_sessions", True),
    ("max_concurrent_activities", 0),
    ("max_concurrent_activities", -3),
    ("heartbeat_timeout", 0),
    ("heartbeat_timeout", -2),
    ("heartbeat_timeout", "10"),
]


@pytest.mark.parametrize(("field", "value"), BAD_WORKER_OPTIONS, ids=lambda v: repr(v))
async def test_s19_invalid_worker_limits_raise_configuration_error(
    redis_url: str,
    key_prefix: str,
    task_queue: str,
    redis_client: redis.asyncio.Redis,
    field: str,
    value: Any,
) -> None:
    """Zero, negative or mistyped limits and timeouts of a session worker raise
    ConfigurationError naming the field, before the worker registers anywhere (but
    max_concurrent_sessions=0 means no limit, as --max-sessions 0: test_caller_hints)."""
    with pytest.raises(ConfigurationError) as caught:
        Worker(
            redis_url,
            task_queue=task_queue,
            activities=acts.ALL,
            enable_sessions=True,
            prefix=key_prefix,
            **{field: value},
        )
    assert caught.value.field == field
    assert field in str(caught.value)
    assert await scan_keys(redis_client, key_prefix) == []


async def test_s19_invalid_create_session_arguments_raise_configuration_error(
    redis_url: str, key_prefix: str, client: Client, redis_client: redis.asyncio.Redis
) -> None:
    """A bad task queue name or options that are not SessionOptions are refused up front."""
    with pytest.raises(ConfigurationError) as caught:
        await client.create_session("bad:queue")
    assert caught.value.field == "task_queue"
    with pytest.raises(ConfigurationError) as caught:
        await client.create_session("fine", {"creation_timeout": 5})  # type: ignore[arg-type]
    assert caught.value.field == "options"
    assert await scan_keys(redis_client, key_prefix) == []


async def test_s19_invalid_activity_option_on_a_session_sends_nothing(
    redis_url: str, key_prefix: str, task_queue: str, client: Client, tmp_path: Path
) -> None:
    """A non-positive activity timeout on a session activity raises ConfigurationError
    naming it; nothing reaches the worker and the session stays usable."""
    ran_file = tmp_path / "ran.txt"
    worker = make_worker(redis_url, key_prefix, task_queue, "w1", concurrency=1)  # runs them in order
    async with worker, client.create_session(task_queue) as session:
        for field in ("start_to_close_timeout", "schedule_to_close_timeout", "heartbeat_timeout"):
            with pytest.raises(ConfigurationError) as caught:
                await session.execute_activity(acts.mark, str(ran_file), **{field: 0})
            assert caught.value.field == field
        assert await session.execute_activity(acts.mark, str(ran_file)) == "w1"
        assert ran_file.read_text() == "w1\n", "a refused activity ran"
        assert session.info.state is SessionState.OPEN
