"""Redis and network faults, injected for real: every call ends, nothing is lost (D07, D11).

Each test puts the fault kit (tests/faultkit.py) between the code under test and Redis:
a relay that drops one reply, freezes or cuts connections, or answers with error replies;
a private server restarted with or without its data; a temporary ACL user. Workers run
in-process (no process dies here; SIGKILL lives in test_faults.py), against the relay or
the private server. Each test names the defect it proves fixed; every bound is stated.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import pytest_asyncio
import redis.asyncio
import redis.exceptions

import sessionq
from sessionq import Client, RedisDataLostError, RedisUnavailableError, SessionOptions, Worker
from sessionq.connection import connect
from sessionq.keys import QueueKeys
from sessionq.scripts import source
from sessionq.wire import Wire
from tests import activities as acts
from tests.faultkit import Relay, TemporaryAclUser, private_server
from tests.helpers import SpawnWorker, wait_for

T = TypeVar("T")

HB = 2.0
"""Heartbeat timeout of the in-process workers: no worker here should ever be declared dead."""
READ_BOUND = 2.0 + 2.0 + 1.0
"""A blocking read's longest stall on a dead connection (BLOCK, the margin) plus slack."""
FAST_FAIL = 2.0
"""unavailable_timeout of the clients that must give up quickly."""


# --- fixtures ------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def relay(redis_url: str) -> AsyncIterator[Relay]:
    async with Relay(redis_url) as relay:
        yield relay


class StartWorker(Protocol):
    async def __call__(self, url: str, identity: str = "w1", **options: Any) -> Worker: ...


