"""Redis Cluster specifics: URL forms, queues spread over masters, connections used.

The session behaviours themselves (S01-S19, D01, D06) run on the cluster through the
``cluster`` backend of ``redis_url`` (test_sessions.py and test_faults.py opt in with
``pytest.mark.cluster``). These tests check what only a cluster has, so they take the
``cluster_url`` fixture directly and run once, on the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
import redis
from redis.asyncio.cluster import RedisCluster

import sessionq
from sessionq.connection import as_cluster_url, connect, split_cluster_url
from sessionq.keys import QueueKeys
from sessionq.wire import Wire
from tests import activities as acts
from tests.cluster import move_slot, sync_cluster
from tests.helpers import wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture
def prefix(cluster_url: str) -> Iterator[str]:
    from tests.conftest import delete_keys

    name = "sqt" + uuid.uuid4().hex[:10]
    yield name
    delete_keys(cluster_url, f"{name}:*")


def worker(url: object, prefix: str, queue: str, identity: str, **options: object) -> sessionq.Worker:
    return sessionq.Worker(
        url,
        task_queue=queue,
        activities=acts.ALL,
        enable_sessions=True,
        identity=identity,
        heartbeat_timeout=2.0,
        shutdown_grace=2.0,
        prefix=prefix,
        **options,  # type: ignore[arg-type]
    )


def queue_on_each_master(url: str, prefix: str) -> dict[str, str]:
    """{master "host:port": a queue name whose slot it holds}, one per master."""
    found: dict[str, str] = {}
    with sync_cluster(url) as client:
        masters = {f"{n.host}:{n.port}" for n in client.get_primaries()}
        for i in range(10_000):
            node = client.get_node_from_key(QueueKeys(prefix, f"q{i}").tasks)
            found.setdefault(f"{node.host}:{node.port}", f"q{i}")
            if len(found) == len(masters):
                return found
    raise AssertionError("no queue name found for some master")


def keys_by_master(url: str, prefix: str) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    with sync_cluster(url) as client:
        for node in client.get_primaries():
            with redis.Redis(host=node.host, port=node.port) as conn:
                out[f"{node.host}:{node.port}"] = list(conn.scan_iter(match=f"{prefix}:*"))
    return out


# --- URLs ------------------------------------------------------------------------------


def test_cluster_url_lists_several_nodes_with_credentials_and_options() -> None:
    single, nodes = split_cluster_url("rediss+cluster://u:p%40w@h1:7000,h2,[::1]:7002/0?max_connections=7")
    assert nodes == [("h1", 7000), ("h2", 6379), ("::1", 7002)]
    assert single == "rediss://u:p%40w@h1:7000/0?max_connections=7"
    client = connect("rediss+cluster://u:p%40w@h1:7000,h2:7001?max_connections=7&pool_timeout=3")
    assert isinstance(client, RedisCluster)
    assert client.connection_kwargs["password"] == "p@w"
    assert client.connection_kwargs["max_connections"] == 7
    assert "pool_timeout" not in client.connection_kwargs  # accepted, and has no effect
    assert list(client.nodes_manager.startup_nodes) == ["h1:7000", "h2:7001"]


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis+cluster://h1:7000/3", "only database 0"),
        ("redis+cluster://", "names no node"),
        ("redis+cluster://h1:port", "bad port"),
    ],
)
def test_cluster_url_mistakes_raise_configuration_error(url: str, complaint: str) -> None:
    with pytest.raises(sessionq.ConfigurationError, match=complaint):
        sessionq.Client(url)


def test_cluster_flag_rewrites_a_plain_url() -> None:
    assert as_cluster_url("redis://h:7000/0") == "redis+cluster://h:7000/0"
    assert as_cluster_url("rediss://h:7000") == "rediss+cluster://h:7000"
    assert as_cluster_url("redis+cluster://h:7000") == "redis+cluster://h:7000"
    with pytest.raises(sessionq.ConfigurationError):
        as_cluster_url("unix:///tmp/redis.sock")


# --- queues over masters -----------------------------------------------------------------


async def test_cluster_each_queue_lives_on_one_master_and_queues_spread(
    cluster_url: str, prefix: str
) -> None:
    """One queue per master, a session and plain work on each: every key of a queue sits on
    that queue's master, in one slot, and every master holds one queue."""
    placement = queue_on_each_master(cluster_url, prefix)
    workers = [worker(cluster_url, prefix, q, f"w-{q}") for q in placement.values()]
    async with sessionq.Client(cluster_url, prefix=prefix) as client:
        for w in workers:
            await w.__aenter__()
        try:
            for q in placement.values():
                async with client.create_session(q) as session:
                    assert await session.execute_activity(acts.whoami) == f"w-{q}"
                assert await client.execute_activity(acts.echo, q, task_queue=q) == q
        finally:
            for w in workers:
                await w.__aexit__(None, None, None)
    found = keys_by_master(cluster_url, prefix)
    with sync_cluster(cluster_url) as c:
        for master, queue in placement.items():
            base = QueueKeys(prefix, queue).base.encode()
            mine = [k for k in found[master] if k.startswith(base)]
            assert mine, f"no key of queue {queue} on {master}"
            assert {c.keyslot(k) for k in mine} == {c.keyslot(QueueKeys(prefix, queue).tasks)}
            elsewhere = [k for m, ks in found.items() if m != master for k in ks if k.startswith(base)]
            assert not elsewhere, f"keys of {queue} on other masters: {elsewhere}"


