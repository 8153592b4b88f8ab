"""Session resources (SEMANTICS R01-R04): typed capacity per worker, claimed atomically per
session, given back exactly once; FIFO among requests that fit, and no starvation.

Workers are real processes (`spawn_worker`); a worker's death is a SIGKILL.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio

import sessionq
from sessionq import Client, ConfigurationError, SessionCreationTimeoutError, SessionOptions, Worker
from sessionq.keys import QueueKeys
from tests import activities as acts
from tests.helpers import SpawnWorker, WorkerProcess, WorkerStartError, wait_for
from tests.test_cli import inspect_json, run_cli

pytestmark = pytest.mark.cluster  # placement and the waiting line also run on the Redis Cluster backend

HB = 1.0


def asking(creation_timeout: float = 10.0, **amounts: int) -> SessionOptions:
    return SessionOptions(resources=amounts, creation_timeout=creation_timeout)


async def offering(
    spawn_worker: SpawnWorker, identity: str, *resources: str, **options: Any
) -> WorkerProcess:
    """A worker process offering `resources` ("gpu=2", ...)."""
    extra = [arg for item in resources for arg in ("--resource", item)]
    return await spawn_worker(identity=identity, heartbeat_timeout=HB, extra_args=extra, **options)


async def used(r: redis.asyncio.Redis, keys: QueueKeys, worker_id: str, name: str) -> int:
    return int(await r.hget(keys.worker(worker_id), f"u:{name}") or 0)


def creator(client: Client, task_queue: str, options: SessionOptions) -> asyncio.Task[sessionq.Session]:
    return asyncio.create_task(client.create_session(task_queue, options).open())


async def queued(r: redis.asyncio.Redis, keys: QueueKeys, count: int) -> None:
    async def enough() -> bool:
        return int(await r.zcard(keys.waiters)) >= count

    await wait_for(enough, timeout=10, message=f"{count} waiting ticket(s)")


# --- R01: placed only where every amount fits; check and claim are one step -------------------


async def test_r01_a_session_lands_only_where_every_amount_fits(
    spawn_worker: SpawnWorker, client: Client, task_queue: str, keys: QueueKeys,
    redis_client: redis.asyncio.Redis, redis_url: str, key_prefix: str,
) -> None:  # fmt: skip
    await offering(spawn_worker, "small", "gpu=1")
    await offering(spawn_worker, "big", "gpu=2", "scratch_gb=100")
    await offering(spawn_worker, "none")
    both = await client.create_session(task_queue, asking(gpu=1, scratch_gb=50))
    assert both.info.worker_id == "big" and both.info.resources == {"gpu": 1, "scratch_gb": 50}
    assert await both.execute_activity(acts.session_resources) == {
        "gpu": 1,
        "scratch_gb": 50,
    }  # as it sees them
    one = await client.create_session(task_queue, asking(gpu=1))  # least taken: small (0/1) over big (1/2)
    assert one.info.worker_id == "small"
    with pytest.raises(SessionCreationTimeoutError, match="free"):  # small 1/1, big 1/2 but scratch 50/100
        await client.create_session(task_queue, asking(creation_timeout=0.5, gpu=1, scratch_gb=60))
    last = await client.create_session(task_queue, asking(gpu=1, scratch_gb=50))
    assert last.info.worker_id == "big"
    assert (
        await used(redis_client, keys, "big", "gpu"),
        await used(redis_client, keys, "big", "scratch_gb"),
    ) == (2, 100)
    doc = await inspect_json(redis_url, key_prefix, "workers", "-Q", task_queue)
    by_id = {w["identity"]: w for w in doc["workers"]}
    assert by_id["big"]["resources"] == {
        "gpu": {"used": 2, "total": 2},
        "scratch_gb": {"used": 100, "total": 100},
    }
    assert by_id["none"]["resources"] == {}
    plain = await client.create_session(task_queue)  # asks for nothing: any worker with a slot
    assert plain.info.resources == {}
    for session in (both, one, last, plain):
        await session.complete()
    assert (
        await used(redis_client, keys, "big", "gpu") == 0
        and await used(redis_client, keys, "small", "gpu") == 0
    )


async def test_r01_racing_creators_never_over_commit(
    spawn_worker: SpawnWorker, client: Client, task_queue: str, keys: QueueKeys,
    redis_client: redis.asyncio.Redis, redis_url: str, key_prefix: str,
) -> None:  # fmt: skip
    await offering(spawn_worker, "w1", "gpu=3")
    await offering(spawn_worker, "w2", "gpu=2")
    others = [Client(redis_url, prefix=key_prefix) for _ in range(3)]
    try:
        attempts = [
            c.create_session(task_queue, asking(creation_timeout=1.0, gpu=1)).open()
            for c in (client, *others)
            for _ in range(10)
        ]
        outcomes = await asyncio.gather(*attempts, return_exceptions=True)
        won = [o for o in outcomes if isinstance(o, sessionq.Session)]
        lost = [o for o in outcomes if not isinstance(o, sessionq.Session)]
        assert len(won) == 5 and all(isinstance(e, SessionCreationTimeoutError) for e in lost)
        assert sorted(s.info.worker_id for s in won) == ["w1", "w1", "w1", "w2", "w2"]
        assert (
            await used(redis_client, keys, "w1", "gpu") == 3
            and await used(redis_client, keys, "w2", "gpu") == 2
        )
        await asyncio.gather(*(s.complete() for s in won))
        assert (
            await used(redis_client, keys, "w1", "gpu") == 0
            and await used(redis_client, keys, "w2", "gpu") == 0
        )
    finally:
        await asyncio.gather(*(c.close() for c in others))


# --- R02: capacity given back exactly once ------------------------------------------------------


async def test_r02_capacity_is_given_back_exactly_once_on_complete_failure_expiry_and_death(
    spawn_worker: SpawnWorker, client: Client, task_queue: str, keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    worker = await offering(spawn_worker, "w1", "gpu=2")
    completed = await client.create_session(task_queue, asking(gpu=2))
    await completed.complete()
    await completed.complete()  # idempotent: nothing given back twice
    assert await used(redis_client, keys, "w1", "gpu") == 0
    expiring = await client.create_session(
        task_queue, SessionOptions(resources={"gpu": 1}, execution_timeout=1.0, creation_timeout=5)
    )
    failing = await client.create_session(task_queue, asking(gpu=1))
    with pytest.raises(SessionCreationTimeoutError):
        await client.create_session(task_queue, asking(creation_timeout=0.3, gpu=1))

    async def expired() -> bool:
        return bool(await redis_client.hget(keys.session(expiring.session_id), "state") == b"FAILED")

    await wait_for(expired, timeout=10, message="the session expired")
    assert await used(redis_client, keys, "w1", "gpu") == 1  # the expired one's gpu is back, once
    await expiring.complete()
    assert await used(redis_client, keys, "w1", "gpu") == 1
    await worker.kill()  # the failing session's worker dies holding a gpu
    with pytest.raises(sessionq.SessionFailedError):
        await failing.execute_activity(acts.whoami)
    await failing.complete()
    replacement = await offering(spawn_worker, "w2", "gpu=2")
    again = [await client.create_session(task_queue, asking(gpu=1)) for _ in range(2)]
    assert {s.info.worker_id for s in again} == {replacement.worker_id}
    assert await used(redis_client, keys, "w2", "gpu") == 2


async def test_r01_placement_looks_only_at_who_offers_the_resource_and_follows_them_in_and_out(
    spawn_worker: SpawnWorker, client: Client, task_queue: str, keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    """A session asking for a resource is placed by looking at the workers that offer it (an
    index, so a few GPU boxes in a fleet of a thousand cost what a few cost): a worker is in
    it while it is registered, and leaves it when it is reaped."""
    await spawn_worker(identity="plain", heartbeat_timeout=HB)
    gpu = await offering(spawn_worker, "gpu-1", "gpu=1")
    assert await redis_client.smembers(keys.resource_index("gpu")) == {b"gpu-1"}
    first = await client.create_session(task_queue, asking(gpu=1))
    assert first.info.worker_id == "gpu-1"
    await first.complete()
    await gpu.kill()

    async def unindexed() -> bool:
        return not await redis_client.exists(keys.resource_index("gpu"))

    await wait_for(unindexed, timeout=10, message="the dead worker stayed in the resource index")
    await offering(spawn_worker, "gpu-2", "gpu=1")
    assert await redis_client.smembers(keys.resource_index("gpu")) == {b"gpu-2"}
    second = await client.create_session(task_queue, asking(gpu=1))
    assert second.info.worker_id == "gpu-2"
    await second.complete()
    # The index lost (evicted, deleted by hand): placement still finds the worker, and the
    # queue's audit puts it back.
    await redis_client.delete(keys.resource_index("gpu"))
    third = await client.create_session(task_queue, asking(gpu=1))
    assert third.info.worker_id == "gpu-2"
    await third.complete()
    await redis_client.zadd(keys.beats, {"scan": 0})  # the audit is due now

    async def indexed_again() -> bool:
        return await redis_client.smembers(keys.resource_index("gpu")) == {b"gpu-2"}

    await wait_for(indexed_again, timeout=10, message="the audit did not rebuild the resource index")


# --- R03: first come, first served among requests that fit; no starvation -----------------------


async def test_r03_waiting_requests_are_served_in_order_and_one_that_fits_nowhere_blocks_no_other(
    spawn_worker: SpawnWorker, client: Client, task_queue: str, keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    await offering(spawn_worker, "gpus", "gpu=1")
    await offering(spawn_worker, "disks", "scratch_gb=10")
    holder = await client.create_session(task_queue, asking(gpu=1))
    first = creator(client, task_queue, asking(gpu=1))
    await queued(redis_client, keys, 1)
    second = creator(client, task_queue, asking(gpu=1))
    await queued(redis_client, keys, 2)
    other = await asyncio.wait_for(client.create_session(task_queue, asking(scratch_gb=5)).open(), 5)
    assert other.info.worker_id == "disks"  # fits elsewhere: not blocked by the gpu line
    await holder.complete()
    got_first = await asyncio.wait_for(first, 5)
    assert not second.done()  # first come, first served
    await got_first.complete()
    got_second = await asyncio.wait_for(second, 5)
    for session in (other, got_second):
        await session.complete()


async def test_r03_a_large_request_is_never_starved_by_later_small_ones(
    spawn_worker: SpawnWorker, client: Client, task_queue: str, keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    await offering(spawn_worker, "w1", "gpu=2")
    small = [await client.create_session(task_queue, asking(gpu=1)) for _ in range(2)]
    big = creator(client, task_queue, asking(gpu=2))
    await queued(redis_client, keys, 1)
    later = creator(client, task_queue, asking(gpu=1))
    await queued(redis_client, keys, 2)
    await small[0].complete()  # one gpu frees: it is kept for the large request, not handed to `later`
    await asyncio.sleep(0.3)
    assert not later.done() and not big.done()
    with pytest.raises(SessionCreationTimeoutError):  # nor to a newcomer
        await client.create_session(task_queue, asking(creation_timeout=0.3, gpu=1))
    await small[1].complete()
    got_big = await asyncio.wait_for(big, 5)
    assert got_big.info.resources == {"gpu": 2}
    token = got_big.info.recreate_token
    await got_big.complete()
    got_later = await asyncio.wait_for(later, 5)
    await got_later.complete()
    again = await client.recreate_session(token)  # the same resources as the session that gave it
    assert again.info.resources == {"gpu": 2} and await used(redis_client, keys, "w1", "gpu") == 2
    await again.complete()


# --- R04: a request nothing can hold times out naming the missing resource ----------------------


async def test_r04_a_request_no_worker_could_hold_says_what_is_missing(
    spawn_worker: SpawnWorker, client: Client, task_queue: str
) -> None:
    await offering(spawn_worker, "w1", "gpu=2")
    with pytest.raises(SessionCreationTimeoutError, match=r"no live worker offers resource 'tpu'"):
        await client.create_session(task_queue, asking(creation_timeout=0.3, tpu=1))
    with pytest.raises(SessionCreationTimeoutError, match=r"gpu=4.*the most any live worker offers is gpu=2"):
        await client.create_session(task_queue, asking(creation_timeout=0.3, gpu=4))
    fits = await client.create_session(task_queue, asking(gpu=2))  # the line did not block it
    await fits.complete()


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ({"GPU": 1}, "resource name 'GPU'"),
        ({"": 1}, "resource name ''"),
        ({"gpu,1": 1}, "resource name 'gpu,1'"),
        ({"gpu": 0}, "amount of 'gpu' must be a positive int"),
        ({"gpu": True}, "amount of 'gpu' must be a positive int"),
        ({"gpu": 1.5}, "amount of 'gpu' must be a positive int"),
        (["gpu"], "must be a mapping"),
    ],
)
def test_r01_bad_resources_are_a_clear_configuration_error(value: Any, says: str) -> None:
    with pytest.raises(ConfigurationError, match="resources") as raised:
        SessionOptions(resources=value)
    assert says in str(raised.value)
    with pytest.raises(ConfigurationError, match="session_resources") as raised:
        Worker(task_queue="q", activities=acts.ALL, enable_sessions=True, session_resources=value)
    assert says in str(raised.value)


def test_r01_options_asking_for_resources_stay_hashable_and_compare_by_value() -> None:
    a, b = SessionOptions(resources={"gpu": 1}), SessionOptions(resources={"gpu": 1})
    assert a == b and hash(a) == hash(b) and a != SessionOptions(resources={"gpu": 2})
    assert {a: "ok"}[b] == "ok"


async def test_r01_cli_resource_flags_are_checked_before_anything_starts() -> None:
    ran = await run_cli("worker", "tests.activities:ALL", "-Q", "q", "--resource", "gpu=lots")
    assert (
        ran.code == 2 and "--resource" in ran.err and "NAME=AMOUNT" in ran.err and "Traceback" not in ran.err
    )


async def test_r01_a_hosts_resources_belong_to_the_host_not_to_each_process(
    spawn_worker: SpawnWorker, client: Client, task_queue: str
) -> None:
    host = ["--host-id", "h1", "--resource", "gpu=1"]
    await spawn_worker(identity="p1", heartbeat_timeout=HB, extra_args=host)
    await spawn_worker(identity="p2", heartbeat_timeout=HB, extra_args=host)
    first = await client.create_session(task_queue, asking(gpu=1))
    assert first.info.host_id == "h1"
    with pytest.raises(SessionCreationTimeoutError):  # two processes, one gpu: the host's
        await client.create_session(task_queue, asking(creation_timeout=0.5, gpu=1))
    with pytest.raises(WorkerStartError, match="session_resources"):  # processes must agree
        await spawn_worker(
            identity="p3", heartbeat_timeout=HB, extra_args=["--host-id", "h1", "--resource", "gpu=2"]
        )
    await first.complete()


async def test_r03_what_a_request_kept_goes_to_the_next_when_it_leaves_the_line(
    spawn_worker: SpawnWorker, client: Client, task_queue: str, keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    """A request held back only by an earlier one's keep is served when that one gives up,
    with no other event on the queue."""
    await offering(spawn_worker, "w1", "gpu=2")
    holder = await client.create_session(task_queue, asking(gpu=1))
    big = creator(client, task_queue, asking(creation_timeout=1.0, gpu=2))  # gives up after 1 s
    await queued(redis_client, keys, 1)
    small = creator(client, task_queue, asking(creation_timeout=15, gpu=1))
    await queued(redis_client, keys, 2)
    with pytest.raises(SessionCreationTimeoutError):
        await big
    got = await asyncio.wait_for(small, 5)  # at once, not at its own timeout
    assert got.info.worker_id == "w1"
    for session in (got, holder):
        await session.complete()


async def test_r03_a_recreate_neither_takes_what_an_earlier_request_keeps_nor_is_starved(
    spawn_worker: SpawnWorker, client: Client, task_queue: str, keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    await offering(spawn_worker, "w1", "gpu=2")
    first = await client.create_session(task_queue, asking(gpu=1))
    token = first.info.recreate_token
    big = creator(client, task_queue, asking(gpu=2))
    await queued(redis_client, keys, 1)
    with pytest.raises(SessionCreationTimeoutError):  # the free gpu is kept for `big`
        await client.recreate_session(token, asking(creation_timeout=0.5, gpu=1))
    await first.complete()
    got_big = await asyncio.wait_for(big, 5)
    recreated = asyncio.create_task(client.recreate_session(token, asking(gpu=2)).open())
    await queued(redis_client, keys, 1)
    with pytest.raises(SessionCreationTimeoutError):  # nor may a newcomer take what the recreate waits for
        await client.create_session(task_queue, asking(creation_timeout=0.5, gpu=1))
    await got_big.complete()
    assert (await asyncio.wait_for(recreated, 5)).info.resources == {"gpu": 2}


async def test_r03_a_keep_covers_only_what_the_oldest_request_asked_for(
    spawn_worker: SpawnWorker, client: Client, task_queue: str, keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    await offering(spawn_worker, "w1", "cpu=4", "gpu=2")
    holder = await client.create_session(task_queue, asking(gpu=1))
    big = creator(client, task_queue, asking(gpu=2))
    await queued(redis_client, keys, 1)
    mixed = creator(client, task_queue, asking(cpu=1, gpu=1))  # held back: it wants a kept gpu
    await queued(redis_client, keys, 2)
    cpu_only = await asyncio.wait_for(client.create_session(task_queue, asking(cpu=1)).open(), 5)
    assert cpu_only.info.worker_id == "w1"  # nobody earlier asked for cpu: it is not kept
    assert not big.done() and not mixed.done()
    for session in (cpu_only, holder):
        await session.complete()
    for waiting in (big, mixed):
        await (await asyncio.wait_for(waiting, 5)).complete()


async def test_r04_a_request_no_single_worker_could_hold_says_so(
    spawn_worker: SpawnWorker, client: Client, task_queue: str
) -> None:
    await offering(spawn_worker, "gpus", "gpu=2")
    await offering(spawn_worker, "disks", "scratch_gb=500")
    with pytest.raises(SessionCreationTimeoutError, match="no single live worker offers all of"):
        await client.create_session(task_queue, asking(creation_timeout=0.3, gpu=1, scratch_gb=100))
