"""No leaked slot (D06, D08): a session slot ends up free whatever happened on the way.

Each test reproduces one way a slot used to leak: a create_session resent after a lost
reply, a re-registration racing grants, a heartbeat that comes back, a crashed waiter, a
caller that leaves with sessions open or is SIGKILLed, a clock step, a worker identity
with a '|' in it, a duration too large for Lua, and waiting lines longer than a script
used to look. Faults are real: the relay drops replies and cuts connections, callers are
killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio
import redis.exceptions

import sessionq
from sessionq import Client, ConfigurationError, SessionOptions, Worker
from sessionq import held as held_module
from sessionq.held import HeldSessions
from sessionq.housekeeping import Housekeeping
from sessionq.keys import QueueKeys
from sessionq.scripts import Swept
from tests import activities as acts
from tests.faultkit import Relay
from tests.helpers import wait_for

HB = 2.0
LONG = SessionOptions(creation_timeout=30)


@pytest_asyncio.fixture
async def clients(key_prefix: str) -> AsyncIterator[list[Client]]:
    made: list[Client] = []
    yield made
    for client in made:
        with contextlib.suppress(Exception):
            await client.close()


def client_on(clients: list[Client], url: str, key_prefix: str, **options: Any) -> Client:
    clients.append(Client(url, prefix=key_prefix, **options))
    return clients[-1]


@pytest_asyncio.fixture
async def workers(key_prefix: str, task_queue: str) -> AsyncIterator[Any]:
    """Factory for in-process workers on the test's queue; all stopped after the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(url: str, identity: str = "w1", **options: Any) -> Worker:
            settings: dict[str, Any] = {
                "task_queue": task_queue, "activities": acts.ALL, "identity": identity,
                "heartbeat_timeout": HB, "shutdown_grace": 1.0, "prefix": key_prefix, "enable_sessions": True,
            }  # fmt: skip
            settings.update(options)
            return await stack.enter_async_context(Worker(url, **settings))

        yield start


@pytest_asyncio.fixture
async def relay(redis_url: str) -> AsyncIterator[Relay]:
    async with Relay(redis_url) as relay:
        yield relay


async def open_count(r: redis.asyncio.Redis, keys: QueueKeys, worker_id: str) -> int:
    return int(await r.hget(keys.worker(worker_id), "open") or 0)


async def waiting(r: redis.asyncio.Redis, keys: QueueKeys) -> int:
    return int(await r.zcard(keys.waiters))


def spawn_creator(client: Client, task_queue: str, options: SessionOptions = LONG) -> asyncio.Task[Any]:
    return asyncio.create_task(client.create_session(task_queue, options).open())


# --- 1. a resent create_session -----------------------------------------------------------


async def test_d08_a_create_session_resent_after_a_lost_reply_queues_one_ticket(
    relay: Relay, redis_url: str, key_prefix: str, task_queue: str, workers: Any, clients: list[Client],
    redis_client: redis.asyncio.Redis, keys: QueueKeys,
) -> None:  # fmt: skip
    """The create_session script ran, its reply was lost, the client sent it again: one
    ticket, one session, and once that is completed the worker's only slot is free."""
    await workers(redis_url, max_concurrent_sessions=1)
    holder = await client_on(clients, redis_url, key_prefix).create_session(task_queue)
    creator = client_on(clients, relay.url, key_prefix)
    assert await creator.execute_activity(acts.echo, 1, task_queue=task_queue) == 1  # its inbox is open
    dropped = relay.drop_reply({"EVALSHA", "EVAL"}, nonempty=True)
    waiter = spawn_creator(creator, task_queue)
    await wait_for(dropped.fired.is_set, message="the create_session reply was never dropped")
    await wait_for(lambda: waiting(redis_client, keys), message="the creator never queued")
    assert await waiting(redis_client, keys) == 1, "the resent call queued a second ticket"
    await holder.complete()
    session = await asyncio.wait_for(waiter, 10)
    assert await waiting(redis_client, keys) == 0
    await session.complete()
    assert await open_count(redis_client, keys, "w1") == 0
    again = await client_on(clients, redis_url, key_prefix).create_session(
        task_queue, SessionOptions(creation_timeout=2)
    )
    assert again.info.worker_id == "w1"
    await again.complete()


# --- 2. sessions granted while the worker registers again ----------------------------------


