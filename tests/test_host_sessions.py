"""Host sessions (SEMANTICS H01-H06): worker processes that share a host_id share one
session limit, and the host's sessions survive the death or restart of its processes.

Every test runs real worker processes; a process death is a SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

import sessionq
from sessionq import (
    ActivityCancelledError,
    ActivityError,
    Client,
    RetryPolicy,
    SessionCreationTimeoutError,
    SessionFailedError,
    SessionOptions,
    SessionState,
)
from sessionq.housekeeping import Housekeeping
from sessionq.keys import QueueKeys, host_worker_id
from tests import activities as acts
from tests.conftest import REPO_ROOT
from tests.helpers import SpawnWorker, WorkerProcess, WorkerStartError, pid_running, wait_for
from tests.test_cli import clean_env, cli_argv, inspect_json, run_cli
from tests.test_slot_leaks import ends_by_its_deadline, open_and_vanish

HB = 1.0
"""The processes' heartbeat_timeout: a dead process is noticed within about a second."""


def host_args(host: str = "h1", grace: float = 30.0, shutdown_grace: float | None = None) -> list[str]:
    args = ["--host-id", host, "--restart-grace", str(grace)]
    if shutdown_grace is not None:
        args += ["--shutdown-grace", str(shutdown_grace)]
    return args


async def host_process(
    spawn_worker: SpawnWorker, identity: str, *, max_sessions: int | None = 2, **host: Any
) -> WorkerProcess:
    return await spawn_worker(
        identity=identity, max_sessions=max_sessions, heartbeat_timeout=HB, extra_args=host_args(**host)
    )


async def started(marker: Path, attempt: int = 1) -> str:
    """Wait until `attempt` of the marked activity started; the process that runs it."""
    path = Path(f"{marker}.started.{attempt}")
    await wait_for(path.exists, timeout=15, message=f"attempt {attempt} started")
    return path.read_text()


# --- H01: one session limit for the whole host; processes that disagree are refused ----------


@pytest.mark.cluster
async def test_h01_limit_counts_the_sessions_of_the_whole_host(
    spawn_worker: SpawnWorker, client: Client, task_queue: str
) -> None:
    await host_process(spawn_worker, "p1", max_sessions=2)
    await host_process(spawn_worker, "p2", max_sessions=2)
    first = await client.create_session(task_queue)
    second = await client.create_session(task_queue)
    assert first.info.host_id == second.info.host_id == "h1"
    assert first.info.worker_id == host_worker_id("h1")
    with pytest.raises(SessionCreationTimeoutError):  # 2 processes, but one limit of 2
        await client.create_session(task_queue, SessionOptions(creation_timeout=0.5))
    waiting = asyncio.create_task(
        client.create_session(task_queue, SessionOptions(creation_timeout=10)).open()
    )
    await first.complete()
    third = await asyncio.wait_for(waiting, 10)  # the freed slot goes to the waiter
    assert third.info.host_id == "h1"
    await second.complete()
    await third.complete()


async def test_h01_processes_that_disagree_on_the_host_settings_are_refused(
    spawn_worker: SpawnWorker,
) -> None:
    await host_process(spawn_worker, "p1", max_sessions=2, grace=30.0)
    with pytest.raises(WorkerStartError) as refused:
        await host_process(spawn_worker, "p2", max_sessions=3, grace=30.0)
    text = str(refused.value)
    assert "ConfigurationError" in text or "max_concurrent_sessions" in text
    assert "max_concurrent_sessions=2" in text and "max_concurrent_sessions=3" in text
    with pytest.raises(WorkerStartError) as refused:
        await host_process(spawn_worker, "p3", max_sessions=2, grace=5.0)
    assert "restart_grace=30s" in str(refused.value) and "restart_grace=5s" in str(refused.value)
    with pytest.raises(WorkerStartError) as refused:  # its beats would shorten the host's grace
        await spawn_worker(
            identity="p4", max_sessions=2, heartbeat_timeout=2 * HB, extra_args=host_args(grace=30.0)
        )
    assert f"heartbeat_timeout={HB:g}s" in str(refused.value)
    assert f"heartbeat_timeout={2 * HB:g}s" in str(refused.value)
    await host_process(spawn_worker, "p5", max_sessions=2, grace=30.0)  # agreeing: joins


# --- H02: activities run on any live process of the host, never elsewhere --------------------


