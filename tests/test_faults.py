"""Faults: workers SIGKILLed or stopped, Redis cut off, sessions timing out, callers vanishing.

Every worker here is a real OS process (``spawn_worker``), so a kill is a true SIGKILL: no
``finally`` blocks run and only the heartbeat TTL tells the rest of the system. Marker
files written by the activities (``tests.activities``) show where and whether work ran.
Heartbeat timeouts are small so the whole file stays fast; every bound on a delay is
"heartbeat_timeout plus a margin" so a hang, not a slow box, is what fails a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio

import sessionq
from sessionq.keys import QueueKeys
from tests.activities import mark, sleep_for, whoami
from tests.helpers import SpawnWorker, WorkerProcess, wait_for
from tests.proxy import RedisProxy

pytestmark = pytest.mark.cluster  # these behaviours also run on the Redis Cluster backend

HB = 1.0
"""Heartbeat timeout of most workers here: small, yet safe from a busy box's hiccups."""
MARGIN = 1.5
"""How much later than the heartbeat timeout a caller may learn that its worker died."""
QUICK = 1.0
"""Bound for "at once": the caller already knows, or one Redis round trip tells it."""
LONG = 60.0
"""An activity duration that outlives every test: it only ends by being cancelled."""

Redis = redis.asyncio.Redis
MakeClient = Callable[[], sessionq.Client]


# --- fixtures and small helpers ---------------------------------------------------------


@pytest_asyncio.fixture
async def make_client(redis_url: str, key_prefix: str) -> AsyncIterator[MakeClient]:
    """Factory of Clients on the test's prefix (two callers = two clients); closed after."""
    clients: list[sessionq.Client] = []

    def make() -> sessionq.Client:
        clients.append(sessionq.Client(redis_url, prefix=key_prefix))
        return clients[-1]

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
def client(make_client: MakeClient) -> sessionq.Client:
    return make_client()


def options(creation: float = 10.0, execution: float = 600.0) -> sessionq.SessionOptions:
    return sessionq.SessionOptions(creation_timeout=creation, execution_timeout=execution)


async def raises_within(
    awaitable: Awaitable[Any], error: type[BaseException], limit: float
) -> tuple[BaseException, float]:
    """Await and expect `error` within `limit` s (a hang fails here); returns (error, elapsed)."""
    __tracebackhide__ = True
    started = time.monotonic()
    with pytest.raises(error) as caught:
        await asyncio.wait_for(awaitable, limit + 5.0)
    elapsed = time.monotonic() - started
    assert elapsed < limit, f"{error.__name__} took {elapsed:.2f} s, more than {limit:g} s"
    return caught.value, elapsed


async def spawn_many(spawn_worker: SpawnWorker, *identities: str, **kwargs: Any) -> list[WorkerProcess]:
    """Start several workers at once (start-up dominates these tests' wall time)."""
    return list(await asyncio.gather(*(spawn_worker(identity=i, **kwargs) for i in identities)))


async def hfield(redis_client: Redis, key: str, name: str) -> str | None:
    value = await redis_client.hget(key, name)
    return None if value is None else value.decode()


async def session_state(redis_client: Redis, keys: QueueKeys, session_id: str) -> str | None:
    return await hfield(redis_client, keys.session(session_id), "state")


async def alive(redis_client: Redis, keys: QueueKeys, worker_id: str) -> bool:
    return bool(await redis_client.exists(keys.alive(worker_id)))


async def registered(redis_client: Redis, keys: QueueKeys, worker_id: str) -> bool:
    return bool(await redis_client.sismember(keys.workers, worker_id))


async def wait_reaped(redis_client: Redis, keys: QueueKeys, worker_id: str) -> None:
    """Until the dead worker left the registry (some reaper ran)."""

    async def gone() -> bool:
        return not await registered(redis_client, keys, worker_id)

    await wait_for(gone, timeout=HB + 5, message=f"worker {worker_id} never reaped")