@pytest_asyncio.fixture
async def start_worker(key_prefix: str, task_queue: str) -> AsyncIterator[StartWorker]:
    """Factory for in-process workers on the test's queue, on the URL given (relay or server)."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(url: str, identity: str = "w1", **options: Any) -> Worker:
            settings: dict[str, Any] = {
                "task_queue": task_queue,
                "activities": acts.ALL,
                "identity": identity,
                "heartbeat_timeout": HB,
                "shutdown_grace": 1.0,
                "prefix": key_prefix,
                "enable_sessions": True,
            }
            settings.update(options)
            return await stack.enter_async_context(Worker(url, **settings))

        yield start


@pytest_asyncio.fixture
async def clients(key_prefix: str) -> AsyncIterator[list[Client]]:
    """Clients a test makes (append to it); all closed after the test."""
    made: list[Client] = []
    yield made
    for client in made:
        with contextlib.suppress(Exception):
            await client.close()


def client_on(clients: list[Client], url: str, key_prefix: str, **options: Any) -> Client:
    clients.append(Client(url, prefix=key_prefix, **options))
    return clients[-1]


async def ends_within(awaitable: Awaitable[T], limit: float) -> tuple[T, float]:
    """Await it and fail the test if it takes longer than `limit` s (a hang fails here)."""
    __tracebackhide__ = True
    started = time.monotonic()
    try:
        value = await asyncio.wait_for(awaitable, limit)
    except asyncio.TimeoutError:
        pytest.fail(f"still waiting after {limit:g} s")
    return value, time.monotonic() - started


async def raises_within(awaitable: Awaitable[Any], error: type[BaseException], limit: float) -> BaseException:
    __tracebackhide__ = True
    started = time.monotonic()
    with pytest.raises(error) as caught:
        await asyncio.wait_for(awaitable, limit + 10)
    elapsed = time.monotonic() - started
    assert elapsed < limit, f"{error.__name__} took {elapsed:.2f} s, more than {limit:g} s"
    return caught.value


async def keys_without_ttl(redis_client: redis.asyncio.Redis, prefix: str) -> list[str]:
    found = []
    async for key in redis_client.scan_iter(match=f"{prefix}:*", count=1000):
        if await redis_client.pttl(key) == -1:
            found.append(key.decode())
    return sorted(found)


def started(marker: Path) -> bool:
    return Path(f"{marker}.started").exists()


# --- 1. a reply lost with its connection -----------------------------------------------------


async def test_d07_a_result_whose_read_reply_is_lost_still_reaches_its_caller(
    relay: Relay, redis_url: str, key_prefix: str, task_queue: str, start_worker: StartWorker,
    clients: list[Client],
) -> None:  # fmt: skip
    """Redis hands the result to the client's blocking read, then the connection drops
    before the client reads the reply: the result must not be gone with it."""
    await start_worker(redis_url)
    client = client_on(clients, relay.url, key_prefix)
    assert await client.execute_activity(acts.echo, "warm", task_queue=task_queue) == "warm"
    dropped = relay.drop_reply({"XREAD", "BLMPOP", "BLPOP"}, nonempty=True)
    call = client.execute_activity(acts.echo, "kept", task_queue=task_queue)
    value, _ = await ends_within(call, READ_BOUND)
    assert value == "kept"
    assert dropped.fired.is_set(), "no reply was dropped: the test proved nothing"


async def test_d07_a_grant_whose_read_reply_is_lost_still_reaches_the_waiting_creator(
    relay: Relay, redis_url: str, key_prefix: str, task_queue: str, start_worker: StartWorker,
    clients: list[Client], redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    await start_worker(redis_url, max_concurrent_sessions=1)
    holder = await client_on(clients, redis_url, key_prefix).create_session(task_queue)
    creator = client_on(clients, relay.url, key_prefix)
    waiting = asyncio.ensure_future(
        creator.create_session(task_queue, SessionOptions(creation_timeout=30)).open()
    )
    keys = QueueKeys(key_prefix, task_queue)
    await wait_for(lambda: redis_client.exists(keys.waiters), message="the creator never queued")
    dropped = relay.drop_reply({"XREAD", "BLMPOP", "BLPOP"}, nonempty=True)
    await holder.complete()
    session, _ = await ends_within(waiting, READ_BOUND)
    assert dropped.fired.is_set(), "no reply was dropped: the test proved nothing"
    assert await session.execute_activity(acts.whoami) == "w1"
    await session.complete()


# --- 2. keys keep their TTL --------------------------------------------------------------------


async def test_d11_a_late_result_for_a_closed_client_leaves_no_key_without_ttl(
    redis_url: str, key_prefix: str, task_queue: str, start_worker: StartWorker, clients: list[Client],
    redis_client: redis.asyncio.Redis, tmp_path: Path,
) -> None:  # fmt: skip
    """A result that arrives after its client closed must not create a key that lives forever."""
    worker = await start_worker(redis_url)
    client = client_on(clients, redis_url, key_prefix)
    inbox = QueueKeys(key_prefix, task_queue).inbox(client.client_id)
    assert await client.execute_activity(acts.echo, 1, task_queue=task_queue) == 1  # the inbox is drained
    marker = tmp_path / "late"
    handle = await client.start_activity(acts.sleep_for, 0.5, str(marker), task_queue=task_queue)
    await wait_for(lambda: started(marker), message="the activity never started")
    await client.close()
    with contextlib.suppress(sessionq.SessionqError):
        await handle.result()
    await wait_for(lambda: worker.runner.done >= 2, message="the late activity never finished")
    await wait_for(lambda: worker.outbox.empty, message="the late result was never written")
    assert await redis_client.pttl(inbox) != -1, "the closed client's inbox lives forever"
    assert not [k for k in await keys_without_ttl(redis_client, key_prefix) if ":inbox:" in k]


async def test_d11_once_callers_and_workers_are_gone_only_the_queue_itself_lacks_a_ttl(
    redis_url: str, key_prefix: str, task_queue: str, start_worker: StartWorker, clients: list[Client],
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    """Every key sessionq writes has a TTL or an owner that deletes it: after a workload, with
    the clients closed and the workers stopped, what is left without a TTL is the task
    queue's stream (the queue itself, which outlives its workers) and the index of queues."""
    async with Worker(
        redis_url, task_queue=task_queue, activities=acts.ALL, identity="w1", heartbeat_timeout=HB,
        enable_sessions=True, max_concurrent_sessions=1, prefix=key_prefix, shutdown_grace=1.0,
    ):  # fmt: skip
        client = client_on(clients, redis_url, key_prefix)
        assert await client.execute_activity(acts.echo, 1, task_queue=task_queue) == 1
        session = await client.create_session(task_queue)
        assert await session.execute_activity(acts.whoami) == "w1"
        waiter = asyncio.ensure_future(client.create_session(task_queue).open())
        keys = QueueKeys(key_prefix, task_queue)
        await wait_for(lambda: redis_client.exists(keys.waiters), message="the creator never queued")
        await session.complete()
        second, _ = await ends_within(waiter, 5.0)
        await second.complete()
        await client.close()
    keys = QueueKeys(key_prefix, task_queue)
    assert await keys_without_ttl(redis_client, key_prefix) == sorted([keys.tasks, f"{key_prefix}:queues"])