async def test_h02_activities_spread_over_the_host_and_never_leave_it(
    spawn_worker: SpawnWorker, client: Client, task_queue: str
) -> None:
    procs = {(await host_process(spawn_worker, name, host="h1")).worker_id for name in ("p1", "p2")}
    other = await host_process(spawn_worker, "q1", host="h2")
    sessions = [await client.create_session(task_queue) for _ in range(4)]
    on_h1 = [s for s in sessions if s.info.host_id == "h1"]
    assert on_h1, "the least loaded host got some of the sessions"
    ran: set[str] = set()
    for session in on_h1:
        ran |= set(await asyncio.gather(*(session.execute_activity(acts.sleep_for, 0.05) for _ in range(12))))
    assert ran == procs, f"activities of host h1's sessions ran on {ran}, not spread over {procs}"
    for session in sessions:
        if session.info.host_id == "h2":
            assert await session.execute_activity(acts.whoami) == other.worker_id
        await session.complete()


# --- H03: a process death keeps the host's sessions open ----------------------------------


@pytest.mark.cluster
async def test_h03_session_survives_sigkill_and_restart_within_the_grace(
    spawn_worker: SpawnWorker,
    client: Client,
    task_queue: str,
    keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
    tmp_path: Path,
) -> None:
    first = await host_process(spawn_worker, "p1", grace=20.0)
    marker = tmp_path / "in-flight"
    async with client.create_session(task_queue) as session:
        assert await session.execute_activity(acts.host_write, "scratch.txt", "downloaded") == first.worker_id
        in_flight = await session.start_activity(acts.attempt_after, 1.0, str(marker))
        assert await started(marker) == first.worker_id
        await first.kill()
        successor = await host_process(spawn_worker, "p2", grace=20.0)
        # The activity the killed process ran is retried on its successor, as its next attempt...
        assert await asyncio.wait_for(in_flight.result(), 20) == [2, successor.worker_id]
        # ...and the file the first activity wrote is there for the next one.
        text, reader = await session.execute_activity(acts.host_read, "scratch.txt")
        assert (text, reader) == ("downloaded", successor.worker_id)
        assert session.state is SessionState.OPEN
        assert await redis_client.hget(keys.session(session.session_id), "state") == b"OPEN"


async def test_h03_in_flight_activity_is_retried_on_another_process(
    spawn_worker: SpawnWorker, client: Client, task_queue: str, tmp_path: Path,
    redis_client: redis.asyncio.Redis, keys: QueueKeys,
) -> None:  # fmt: skip
    procs = {p.worker_id: p for p in [await host_process(spawn_worker, n) for n in ("p1", "p2")]}
    marker = tmp_path / "long"
    async with client.create_session(task_queue) as session:
        handle = await session.start_activity(acts.attempt_after, 1.5, str(marker))
        runner = await started(marker)
        await procs[runner].kill()
        attempt, finisher = await asyncio.wait_for(handle.result(), 20)
        assert attempt == 2 and finisher != runner and finisher in procs
        assert session.state is SessionState.OPEN
        assert await session.execute_activity(acts.whoami) in procs
    # The takeover mark the reap left for the host's processes is gone with what it marked.
    assert not await redis_client.exists(keys.host_marks("h1"))


async def test_h03_no_attempt_left_gives_activity_error_not_session_failure(
    spawn_worker: SpawnWorker, client: Client, task_queue: str, tmp_path: Path
) -> None:
    procs = {p.worker_id: p for p in [await host_process(spawn_worker, n) for n in ("p1", "p2")]}
    marker = tmp_path / "once"
    async with client.create_session(task_queue) as session:
        handle = await session.start_activity(
            acts.attempt_after, 30, str(marker), retry_policy=RetryPolicy(maximum_attempts=1)
        )
        await procs[await started(marker)].kill()
        with pytest.raises(ActivityError) as failed:
            await asyncio.wait_for(handle.result(), 20)
        assert not isinstance(failed.value, SessionFailedError)
        assert "no attempt is left" in str(failed.value)
        assert session.state is SessionState.OPEN
        assert await session.execute_activity(acts.whoami) in procs


# --- H04: after restart_grace with no live process the sessions fail -------------------------