def started_by(marker: Path) -> Callable[[], str]:
    """Predicate: the worker id written to ``<marker>.started``, once there."""
    path = Path(f"{marker}.started")
    return lambda: path.read_text() if path.exists() else ""


def ran_marks(path: Path) -> list[str]:
    """Worker ids the ``mark`` activity appended to `path` (one line per run)."""
    return path.read_text().split() if path.exists() else []


# --- S11: worker killed while a session activity runs ------------------------------------


async def test_s11_kill_during_session_activity_fails_caller_within_heartbeat(
    spawn_worker: SpawnWorker, client: sessionq.Client, task_queue: str, tmp_path: Path
) -> None:
    # No other worker is alive: only the caller itself can notice the death.
    # (With another worker alive: see the S12 test of queued activities below.)
    victim = await spawn_worker(identity="w1", heartbeat_timeout=HB)
    session = await client.create_session(task_queue, options())
    running = asyncio.ensure_future(session.execute_activity(sleep_for, LONG, str(tmp_path / "m")))
    await wait_for(started_by(tmp_path / "m"), message="activity never started")

    await victim.kill()
    await raises_within(running, sessionq.SessionFailedError, HB + MARGIN)
    assert session.state is sessionq.SessionState.FAILED
    await raises_within(session.execute_activity(whoami), sessionq.SessionFailedError, QUICK)


# --- S12: worker killed between activities ----------------------------------------------


async def test_s12_kill_between_activities_next_activity_fails(
    spawn_worker: SpawnWorker,
    client: sessionq.Client,
    redis_client: Redis,
    keys: QueueKeys,
    task_queue: str,
) -> None:
    victim, _ = await asyncio.gather(
        spawn_worker(identity="w1", heartbeat_timeout=HB),
        spawn_worker(identity="w2", heartbeat_timeout=HB, enable_sessions=False),  # a reaper
    )
    early, late = [await client.create_session(task_queue, options()) for _ in range(2)]
    for session in (early, late):
        assert await session.execute_activity(whoami) == victim.worker_id

    await victim.kill()
    # Before the reap the send succeeds; the caller's watchdog notices the dead worker.
    await raises_within(early.execute_activity(whoami), sessionq.SessionFailedError, HB + MARGIN)
    # After the reap the worker's stream is gone: the send itself finds out.
    await wait_reaped(redis_client, keys, victim.worker_id)
    await raises_within(late.execute_activity(whoami), sessionq.SessionFailedError, QUICK)
    for session in (early, late):
        assert await session_state(redis_client, keys, session.session_id) == "FAILED"


async def test_s12_activities_queued_for_killed_worker_are_cancelled_never_run_elsewhere(
    spawn_worker: SpawnWorker,
    client: sessionq.Client,
    redis_client: Redis,
    keys: QueueKeys,
    task_queue: str,
    tmp_path: Path,
) -> None:
    # One activity slot: the first activity runs, the marks queue behind it.
    victim, survivor = await asyncio.gather(
        spawn_worker(identity="w1", heartbeat_timeout=HB, concurrency=1),
        spawn_worker(identity="w2", heartbeat_timeout=HB, enable_sessions=False),
    )
    session = await client.create_session(task_queue, options())
    busy = await session.start_activity(sleep_for, LONG, str(tmp_path / "busy"))
    await wait_for(started_by(tmp_path / "busy"), message="first activity never started")
    queued_marks = tmp_path / "queued.marks"
    queued = [await session.start_activity(mark, str(queued_marks)) for _ in range(3)]

    await victim.kill()
    # S11 with another worker alive, and S12: the running one and the queued ones all fail.
    for handle in [busy, *queued]:
        await raises_within(handle.result(), sessionq.SessionFailedError, HB + MARGIN)
    await wait_reaped(redis_client, keys, victim.worker_id)

    # The survivor is live and serving the queue, yet none of the queued marks ran anywhere.
    plain_marks = tmp_path / "plain.marks"
    for _ in range(3):
        await client.execute_activity(mark, str(plain_marks), task_queue=task_queue)
    assert ran_marks(plain_marks) == [survivor.worker_id] * 3
    assert ran_marks(queued_marks) == []


