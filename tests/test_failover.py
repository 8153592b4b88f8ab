"""High availability: a Redis Cluster master SIGKILLed under live Clients and Workers.

Each test starts a private cluster of three masters with one replica each (free loopback
ports, cluster-node-timeout 1 s, so a replica takes over about 2 s after its master
dies), runs a worker and a caller on it, and kills the master that holds the task
queue's slot. What must hold: the Client and Worker that were running carry on without a
restart (they learn the new slot map on their own), every call ends in a result or a
clear SessionqError within a stated bound, and no slot leaks.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import sessionq
from sessionq.keys import QueueKeys
from tests import activities as acts
from tests.cluster import LocalCluster, cluster_tools, sync_cluster
from tests.helpers import failover_worker, wait_for, wait_replicated

NODE_TIMEOUT_MS = 1000
RECOVERY_BOUND_S = 12.0
"""A call made after the kill gets its answer within this: the failover (node timeout plus
the election, about 2 s here) plus the caller's retry backoff, well inside the 15 s a call
keeps retrying before RedisUnavailableError."""


@pytest.fixture
def ha_cluster() -> Iterator[LocalCluster]:
    missing = cluster_tools()
    if missing:
        pytest.skip(f"no redis-server to start a cluster with ({missing})")
    cluster = LocalCluster(replicas=1, node_timeout_ms=NODE_TIMEOUT_MS)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def a_worker(url: object, prefix: str, queue: str, identity: str) -> sessionq.Worker:
    return failover_worker(url, prefix, queue, identity, heartbeat_timeout=10.0)


async def test_existing_client_and_worker_follow_a_failover_of_the_queues_master(
    ha_cluster: LocalCluster,
) -> None:
    """SIGKILL of the master holding the queue: its replica takes over, and the Client and
    Worker that were running reach it without a restart. A plain and a session activity
    started after the kill get their results within RECOVERY_BOUND_S, the session stays
    OPEN (its worker lived), complete() frees its slot, and a new session can be had."""
    url, prefix, queue = ha_cluster.url, "sqt" + uuid.uuid4().hex[:8], "ha"
    k = QueueKeys(prefix, queue)
    async with a_worker(url, prefix, queue, "w1"), sessionq.Client(url, prefix=prefix) as client:
        session = await client.create_session(queue, sessionq.SessionOptions(creation_timeout=10))
        assert await session.execute_activity(acts.echo, "before") == "before"
        assert await client.execute_activity(acts.echo, 1, task_queue=queue) == 1
        await asyncio.to_thread(wait_all_replicated, ha_cluster, k.tasks)

        dead = await asyncio.to_thread(ha_cluster.kill_master_of, k.tasks)
        killed_at = time.monotonic()
        plain = await asyncio.wait_for(
            client.execute_activity(acts.echo, 2, task_queue=queue), RECOVERY_BOUND_S
        )
        plain_s = time.monotonic() - killed_at
        in_session = await asyncio.wait_for(session.execute_activity(acts.echo, "after"), RECOVERY_BOUND_S)
        assert (plain, in_session) == (2, "after")
        new_master = ha_cluster.master_port_of(k.tasks)
        assert new_master is not None and new_master != dead
        assert session.state is sessionq.SessionState.OPEN

        await session.complete()
        with sync_cluster(url) as sync:
            assert sync.hget(k.session(session.session_id), "state") == b"COMPLETED"
            await wait_for(
                lambda: sync.hget(k.worker("w1"), "open") == b"0", message="the slot was not given back"
            )
        again = await client.create_session(queue, sessionq.SessionOptions(creation_timeout=10))
        assert await again.execute_activity(acts.whoami) == "w1"
        await again.complete()
    print(f"plain activity answered {plain_s:.2f}s after the master was killed")


async def test_calls_in_flight_when_the_master_dies_get_their_results(
    ha_cluster: LocalCluster, tmp_path: Path
) -> None:
    """Plain and session activities running when the queue's master is SIGKILLed: their
    tasks had reached the replica, so none is lost; each caller gets its result within the
    activity's time plus RECOVERY_BOUND_S, and no slot is left taken."""
    url, prefix, queue = ha_cluster.url, "sqt" + uuid.uuid4().hex[:8], "ha"
    k = QueueKeys(prefix, queue)
    async with a_worker(url, prefix, queue, "w1"), sessionq.Client(url, prefix=prefix) as client:
        session = await client.create_session(queue, sessionq.SessionOptions(creation_timeout=10))
        markers = [str(tmp_path / f"m{i}") for i in range(13)]
        plain = [await client.start_activity(acts.sleep_for, 3, m, task_queue=queue) for m in markers[:10]]
        in_session = [await session.start_activity(acts.sleep_for, 3, m) for m in markers[10:]]
        await wait_for(lambda: all(Path(m + ".started").exists() for m in markers), message="not all started")
        await asyncio.to_thread(wait_all_replicated, ha_cluster, k.tasks)
        await asyncio.to_thread(ha_cluster.kill_master_of, k.tasks)
        results = await asyncio.wait_for(
            asyncio.gather(*(h.result() for h in plain + in_session)), 3 + RECOVERY_BOUND_S
        )
        assert results == ["w1"] * 13
        await session.complete()
        with sync_cluster(url) as sync:
            await wait_for(
                lambda: sync.hget(k.worker("w1"), "open") == b"0", message="the slot was not given back"
            )


def wait_all_replicated(cluster: LocalCluster, key: str, timeout_ms: int = 5000) -> None:
    """Until the replica of `key`'s master acknowledged every write so far (a write, then
    WAIT on its connection: see `wait_replicated`)."""
    with sync_cluster(cluster.url) as sync:
        node = sync.get_node_from_key(key)
    assert wait_replicated(node.host, node.port, key, timeout_ms) == 1, "the replica did not catch up"


def test_the_replication_guard_waits_for_a_replica_that_lags(ha_cluster: LocalCluster) -> None:
    """wait_all_replicated passes only once the replica has every write: with the replica
    stopped (SIGSTOP, a replica that lags) it says so, and it passes once the replica runs
    again. A WAIT sent first on a fresh redis-py 5.0.8 connection passed at once, whatever
    the replica had, so the tests above could kill a master whose replica lacked writes."""
    key = "sqt" + uuid.uuid4().hex[:8] + ":{ha}:tasks"
    with sync_cluster(ha_cluster.url) as sync:
        node = sync.get_node_from_key(key)
        sync.set(key, "x")
    import redis

    with redis.Redis(host=node.host, port=node.port) as master:
        replica = int(master.info("replication")["slave0"]["port"])
        stopped = ha_cluster.by_port[replica]
        stopped.send_signal(signal.SIGSTOP)
        try:
            master.set(key, "written while the replica is stopped")
            with pytest.raises(AssertionError, match="did not catch up"):
                wait_all_replicated(ha_cluster, key, timeout_ms=300)
        finally:
            stopped.send_signal(signal.SIGCONT)
    wait_all_replicated(ha_cluster, key)