@pytest.mark.cluster
async def test_h04_sessions_fail_once_the_grace_passes(
    spawn_worker: SpawnWorker, client: Client, task_queue: str, tmp_path: Path
) -> None:
    grace = 2.0
    only = await host_process(spawn_worker, "p1", grace=grace)
    marker = tmp_path / "busy"
    async with client.create_session(task_queue) as session:
        handle = await session.start_activity(acts.attempt_after, 60, str(marker))
        await started(marker)
        await only.kill()
        killed = time.monotonic()
        with pytest.raises(SessionFailedError) as failed:
            await asyncio.wait_for(handle.result(), grace + HB + 10)
        took = time.monotonic() - killed
        assert "restart_grace" in str(failed.value)
        assert grace <= took <= grace + HB + 1 + 1.5, f"learnt after {took:.2f}s"  # bound + scheduling slack
        assert session.state is SessionState.FAILED
    # A process that comes back after the grace starts a new host: the old session stays failed.
    await host_process(spawn_worker, "p2", grace=grace)
    fresh = await client.create_session(task_queue)
    assert fresh.info.host_id == "h1"
    await fresh.complete()


async def test_h03_a_host_session_expires_on_time_while_no_process_of_the_host_lives(
    spawn_worker: SpawnWorker, redis_client: redis.asyncio.Redis, keys: QueueKeys,
    redis_url: str, key_prefix: str, task_queue: str,
) -> None:  # fmt: skip
    """Within its restart grace a host may have no live process to end its sessions at
    their deadline, so they stay in the queue's deadline index: with the host's only
    process and the caller both SIGKILLed, another worker's sweep fails the session at its
    execution deadline, long before the 30 s grace would."""
    only = await host_process(spawn_worker, "p1")
    sid = await open_and_vanish(redis_url, key_prefix, task_queue, 3.0)
    assert await redis_client.zscore(keys.deadlines, f"s:{sid}") is not None
    await only.kill()
    await spawn_worker(identity="sweeper", heartbeat_timeout=HB)
    await ends_by_its_deadline(redis_client, keys, sid, 3.0 + HB + 3)
    assert await redis_client.hget(keys.worker(host_worker_id("h1")), "open") == b"0"


async def test_h04_a_reaped_host_leaves_no_takeover_mark_behind(
    spawn_worker: SpawnWorker, client: Client, task_queue: str, tmp_path: Path,
    redis_client: redis.asyncio.Redis, keys: QueueKeys,
) -> None:  # fmt: skip
    """A host's only process dies holding one of its activities: a plain worker reaps the
    process (marking the activity for the host's processes to take over; none comes), then
    the host once its grace passed. The mark goes with the host: nothing is left behind."""
    await spawn_worker(identity="plain", heartbeat_timeout=HB, enable_sessions=False)
    only = await host_process(spawn_worker, "p1", grace=2.0)
    marker = tmp_path / "busy"
    session = await client.create_session(task_queue)
    handle = await session.start_activity(acts.attempt_after, 60, str(marker))
    await started(marker)
    await only.kill()

    async def marked() -> bool:
        return bool(await redis_client.sismember(keys.host_marks("h1"), "p1"))

    await wait_for(marked, timeout=10, message="the reap of p1 left no takeover mark")
    with pytest.raises(SessionFailedError):
        await asyncio.wait_for(handle.result(), 2.0 + HB + 10)

    async def host_reaped() -> bool:
        return not await redis_client.sismember(keys.workers, host_worker_id("h1"))

    await wait_for(host_reaped, timeout=10, message="the host was never reaped")
    assert not await redis_client.exists(keys.host_marks("h1")), "the takeover mark outlived its host"


# --- H05: a rolling restart loses no session --------------------------------------------------


@pytest.mark.cluster
async def test_h05_rolling_restart_of_a_two_process_host_loses_no_session(
    spawn_worker: SpawnWorker, client: Client, task_queue: str
) -> None:
    current = [await host_process(spawn_worker, n, shutdown_grace=5.0) for n in ("p1", "p2")]
    sessions = [await client.create_session(task_queue) for _ in range(2)]
    stop = asyncio.Event()
    ran: list[str] = []

    async def keep_busy(session: Any) -> None:
        while not stop.is_set():
            ran.append(await session.execute_activity(acts.sleep_for, 0.05))

    busy = [asyncio.create_task(keep_busy(s)) for s in sessions]
    for number, old in enumerate(list(current), start=3):
        wanted = 10 * (number - 2)
        await wait_for(lambda: len(ran) >= wanted, timeout=20, message="activities ran")  # noqa: B023
        old.terminate()
        assert await old.wait(15) == 0  # a graceful stop
        current.append(await host_process(spawn_worker, f"p{number}", shutdown_grace=5.0))
    done_before = len(ran)
    await wait_for(lambda: len(ran) >= done_before + 10, timeout=20, message="activities ran after")
    stop.set()
    await asyncio.gather(*busy)  # raises if any activity failed
    assert set(ran[done_before:]) <= {current[2].worker_id, current[3].worker_id}
    for session in sessions:
        assert session.state is SessionState.OPEN
        await session.complete()