# --- S16: recreate_session ----------------------------------------------------------------


async def test_s16_recreate_lands_on_same_worker_each_time(
    spawn_worker: SpawnWorker, client: sessionq.Client, task_queue: str
) -> None:
    workers = await spawn_many(spawn_worker, "w1", "w2", "w3", heartbeat_timeout=HB)
    # Held together, the three sessions spread over the three workers (least loaded first).
    first = [await client.create_session(task_queue, options()) for _ in workers]
    assert sorted(s.info.worker_id for s in first) == sorted(w.worker_id for w in workers)
    for session in first:
        await session.complete()

    # All workers are idle now: only the token can steer a session to a given one.
    for original in first:
        for _ in range(3):
            again = await client.recreate_session(original.info.recreate_token, options(creation=5))
            assert again.info.worker_id == original.info.worker_id
            assert again.session_id != original.session_id
            assert await again.execute_activity(whoami) == original.info.worker_id
            await again.complete()


async def full_worker_and_free_one(
    spawn_worker: SpawnWorker, client: sessionq.Client, task_queue: str
) -> tuple[sessionq.Session, WorkerProcess, WorkerProcess]:
    """Two workers of one slot each; a session fills one. Returns (session, full, free)."""
    workers = {
        w.worker_id: w
        for w in await spawn_many(spawn_worker, "w1", "w2", heartbeat_timeout=HB, max_sessions=1)
    }
    holder = await client.create_session(task_queue, options())
    full = workers.pop(holder.info.worker_id)
    (free,) = workers.values()
    return holder, full, free


async def test_s16_recreate_on_dead_worker_raises_session_failed(
    spawn_worker: SpawnWorker,
    client: sessionq.Client,
    redis_client: Redis,
    keys: QueueKeys,
    task_queue: str,
) -> None:
    holder, victim, free = await full_worker_and_free_one(spawn_worker, client, task_queue)
    token = holder.info.recreate_token
    waiting = asyncio.ensure_future(client.recreate_session(token, options(creation=30)).open())
    await wait_for(lambda: redis_client.zcard(keys.waiters), message="recreate never queued")

    # Waiting for a slot when the worker dies: refused once it is declared dead.
    await victim.kill()
    await raises_within(waiting, sessionq.SessionFailedError, HB + MARGIN + 1.0)
    # Recreating on a worker already declared dead: refused at once.
    await wait_reaped(redis_client, keys, victim.worker_id)
    await raises_within(
        client.recreate_session(token, options(creation=10)).open(), sessionq.SessionFailedError, QUICK
    )
    # Never a session on the free worker instead.
    assert await hfield(redis_client, keys.worker(free.worker_id), "open") == "0"
    assert await redis_client.zcard(keys.waiters) == 0


async def test_s16_recreate_on_full_worker_times_out_or_gets_the_freed_slot(
    spawn_worker: SpawnWorker,
    make_client: MakeClient,
    redis_client: Redis,
    keys: QueueKeys,
    task_queue: str,
) -> None:
    holder, full, free = await full_worker_and_free_one(spawn_worker, make_client(), task_queue)
    recreator = make_client()
    token = holder.info.recreate_token

    # Full past creation_timeout: the right error, and no session on the free worker.
    opener = recreator.recreate_session(token, options(creation=1.0))
    _, elapsed = await raises_within(opener.open(), sessionq.SessionCreationTimeoutError, 1.0 + MARGIN)
    assert elapsed >= 0.9
    assert await hfield(redis_client, keys.worker(free.worker_id), "open") == "0"
    assert await session_state(redis_client, keys, holder.session_id) == "OPEN"
    assert await redis_client.zcard(keys.waiters) == 0

    # Waiting when the slot frees: the recreate gets it, on the same worker.
    waiting = asyncio.ensure_future(recreator.recreate_session(token, options(creation=30)).open())
    await wait_for(lambda: redis_client.zcard(keys.waiters), message="recreate never queued")
    assert not waiting.done()
    await holder.complete()
    again = await asyncio.wait_for(waiting, 5.0)
    assert again.info.worker_id == full.worker_id
    assert await again.execute_activity(whoami) == full.worker_id
    assert await hfield(redis_client, keys.worker(free.worker_id), "open") == "0"
    await again.complete()