async def test_cluster_client_and_worker_accept_a_redis_cluster_instance(
    cluster_url: str, prefix: str
) -> None:
    """A user's RedisCluster (here decoding replies to str) is taken as connection settings."""
    _, nodes = split_cluster_url(cluster_url)
    from redis.asyncio.cluster import ClusterNode

    user = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], decode_responses=True)
    try:
        async with (
            worker(user, prefix, "inst", "w1"),
            sessionq.Client(user, prefix=prefix) as client,
            client.create_session("inst") as session,
        ):
            assert await session.execute_activity(acts.echo, b"raw") == b"raw"
    finally:
        await user.aclose()


# --- connections -------------------------------------------------------------------------


@pytest_asyncio.fixture
async def busy_worker(cluster_url: str, prefix: str) -> AsyncIterator[str]:
    async with worker(cluster_url, prefix, "conn", "w1", max_concurrent_activities=300):
        yield "conn"


async def test_cluster_many_waiting_calls_share_a_few_connections(
    cluster_url: str, prefix: str, busy_worker: str
) -> None:
    """200 concurrent calls through a client allowed 4 connections all succeed: their
    result waits share one blocking pop, and the sends queue for a free connection."""
    name = f"{prefix}-caller"
    url = f"{cluster_url}?max_connections=4&client_name={name}"
    async with sessionq.Client(url, prefix=prefix) as client:
        calls = [client.execute_activity(acts.sleep_for, 0.3, task_queue=busy_worker) for _ in range(200)]
        assert len(await asyncio.wait_for(asyncio.gather(*calls), 20)) == 200
        opened = connections_named(cluster_url, name)
    assert opened, "the caller's connections were not seen"
    assert max(opened.values()) <= 4 + 1, opened  # + the one redis-py keeps from CLUSTER SLOTS


def connections_named(url: str, name: str) -> dict[str, int]:
    """{master: connections open with this client name}, as the servers see them."""
    with sync_cluster(url) as client:
        return {
            f"{n.host}:{n.port}": sum(c.get("name") == name for c in client.client_list(target_nodes=n))
            for n in client.get_primaries()
        }


async def test_cluster_slot_map_relearnt_by_many_commands_at_once(cluster_url: str) -> None:
    """Many commands that relearn the slot map at once (redirected or failed together, as in
    a failover or a resharding) all get a map: one load runs at a time, not several that
    trip over each other. With two unreachable startup nodes first, the loads interleave:
    on redis-py 5.0.8 concurrent loads failed with "RuntimeError: dictionary changed size
    during iteration" (redis-py issue 3565; it failed the slot-migration test now and then)."""
    from tests.ports import release, reserve_ports

    _, nodes = split_cluster_url(cluster_url)
    dead = reserve_ports(2)  # reserved and never listened on: connection refused
    try:
        hosts = ",".join(f"127.0.0.1:{p}" for p in dead) + "," + ",".join(f"{h}:{p}" for h, p in nodes)
        for _ in range(5):
            redis_client = connect(f"redis+cluster://{hosts}")
            wire = Wire(redis_client)
            try:
                loads = await asyncio.gather(
                    *(wire.relearn_slots() for _ in range(20)), return_exceptions=True
                )
                failed = [r for r in loads if isinstance(r, BaseException)]
                assert not failed, failed
                assert await wire.execute("{x}k", "EXISTS", "{x}k") == 0
            finally:
                await wire.aclose()
                await redis_client.aclose()
    finally:
        release(*dead)


async def test_cluster_pool_settings_in_the_url_bound_nothing_sessionq_sends(
    cluster_url: str, prefix: str, busy_worker: str
) -> None:
    """A URL allowing one pooled connection, with a short pool_timeout: 50 concurrent calls
    and their waits all succeed (no command of sessionq's takes a pool connection)."""
    url = f"{cluster_url}?max_connections=1&pool_timeout=0.3"
    async with sessionq.Client(url, prefix=prefix) as client:
        calls = [client.execute_activity(acts.sleep_for, 0.5, task_queue=busy_worker) for _ in range(50)]
        assert len(await asyncio.wait_for(asyncio.gather(*calls), 20)) == 50


