"""Redis Sentinel: URLs, a Sentinel-managed client passed in, and failovers under live
Clients and Workers.

The failover tests start a private set-up (tests/sentinel.py: one primary, one replica,
three sentinels that call a primary down after 1 s of silence), run a worker and a caller
on it, and fail the primary over, by SENTINEL FAILOVER (the old primary is demoted and
answers READONLY) and by SIGKILL. The Client and Worker that were running must carry on
without a restart, the session whose worker lived must stay OPEN, and no slot may leak.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio

import sessionq
from sessionq.connection import connect
from sessionq.keys import QueueKeys
from sessionq.sentinel import split_sentinel_url
from tests import activities as acts
from tests.cluster import cluster_tools
from tests.helpers import failover_worker, wait_for, wait_replicated
from tests.sentinel import SERVICE, LocalSentinel
from tests.test_cli import clean_env, cli_argv, inspect_json

REPO_ROOT = Path(__file__).resolve().parent.parent

RECOVERY_BOUND_S = 12.0
"""A call made after the fault gets its answer within this: the sentinels' down-after
(1 s) and election, plus the caller's retry backoff; well inside the 15 s a call keeps
retrying before RedisUnavailableError."""


# --- URLs --------------------------------------------------------------------------------


def test_sentinel_url_names_sentinels_service_db_and_credentials() -> None:
    sentinels, service, settings, sentinel_settings = split_sentinel_url(
        "redis+sentinel://u:p%40w@h1:26380,h2/my-service/3?socket_timeout=2&sentinel_password=sp"
    )
    assert sentinels == [("h1", 26380), ("h2", 26379)]
    assert service == "my-service"
    assert (settings["username"], settings["password"], settings["db"]) == ("u", "p@w", 3)
    assert settings["socket_timeout"] == 2.0 and "ssl" not in settings
    assert sentinel_settings == {"socket_timeout": 2.0, "password": "sp"}
    _, _, tls, tls_sentinels = split_sentinel_url("rediss+sentinel://h1:26379/svc")
    assert tls["ssl"] is True and tls_sentinels["ssl"] is True and tls["db"] == 0


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://h1:26379", "must name the service"),
        ("redis+sentinel://h1:26379/svc/0/extra", "must name the service"),
        ("redis+sentinel://h1:26379/svc/zero", "database must be a number"),
        ("redis+sentinel://h1:notaport/svc", "bad port"),
        ("redis+sentinel:///svc", "names no sentinel"),
        ("redis+sentinel://u:secret@h1:99999/svc", "bad port"),
    ],
)
def test_a_bad_sentinel_url_is_a_clear_configuration_error(url: str, says: str) -> None:
    with pytest.raises(sessionq.ConfigurationError, match=says) as caught:
        sessionq.Client(url)
    assert "secret" not in str(caught.value)


# --- a live set-up ------------------------------------------------------------------------


@pytest.fixture
def sentinel_setup() -> Iterator[LocalSentinel]:
    missing = cluster_tools()
    if missing:
        pytest.skip(f"no redis-server to start a Sentinel set-up with ({missing})")
    setup = LocalSentinel()
    setup.start()
    try:
        yield setup
    finally:
        setup.stop()


def a_worker(url: object, prefix: str, queue: str, identity: str) -> sessionq.Worker:
    return failover_worker(url, prefix, queue, identity, heartbeat_timeout=10.0)


async def test_a_sentinel_managed_client_passed_in_needs_no_reference_kept(
    sentinel_setup: LocalSentinel,
) -> None:
    """Client(Sentinel(...).master_for(...)) with nothing else holding the Sentinel or its
    client (redis-py's pool keeps only a weak reference to itself in its settings)."""
    prefix, queue = "sqt" + uuid.uuid4().hex[:8], "q"
    async with (
        a_worker(sentinel_setup.url, prefix, queue, "w1"),
        sessionq.Client(
            redis.asyncio.Sentinel(sentinel_setup.sentinel_addresses).master_for(SERVICE), prefix=prefix
        ) as client,
    ):
        gc.collect()
        assert await client.execute_activity(acts.echo, "hi", task_queue=queue) == "hi"
        async with client.create_session(queue) as session:
            assert await session.execute_activity(acts.whoami) == "w1"


@pytest.mark.parametrize("fault", ["sentinel-failover", "sigkill-primary"])
async def test_existing_client_and_worker_follow_a_sentinel_failover(
    sentinel_setup: LocalSentinel, fault: str, tmp_path: Path
) -> None:
    """The primary fails over (demoted by SENTINEL FAILOVER, or SIGKILLed): the Client and
    Worker that were running reach the new primary by themselves. A plain and a session
    activity started after the fault are answered within RECOVERY_BOUND_S, the session
    stays OPEN (its worker lived), and complete() gives its slot back."""
    url, prefix, queue = sentinel_setup.url, "sqt" + uuid.uuid4().hex[:8], "q"
    k = QueueKeys(prefix, queue)
    async with a_worker(url, prefix, queue, "w1"), sessionq.Client(url, prefix=prefix) as client:
        session = await client.create_session(queue, sessionq.SessionOptions(creation_timeout=10))
        assert await session.execute_activity(acts.echo, "before") == "before"
        markers = [str(tmp_path / f"m{i}") for i in range(6)]
        in_flight = [await client.start_activity(acts.sleep_for, 3, m, task_queue=queue) for m in markers[:5]]
        in_flight.append(await session.start_activity(acts.sleep_for, 3, markers[5]))
        await wait_for(lambda: all(Path(m + ".started").exists() for m in markers), message="not all started")
        old = sentinel_setup.primary()
        # the replica has everything written so far (a write, then WAIT: see wait_replicated)
        assert await asyncio.to_thread(wait_replicated, "127.0.0.1", old, k.tasks) == 1

        started = time.monotonic()
        if fault == "sentinel-failover":
            await asyncio.to_thread(sentinel_setup.failover)
        else:
            await asyncio.to_thread(sentinel_setup.kill_primary)
        plain = await asyncio.wait_for(
            client.execute_activity(acts.echo, 2, task_queue=queue), RECOVERY_BOUND_S
        )
        in_session = await asyncio.wait_for(session.execute_activity(acts.echo, "after"), RECOVERY_BOUND_S)
        took = time.monotonic() - started
        assert (plain, in_session) == (2, "after")
        # The calls running at the fault: none lost, each answered.
        assert (
            await asyncio.wait_for(asyncio.gather(*(h.result() for h in in_flight)), 3 + RECOVERY_BOUND_S)
            == ["w1"] * 6
        )
        new = await asyncio.to_thread(sentinel_setup.wait_new_primary, old)
        assert session.state is sessionq.SessionState.OPEN
        # Replication is asynchronous: what reaches the old primary between the switch and
        # its demotion is lost (README, High availability). Go on once it is over: every
        # call now needs the new primary.
        await asyncio.to_thread(sentinel_setup.wait_demoted, old)
        plain = await asyncio.wait_for(
            client.execute_activity(acts.echo, 3, task_queue=queue), RECOVERY_BOUND_S
        )
        in_session = await asyncio.wait_for(session.execute_activity(acts.echo, "later"), RECOVERY_BOUND_S)
        assert (plain, in_session) == (3, "later")

        await session.complete()
        with redis.Redis(port=new) as primary:
            assert primary.hget(k.session(session.session_id), "state") == b"COMPLETED"
            await wait_for(
                lambda: primary.hget(k.worker("w1"), "open") == b"0", message="slot not given back"
            )
        again = await client.create_session(queue, sessionq.SessionOptions(creation_timeout=10))
        assert await again.execute_activity(acts.whoami) == "w1"
        await again.complete()
    print(f"{fault}: answered {took:.2f}s after the fault")


async def test_connect_builds_its_own_sentinel_manager(sentinel_setup: LocalSentinel) -> None:
    """sessionq never uses the given object: its connections ask its own Sentinel manager."""
    given = redis.asyncio.Sentinel(sentinel_setup.sentinel_addresses, socket_timeout=4).master_for(SERVICE)
    made = connect(given)
    try:
        assert made is not given and made.connection_pool is not given.connection_pool
        assert made.connection_pool.sentinel_manager is not given.connection_pool.sentinel_manager
        assert made.connection_pool.connection_kwargs["socket_timeout"] == 4
        assert await made.execute_command("PING") is True
    finally:
        await made.aclose()
        await given.aclose()


async def test_a_sentinel_switch_moves_connections_before_the_old_primary_is_demoted(
    sentinel_setup: LocalSentinel,
) -> None:
    """A coordinated failover leaves the old primary taking writes for a while after the
    sentinels switched (until they demote it), and writes it takes then are lost. The
    client hears the switch (+switch-master) and moves at once: its connections show up
    on the new primary while the old one still serves as a primary."""
    prefix, queue, name = "sqt" + uuid.uuid4().hex[:8], "q", "watch-" + uuid.uuid4().hex[:8]
    async with (
        a_worker(sentinel_setup.url, prefix, queue, "w1"),
        sessionq.Client(f"{sentinel_setup.url}?client_name={name}", prefix=prefix) as client,
    ):
        waiting = await client.start_activity(acts.sleep_for, 3, task_queue=queue)  # the inbox reader blocks
        old = sentinel_setup.primary()
        await wait_for(lambda: _connections_named(old, name) >= 1, message="the client never connected")
        # SENTINEL FAILOVER promotes the replica as it is: what it has not applied yet (it lags
        # on a loaded machine) is lost, the worker's registration and the call's inbox with it.
        # What this test is about are the writes after the switch, so the ones before must be there.
        assert await asyncio.to_thread(wait_replicated, "127.0.0.1", old, QueueKeys(prefix, queue).tasks) == 1
        await asyncio.to_thread(sentinel_setup.failover)
        new = await asyncio.to_thread(sentinel_setup.wait_new_primary, old)

        def moved_while_old_is_primary() -> str:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                role = _role(old)
                if _connections_named(new, name) >= 1:
                    return role
                time.sleep(0.01)
            raise AssertionError("the client never connected to the new primary")

        assert await asyncio.to_thread(moved_while_old_is_primary) == "master"
        assert await asyncio.wait_for(waiting.result(), RECOVERY_BOUND_S) is not None
        assert (
            await asyncio.wait_for(client.execute_activity(acts.echo, 2, task_queue=queue), RECOVERY_BOUND_S)
            == 2
        )


def _connections_named(port: int, name: str) -> int:
    with redis.Redis(port=port, socket_timeout=2) as conn:
        return sum(1 for c in conn.client_list() if c.get("name") == name)


def _role(port: int) -> str:
    with redis.Redis(port=port, socket_timeout=2) as conn:
        return str(conn.info("replication").get("role"))


async def test_cli_worker_and_inspect_take_a_sentinel_url(
    sentinel_setup: LocalSentinel, tmp_path: Path
) -> None:
    """`sessionq worker` serves through a redis+sentinel:// URL and `sessionq inspect` reads it."""
    prefix, queue = "sqt" + uuid.uuid4().hex[:8], "q"
    url = sentinel_setup.url
    argv = cli_argv(
        "worker", "tests.activities:ALL", "--redis-url", url, "--prefix", prefix, "--task-queue", queue,
        "--identity", "cli-w1", "--max-sessions", "1",
    )  # fmt: skip
    log = (tmp_path / "worker.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=log, stderr=subprocess.STDOUT, env=clean_env(), cwd=str(REPO_ROOT)
    )
    try:
        async with (
            sessionq.Client(url, prefix=prefix) as client,
            client.create_session(queue, sessionq.SessionOptions(creation_timeout=20)) as session,
        ):
            assert await session.execute_activity(acts.whoami) == "cli-w1"
            doc = await inspect_json(url, prefix)
            assert [w["identity"] for w in doc["workers"]] == ["cli-w1"]
            assert [s["session_id"] for s in doc["sessions"]] == [session.session_id]
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)
        log.close()
    assert process.returncode == 0, (tmp_path / "worker.log").read_text()