async def test_d08_sessions_granted_while_a_worker_registers_again_stay_open(
    relay: Relay, redis_url: str, key_prefix: str, task_queue: str, workers: Any, clients: list[Client],
    redis_client: redis.asyncio.Redis, keys: QueueKeys,
) -> None:  # fmt: skip
    """Cut off past its heartbeat timeout, the worker is reaped; callers queue meanwhile;
    back, it registers afresh and the registration grants them at once. Those sessions are
    new: they must work, and their slots free on complete."""
    await workers(relay.url, max_concurrent_sessions=3)
    await workers(redis_url, identity="reaper", enable_sessions=False)
    client = client_on(clients, redis_url, key_prefix)
    relay.cut()
    await wait_for(
        lambda: _not(redis_client.sismember(keys.workers, "w1")), timeout=HB + 8, message="never reaped"
    )
    creators = [spawn_creator(client, task_queue) for _ in range(3)]
    await wait_for(lambda: _at_least(waiting(redis_client, keys), 3), message="the creators never queued")
    relay.heal()
    sessions = [await asyncio.wait_for(c, 15) for c in creators]
    for session in sessions:
        assert await asyncio.wait_for(session.execute_activity(acts.whoami), 10) == "w1"
        await session.complete()
    assert await open_count(redis_client, keys, "w1") == 0


async def _not(value: Any) -> bool:
    return not await value


async def _at_least(value: Any, n: int) -> bool:
    return int(await value) >= n


# --- 3. a heartbeat that comes back --------------------------------------------------------


async def test_d08_waiters_are_served_when_a_workers_heartbeat_comes_back(
    relay: Relay, redis_url: str, key_prefix: str, task_queue: str, workers: Any, clients: list[Client],
    redis_client: redis.asyncio.Redis, keys: QueueKeys,
) -> None:  # fmt: skip
    """A partition longer than the heartbeat timeout, with nobody around to reap: the worker
    keeps its registration, its heartbeat key lapses, callers queue. When the heartbeat comes
    back, its free slots are handed out at once, not at the next complete()."""
    await workers(relay.url, max_concurrent_sessions=2)
    client = client_on(clients, redis_url, key_prefix)
    relay.partition()
    await wait_for(lambda: _not(redis_client.exists(keys.alive("w1"))), timeout=HB + 8, message="no lapse")
    creators = [spawn_creator(client, task_queue) for _ in range(2)]
    await wait_for(lambda: _at_least(waiting(redis_client, keys), 2), message="the creators never queued")
    relay.heal()
    healed = time.monotonic()
    sessions = [await asyncio.wait_for(c, 10) for c in creators]
    assert time.monotonic() - healed < HB + 2, "the waiters were not served when the heartbeat came back"
    for session in sessions:
        await session.complete()


# --- 4. a crashed waiter --------------------------------------------------------------------

CRASHING_WAITERS = """
import asyncio, sys
import sessionq

async def main(url, prefix, queue, n):
    client = sessionq.Client(url, prefix=prefix)
    opts = sessionq.SessionOptions(creation_timeout=60)
    waiters = [asyncio.ensure_future(client.create_session(queue, opts).open()) for _ in range(int(n))]
    print("WAITING", flush=True)
    await asyncio.gather(*waiters)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_d08_a_crashed_callers_tickets_are_never_granted(
    redis_url: str, key_prefix: str, task_queue: str, workers: Any, clients: list[Client],
    redis_client: redis.asyncio.Redis, keys: QueueKeys,
) -> None:  # fmt: skip
    """A process with many waiting callers is SIGKILLed; a live caller queues behind them.
    The freed slot goes to the live caller, never to a dead ticket (whose session nobody
    would ever complete)."""
    await workers(redis_url, max_concurrent_sessions=1)
    holder = await client_on(clients, redis_url, key_prefix).create_session(task_queue)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_WAITERS, redis_url, key_prefix, task_queue, "20",
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        assert (await asyncio.wait_for(process.stdout.readline(), 20)).startswith(b"WAITING")
        await wait_for(
            lambda: _at_least(waiting(redis_client, keys), 20), message="the dead caller never queued"
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
    live = spawn_creator(
        client_on(clients, redis_url, key_prefix), task_queue, SessionOptions(creation_timeout=30)
    )
    await wait_for(lambda: _at_least(waiting(redis_client, keys), 21), message="the live caller never queued")
    await wait_for(
        lambda: dead_leases_lapsed(redis_client, keys), timeout=15, message="the lease never lapsed"
    )
    await holder.complete()
    session = await asyncio.wait_for(live, 5)
    assert session.info.worker_id == "w1"
    assert await waiting(redis_client, keys) == 0, "the dead tickets stayed in line"
    await session.complete()
    assert await open_count(redis_client, keys, "w1") == 0


async def dead_leases_lapsed(r: redis.asyncio.Redis, keys: QueueKeys, window_ms: int = 5000) -> bool:
    """Whether every waiting ticket's client but the newest has been silent for `window_ms`."""
    seconds, micros = await r.time()
    now = int(seconds) * 1000 + int(micros) // 1000
    tickets = await r.hgetall(keys.tickets)
    clients = {v.decode() for f, v in tickets.items() if f.endswith(b":c")}
    renewals = [await r.get(keys.lease(c)) for c in clients]
    silent = [v is None or now - int(v) > window_ms for v in renewals]
    return sum(silent) == len(clients) - 1  # the live caller keeps renewing