# --- 3. the inbox reader survives error replies ----------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        "NOPERM this user has no permissions to run the 'xread' command",
        "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.",
        "OOM command not allowed when used memory > 'maxmemory'.",
        "LOADING Redis is loading the dataset in memory",
        "ERR something nobody expected",
    ],
    ids=["NOPERM", "MISCONF", "OOM", "LOADING", "ERR"],
)
async def test_d07_the_inbox_reader_rides_out_error_replies(
    error: str, relay: Relay, redis_url: str, key_prefix: str, task_queue: str,
    start_worker: StartWorker, clients: list[Client],
) -> None:  # fmt: skip
    """Its blocking read refused for 2.5 s, the reader backs off and reads again: the result
    sent meanwhile still arrives, and so do later ones."""
    await start_worker(redis_url)
    client = client_on(clients, relay.url, key_prefix)
    assert await client.execute_activity(acts.echo, "warm", task_queue=task_queue) == "warm"
    refused = relay.inject_error({"XREAD", "BLMPOP", "BLPOP"}, error, seconds=2.5)
    value, _ = await ends_within(client.execute_activity(acts.echo, "through", task_queue=task_queue), 10.0)
    assert value == "through"
    assert refused.hits > 0, "no read was refused: the test proved nothing"
    assert await client.execute_activity(acts.echo, "after", task_queue=task_queue) == "after"


async def test_d07_the_inbox_reader_rides_out_an_acl_change(
    backend: str, redis_url: str, key_prefix: str, task_queue: str, start_worker: StartWorker,
    clients: list[Client],
) -> None:  # fmt: skip
    """The real thing: the client's ACL user loses XREAD for 2.5 s (NOPERM), then gets it back."""
    async with TemporaryAclUser(redis_url) as user:
        await start_worker(redis_url)
        client = client_on(clients, user.url, key_prefix)
        assert await client.execute_activity(acts.echo, "warm", task_queue=task_queue) == "warm"
        await user.deny("xread", "blmpop", "blpop")
        call = asyncio.ensure_future(client.execute_activity(acts.echo, "through", task_queue=task_queue))
        await asyncio.sleep(2.5)  # the outage itself: the length of the fault, not a synchronisation
        await user.allow("xread", "blmpop", "blpop")
        value, _ = await ends_within(call, 10.0)
        assert value == "through"


async def test_d07_a_reader_refused_for_longer_than_unavailable_timeout_tells_its_callers(
    relay: Relay, redis_url: str, key_prefix: str, task_queue: str, start_worker: StartWorker,
    clients: list[Client],
) -> None:  # fmt: skip
    """Refused for good, the waiting call ends in RedisUnavailableError naming the cause."""
    await start_worker(redis_url)
    client = client_on(clients, relay.url, key_prefix, unavailable_timeout=FAST_FAIL)
    assert await client.execute_activity(acts.echo, "warm", task_queue=task_queue) == "warm"
    relay.inject_error({"XREAD", "BLMPOP", "BLPOP"}, "NOPERM this user has no permissions to run 'xread'")
    error = await raises_within(
        client.execute_activity(acts.echo, 1, task_queue=task_queue), RedisUnavailableError, FAST_FAIL + 3
    )
    assert "NOPERM" in str(error) and "ACL" in str(error)