# --- H06: without host_id a process restart fails its sessions, as before ----------------------


async def test_h06_without_host_id_a_restart_fails_the_sessions(
    spawn_worker: SpawnWorker,
    client: Client,
    task_queue: str,
    keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
) -> None:
    worker = await spawn_worker(identity="solo", heartbeat_timeout=HB)
    session = await client.create_session(task_queue)
    assert session.info.host_id is None
    await worker.kill()

    async def lapsed() -> bool:
        return not await redis_client.exists(keys.alive("solo"))

    await wait_for(lapsed, timeout=10, message="the killed worker's heartbeat lapsed")
    await spawn_worker(identity="solo", heartbeat_timeout=HB)  # same identity, new process
    with pytest.raises(SessionFailedError):
        await session.execute_activity(acts.whoami)
    assert session.state is SessionState.FAILED


# --- `sessionq worker --processes N`: one host under a supervisor ------------------------------


async def test_cli_processes_2_runs_one_host_replaces_killed_and_stopped_processes_and_stops_gracefully(
    redis_url: str,
    key_prefix: str,
    task_queue: str,
    client: Client,
    keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
    tmp_path: Path,
) -> None:
    """Named processes (-n sup: sup-1, sup-2) with a heartbeat timeout longer than the
    restart pause: a replacement must not collide with its predecessor's live heartbeat."""
    log_file = tmp_path / "supervisor.log"
    argv = cli_argv(
        "worker", "tests.activities:ALL", "--redis-url", redis_url, "--prefix", key_prefix,
        "-Q", task_queue, "--processes", "2", "--host-id", "hx", "--max-sessions", "2", "-n", "sup",
        "--heartbeat-timeout", "3", "--shutdown-grace", "5",
    )  # fmt: skip
    with open(log_file, "wb") as sink:
        supervisor = await asyncio.create_subprocess_exec(
            *argv, cwd=REPO_ROOT, env=clean_env(), stdin=asyncio.subprocess.DEVNULL, stdout=sink, stderr=sink
        )

    async def live_processes() -> dict[str, int]:
        """The host's live processes: identity -> pid."""
        if supervisor.returncode is not None:
            raise AssertionError(f"supervisor exited with {supervisor.returncode}:\n{log_file.read_text()}")
        members = [m.decode() for m in await redis_client.smembers(keys.host_procs("hx"))]
        return {
            m: int(await redis_client.hget(keys.worker(m), "pid") or 0)
            for m in members
            if await redis_client.exists(keys.alive(m))
        }

    async def replaced(gone: str) -> dict[str, int] | None:
        now = await live_processes()
        return now if len(now) == 2 and gone not in now else None

    seen: set[int] = set()
    try:
        first = await wait_for(
            lambda: _exactly(live_processes, 2), timeout=30, message="2 processes of host hx registered"
        )
        assert set(first) == {"sup-1", "sup-2"}
        seen |= set(first.values())
        session = await client.create_session(task_queue, SessionOptions(creation_timeout=10))
        assert session.info.host_id == "hx"
        ran = set(await asyncio.gather(*(session.execute_activity(acts.sleep_for, 0.05) for _ in range(20))))
        assert ran and ran <= set(first)
        os.kill(first["sup-1"], signal.SIGKILL)
        after = await wait_for(lambda: replaced("sup-1"), timeout=30, message="sup-1 replaced")
        seen |= set(after.values())
        assert "sup-1.2" in after
        assert await session.execute_activity(acts.whoami) in after  # the session carried on
        os.kill(after["sup-2"], signal.SIGTERM)  # a rolling restart, one process at a time
        after = await wait_for(lambda: replaced("sup-2"), timeout=30, message="sup-2 replaced")
        seen |= set(after.values())
        assert set(after) == {"sup-1.2", "sup-2.2"}
        assert await session.execute_activity(acts.whoami) in after
        supervisor.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(supervisor.wait(), 30) == 0
        assert not [p for p in seen if pid_running(p)], "every worker process stopped"
        assert await redis_client.hget(keys.session(session.session_id), "state") == b"OPEN"  # in its grace
        log_text = log_file.read_text()
        assert "was killed by SIGKILL" in log_text and "stopped; starting another" in log_text
    finally:
        if supervisor.returncode is None:
            supervisor.kill()
            await supervisor.wait()
        for pid in seen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def _exactly(probe: Any, count: int) -> Any:
    found = await probe()
    return found if len(found) == count else None