# --- S17 / D06: execution timeout ----------------------------------------------------------


async def test_s17_execution_timeout_fails_session_frees_slot_cancels_activities(
    spawn_worker: SpawnWorker,
    make_client: MakeClient,
    redis_client: Redis,
    keys: QueueKeys,
    task_queue: str,
    tmp_path: Path,
) -> None:
    worker = await spawn_worker(identity="w1", heartbeat_timeout=HB, max_sessions=1)
    caller = make_client()
    timeout = 1.5
    session = await caller.create_session(task_queue, options(execution=timeout))
    running = await session.start_activity(sleep_for, LONG, str(tmp_path / "m"))
    await wait_for(started_by(tmp_path / "m"), message="activity never started")
    creator = asyncio.ensure_future(make_client().create_session(task_queue, options(creation=30)).open())
    await wait_for(lambda: redis_client.zcard(keys.waiters), message="second creator never queued")

    _, elapsed = await raises_within(running.result(), sessionq.SessionFailedError, timeout + MARGIN)
    assert elapsed >= timeout - 0.5, "failed well before its execution timeout"
    assert await session_state(redis_client, keys, session.session_id) == "FAILED"
    assert "execution timeout" in (
        await hfield(redis_client, keys.session(session.session_id), "reason") or ""
    )
    await wait_for(lambda: Path(f"{tmp_path / 'm'}.cancelled").exists(), message="activity not cancelled")

    # The slot went to the waiting creator, not before the old deadline.
    second = await asyncio.wait_for(creator, 5.0)
    assert second.info.worker_id == worker.worker_id
    await assert_created_after_deadline(redis_client, keys, second.session_id, session.session_id)
    await raises_within(session.execute_activity(whoami), sessionq.SessionFailedError, QUICK)
    await second.complete()


async def assert_created_after_deadline(redis_client: Redis, keys: QueueKeys, new: str, old: str) -> None:
    """The new session's slot was handed over only once the old one's deadline passed."""
    __tracebackhide__ = True
    created = int(await hfield(redis_client, keys.session(new), "deadline") or 0) - int(
        await hfield(redis_client, keys.session(new), "exec_ms") or 0
    )
    deadline = int(await hfield(redis_client, keys.session(old), "deadline") or 0)
    assert deadline and created >= deadline, f"slot reused at {created}, before deadline {deadline}"


VANISHING_CALLER = """
import asyncio, sys
import sessionq

async def main(url, prefix, queue, execution_timeout, marker, activity="sleep_for", seconds="3600"):
    client = sessionq.Client(url, prefix=prefix)
    options = sessionq.SessionOptions(creation_timeout=10, execution_timeout=float(execution_timeout))
    session = await client.create_session(queue, options)
    await session.start_activity(activity, float(seconds), marker)
    print("OPEN", session.session_id, flush=True)
    await asyncio.Event().wait()

asyncio.run(main(*sys.argv[1:]))
"""


