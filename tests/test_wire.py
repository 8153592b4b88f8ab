"""The hot path's connections (sessionq/wire.py): shared commands answered in order, blocking
reads on their own connection, and what a lost connection or an unknown script does."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import redis.exceptions as rexc

from sessionq.connection import connect, is_cluster_url
from sessionq.scripts import Scripts
from sessionq.wire import Wire
from tests import activities as acts
from tests.proxy import RedisProxy
from tests.test_sessions import make_worker

pytestmark = pytest.mark.cluster  # routing by key slot matters most there


@pytest_asyncio.fixture
async def wire(redis_url: str) -> AsyncIterator[Wire]:
    redis = connect(redis_url)
    wire = Wire(redis)
    yield wire
    await wire.aclose()
    await redis.aclose()


@pytest_asyncio.fixture
async def proxy(redis_url: str) -> AsyncIterator[RedisProxy]:
    if is_cluster_url(redis_url):
        pytest.skip("the relay fronts one server; a cluster client follows the nodes' own addresses")
    relay = RedisProxy(redis_url)
    await relay.start()
    yield relay
    await relay.close()


def key_of(key_prefix: str, name: str) -> str:
    return f"{key_prefix}:{{wire}}:{name}"


async def test_each_concurrent_command_gets_its_own_reply(wire: Wire, key_prefix: str) -> None:
    keys = [key_of(key_prefix, f"k{i}") for i in range(300)]
    await wire.execute_many(keys[0], [("SET", key, f"value {i}") for i, key in enumerate(keys)])
    replies = await asyncio.gather(*(wire.execute(key, "GET", key) for key in keys))
    assert replies == [f"value {i}".encode() for i in range(300)]


async def test_commands_issued_on_a_live_connection_run_in_issue_order(wire: Wire, key_prefix: str) -> None:
    counter = key_of(key_prefix, "counter")
    assert await wire.execute(counter, "EXISTS", counter) == 0  # connected (and routed, on a cluster)
    replies = await asyncio.gather(*(wire.execute(counter, "INCR", counter) for _ in range(500)))
    assert replies == list(range(1, 501))


async def test_an_error_reply_fails_only_its_own_command(wire: Wire, key_prefix: str) -> None:
    text = key_of(key_prefix, "text")
    first, bad, last = await asyncio.gather(
        wire.execute(text, "SET", text, "not a number"),
        wire.execute(text, "INCR", text),
        wire.execute(text, "GET", text),
        return_exceptions=True,
    )
    assert first == b"OK"
    assert isinstance(bad, rexc.ResponseError)
    assert last == b"not a number"


async def test_execute_many_writes_a_batch_and_raises_its_error_after_all_ran(
    wire: Wire, key_prefix: str
) -> None:
    items, text = key_of(key_prefix, "items"), key_of(key_prefix, "text2")
    assert await wire.execute_many(items, [("RPUSH", items, b"a", b"b"), ("LLEN", items)]) == [2, 2]
    with pytest.raises(rexc.ResponseError):
        await wire.execute_many(items, [("SET", text, "x"), ("INCR", text), ("RPUSH", items, b"c")])
    assert await wire.execute(items, "LLEN", items) == 3  # the command after the error ran


async def test_a_caller_that_stops_waiting_does_not_shift_later_replies(wire: Wire, key_prefix: str) -> None:
    one, two = key_of(key_prefix, "one"), key_of(key_prefix, "two")
    await wire.execute_many(one, [("SET", one, "1"), ("SET", two, "2")])
    abandoned = asyncio.ensure_future(wire.execute(one, "GET", one))
    await asyncio.sleep(0)  # written; its reply has not been read yet
    abandoned.cancel()
    assert await wire.execute(two, "GET", two) == b"2"
    assert await wire.execute(one, "GET", one) == b"1"


async def test_blocking_read_has_its_own_connection(wire: Wire, key_prefix: str) -> None:
    """A blocked read does not hold up commands on the shared connection."""
    queue = key_of(key_prefix, "queue")
    reader = wire.blocking(queue, 5)
    popped = asyncio.ensure_future(reader.execute("BLPOP", queue, 5))
    await asyncio.sleep(0.05)
    assert not popped.done()
    assert await wire.execute(queue, "RPUSH", queue, b"job") == 1  # not stuck behind the BLPOP
    assert await asyncio.wait_for(popped, 5) == [queue.encode(), b"job"]


async def test_a_cut_connection_fails_commands_in_flight_then_reconnects(
    proxy: RedisProxy, key_prefix: str
) -> None:
    redis = connect(proxy.url)
    wire = Wire(redis)
    key = key_of(key_prefix, "cut")
    try:
        assert await wire.execute(key, "SET", key, "before") == b"OK"
        in_flight = asyncio.ensure_future(wire.execute(key, "GET", key))
        blocked = asyncio.ensure_future(wire.blocking(key + ":q", 5).execute("BLPOP", key + ":q", 5))
        await asyncio.sleep(0)  # both written, neither answered: the relay has not run yet
        proxy.cut()
        with pytest.raises(rexc.ConnectionError):
            await asyncio.wait_for(in_flight, 5)
        with pytest.raises(rexc.ConnectionError):
            await asyncio.wait_for(blocked, 5)
        with pytest.raises(rexc.ConnectionError):
            await wire.execute(key, "GET", key)  # Redis is away: fails at once, no hang
        proxy.resume()
        assert await wire.execute(key, "GET", key) == b"before"
        assert await wire.blocking(key + ":q", 5).execute("LPUSH", key + ":q", b"x") == 1
    finally:
        await wire.aclose()
        await redis.aclose()


async def test_a_script_the_server_does_not_know_is_sent_whole(wire: Wire, key_prefix: str) -> None:
    """EVALSHA of a script the server lacks (first use, a restart, a new cluster node) falls
    back to EVAL once, which also caches it."""
    scripts = Scripts(wire)
    scripts._shas["heartbeat"] = uuid.uuid4().hex[:40].ljust(40, "0")  # a SHA no server knows
    k = key_of(key_prefix, "hb")
    reply = await scripts.run("heartbeat", [k + ":workers", k + ":worker", k + ":alive"], ["w", 1000, 0, 0])
    assert reply == 0  # the script ran: this worker is not registered


async def test_client_and_worker_on_an_in_process_fakeredis() -> None:
    """How users test their own activities: a fakeredis.aioredis.FakeRedis passed to Client
    and Worker (its connections are fake sockets, driven directly by the hot path too)."""
    import fakeredis

    from sessionq import Client, Worker

    server, key_prefix = fakeredis.FakeServer(), "sqt" + uuid.uuid4().hex[:10]  # a private server
    worker = Worker(
        fakeredis.aioredis.FakeRedis(server=server), task_queue="q", activities=[acts.echo],
        enable_sessions=True, prefix=key_prefix,
    )  # fmt: skip
    async with worker, Client(fakeredis.aioredis.FakeRedis(server=server), prefix=key_prefix) as client:
        assert (
            await asyncio.wait_for(client.execute_activity(acts.echo, "plain", task_queue="q"), 10) == "plain"
        )
        async with client.create_session("q") as session:
            assert await asyncio.wait_for(session.execute_activity(acts.echo, "pinned"), 10) == "pinned"
            assert session.info.worker_id == worker.worker_id


async def test_a_session_used_after_its_client_closed_says_so_at_once(
    redis_url: str, key_prefix: str
) -> None:
    """No retrying against a Redis that is fine: closing the client completed its session,
    and the client itself refuses new calls at once, saying it was closed."""
    from sessionq import Client, SessionCompletedError, SessionqError

    async with make_worker(redis_url, key_prefix, "q", "w1"):
        client = Client(redis_url, prefix=key_prefix)
        session = await client.create_session("q")
        await client.close()
        with pytest.raises(SessionCompletedError):
            await asyncio.wait_for(session.execute_activity(acts.echo, 1), 2)
        with pytest.raises(SessionqError, match="closed"):
            await asyncio.wait_for(client.execute_activity(acts.echo, 1, task_queue="q"), 2)