async def test_cluster_hot_path_follows_a_slot_moved_to_another_master(cluster_url: str, prefix: str) -> None:
    """Resharding: once a queue's slot moves, the hot path's commands reach the new master.
    The old one answers MOVED; the wire learns the slot map again and resends the command
    (raw reply and all, as on the way there). The slot moves three times, so that each path (shared
    connection, batch, blocking read) is the first to meet the MOVED once; then a move is
    caught halfway, where the old owner answers ASK."""
    redis_client = connect(cluster_url)
    wire = Wire(redis_client)
    value, items = f"{prefix}:{{{prefix}-moving}}:value", f"{prefix}:{{{prefix}-moving}}:items"
    slot = redis_client.keyslot(value)
    masters = sorted(keys_by_master(cluster_url, prefix))
    reader = wire.blocking(items, 1)

    async def move_to_next_master() -> str:
        here = (await wire._node_for(value)).name
        target = masters[(masters.index(here) + 1) % len(masters)]
        assert await asyncio.to_thread(move_slot, cluster_url, slot, target) == here
        return target

    try:
        assert await wire.execute(value, "SET", value, "v1") == b"OK"  # connected to the first owner
        assert await reader.execute("LLEN", items) == 0

        target = await move_to_next_master()
        assert await wire.execute(value, "GET", value) == b"v1"
        assert (await wire._node_for(value)).name == target, "the slot map was not relearned"

        target = await move_to_next_master()
        assert await wire.execute_many(value, [("SET", value, "v2"), ("GET", value)]) == [b"OK", b"v2"]
        assert (await wire._node_for(value)).name == target

        await wire.execute(items, "RPUSH", items, b"x")  # before the move: lands on the owner
        target = await move_to_next_master()
        assert await reader.execute("BLPOP", items, 1) == [items.encode(), b"x"]
        assert (await wire._node_for(value)).name == target
        assert await wire.execute(value, "GET", value) == b"v2"

        # Mid-migration: the keys already sit on the next master, the old owner answers ASK.
        here = target
        target = masters[(masters.index(here) + 1) % len(masters)]
        await asyncio.to_thread(move_slot, cluster_url, slot, target, finish=False)
        assert await wire.execute(value, "GET", value) == b"v2"
        assert await wire.execute_many(value, [("GET", value), ("EXISTS", value)]) == [b"v2", 1]
        with pytest.raises(redis.exceptions.TryAgainError, match="being migrated"):
            await reader.execute("LLEN", items)  # a worker's poll loop retries this shortly
        await asyncio.to_thread(move_slot, cluster_url, slot, target)
        assert await reader.execute("LLEN", items) == 0  # MOVED: relearned, reconnected
        assert (await wire._node_for(value)).name == target
    finally:
        await wire.aclose()
        await redis_client.aclose()


async def test_cluster_complete_during_a_slot_migration_changes_nothing_until_it_can_run_whole(
    cluster_url: str, prefix: str
) -> None:
    """A slot caught mid-migration, every key end_session declares still on the old owner
    but the worker's record already moved: the script reaches that record only from inside.
    It declares a key that never exists, so Redis refuses to start it (TRYAGAIN) rather
    than failing halfway with COMPLETED written and the slot kept; complete() retries and,
    once the migration ends, completes and frees the slot."""
    queue = "mig"
    k = QueueKeys(prefix, queue)
    options = sessionq.SessionOptions(creation_timeout=30)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(worker(cluster_url, prefix, queue, "w1", max_concurrent_sessions=1))
        client = await stack.enter_async_context(sessionq.Client(cluster_url, prefix=prefix))
        session = await client.create_session(queue, options)
        assert session.info.worker_id == "w1"
        await stack.enter_async_context(worker(cluster_url, prefix, queue, "w2", max_concurrent_sessions=2))
        # A caller waiting to recreate a session on the full w1: the line's keys exist.
        recreating = asyncio.ensure_future(
            client.recreate_session(session.info.recreate_token, options).open()
        )
        declared = [k.session(session.session_id), k.free, k.waiters, k.tickets, k.deadlines]
        with sync_cluster(cluster_url) as sync:
            await wait_for(lambda: sync.exists(*declared) == len(declared), message="the line never formed")
            slot = sync.keyslot(k.tasks)
            owner = sync.nodes_manager.slots_cache[slot][0]
            here = f"{owner.host}:{owner.port}"
            target = next(f"{n.host}:{n.port}" for n in sync.get_primaries() if f"{n.host}:{n.port}" != here)
            assert sync.hget(k.worker("w1"), "open") == b"1"
        await asyncio.to_thread(move_slot, cluster_url, slot, target, finish=False, only=[k.worker("w1")])
        try:
            completing = asyncio.ensure_future(session.complete())
            done, _ = await asyncio.wait({completing}, timeout=1.0)
            assert not done, f"complete() ended while the slot was half migrated: {completing}"
            with redis.Redis(host=here.split(":")[0], port=int(here.split(":")[1])) as old_owner:
                assert old_owner.hget(k.session(session.session_id), "state") == b"OPEN", "written halfway"
        finally:  # the cluster is shared: never leave the slot half migrated
            await asyncio.to_thread(move_slot, cluster_url, slot, target)
        await asyncio.wait_for(completing, 15)
        assert session.info.state is sessionq.SessionState.COMPLETED
        recreated = await asyncio.wait_for(recreating, 15)  # the freed slot went to the waiter
        assert recreated.info.worker_id == "w1"
        with sync_cluster(cluster_url) as sync:
            assert sync.hget(k.session(session.session_id), "state") == b"COMPLETED"
        await recreated.complete()
        with sync_cluster(cluster_url) as sync:
            assert sync.hget(k.worker("w1"), "open") == b"0", "a slot was not given back"