async def run_vanishing_caller(argv: list[str]) -> tuple[asyncio.subprocess.Process, str]:
    """Start a caller process that opens a session and then just sits there; (process, sid)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", VANISHING_CALLER, *argv,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 20.0)
    assert line.startswith(b"OPEN "), f"caller process said {line!r}"
    return process, line.split()[1].decode()


async def test_s17_d06_vanished_caller_does_not_leak_slot_past_execution_timeout(
    spawn_worker: SpawnWorker,
    client: sessionq.Client,
    redis_client: Redis,
    keys: QueueKeys,
    redis_url: str,
    key_prefix: str,
    task_queue: str,
    tmp_path: Path,
) -> None:
    worker = await spawn_worker(identity="w1", heartbeat_timeout=HB, max_sessions=1)
    timeout = 2.0
    marker = tmp_path / "m"
    process, sid = await run_vanishing_caller([redis_url, key_prefix, task_queue, str(timeout), str(marker)])
    try:
        await wait_for(started_by(marker), message="the caller's activity never started")
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
    assert await session_state(redis_client, keys, sid) == "OPEN"

    # max_sessions=1: this only succeeds once the orphaned session's slot is released.
    started = time.monotonic()
    session = await client.create_session(task_queue, options(creation=timeout + 10))
    assert time.monotonic() - started < timeout + MARGIN
    assert session.info.worker_id == worker.worker_id
    assert await session_state(redis_client, keys, sid) == "FAILED"
    await assert_created_after_deadline(redis_client, keys, session.session_id, sid)
    await wait_for(lambda: Path(f"{marker}.cancelled").exists(), message="orphaned activity not cancelled")
    await session.complete()


async def test_s17_a_session_ends_at_its_deadline_while_an_activity_blocks_the_workers_loop(
    spawn_worker: SpawnWorker, redis_client: Redis, keys: QueueKeys,
    redis_url: str, key_prefix: str, task_queue: str, tmp_path: Path,
) -> None:  # fmt: skip
    """A badly written async activity blocks the worker's event loop (time.sleep) past the
    session's deadline, and its caller is gone. The worker's timers cannot run and it still
    heartbeats (from its thread), so nobody reaps it: its heartbeat thread ends the
    session at the deadline, not when the loop is free again."""
    await spawn_worker(identity="w1", heartbeat_timeout=HB, max_sessions=1)
    timeout, block = 2.0, 12.0
    marker = tmp_path / "blocked"
    argv = [redis_url, key_prefix, task_queue, str(timeout), str(marker), "block_loop", str(block)]
    process, sid = await run_vanishing_caller(argv)
    opened = time.monotonic()
    try:
        await wait_for(marker.exists, message="the blocking activity never started")
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
    ended = lambda: _not_open(redis_client, keys, sid)  # noqa: E731
    await wait_for(ended, timeout=timeout + HB + MARGIN + 2, message="the session waited for the loop")
    assert time.monotonic() - opened < block - 2, "ended only once the loop was free again"
    record = await redis_client.hmget(keys.session(sid), "state", "reason")
    assert record == [b"FAILED", b"execution timeout passed"]


async def _not_open(redis_client: Redis, keys: QueueKeys, sid: str) -> bool:
    return await session_state(redis_client, keys, sid) != "OPEN"


# --- D01: plain activities and dead workers --------------------------------------------------


async def test_d01_plain_activity_of_killed_worker_is_retried_on_live_worker(
    spawn_worker: SpawnWorker, client: sessionq.Client, task_queue: str, tmp_path: Path
) -> None:
    workers = {w.worker_id: w for w in await spawn_many(spawn_worker, "w1", "w2", heartbeat_timeout=HB)}
    marker = tmp_path / "m"
    handle = await client.start_activity(
        sleep_for, 1.5, str(marker), task_queue=task_queue,
        retry_policy=sessionq.RetryPolicy(maximum_attempts=3, initial_interval=0.1),
    )  # fmt: skip
    first = await wait_for(started_by(marker), message="activity never started")
    await workers[first].kill()
    Path(f"{marker}.started").unlink()

    result = await asyncio.wait_for(handle.result(), HB + MARGIN + 1.5 + 5.0)
    (survivor,) = set(workers) - {first}
    assert result == survivor
    assert started_by(marker)() == survivor  # it really started a second time, there


async def test_d01_long_plain_activity_on_healthy_worker_is_never_handed_out_twice(
    spawn_worker: SpawnWorker, client: sessionq.Client, task_queue: str, tmp_path: Path,
    redis_client: Redis, keys: QueueKeys,
) -> None:  # fmt: skip
    workers = {w.worker_id for w in await spawn_many(spawn_worker, "w1", "w2", heartbeat_timeout=HB)}
    marker = tmp_path / "m"
    handle = await client.start_activity(sleep_for, 3 * HB, str(marker), task_queue=task_queue)
    runner = await wait_for(started_by(marker), message="activity never started")
    assert runner in workers
    Path(f"{marker}.started").unlink()  # a second start would write it again
    # The other worker is told to take over the runner's activities (a takeover mark, as a
    # reaper that misjudged it would leave) and to audit the queue (which claims from every
    # consumer it thinks dead): the claim must see the runner's heartbeat and take nothing.
    await redis_client.zadd(keys.beats, {f"o:{runner}": 0, "scan": 0})

    async def mark_settled() -> bool:
        return await redis_client.zscore(keys.beats, f"o:{runner}") is None

    await wait_for(mark_settled, timeout=3 * HB, message="nobody looked at the takeover mark")

    assert await asyncio.wait_for(handle.result(), 3 * HB + 5.0) == runner
    assert not Path(f"{marker}.started").exists(), "the activity was started a second time"


# --- D02: a worker loses Redis for a while ---------------------------------------------------


@pytest_asyncio.fixture
async def proxy(redis_url: str) -> AsyncIterator[RedisProxy]:
    if redis_url.startswith(("redis+cluster://", "rediss+cluster://")):
        pytest.skip("D02's relay fronts one server; a cluster client follows the nodes' own addresses")
    relay = RedisProxy(redis_url)
    await relay.start()
    yield relay
    await relay.close()


async def test_d02_short_redis_cut_session_survives(
    spawn_worker: SpawnWorker,
    client: sessionq.Client,
    redis_client: Redis,
    keys: QueueKeys,
    proxy: RedisProxy,
    task_queue: str,
) -> None:
    hb = 2.0
    worker = await spawn_worker(identity="w1", heartbeat_timeout=hb, extra_args=["--redis-url", proxy.url])
    session = await client.create_session(task_queue, options())
    assert await session.execute_activity(whoami) == worker.worker_id
    registered_at = await hfield(redis_client, keys.worker(worker.worker_id), "registered")
    across = asyncio.ensure_future(session.execute_activity(sleep_for, 0.5))  # its result crosses the cut

    proxy.cut()
    await wait_for(lambda: proxy.refused >= 1, message="the worker never tried to reconnect")
    await asyncio.sleep(0.3)  # the outage itself, well under the heartbeat timeout
    reconnects = proxy.accepted
    proxy.resume()

    assert await asyncio.wait_for(across, 10.0) == worker.worker_id
    for _ in range(3):
        assert await session.execute_activity(whoami) == worker.worker_id
    assert proxy.accepted > reconnects, "the worker did not reconnect through the proxy"
    assert await session_state(redis_client, keys, session.session_id) == "OPEN"
    # Never declared dead: the original registration is the one still in place.
    assert await hfield(redis_client, keys.worker(worker.worker_id), "registered") == registered_at
    await session.complete()


async def test_d02_long_redis_cut_fails_session_then_worker_reregisters(
    spawn_worker: SpawnWorker,
    client: sessionq.Client,
    redis_client: Redis,
    keys: QueueKeys,
    proxy: RedisProxy,
    task_queue: str,
    tmp_path: Path,
) -> None:
    worker, _ = await asyncio.gather(
        spawn_worker(identity="w1", heartbeat_timeout=HB, extra_args=["--redis-url", proxy.url]),
        spawn_worker(identity="w2", heartbeat_timeout=HB, enable_sessions=False),  # alive, reaping
    )
    session = await client.create_session(task_queue, options())
    registered_at = await hfield(redis_client, keys.worker(worker.worker_id), "registered")
    running = await session.start_activity(sleep_for, LONG, str(tmp_path / "m"))
    await wait_for(started_by(tmp_path / "m"), message="activity never started")

    proxy.cut()
    await raises_within(running.result(), sessionq.SessionFailedError, HB + MARGIN)
    await wait_reaped(redis_client, keys, worker.worker_id)
    proxy.resume()

    async def reregistered() -> bool:
        at = await hfield(redis_client, keys.worker(worker.worker_id), "registered")
        return at is not None and at != registered_at and await alive(redis_client, keys, worker.worker_id)

    await wait_for(reregistered, timeout=10.0, message="the worker never re-registered")
    # It drops the failed session's work, and serves new sessions.
    await wait_for(lambda: Path(f"{tmp_path / 'm'}.cancelled").exists(), message="stale work not cancelled")
    await raises_within(session.execute_activity(whoami), sessionq.SessionFailedError, QUICK)
    again = await client.recreate_session(session.info.recreate_token, options(creation=5))
    assert await again.execute_activity(whoami) == worker.worker_id
    await again.complete()


# --- complete() racing a worker's death ------------------------------------------------------


async def test_s09_complete_racing_worker_death_never_raises(
    spawn_worker: SpawnWorker,
    make_client: MakeClient,
    redis_client: Redis,
    keys: QueueKeys,
    task_queue: str,
) -> None:
    caller = make_client()
    workers = {
        w.worker_id: w
        for w in await spawn_many(spawn_worker, "w1", "w2", heartbeat_timeout=HB, max_sessions=2)
    }
    # Three sessions on two workers of two slots: one worker holds two (doomed), the other one.
    sessions = [await caller.create_session(task_queue, options()) for _ in range(3)]
    by_worker: dict[str, list[sessionq.Session]] = {}
    for session in sessions:
        by_worker.setdefault(session.info.worker_id, []).append(session)
    (victim_id, doomed), (other_id, (bystander,)) = sorted(by_worker.items(), key=lambda kv: -len(kv[1]))

    await workers[victim_id].kill()
    await doomed[0].complete()  # right after the kill: heartbeat still present
    await wait_reaped(redis_client, keys, victim_id)
    await doomed[1].complete()  # after the reap: already FAILED in Redis
    for session in doomed:
        assert session.state in (sessionq.SessionState.COMPLETED, sessionq.SessionState.FAILED)
        assert await session_state(redis_client, keys, session.session_id) in ("COMPLETED", "FAILED")
        await session.complete()  # still idempotent

    # The other worker's slot accounting is untouched: one open, one free.
    assert await hfield(redis_client, keys.worker(other_id), "open") == "1"
    assert await redis_client.zscore(keys.free, other_id) == 1
    second = await caller.create_session(task_queue, options(creation=2))
    assert second.info.worker_id == other_id
    assert await hfield(redis_client, keys.worker(other_id), "open") == "2"
    for session in (second, bystander):
        await session.complete()
    assert await hfield(redis_client, keys.worker(other_id), "open") == "0"


# --- graceful stop -------------------------------------------------------------------------


async def test_s11_graceful_stop_sigterm_fails_open_session_after_the_grace_and_cleans_up(
    spawn_worker: SpawnWorker,
    client: sessionq.Client,
    redis_client: Redis,
    keys: QueueKeys,
    task_queue: str,
    tmp_path: Path,
    backend: str,
) -> None:
    grace = 1.0
    worker = await spawn_worker(
        identity="w1", heartbeat_timeout=5.0, max_sessions=1, extra_args=["--shutdown-grace", str(grace)]
    )
    session = await client.create_session(task_queue, options())
    running = await session.start_activity(sleep_for, LONG, str(tmp_path / "m"))
    await wait_for(started_by(tmp_path / "m"), message="activity never started")

    worker.terminate()
    # The running activity gets the grace, then is cancelled and the session fails: the
    # caller learns then, not when the heartbeat (5 s) would expire.
    await raises_within(running.result(), sessionq.SessionFailedError, grace + 1.5)
    await raises_within(session.execute_activity(whoami), sessionq.SessionFailedError, QUICK)
    assert await worker.wait(20.0) == 0
    wid = worker.worker_id
    assert await redis_client.exists(keys.alive(wid), keys.worker(wid), keys.stream(wid)) == 0
    assert not await registered(redis_client, keys, wid)
    assert await session_state(redis_client, keys, session.session_id) == "FAILED"
    consumers = [c["name"] for c in await redis_client.xinfo_consumers(keys.tasks, "workers")]
    if backend != "fakeredis":
        # fakeredis runs a blocked XREADGROUP again on every write until its block time is
        # over, even after its connection closed, and each run makes the consumer again: a
        # stop whose last read was still blocked there finds its consumer back (rare). Real
        # Redis drops a blocked read with its connection.
        assert wid.encode() not in consumers, "a stopped worker stays in the consumer group"


async def test_d01_entry_delivered_but_reply_lost_is_still_run(
    redis_url: str, key_prefix: str, task_queue: str, redis_client: redis.asyncio.Redis
) -> None:
    """An entry Redis delivered to a consumer whose reply never arrived (connection dropped
    mid-read) sits in that live consumer's pending list, where neither '>' reads nor the
    orphan reaper would find it: the worker itself must pick it up again."""
    keys = QueueKeys(key_prefix, task_queue)
    client = sessionq.Client(redis_url, prefix=key_prefix)
    try:
        handle = await client.start_activity(whoami, task_queue=task_queue, schedule_to_close_timeout=15)
        # Deliver the entry to consumer "w-lost" by hand, as if its reply had been lost.
        with contextlib.suppress(redis.exceptions.ResponseError):
            await redis_client.xgroup_create(keys.tasks, "workers", id="0")
        delivered = await redis_client.xreadgroup("workers", "w-lost", {keys.tasks: ">"}, count=10)
        assert delivered and len(delivered[0][1]) == 1
        worker = sessionq.Worker(
            redis_url, task_queue=task_queue, activities=[whoami], identity="w-lost",
            heartbeat_timeout=1.0, prefix=key_prefix,
        )  # fmt: skip
        async with worker:
            assert await handle.result() == "w-lost"
    finally:
        await client.close()


# --- a live worker is never mistaken for a dead one ------------------------------------------


async def test_s11_heartbeat_goes_on_while_housekeeping_is_stuck(
    redis_url: str, key_prefix: str, task_queue: str, redis_client: Redis, keys: QueueKeys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Heartbeats have a task of their own: a housekeeping pass that hangs (a slow reap or
    orphan claim on a loaded Redis) must not let a live worker's heartbeat key expire, or
    its callers would see a death that did not happen."""
    worker = sessionq.Worker(
        redis_url, task_queue=task_queue, activities=[whoami], enable_sessions=True,
        heartbeat_timeout=HB, prefix=key_prefix, identity="stuck-housekeeping",
    )  # fmt: skip
    stuck = asyncio.Event()

    async def housekeeping_hangs(self: Any) -> None:
        stuck.set()
        await asyncio.Event().wait()

    monkeypatch.setattr("sessionq.housekeeping.Housekeeping.step", housekeeping_hangs)
    refreshed: list[int] = []

    async def refreshed_three_times() -> bool:
        ttl = await redis_client.pttl(keys.alive(worker.worker_id))
        assert ttl != -2, "the heartbeat key expired while the worker was alive"
        if not refreshed or ttl > refreshed[-1]:
            refreshed.append(ttl)
        else:
            refreshed[-1] = ttl
        return len(refreshed) > 3

    async with worker:
        await wait_for(stuck.is_set, message="housekeeping never ran")
        await wait_for(refreshed_three_times, timeout=4 * HB, message="the heartbeat stopped")