# --- 4. half-open connections ------------------------------------------------------------------


async def test_d07_a_worker_behind_frozen_connections_serves_again_and_keeps_its_session(
    relay: Relay, redis_url: str, key_prefix: str, task_queue: str, start_worker: StartWorker,
    clients: list[Client], redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    """Every connection of the worker freezes (half-open: no FIN, no RST). Its heartbeat and
    reads give up on them and reconnect, in time: the session stays OPEN and its next
    activity, and a plain one, run within a read's or a command's timeout."""
    await start_worker(f"{relay.url}?socket_timeout=2")
    client = client_on(clients, redis_url, key_prefix)
    session = await client.create_session(task_queue)
    assert await session.execute_activity(acts.whoami) == "w1"
    frozen = relay.freeze()
    assert frozen, "nothing was frozen: the test proves nothing"
    value, _ = await ends_within(session.execute_activity(acts.whoami), READ_BOUND + HB)
    assert value == "w1"
    plain, _ = await ends_within(client.execute_activity(acts.echo, "p", task_queue=task_queue), READ_BOUND)
    assert plain == "p"
    keys = QueueKeys(key_prefix, task_queue)
    assert (await redis_client.hget(keys.session(session.session_id), "state")) == b"OPEN"
    await session.complete()


async def test_d07_a_caller_partitioned_from_redis_gets_redis_unavailable_within_its_bound(
    relay: Relay, redis_url: str, key_prefix: str, task_queue: str, start_worker: StartWorker,
    clients: list[Client],
) -> None:  # fmt: skip
    """Behind a black-holed path (connections open, nothing moves) a call neither hangs nor
    lasts the partition: sending gives up after the command timeout plus unavailable_timeout,
    waiting after a read's timeout. Healed, the same client works again."""
    await start_worker(redis_url)
    client = client_on(clients, f"{relay.url}?socket_timeout=1", key_prefix, unavailable_timeout=FAST_FAIL)
    assert await client.execute_activity(acts.echo, "warm", task_queue=task_queue) == "warm"
    waiting = await client.start_activity(acts.sleep_for, 0.2, task_queue=task_queue)
    relay.partition()
    await raises_within(waiting.result(), RedisUnavailableError, READ_BOUND)
    await raises_within(
        client.execute_activity(acts.echo, 1, task_queue=task_queue), RedisUnavailableError, 1 + FAST_FAIL + 2
    )
    relay.heal()
    value, _ = await ends_within(client.execute_activity(acts.echo, "healed", task_queue=task_queue), 10.0)
    assert value == "healed"


# --- 5. one lost read must not stall the worker ------------------------------------------------


async def test_d07_one_lost_shared_read_does_not_stall_the_worker(
    relay: Relay, redis_url: str, key_prefix: str, task_queue: str, start_worker: StartWorker,
    clients: list[Client], tmp_path: Path,
) -> None:  # fmt: skip
    """The reply carrying an entry is lost, so the entry sits in the worker's pending list
    behind one that is still running: the worker must find it at once, without spinning."""
    await start_worker(relay.url, max_concurrent_activities=2)
    client = client_on(clients, redis_url, key_prefix)
    long_marker = tmp_path / "long"
    long = await client.start_activity(acts.sleep_for, 4.0, str(long_marker), task_queue=task_queue)
    await wait_for(lambda: started(long_marker), message="the long activity never started")
    dropped = relay.drop_reply({"XREADGROUP"}, nonempty=True)
    before = relay.count("XREADGROUP")
    value, elapsed = await ends_within(client.execute_activity(acts.echo, "next", task_queue=task_queue), 3.5)
    assert value == "next"
    assert dropped.fired.is_set(), "no reply was dropped: the test proved nothing"
    assert not long.done(), "the second activity waited for the first to finish"
    reads = relay.count("XREADGROUP") - before
    assert reads < 50, f"{reads} XREADGROUP calls in {elapsed:.1f} s: the worker spins"
    await long.result()


# --- 6. Redis restarts -------------------------------------------------------------------------


@pytest.fixture
def server(backend: str) -> Any:
    with private_server(backend) as server:
        yield server


@pytest.fixture
def persistent_server(backend: str) -> Any:
    with private_server(backend, persistent=True) as server:
        yield server


async def test_d07_after_a_restart_without_data_callers_learn_at_once_and_workers_serve_again(
    server: Any, key_prefix: str, task_queue: str, start_worker: StartWorker, clients: list[Client],
    tmp_path: Path,
) -> None:  # fmt: skip
    """Redis comes back empty: calls in flight fail with a clear error (their work is gone),
    the worker re-creates its consumer group and registration, and new work runs."""
    await start_worker(server.url)
    client = client_on(clients, server.url, key_prefix)
    session = await client.create_session(task_queue)
    assert await session.execute_activity(acts.whoami) == "w1"
    plain_marker, session_marker = tmp_path / "plain", tmp_path / "session"
    plain = await client.start_activity(acts.sleep_for, 30, str(plain_marker), task_queue=task_queue)
    pinned = await session.start_activity(acts.sleep_for, 30, str(session_marker))
    await wait_for(lambda: started(plain_marker) and started(session_marker), message="work never started")

    await asyncio.to_thread(server.restart, False)
    await raises_within(plain.result(), RedisDataLostError, READ_BOUND + 2)
    await raises_within(pinned.result(), sessionq.SessionqError, READ_BOUND + 2)
    await raises_within(session.execute_activity(acts.whoami), sessionq.SessionFailedError, READ_BOUND)

    value, _ = await ends_within(client.execute_activity(acts.echo, "again", task_queue=task_queue), 10.0)
    assert value == "again"
    async with client.create_session(task_queue) as again:
        assert await again.execute_activity(acts.whoami) == "w1"


async def test_d07_a_call_whose_task_redis_lost_while_keeping_the_inbox_fails_clearly(
    server: Any, key_prefix: str, task_queue: str, start_worker: StartWorker, clients: list[Client],
) -> None:  # fmt: skip
    """Redis comes back from an older state (as after a failover to a replica that lagged):
    the inbox survived, but the task of one waiting call did not. That call gets
    RedisDataLostError within seconds instead of waiting for ever; a call whose task
    survived runs once a worker comes."""
    client = client_on(clients, server.url, key_prefix)
    kept = await client.start_activity(acts.echo, "kept", task_queue=task_queue)  # no worker yet
    await asyncio.to_thread(server.snapshot)  # the inbox and the first task
    lost = await client.start_activity(acts.echo, "lost", task_queue=task_queue)
    await asyncio.to_thread(server.restart_from_snapshot)
    error = await raises_within(lost.result(), RedisDataLostError, READ_BOUND + 2)
    assert "lost this activity's task" in str(error)
    assert not kept.done()
    await start_worker(server.url)
    value, _ = await ends_within(kept.result(), 10.0)
    assert value == "kept"


async def test_d02_after_a_restart_with_data_work_in_flight_completes_and_sessions_stay_open(
    persistent_server: Any, key_prefix: str, task_queue: str, start_worker: StartWorker,
    clients: list[Client], tmp_path: Path,
) -> None:  # fmt: skip
    server = persistent_server
    await start_worker(server.url)
    client = client_on(clients, server.url, key_prefix)
    session = await client.create_session(task_queue)
    marker = tmp_path / "m"
    plain = await client.start_activity(acts.sleep_for, 1.0, str(marker), task_queue=task_queue)
    await wait_for(lambda: started(marker), message="the activity never started")
    await asyncio.to_thread(server.restart, True)
    value, _ = await ends_within(plain.result(), 10.0)
    assert value == "w1"
    same, _ = await ends_within(session.execute_activity(acts.whoami), 10.0)
    assert same == "w1"
    assert session.state is sessionq.SessionState.OPEN
    await session.complete()


# --- 7. a result batch refused for a transient reason is sent again ------------------------------


@pytest.mark.parametrize(
    "error",
    [
        "READONLY You can't write against a read only replica.",
        "LOADING Redis is loading the dataset in memory",
        "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
        "TRYAGAIN Multiple keys request during rehashing of slot",
        "CLUSTERDOWN The cluster is down",
        "OOM command not allowed when used memory > 'maxmemory'.",
        "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.",
    ],
    ids=["READONLY", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "OOM", "MISCONF"],
)
async def test_d07_a_result_batch_refused_for_a_transient_reason_is_sent_again(
    error: str, relay: Relay, redis_url: str, key_prefix: str, task_queue: str,
    start_worker: StartWorker, clients: list[Client],
) -> None:  # fmt: skip
    await start_worker(relay.url)
    client = client_on(clients, redis_url, key_prefix)
    session = await client.create_session(task_queue)
    refused = relay.inject_error({"XADD", "RPUSH"}, error, count=2)
    value, _ = await ends_within(session.execute_activity(acts.whoami), 5.0)
    assert value == "w1"
    plain, _ = await ends_within(client.execute_activity(acts.echo, "p", task_queue=task_queue), 5.0)
    assert plain == "p"
    assert refused.hits >= 1, "no write was refused: the test proved nothing"
    await session.complete()


# --- 8. a waiting creator when Redis goes away ----------------------------------------------------


async def test_d07_a_waiting_creator_cut_off_from_redis_gets_redis_unavailable(
    relay: Relay, redis_url: str, key_prefix: str, task_queue: str, start_worker: StartWorker,
    clients: list[Client], redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    """Not a redis-py exception, not after its whole creation_timeout: RedisUnavailableError
    after unavailable_timeout. Once Redis is back, its place in the line is given up."""
    await start_worker(redis_url, max_concurrent_sessions=1)
    holder = await client_on(clients, redis_url, key_prefix).create_session(task_queue)
    creator = client_on(clients, relay.url, key_prefix, unavailable_timeout=FAST_FAIL)
    waiting = asyncio.ensure_future(
        creator.create_session(task_queue, SessionOptions(creation_timeout=60)).open()
    )
    keys = QueueKeys(key_prefix, task_queue)
    await wait_for(lambda: redis_client.exists(keys.waiters), message="the creator never queued")
    relay.cut()
    await raises_within(waiting, RedisUnavailableError, FAST_FAIL + 3)
    relay.heal()
    await wait_for(
        lambda: _not(redis_client.exists(keys.waiters)), timeout=10, message="its ticket stayed in line"
    )
    await holder.complete()


async def _not(value: Awaitable[Any]) -> bool:
    return not await value


# --- 9. the shared connection ----------------------------------------------------------------


async def test_wire_a_command_that_cannot_be_packed_fails_alone(redis_url: str, key_prefix: str) -> None:
    """Packing fails before anything is queued: the replies of the others stay theirs."""
    wire = Wire(connect(redis_url))
    a, b, c = (f"{key_prefix}:{name}" for name in "abc")
    try:
        await wire.execute_many(a, [("SET", b, "B"), ("SET", c, "C")])
        bad = asyncio.ensure_future(wire.execute(a, "SET", a, object()))
        got_b = asyncio.ensure_future(wire.execute(b, "GET", b))
        got_c = asyncio.ensure_future(wire.execute(c, "GET", c))
        with pytest.raises(redis.exceptions.DataError):
            await bad
        assert await asyncio.wait_for(asyncio.gather(got_b, got_c), 5) == [b"B", b"C"]
    finally:
        await wire.aclose()
        await wire.redis.aclose()


async def test_wire_a_caller_cancelled_mid_write_leaves_the_connection_to_the_others(
    relay: Relay, key_prefix: str
) -> None:
    """Cancelling the caller of a large write must not cut the connection under every other
    command in flight on it (no reconnect, nothing re-sent, every reply to its caller)."""
    wire = Wire(connect(relay.url))
    key = f"{key_prefix}:big"
    size = 8 * 1024 * 1024
    try:
        assert await wire.execute(key, "PING") == b"PONG"
        accepted = relay.accepted
        big = asyncio.ensure_future(wire.execute(key, "SET", key, b"x" * size))
        await asyncio.sleep(0)  # it is writing now
        others = [asyncio.ensure_future(wire.execute(key, "SET", f"{key}:{i}", i)) for i in range(20)]
        big.cancel()
        assert await asyncio.wait_for(asyncio.gather(*others), 10) == [b"OK"] * 20
        assert relay.accepted == accepted, "the connection was dropped and made again"
        assert relay.count("SET") == 21, "commands were re-sent"
    finally:
        await wire.aclose()
        await wire.redis.aclose()


# --- found in review and in the chaos soak ------------------------------------------------------


async def test_d07_a_result_redis_refuses_keeps_its_entry_until_the_result_is_written(
    relay: Relay, redis_url: str, key_prefix: str, task_queue: str, spawn_worker: SpawnWorker,
    clients: list[Client], tmp_path: Path,
) -> None:  # fmt: skip
    """Redis refuses the result (OOM) but would take the ack: the entry must stay pending,
    so when the worker dies with the result only in its memory, another one runs it."""
    first = await spawn_worker(identity="w1", heartbeat_timeout=1.0, extra_args=["--redis-url", relay.url])
    client = client_on(clients, redis_url, key_prefix)
    marker = tmp_path / "m"
    handle = await client.start_activity(acts.sleep_for, 0.3, str(marker), task_queue=task_queue)
    await wait_for(lambda: started(marker), message="the activity never started")
    refused = relay.inject_error({"XADD"}, "OOM command not allowed when used memory > 'maxmemory'.")
    await wait_for(refused.fired.is_set, message="the result was never refused")
    await first.kill()
    refused.cancel()
    await spawn_worker(identity="w2", heartbeat_timeout=1.0)
    value, _ = await ends_within(handle.result(), 10.0)
    assert value == "w2"


async def test_d07_a_lost_reply_of_a_takeover_does_not_strand_what_it_took(
    relay: Relay, redis_url: str, key_prefix: str, task_queue: str, spawn_worker: SpawnWorker,
    start_worker: StartWorker, clients: list[Client], tmp_path: Path, redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    """A live worker takes over a dead one's activity, and the reply of that claim is lost:
    the entry is now in the live worker's pending list, and it must still run there."""
    # The claim must go as EVALSHA: a server that never ran the script gets it by EVAL
    # (scripts.py), which the rule below would not match.
    claim_sha = hashlib.sha1(source("claim_orphans").encode()).hexdigest()
    assert await redis_client.script_load(source("claim_orphans")) == claim_sha
    doomed = await spawn_worker(identity="doomed", heartbeat_timeout=1.0)
    client = client_on(clients, redis_url, key_prefix)
    marker = tmp_path / "m"
    handle = await client.start_activity(acts.sleep_for, 1.0, str(marker), task_queue=task_queue)
    await wait_for(lambda: started(marker), message="the activity never started")
    await doomed.kill()
    dropped = relay.drop_reply({f"EVALSHA {claim_sha}"}, nonempty=True)
    await start_worker(relay.url, identity="heir", heartbeat_timeout=1.0)
    value, _ = await ends_within(handle.result(), 15.0)
    assert value == "heir"
    assert dropped.fired.is_set(), "no claim reply was dropped: the test proved nothing"


async def test_s11_a_worker_restarted_under_the_same_identity_fails_its_callers_at_once(
    spawn_worker: SpawnWorker, start_worker: StartWorker, redis_url: str, key_prefix: str, task_queue: str,
    clients: list[Client], tmp_path: Path,
) -> None:  # fmt: skip
    """SIGKILL, and the same identity starts again as soon as the old heartbeat lapses: the
    heartbeat key is back, but the caller's session failed with the old process."""
    victim = await spawn_worker(identity="w1", heartbeat_timeout=1.0)
    client = client_on(clients, redis_url, key_prefix)
    session = await client.create_session(task_queue, SessionOptions(execution_timeout=60))
    marker = tmp_path / "m"
    running = await session.start_activity(acts.sleep_for, 60, str(marker))
    await wait_for(lambda: started(marker), message="the activity never started")
    await victim.kill()
    # The new process registers the moment the old heartbeat lapses: the caller's periodic
    # look at the heartbeat key (every 0.2 s) finds it present again.
    alive_key = QueueKeys(key_prefix, task_queue).alive("w1")
    direct = redis.asyncio.Redis.from_url(redis_url)
    try:
        while await direct.exists(alive_key):
            await asyncio.sleep(0.002)
    finally:
        await direct.aclose()
    await start_worker(redis_url, identity="w1", heartbeat_timeout=1.0)
    await raises_within(running.result(), sessionq.SessionFailedError, 5.0)


async def test_d02_a_cut_that_hits_every_worker_alike_reaps_none_of_them(
    relay: Relay, redis_url: str, key_prefix: str, task_queue: str, start_worker: StartWorker,
    clients: list[Client], redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    """Every worker loses Redis for longer than the heartbeat timeout, then all come back. The
    first one back must not reap the others, which are a moment behind: they were cut off by
    the same fault, not dead. No session fails, no running activity changes hands."""
    await start_worker(relay.url, identity="w1")
    await start_worker(relay.url, identity="w2")
    client = client_on(clients, redis_url, key_prefix)
    sessions = [await client.create_session(task_queue) for _ in range(2)]
    keys = QueueKeys(key_prefix, task_queue)
    registered = {w: await redis_client.hget(keys.worker(w), "registered") for w in ("w1", "w2")}
    relay.cut()
    await wait_for(lambda: _none_alive(redis_client, keys), timeout=HB + 3, message="the keys never lapsed")
    relay.heal()
    await asyncio.sleep(HB + 1)  # what a reaper needs to act (a pass every HB / 3): the aftermath
    for w in ("w1", "w2"):
        assert await redis_client.hget(keys.worker(w), "registered") == registered[w], f"{w} was reaped"
    for session in sessions:
        assert await session.execute_activity(acts.whoami) == session.info.worker_id
        await session.complete()


async def _none_alive(r: redis.asyncio.Redis, keys: QueueKeys) -> bool:
    return not await r.exists(keys.alive("w1"), keys.alive("w2"))


async def test_d11_a_restart_without_data_leaves_no_session_record_without_ttl(
    server: Any, key_prefix: str, task_queue: str, start_worker: StartWorker, clients: list[Client],
    tmp_path: Path,
) -> None:  # fmt: skip
    """The worker still holds sessions that ran activities when Redis comes back empty: its
    housekeeping must not re-create their records (without a TTL) to publish their counts."""
    worker = await start_worker(server.url, heartbeat_timeout=1.0)
    client = client_on(clients, server.url, key_prefix)
    session = await client.create_session(task_queue)
    for _ in range(3):
        await session.execute_activity(acts.whoami)
    await asyncio.to_thread(server.restart, False)
    direct = redis.asyncio.Redis.from_url(server.url)
    keys = QueueKeys(key_prefix, task_queue)
    try:
        await wait_for(lambda: direct.sismember(keys.workers, worker.worker_id), timeout=10,
                       message="the worker never registered again")  # fmt: skip
        await asyncio.sleep(1.0)  # a few housekeeping passes (every 0.33 s): the window of the bug
        assert not [k for k in await keys_without_ttl(direct, key_prefix) if ":session:" in k]
    finally:
        await direct.aclose()