async def test_h02_recreate_session_targets_the_host(
    spawn_worker: SpawnWorker, client: Client, task_queue: str
) -> None:
    h1 = {(await host_process(spawn_worker, n, host="h1", max_sessions=4)).worker_id for n in ("p1", "p2")}
    await host_process(spawn_worker, "q1", host="h2", max_sessions=4)
    sessions = [await client.create_session(task_queue) for _ in range(2)]
    on_h1 = next(s for s in sessions if s.info.host_id == "h1")
    token = on_h1.info.recreate_token
    await on_h1.complete()
    for _ in range(3):  # h2 is now the less loaded host; recreate goes to h1 all the same
        again = await client.recreate_session(token)
        assert again.info.host_id == "h1"
        assert await again.execute_activity(acts.whoami) in h1
        token = await again.execute_activity(acts.session_token)  # as an activity sees it: the host too
        await again.complete()
    for session in sessions:
        await session.complete()


async def test_h04_inspect_shows_a_host_in_its_grace(
    spawn_worker: SpawnWorker, client: Client, task_queue: str, redis_url: str, key_prefix: str
) -> None:
    procs = [await host_process(spawn_worker, n, grace=30.0) for n in ("p1", "p2")]
    session = await client.create_session(task_queue)
    doc = await inspect_json(redis_url, key_prefix, "-Q", task_queue)
    (host,) = doc["hosts"]
    assert host["host_id"] == "h1" and host["processes_alive"] == 2 and not host["in_grace"]
    assert host["open_sessions"] == 1 and host["max_sessions"] == 2
    assert {w["host_id"] for w in doc["workers"]} == {"h1"}
    assert [s["worker"] for s in doc["sessions"]] == [host_worker_id("h1")]
    for proc in procs:
        await proc.kill()

    async def in_grace() -> dict[str, Any] | None:
        (row,) = (await inspect_json(redis_url, key_prefix, "hosts", "-Q", task_queue))["hosts"]
        return row if row["in_grace"] else None

    host = await wait_for(in_grace, timeout=15, message="the host shown in its grace")
    assert host["alive"] and host["processes_alive"] == 0 and host["no_live_process_s"] is not None
    assert 0 <= host["no_live_process_s"] <= host["restart_grace_s"] == 30.0
    ran = await run_cli("inspect", "hosts", "--redis-url", redis_url, "--prefix", key_prefix)
    assert "no live process for" in ran.out and "of 30.0s" in ran.out
    assert session.state is SessionState.OPEN


async def test_h05_a_host_whose_processes_all_stop_takes_no_new_session(
    spawn_worker: SpawnWorker, client: Client, task_queue: str, keys: QueueKeys,
    redis_client: redis.asyncio.Redis, tmp_path: Path,
) -> None:  # fmt: skip
    """A stopping process keeps its host's sessions alive while its activities finish, but
    once every process of the host is stopping, new sessions go elsewhere."""
    only = await host_process(spawn_worker, "p1", shutdown_grace=30.0)
    plain = await spawn_worker(identity="w1", heartbeat_timeout=HB)  # a worker that is its own host
    busy = await client.create_session(task_queue)  # equal loads: "host=h1" sorts before "w1"
    assert busy.info.host_id == "h1"
    marker = tmp_path / "long"
    await busy.start_activity(acts.attempt_after, 60, str(marker))
    await started(marker)
    elsewhere = await client.create_session(task_queue)
    assert elsewhere.info.worker_id == plain.worker_id
    only.terminate()  # its activity runs on, for up to 30 s

    async def withdrawn() -> bool:
        return not await redis_client.exists(keys.host_up("h1"))

    await wait_for(withdrawn, timeout=10, message="the stopping host withdrew from placement")
    third = await client.create_session(task_queue)  # equal loads again: without the withdrawal, h1
    assert third.info.worker_id == plain.worker_id
    assert busy.state is SessionState.OPEN and only.returncode is None