# --- 5. a caller that leaves with sessions open ----------------------------------------------


async def test_d06_leaving_async_with_client_completes_the_sessions_it_holds(
    redis_url: str, key_prefix: str, task_queue: str, workers: Any, redis_client: redis.asyncio.Redis,
    keys: QueueKeys, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """The ordinary pattern: an exception escapes asyncio.gather inside `async with Client`
    while other tasks hold sessions. Leaving the block completes them: their slots free now."""
    await workers(redis_url, max_concurrent_sessions=2)

    async def hold(client: Client) -> None:
        session = await client.create_session(task_queue)
        await session.execute_activity(acts.sleep_for, 30)

    async def explode(client: Client) -> None:
        await asyncio.sleep(0.5)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        async with Client(redis_url, prefix=key_prefix) as client:
            await asyncio.gather(hold(client), hold(client), explode(client))
    assert await open_count(redis_client, keys, "w1") == 0, "the sessions kept their slots"
    async with Client(redis_url, prefix=key_prefix) as again:
        two = [await again.create_session(task_queue, SessionOptions(creation_timeout=2)) for _ in range(2)]
        for session in two:
            await session.complete()
    assert "never retrieved" not in caplog.text


CALLER_THAT_DIES = """
import asyncio, sys
import sessionq

async def main(url, prefix, queue, seconds, option="owner_timeout"):
    client = sessionq.Client(url, prefix=prefix)
    opts = sessionq.SessionOptions(creation_timeout=10, **{option: float(seconds)})
    session = await client.create_session(queue, opts)
    print("OPEN", session.session_id, flush=True)
    await asyncio.Event().wait()

asyncio.run(main(*sys.argv[1:]))
"""


async def test_d06_a_killed_callers_session_ends_after_its_owner_timeout(
    redis_url: str, key_prefix: str, task_queue: str, workers: Any, clients: list[Client],
    redis_client: redis.asyncio.Redis, keys: QueueKeys,
) -> None:  # fmt: skip
    """SIGKILL a caller holding a session with owner_timeout=2: the session fails ("its
    owner went away") and its slot frees within owner_timeout plus one heartbeat pass."""
    owner_timeout = 2.0
    await workers(redis_url, max_concurrent_sessions=1)
    sid = await open_and_vanish(redis_url, key_prefix, task_queue, owner_timeout, "owner_timeout")
    killed = time.monotonic()
    session = await client_on(clients, redis_url, key_prefix).create_session(
        task_queue, SessionOptions(creation_timeout=owner_timeout + HB + 5)
    )
    assert time.monotonic() - killed < owner_timeout + HB / 3 + 2.0
    record = await redis_client.hgetall(keys.session(sid))
    assert (record[b"state"], record[b"reason"]) == (b"FAILED", b"its owner went away")
    await session.complete()


# --- 6. a clock step on the worker ----------------------------------------------------------


async def test_d08_a_clock_step_on_the_worker_does_not_end_sessions_early(
    redis_url: str, key_prefix: str, task_queue: str, workers: Any, clients: list[Client],
    redis_client: redis.asyncio.Redis, keys: QueueKeys, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The worker's clock jumps a minute ahead: its timer for a session's execution
    timeout fires at once. Redis' clock decides: the session stays open and usable until
    its real deadline, then fails and frees its slot."""
    worker = await workers(redis_url, max_concurrent_sessions=1)
    true_now = worker.redis_now_ms
    monkeypatch.setattr(worker, "redis_now_ms", lambda: true_now() + 60_000)
    client = client_on(clients, redis_url, key_prefix)
    session = await client.create_session(task_queue, SessionOptions(execution_timeout=3, owner_timeout=None))
    # Past the 2 s after which the early timer used to give up and end the session here
    # while Redis still had it OPEN (its slot leaked): the length of the fault, not a wait.
    await asyncio.sleep(2.5)
    assert await session.execute_activity(acts.whoami) == "w1"
    assert await redis_client.hget(keys.session(session.session_id), "state") == b"OPEN"
    again = await client.create_session(task_queue, SessionOptions(creation_timeout=10))
    assert (
        await redis_client.hget(keys.session(session.session_id), "reason")
    ) == b"execution timeout passed"
    deadline = int(await redis_client.hget(keys.session(session.session_id), "deadline") or 0)
    record = keys.session(again.session_id)
    again_deadline, again_exec_ms = await redis_client.hmget(record, "deadline", "exec_ms")
    assert int(again_deadline or 0) - int(again_exec_ms or 0) >= deadline  # created after it
    await again.complete()


async def test_d08_the_sweep_goes_by_the_workers_guess_of_redis_clock_only_to_find_what_is_due(
    client: Client, keys: QueueKeys, redis_client: redis.asyncio.Redis
) -> None:
    """An idle sweep sends no TIME: it looks for what is due by the worker's reckoning of
    Redis' clock. Once anything looks due, Redis' own clock decides, so a guess that runs
    ahead (a clock step, a failover to another server) ends nothing early, and one that lags
    only acts a pass later."""
    scripts = client.scripts
    await scripts.register_worker(keys, "w1", hb_ms=60_000, max_sessions=1, fields=["host", "m"])
    opened = await scripts.create_session(
        keys, "s1", client_id="c1", exec_ms=30_000, wait_ms=0, target="", owner="t",
        owner_ms=0, lease_ms=60_000,
    )  # fmt: skip
    assert opened.status == "OK"  # a worker without expiry=own: its session is in the index
    deadline = int(await redis_client.zscore(keys.deadlines, "s:s1") or 0)
    secs, micros = await redis_client.time()
    now = secs * 1000 + micros // 1000

    async def sweep(guess: float | None) -> Swept:
        return await scripts.sweep(
            keys, 60_000, me="w1", may_reap=True, retry_ms=1_000, audit_ms=3_600_000, now_ms=guess
        )

    await redis_client.zadd(keys.beats, {"scan": now + 3_600_000})  # no audit due in this test
    idle = await sweep(now)
    assert not idle.timed and idle.now_ms == now and idle.expired == 0  # nothing due: no TIME
    ahead = await sweep(now + 3_600_000)  # an hour ahead: the session looks due
    assert ahead.timed and ahead.expired == 0 and abs(ahead.now_ms - now) < 60_000
    assert await redis_client.hget(keys.session("s1"), "state") == b"OPEN"
    assert await redis_client.zscore(keys.deadlines, "s:s1") == deadline  # still indexed
    assert (await sweep(None)).timed  # asked for: Redis' clock

    await redis_client.zadd(keys.deadlines, {"s:s1": now - 1}, xx=True)  # now due on Redis' clock
    await redis_client.hset(keys.session("s1"), "deadline", now - 1)
    lagging = await sweep(now - 60_000)  # a guess a minute behind: not yet
    assert not lagging.timed and lagging.expired == 0
    assert (await sweep(None)).expired == 1  # the next pass that asks Redis' clock ends it
    assert await redis_client.hget(keys.session("s1"), "reason") == b"execution timeout passed"


async def test_d08_an_idle_sweep_looks_at_the_deadline_index_only_when_its_earliest_moment_came(
    client: Client, keys: QueueKeys, redis_client: redis.asyncio.Redis
) -> None:
    """The deadline index's earliest moment is mirrored in `beats` ('d'), so a sweep looks
    at the index only once something there may be due, and then marks the next moment;
    every few passes it looks anyway, for entries an earlier version wrote without a mark."""
    scripts = client.scripts

    async def wait_in_line(sid: str) -> None:
        queued = await scripts.create_session(
            keys, sid, client_id="c1", exec_ms=30_000, wait_ms=60_000, target="", owner="t",
            owner_ms=0, lease_ms=60_000,
        )  # fmt: skip
        assert queued.status == "WAIT"  # no session slot: a ticket, due to leave the line in 60 s

    async def sweep(look: bool) -> Swept:
        return await scripts.sweep(
            keys, 60_000, me="w0", may_reap=True, retry_ms=1_000, audit_ms=3_600_000,
            look_at_deadlines=look,
        )  # fmt: skip

    async def mark() -> float | None:
        return await redis_client.zscore(keys.beats, "d")

    await scripts.register_worker(keys, "w0", hb_ms=60_000, max_sessions=-1, fields=["host", "m"])
    await wait_in_line("t1")
    await wait_in_line("t2")
    assert await mark() == await redis_client.zscore(keys.deadlines, "t:t1")
    await redis_client.zadd(keys.deadlines, {"t:t1": 1}, xx=True)  # its wait is over (as if)
    await sweep(look=False)  # the mark's moment has not come: not looked at
    assert await redis_client.zscore(keys.waiters, "t1") is not None
    await redis_client.zadd(keys.beats, {"d": 1})  # now it has
    await sweep(look=False)
    assert await redis_client.zscore(keys.waiters, "t1") is None  # dropped from the line
    assert await mark() == await redis_client.zscore(keys.deadlines, "t:t2")  # the next moment

    await redis_client.zadd(keys.deadlines, {"t:t2": 1}, xx=True)
    await redis_client.zrem(keys.beats, "d")  # as an earlier version's writer leaves it
    await sweep(look=False)
    assert await redis_client.zscore(keys.waiters, "t2") is not None
    await sweep(look=True)  # the pass that looks anyway
    assert await redis_client.zscore(keys.waiters, "t2") is None
    assert await mark() is None and await redis_client.zcard(keys.deadlines) == 0


async def test_d08_items_that_stay_due_do_not_hide_the_deadline_indexs_moment_from_the_sweep(
    client: Client, keys: QueueKeys, redis_client: redis.asyncio.Redis
) -> None:
    """Takeover marks nobody can take yet stay due in `beats`; however many there are,
    they must not hide 'd', or tickets and host sessions would wait for a pass that looks
    at the deadline index anyway."""
    scripts = client.scripts
    await scripts.register_worker(keys, "w0", hb_ms=60_000, max_sessions=-1, fields=["host", "m"])
    queued = await scripts.create_session(
        keys, "t1", client_id="c1", exec_ms=30_000, wait_ms=60_000, target="w0", owner="t",
        owner_ms=0, lease_ms=60_000,
    )  # fmt: skip
    assert queued.status == "WAIT"  # waits for its own worker, which takes no session
    await redis_client.zadd(keys.deadlines, {"t:t1": 3}, xx=True)  # its wait is over (as if)
    await redis_client.zadd(keys.beats, {"o:x1": 1, "o:x2": 1, "o:x3": 2, "d": 3})
    await scripts.sweep(
        keys, 60_000, me="w0", may_reap=True, retry_ms=1_000, audit_ms=3_600_000, free=0, limit=2,
        look_at_deadlines=False,
    )  # fmt: skip
    assert await redis_client.zscore(keys.beats, "o:x3") == 2  # no free slot: the marks stay due
    assert await redis_client.zscore(keys.waiters, "t1") is None  # and the ticket left the line


async def test_d08_the_first_worker_back_audits_at_once_though_callers_wait_meanwhile(
    client: Client, keys: QueueKeys, redis_client: redis.asyncio.Redis
) -> None:
    """When the last worker goes, what it left is taken over by the next worker to
    register, whose first audit is due at once: a caller queueing meanwhile (its ticket has
    a wait deadline) must not make it look as if workers were still around."""
    scripts = client.scripts
    await scripts.register_worker(keys, "w1", hb_ms=60_000, max_sessions=1, fields=["host", "m"])
    assert await scripts.reap_worker(keys, "w1", "gone", force=True, retention_ms=60_000)
    assert not await redis_client.exists(keys.beats)  # the last worker: nothing left to watch
    queued = await scripts.create_session(
        keys, "t1", client_id="c1", exec_ms=30_000, wait_ms=60_000, target="", owner="t",
        owner_ms=0, lease_ms=60_000,
    )  # fmt: skip
    assert queued.status == "WAIT"
    await scripts.register_worker(keys, "w2", hb_ms=60_000, max_sessions=1, fields=["host", "m"])
    secs, micros = await redis_client.time()
    assert (await redis_client.zscore(keys.beats, "scan") or 0) <= secs * 1000 + micros // 1000


async def test_d08_after_a_failed_pass_the_sweep_asks_redis_clock_again(
    redis_url: str, workers: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the passes that ask Redis' clock, the sweep goes by the worker's reckoning
    of it; a failed pass (a cut, a failover to another server with another clock) makes
    the next one ask again."""
    worker = await workers(redis_url)
    housekeeping = Housekeeping(worker)
    sent: list[float | None] = []
    sweep, here = worker.scripts.sweep, asyncio.current_task()

    async def recorded(*args: Any, **kwargs: Any) -> Swept:
        if asyncio.current_task() is not here:  # the worker's own housekeeping
            return await sweep(*args, **kwargs)
        sent.append(kwargs["now_ms"])
        if len(sent) == 3:
            raise redis.exceptions.ConnectionError("cut (injected)")
        return await sweep(*args, **kwargs)

    monkeypatch.setattr(worker.scripts, "sweep", recorded)
    await housekeeping.step()
    await housekeeping.step()
    with pytest.raises(redis.exceptions.ConnectionError):
        await housekeeping.step()
    await housekeeping.step()
    await housekeeping.step()
    asked = [now is None for now in sent]
    assert asked == [True, False, False, True, False]


# --- 6b. who ends a session at its execution deadline ---------------------------------------


async def open_and_vanish(
    redis_url: str, key_prefix: str, task_queue: str, seconds: float, option: str = "execution_timeout"
) -> str:
    """A caller process opens a session (its `option` set to `seconds`) and is SIGKILLed:
    nobody on the caller's side will end it. Returns its id."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CALLER_THAT_DIES, redis_url, key_prefix, task_queue, str(seconds), option,
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 20)
        assert line.startswith(b"OPEN"), line
        return line.split()[1].decode()
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def ends_by_its_deadline(r: redis.asyncio.Redis, keys: QueueKeys, sid: str, within: float) -> None:
    __tracebackhide__ = True
    record = keys.session(sid)
    await wait_for(lambda: _not_open(r, record), timeout=within, message="the session outlived its deadline")
    state, reason, deadline, ended = await r.hmget(record, "state", "reason", "deadline", "ended")
    assert (state, reason) == (b"FAILED", b"execution timeout passed")
    assert int(ended or 0) >= int(deadline or 0), "ended before its deadline"


async def _not_open(r: redis.asyncio.Redis, record: str) -> bool:
    return await r.hget(record, "state") != b"OPEN"


async def test_d06_a_worker_ends_its_own_sessions_at_their_deadline_without_an_index_entry(
    redis_url: str, key_prefix: str, task_queue: str, workers: Any,
    redis_client: redis.asyncio.Redis, keys: QueueKeys,
) -> None:  # fmt: skip
    """Memory at fleet scale: a session on a worker of this version has no entry in the
    queue's deadline index (120 bytes a session). Its worker ends it at its deadline, on
    Redis' clock, though its caller is gone, and the slot frees."""
    worker = await workers(redis_url, max_concurrent_sessions=1)
    assert await redis_client.hget(keys.worker(worker.worker_id), "expiry") == b"own"
    sid = await open_and_vanish(redis_url, key_prefix, task_queue, 2.0)
    assert await redis_client.zscore(keys.deadlines, f"s:{sid}") is None
    await ends_by_its_deadline(redis_client, keys, sid, 2.0 + 3)
    assert await open_count(redis_client, keys, worker.worker_id) == 0


async def test_d06_an_earlier_versions_worker_has_its_sessions_swept_at_their_deadline(
    redis_url: str, key_prefix: str, task_queue: str, workers: Any,
    redis_client: redis.asyncio.Redis, keys: QueueKeys, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A worker whose record lacks expiry=own (an earlier version's, during a rolling
    upgrade) may not end its sessions itself: they keep their deadline entry, and the
    sweep of any worker ends them at the deadline. Here the holder's own timer never
    fires; another worker's sweep ends the session."""
    monkeypatch.setattr(HeldSessions, "_arm", lambda self, held, seconds: None)
    holder = await workers(redis_url, identity="old", max_concurrent_sessions=1)
    await redis_client.hdel(keys.worker(holder.worker_id), "expiry")
    sid = await open_and_vanish(redis_url, key_prefix, task_queue, 2.0)
    assert await redis_client.zscore(keys.deadlines, f"s:{sid}") is not None
    await workers(redis_url, identity="sweeper", enable_sessions=False)
    await ends_by_its_deadline(redis_client, keys, sid, 2.0 + HB + 3)
    assert await open_count(redis_client, keys, holder.worker_id) == 0


# --- 7. a '|' in a worker identity -----------------------------------------------------------


async def test_d08_a_worker_identity_with_a_bar_still_gets_its_waiters_granted(
    redis_url: str, key_prefix: str, task_queue: str, workers: Any, clients: list[Client],
    redis_client: redis.asyncio.Redis, keys: QueueKeys,
) -> None:  # fmt: skip
    await workers(redis_url, identity="gpu|box:1".replace(":", "-"), max_concurrent_sessions=1)
    client = client_on(clients, redis_url, key_prefix)
    holder = await client.create_session(task_queue)
    waiter = spawn_creator(client, task_queue)
    await wait_for(lambda: waiting(redis_client, keys), message="the creator never queued")
    await holder.complete()
    session = await asyncio.wait_for(waiter, 5)
    assert session.info.worker_id == "gpu|box-1"
    assert await session.execute_activity(acts.whoami) == "gpu|box-1"
    with pytest.raises(sessionq.SessionCreationTimeoutError):  # full: the right error, not a garbled grant
        await client.recreate_session(session.info.recreate_token, SessionOptions(creation_timeout=1))
    await session.complete()
    assert await open_count(redis_client, keys, "gpu|box-1") == 0


# --- 8. durations too large for Lua ----------------------------------------------------------


@pytest.mark.parametrize("field", ["execution_timeout", "creation_timeout", "owner_timeout"])
def test_s19_a_duration_beyond_ten_years_is_refused_naming_its_field(field: str) -> None:
    with pytest.raises(ConfigurationError, match=field):
        SessionOptions(**{field: 1e15})
    with pytest.raises(ConfigurationError, match="start_to_close_timeout"):
        sessionq.ActivityOptions(start_to_close_timeout=1e12)


async def test_d08_a_session_of_nine_years_works_and_frees_its_slot(
    redis_url: str, key_prefix: str, task_queue: str, workers: Any, clients: list[Client],
    redis_client: redis.asyncio.Redis, keys: QueueKeys,
) -> None:  # fmt: skip
    await workers(redis_url, max_concurrent_sessions=1)
    nine_years = 9 * 365 * 24 * 3600.0
    session = await client_on(clients, redis_url, key_prefix).create_session(
        task_queue, SessionOptions(execution_timeout=nine_years)
    )
    assert await session.execute_activity(acts.whoami) == "w1"
    await session.complete()
    assert await open_count(redis_client, keys, "w1") == 0


# --- 9. long lines, many candidates ----------------------------------------------------------


async def test_d08_the_waiting_line_is_served_past_its_first_256_tickets(
    redis_url: str, key_prefix: str, task_queue: str, workers: Any, clients: list[Client],
    redis_client: redis.asyncio.Redis, keys: QueueKeys,
) -> None:  # fmt: skip
    """260 callers wait to recreate a session on a full worker A; one more waits for any
    worker. When B frees a slot, that caller gets it, however far back it stands."""
    await workers(redis_url, identity="a", max_concurrent_sessions=1)
    client = client_on(clients, redis_url, key_prefix)
    on_a = await client.create_session(task_queue)
    await workers(redis_url, identity="b", max_concurrent_sessions=1)
    on_b = await client.create_session(task_queue)
    assert (on_a.info.worker_id, on_b.info.worker_id) == ("a", "b")
    token = on_a.info.recreate_token
    recreators = [asyncio.create_task(client.recreate_session(token, LONG).open()) for _ in range(260)]
    await wait_for(lambda: _at_least(waiting(redis_client, keys), 260), message="the recreators never queued")
    anyone = spawn_creator(client, task_queue)
    await wait_for(
        lambda: _at_least(waiting(redis_client, keys), 261), message="the last caller never queued"
    )
    await on_b.complete()
    last = await asyncio.wait_for(anyone, 5)
    assert last.info.worker_id == "b"
    for task in recreators:
        task.cancel()
    await asyncio.gather(*recreators, return_exceptions=True)
    await last.complete()
    await on_a.complete()


async def test_d08_a_live_worker_is_found_behind_many_dead_candidates(
    redis_url: str, key_prefix: str, task_queue: str, workers: Any, clients: list[Client],
    redis_client: redis.asyncio.Redis, keys: QueueKeys,
) -> None:  # fmt: skip
    """70 dead workers (no heartbeat, not reaped yet) sort before the live one among the
    workers with a free slot: placement must look past them."""
    await workers(redis_url, identity="z-live")
    await redis_client.zadd(keys.free, {f"a-dead-{i:02d}": 0 for i in range(70)})
    session = await client_on(clients, redis_url, key_prefix).create_session(
        task_queue, SessionOptions(creation_timeout=2)
    )
    assert session.info.worker_id == "z-live"
    await session.complete()


# --- found in review and in the chaos soak ------------------------------------------------------


async def test_d06_a_shorter_owner_lease_is_renewed_in_time_when_it_joins(
    redis_url: str, key_prefix: str, task_queue: str, workers: Any, clients: list[Client],
    redis_client: redis.asyncio.Redis, keys: QueueKeys,
) -> None:  # fmt: skip
    """A client holding a session with a long owner_timeout opens one with a short one: its
    lease must from then on be renewed often enough for the short one."""
    await workers(redis_url, max_concurrent_sessions=2)
    client = client_on(clients, redis_url, key_prefix)
    long = await client.create_session(task_queue, SessionOptions(owner_timeout=120))
    lease = keys.lease(client.client_id)
    await asyncio.sleep(1.5)  # the lease is now renewed every 30 s, and its keeper asleep: the set-up
    short = await client.create_session(task_queue, SessionOptions(owner_timeout=2))

    async def renewed_twice() -> bool:
        seen = await redis_client.get(lease)
        renewals.add(seen)
        return len(renewals) >= 3

    renewals: set[Any] = set()
    await wait_for(renewed_twice, timeout=5, message="the short lease was not renewed in time")
    assert await short.execute_activity(acts.whoami) == "w1"
    assert await redis_client.hget(keys.session(short.session_id), "state") == b"OPEN"
    for session in (long, short):
        await session.complete()


async def test_d08_a_caller_holding_a_session_keeps_its_place_in_line(
    redis_url: str, key_prefix: str, task_queue: str, workers: Any, clients: list[Client],
    redis_client: redis.asyncio.Redis, keys: QueueKeys,
) -> None:  # fmt: skip
    """A queues first while it holds a session (its lease renewed rarely for that one), C
    queues second; 6 s later (past the waiters' 5 s window) a slot frees: A gets it."""
    await workers(redis_url, max_concurrent_sessions=2)
    a, b, c = (client_on(clients, redis_url, key_prefix, identity=name) for name in "abc")
    held = await a.create_session(task_queue)
    await asyncio.sleep(1.5)  # A's lease keeper now sleeps 15 s between renewals: the set-up
    blocker = await b.create_session(task_queue)
    first = spawn_creator(a, task_queue)
    await wait_for(lambda: waiting(redis_client, keys), message="A never queued")
    second = spawn_creator(c, task_queue)
    await wait_for(lambda: _at_least(waiting(redis_client, keys), 2), message="C never queued")
    await asyncio.sleep(6.0)  # longer than the waiters' window: the length of the fault
    await blocker.complete()
    got = await asyncio.wait_for(first, 5)
    assert not second.done(), "C was served before A, who queued first"
    await got.complete()
    await (await asyncio.wait_for(second, 5)).complete()
    await held.complete()


async def test_d08_a_client_closed_while_its_create_session_runs_gives_the_slot_back(
    redis_url: str, key_prefix: str, task_queue: str, workers: Any,
    redis_client: redis.asyncio.Redis, keys: QueueKeys,
) -> None:  # fmt: skip
    await workers(redis_url, max_concurrent_sessions=1)
    for _ in range(5):  # the race needs a few tries to land in the script's window
        client = Client(redis_url, prefix=key_prefix)
        opening = asyncio.ensure_future(client.create_session(task_queue).open())
        await asyncio.sleep(0)
        await client.close()
        with contextlib.suppress(sessionq.SessionqError):
            await opening
        assert int(await redis_client.hget(keys.worker("w1"), "open") or 0) == 0, "the slot leaked"


async def test_d06_a_complete_that_cannot_reach_redis_is_finished_once_redis_is_back(
    relay: Relay, redis_url: str, key_prefix: str, task_queue: str, workers: Any, clients: list[Client],
    redis_client: redis.asyncio.Redis, keys: QueueKeys,
) -> None:  # fmt: skip
    await workers(redis_url, max_concurrent_sessions=1)
    client = client_on(clients, relay.url, key_prefix, unavailable_timeout=1)
    session = await client.create_session(task_queue)
    relay.cut()
    with pytest.raises(sessionq.RedisUnavailableError):
        await session.complete()
    relay.heal()

    async def completed() -> bool:
        return await redis_client.hget(keys.session(session.session_id), "state") == b"COMPLETED"

    await wait_for(completed, timeout=15, message="the session was never completed")
    assert int(await redis_client.hget(keys.worker("w1"), "open") or 0) == 0


async def test_d08_a_session_an_older_snapshot_brings_back_open_is_ended_by_its_worker(
    redis_url: str, key_prefix: str, task_queue: str, workers: Any, clients: list[Client],
    redis_client: redis.asyncio.Redis, keys: QueueKeys,
) -> None:  # fmt: skip
    """Redis restored from a snapshot taken before complete(): the session is OPEN again and
    counted on its worker, which no longer holds it. The worker ends it; its slot frees."""
    await workers(redis_url, max_concurrent_sessions=1, heartbeat_timeout=1.0)
    session = await client_on(clients, redis_url, key_prefix).create_session(task_queue)
    sid = session.session_id
    before = await redis_client.hgetall(keys.session(sid))
    await session.complete()
    # What the old snapshot holds, put back as a restore would:
    await redis_client.hset(keys.session(sid), mapping=before)
    await redis_client.persist(keys.session(sid))
    await redis_client.sadd(keys.worker_sessions("w1"), sid)
    await redis_client.hincrby(keys.worker("w1"), "open", 1)
    await redis_client.zrem(keys.free, "w1")

    async def ended() -> bool:
        return await redis_client.hget(keys.session(sid), "state") == b"FAILED"

    await wait_for(ended, timeout=15, message="the restored session was never ended")
    assert int(await redis_client.hget(keys.worker("w1"), "open") or 0) == 0


async def test_d08_one_reconcile_ends_a_stray_wherever_it_lies_in_a_big_set(
    redis_url: str, key_prefix: str, task_queue: str, workers: Any, clients: list[Client],
    redis_client: redis.asyncio.Redis, keys: QueueKeys, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A session Redis counts on a worker that does not hold it (its grant message lost, an
    older snapshot restored) is ended by nobody else: it has no deadline entry. When Redis
    counts more sessions than the worker holds, one reconcile walks the whole set, not
    one step of it: here the stray lies among 1,000 members walked 10 at a time."""
    monkeypatch.setattr(held_module, "RECONCILE_BATCH", 10)
    worker = await workers(redis_url, heartbeat_timeout=30)  # its own passes are 10 s apart
    session = await client_on(clients, redis_url, key_prefix).create_session(task_queue)
    sid = session.session_id
    before = await redis_client.hgetall(keys.session(sid))
    await session.complete()
    seconds, micros = await redis_client.time()
    now_ms = seconds * 1000 + micros // 1000
    # Back as a restore would bring it, opened an hour ago, among members whose records are gone:
    await redis_client.hset(keys.session(sid), mapping={**before, b"deadline": now_ms + 3_600_000,
                                                        b"exec_ms": 7_200_000})  # fmt: skip
    await redis_client.persist(keys.session(sid))
    await redis_client.sadd(keys.worker_sessions("w1"), sid, *(f"gone{i:04d}" for i in range(1000)))
    await worker.sessions.reconcile()
    state, reason = await redis_client.hmget(keys.session(sid), "state", "reason")
    assert state == b"FAILED" and b"no longer held it" in (reason or b""), (state, reason)