async def test_h03_an_activity_cancelled_while_no_process_lives_never_runs(
    spawn_worker: SpawnWorker, client: Client, task_queue: str, tmp_path: Path
) -> None:
    first = await spawn_worker(
        identity="p1", max_sessions=2, heartbeat_timeout=HB, concurrency=1, extra_args=host_args()
    )
    session = await client.create_session(task_queue)
    long_marker, queued_marker = tmp_path / "long", tmp_path / "queued"
    long = await session.start_activity(acts.attempt_after, 1.0, str(long_marker))
    await started(long_marker)
    queued = await session.start_activity(acts.sleep_for, 0.1, str(queued_marker))  # p1's one slot is busy
    await first.kill()
    await queued.cancel()  # no process of the host lives to be told
    with pytest.raises(ActivityCancelledError):
        await queued.result()
    await host_process(spawn_worker, "p2")
    attempt, _ = await asyncio.wait_for(long.result(), 20)
    assert attempt == 2  # the successor took over the host's work...
    assert not Path(f"{queued_marker}.started").exists()  # ...but not the cancelled activity


async def test_h04_a_lost_host_record_fails_its_sessions_instead_of_leaking_them(
    spawn_worker: SpawnWorker, client: Client, task_queue: str, keys: QueueKeys,
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    await host_process(spawn_worker, "p1")
    session = await client.create_session(task_queue)
    await redis_client.hdel(keys.worker(host_worker_id("h1")), "max_sessions")  # evicted, deleted by hand...

    async def failed() -> bool:
        return bool(await redis_client.hget(keys.session(session.session_id), "state") == b"FAILED")

    await wait_for(failed, timeout=10, message="the uncounted session failed")
    with pytest.raises(SessionFailedError):
        await session.execute_activity(acts.whoami)
    fresh = await client.create_session(task_queue)  # the host registered again, counting from 0
    assert fresh.info.host_id == "h1"
    assert await redis_client.hget(keys.worker(host_worker_id("h1")), "open") == b"1"


# --- Fleet scale: a host's keys are renewed once per host, not by each process's beat ---------


async def test_a_hosts_keys_are_renewed_by_one_beat_per_quarter_heartbeat_not_by_every_process(
    client: Client, keys: QueueKeys, redis_client: redis.asyncio.Redis
) -> None:
    """A host of K processes idles at about what one process costs: a process's beat renews
    the host's keys only when a quarter of the heartbeat timeout passed since they were last
    renewed (or 'up' is gone). What it renews outlives every process's heartbeat key, so a
    host is never withdrawn or reaped before its last live process."""
    hb, grace = 60_000, 30_000
    scripts, host = client.scripts, host_worker_id("h1")
    for p in ("p1", "p2"):
        joined = await scripts.register_worker(
            keys, p, hb_ms=hb, max_sessions=2, fields=["host", "m"], host_id="h1", grace_ms=grace
        )
        assert joined.status == "FRESH"
    secs, micros = await redis_client.time()
    now = secs * 1000 + micros // 1000

    async def beat(p: str, at: int, *, stopping: bool = False) -> None:
        assert await scripts.heartbeat(
            keys, p, hb_ms=hb, counts=None, now_ms=at, timeout=None, host_id="h1", grace_ms=grace,
            stopping=stopping,
        )  # fmt: skip

    async def host_beat() -> tuple[int, float]:
        return int(await redis_client.hget(keys.worker(host), "beat")), await redis_client.zscore(
            keys.beats, "w:" + host
        )

    registered = await host_beat()
    await beat("p1", now + 1_000)  # just renewed (by p2's registration): left alone
    await beat("p2", now + 2_000)
    assert await host_beat() == registered
    assert await redis_client.pttl(keys.host_up("h1")) > hb

    await redis_client.pexpire(keys.host_up("h1"), hb)  # as a quarter of hb later
    await beat("p2", now + 3_000)  # the first beat after that renews them
    up_ms = hb + hb // 4
    assert await host_beat() == (now + 3_000, now + 3_000 + up_ms + grace)
    assert hb < await redis_client.pttl(keys.host_up("h1")) <= up_ms
    await beat("p1", now + 4_000)  # and the next one leaves them alone again
    assert (await host_beat())[0] == now + 3_000
    for p in ("p1", "p2"):  # 'up' and the host's key outlive every process's key
        assert await redis_client.pttl(keys.alive(p)) <= hb < await redis_client.pttl(keys.host_up("h1"))
    assert await redis_client.pttl(keys.alive(host)) > up_ms

    await beat("p1", now + 5_000, stopping=True)  # a stopping process always looks: p2 serves
    assert (await host_beat())[0] == now + 5_000 and await redis_client.exists(keys.host_up("h1"))
    await beat("p2", now + 6_000, stopping=True)  # the last serving one withdraws the host
    assert not await redis_client.exists(keys.host_up("h1"))
    await redis_client.hdel(keys.worker("p1"), "stopping")  # p1 serves again: 'up' is back at once
    await beat("p1", now + 7_000)
    assert await redis_client.pttl(keys.host_up("h1")) > hb and (await host_beat())[0] == now + 7_000


async def test_a_lone_process_renews_its_hosts_keys_on_every_beat_for_exactly_the_heartbeat_timeout(
    client: Client, keys: QueueKeys, redis_client: redis.asyncio.Redis
) -> None:
    """With one process nobody else renews the host's keys, so each of its beats does, and
    they last heartbeat_timeout (+ restart_grace), as before: the grace starts when its
    heartbeat key lapses, and its callers learn of the host's end no later."""
    hb, grace = 60_000, 30_000
    await client.scripts.register_worker(
        keys, "p1", hb_ms=hb, max_sessions=2, fields=["host", "m"], host_id="h1", grace_ms=grace
    )
    host = host_worker_id("h1")
    secs, micros = await redis_client.time()
    now = secs * 1000 + micros // 1000
    for at in (now + 1_000, now + 2_000):
        assert await client.scripts.heartbeat(
            keys, "p1", hb_ms=hb, counts=None, now_ms=at, timeout=None, host_id="h1", grace_ms=grace
        )
        assert int(await redis_client.hget(keys.worker(host), "beat")) == at
        assert await redis_client.zscore(keys.beats, "w:" + host) == at + hb + grace
        assert hb - 5_000 < await redis_client.pttl(keys.host_up("h1")) <= hb
        assert hb + grace - 5_000 < await redis_client.pttl(keys.alive(host)) <= hb + grace


async def test_a_host_made_anew_keeps_its_live_processes_and_the_audit_puts_back_a_lost_one(
    client: Client, keys: QueueKeys, redis_client: redis.asyncio.Redis, redis_url: str, key_prefix: str,
    task_queue: str,
) -> None:  # fmt: skip
    """A process's beat adds it to its host's process set only when it renews the host's
    keys, so the set must not lose a live process: a host made anew (its record was lost)
    keeps those still beating, and the queue's audit puts back one the set lost otherwise
    (it would hear of no session end or cancel, and would not count as the host's life)."""
    hb, grace = 60_000, 30_000
    for p in ("p1", "p2", "p3"):
        await client.scripts.register_worker(
            keys, p, hb_ms=hb, max_sessions=2, fields=["host", "m"], host_id="h1", grace_ms=grace
        )
    await redis_client.hdel(keys.worker(host_worker_id("h1")), "max_sessions")  # the record is lost
    again = await client.scripts.register_worker(
        keys, "p1", hb_ms=hb, max_sessions=2, fields=["host", "m"], host_id="h1", grace_ms=grace
    )
    assert again.host_status == "NEW"
    assert await redis_client.smembers(keys.host_procs("h1")) == {b"p1", b"p2", b"p3"}

    await redis_client.srem(keys.host_procs("h1"), "p2")  # lost otherwise (evicted, by hand)
    async with sessionq.Worker(
        redis_url, task_queue=task_queue, activities=acts.ALL, identity="auditor", prefix=key_prefix,
        heartbeat_timeout=HB,
    ) as auditor:  # fmt: skip
        await Housekeeping(auditor).reap_dead_workers()
    assert await redis_client.smembers(keys.host_procs("h1")) == {b"p1", b"p2", b"p3"}
