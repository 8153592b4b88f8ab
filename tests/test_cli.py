"""The `sessionq` command line, driven as users drive it: real commands in subprocesses.

- `sessionq worker` serves sessions (S05), fails its sessions at once on SIGTERM and exits 0,
  keeps a module's Worker settings unless flags override them, drains and exits in --burst,
  and reports a bad MODULE:ATTR or an unreachable Redis in one line.
- `sessionq inspect --json` shows workers, sessions and queues, and never writes Redis.
- `sessionq demo` tells the whole story and exits 0 on both embedded servers, running only
  modules the wheel ships.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio
from click.testing import CliRunner
from rich.console import Console

import sessionq
from sessionq import Client
from sessionq.keys import QueueKeys
from tests import activities as acts
from tests.faultkit import private_server
from tests.helpers import pid_running, wait_for
from tests.ports import reserve_port

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).with_name("sessionq")
"""The installed console script (the entry point users run); `python -m sessionq.cli` if absent."""


def cli_argv(*args: str) -> list[str]:
    base = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "sessionq.cli"]
    return [*base, *args]


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment minus PYTHONPATH and Redis settings, so the CLI finds modules only
    because the current directory is importable, and Redis only through its flags."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SESSIONQ_REDIS_URL", "REDIS_URL")}
    env.update(PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1", **extra)
    return env


@dataclass
class Ran:
    code: int
    out: str
    err: str


async def run_cli(
    *args: str, cwd: Path = REPO_ROOT, timeout: float = 30.0, env: dict[str, str] | None = None
) -> Ran:
    """Run `sessionq ARGS...` to completion without blocking the event loop.

    Output goes to files, not pipes, so nothing is lost when a hung command is stopped
    (SIGABRT: faulthandler then prints every thread's stack, to show where it hung).
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = await asyncio.create_subprocess_exec(
            *cli_argv(*args),
            cwd=cwd,
            env=env or clean_env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except asyncio.TimeoutError:
            process.send_signal(signal.SIGABRT)
            await asyncio.wait_for(process.wait(), 10)
        texts = []
        for sink in (out, err):
            sink.seek(0)
            texts.append(sink.read().decode(errors="replace"))
    if process.returncode == -signal.SIGABRT:
        raise AssertionError(f"sessionq {' '.join(args)} ran over {timeout}s\n{texts[0]}\n{texts[1]}")
    assert process.returncode is not None
    return Ran(process.returncode, texts[0], texts[1])


async def inspect_json(redis_url: str, prefix: str, *args: str) -> dict[str, Any]:
    """`sessionq inspect ARGS --json`, the real command in a subprocess."""
    ran = await run_cli("inspect", *args, "--json", "--redis-url", redis_url, "--prefix", prefix)
    assert ran.code == 0, ran.err
    return json.loads(ran.out)


async def collect_in_process(
    redis_url: str, prefix: str, view: str = "overview", **kw: Any
) -> dict[str, Any]:
    """What `inspect --json` prints, built in-process by the same code: cheap enough to poll."""
    import redis as sync_redis
    from sessionq.cli.snapshot import collect

    def run() -> dict[str, Any]:
        with sync_redis.Redis.from_url(redis_url) as client:
            return json.loads(json.dumps(collect(client, prefix, view, **kw)))

    return await asyncio.to_thread(run)


@dataclass
class CliWorker:
    """A `sessionq worker` process; its stdout+stderr go to a log file."""

    process: asyncio.subprocess.Process
    log: Path
    identity: str

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    async def wait(self, timeout: float = 15.0) -> int:
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(
                f"worker {self.identity} did not exit in {timeout}s:\n{self.output()}"
            ) from None


StartWorker = Callable[..., Any]


@pytest_asyncio.fixture
async def cli_worker(
    redis_url: str, key_prefix: str, task_queue: str, tmp_path: Path, redis_client: redis.asyncio.Redis
) -> AsyncIterator[StartWorker]:
    """Factory: `w = await cli_worker("tests.activities:ALL", "-n", "w1", ...)`, registered when it returns.

    Passes --redis-url, --prefix and (unless given) --task-queue; cwd is the repository root.
    Workers still running at teardown are SIGKILLed.
    """
    started: list[CliWorker] = []

    async def start(target: str, *flags: str, identity: str = "cli-w1", cwd: Path = REPO_ROOT,
                    queue: str | None = None) -> CliWorker:  # fmt: skip
        log = tmp_path / f"{identity}.log"
        argv = cli_argv("worker", target, "--redis-url", redis_url, "--prefix", key_prefix, *flags)
        if "-n" not in flags and "--identity" not in flags:
            argv += ["--identity", identity]
        if queue is None and "-Q" not in flags and "--task-queue" not in flags:
            argv += ["--task-queue", task_queue]
        with open(log, "wb") as sink:
            process = await asyncio.create_subprocess_exec(
                *argv, cwd=cwd, env=clean_env(), stdin=asyncio.subprocess.DEVNULL, stdout=sink, stderr=sink
            )
        worker = CliWorker(process, log, identity)
        started.append(worker)
        alive_key = QueueKeys(key_prefix, queue or task_queue).alive(identity)

        async def registered() -> bool:
            if process.returncode is not None:
                raise AssertionError(f"worker exited with {process.returncode}:\n{worker.output()}")
            return bool(await redis_client.exists(alive_key))

        await wait_for(registered, timeout=20, message=f"worker {identity} never registered")
        return worker

    yield start

    for worker in started:
        worker.signal(signal.SIGKILL)
        await worker.process.wait()


def free_port() -> int:
    """A port nothing listens on (reserved: no other test's server may take it meanwhile)."""
    return reserve_port()


def assert_one_line_error(ran: Ran, code: int, *needles: str) -> None:
    lines = [line for line in ran.err.splitlines() if line.strip()]
    assert ran.code == code, (ran.code, ran.err)
    assert len(lines) == 1 and lines[0].startswith("Error: "), ran.err
    assert "Traceback" not in ran.err
    for needle in needles:
        assert needle in lines[0], lines[0]


# --- help and arguments (no Redis needed) ----------------------------------------------------


def test_help_lists_the_three_commands_in_order() -> None:
    from sessionq.cli import main

    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    commands = result.output.split("Commands:")[1]
    assert [line.split()[0] for line in commands.strip().splitlines()] == ["worker", "inspect", "demo"]
    for name in ("worker", "inspect", "demo"):
        sub = CliRunner().invoke(main, [name, "--help"])
        assert sub.exit_code == 0 and "Usage: " in sub.output, sub.output


async def test_worker_bad_module_attr_gives_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    cases = [
        ("no_such_module_xyz:worker", "no module named 'no_such_module_xyz'"),
        ("tests.activities:NOPE", "has no attribute 'NOPE'"),
        ("tests.activities", "expected MODULE:ATTR"),
        ("tests.helpers:TAIL_LINES", "expected a sessionq.Worker or a list of activities"),
    ]
    real = await run_cli("worker", cases[0][0], "-Q", "q")  # the real process: no traceback
    assert_one_line_error(real, 2, cases[0][1])
    from sessionq.cli import main

    for spec, needle in cases[1:]:
        result = CliRunner().invoke(main, ["worker", spec, "-Q", "q"])
        assert_one_line_error(Ran(result.exit_code, result.stdout, result.stderr), 2, needle)
        assert spec.split(":")[0] in result.stderr


async def test_worker_unreachable_redis_gives_one_line_error() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    flags = ["--redis-url", url, "--wait-for-redis", "0"]
    ran = await run_cli("worker", "tests.activities:ALL", "-Q", "q", *flags)
    assert_one_line_error(ran, 1, "cannot reach Redis", url)
    ran = await run_cli("inspect", "--redis-url", url)
    assert_one_line_error(ran, 1, "cannot reach Redis")


async def test_worker_waits_for_redis_then_gives_up_with_one_warning_and_one_error() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    began = time.monotonic()
    flags = ["--redis-url", url, "--wait-for-redis", "2"]
    ran = await run_cli("worker", "tests.activities:ALL", "-Q", "q", *flags)
    took = time.monotonic() - began
    lines = [line for line in ran.err.splitlines() if line.strip()]
    assert ran.code == 1, ran.err
    assert took >= 2, f"gave up after {took:.1f}s"
    assert len(lines) == 2 and "trying again for up to 2s" in lines[0], ran.err
    assert lines[1].startswith("Error: cannot reach Redis") and "tried for 2s" in lines[1], ran.err


async def test_worker_started_before_redis_serves_once_redis_comes_up(
    backend: str, key_prefix: str, task_queue: str, tmp_path: Path
) -> None:
    """As celery's broker_connection_retry_on_startup: a worker started a moment before its
    Redis (compose, a pod) waits for it instead of exiting, then serves."""
    server = private_server(backend)
    server.port = free_port()  # known before the server runs: the worker is pointed at it first
    log = tmp_path / "worker.log"
    argv = cli_argv("worker", "tests.activities:ALL", "-Q", task_queue, "--prefix", key_prefix,
                    "--redis-url", server.url, "--identity", "early", "--wait-for-redis", "30")  # fmt: skip
    with open(log, "wb") as sink:
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=REPO_ROOT, env=clean_env(), stdin=asyncio.subprocess.DEVNULL, stdout=sink, stderr=sink
        )
    try:
        await wait_for(lambda: "cannot reach Redis" in log.read_text(), timeout=15, message="no warning")
        assert process.returncode is None
        with server:
            async with Client(server.url, prefix=key_prefix) as client:
                answer = await asyncio.wait_for(
                    client.execute_activity(acts.whoami, task_queue=task_queue), 30
                )
            assert answer == "early"
            assert log.read_text().count("cannot reach Redis") == 1, log.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


def test_worker_list_of_activities_needs_a_task_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    from sessionq.cli import main

    monkeypatch.chdir(REPO_ROOT)
    result = CliRunner().invoke(main, ["worker", "tests.activities:ALL"])
    assert result.exit_code == 2
    assert "--task-queue is required" in result.output


def test_redis_url_comes_from_flag_then_env_then_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from sessionq.cli.common import redis_url_from

    monkeypatch.delenv("SESSIONQ_REDIS_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert redis_url_from(None) == "redis://localhost:6379/0"
    monkeypatch.setenv("REDIS_URL", "redis://b:2/0")
    assert redis_url_from(None) == "redis://b:2/0"
    monkeypatch.setenv("SESSIONQ_REDIS_URL", "redis://a:1/0")
    assert redis_url_from(None) == "redis://a:1/0"
    assert redis_url_from("redis://flag:3/0") == "redis://flag:3/0"


def test_worker_instance_keeps_its_settings_unless_flags_override() -> None:
    from sessionq.cli.worker_cmd import build_worker, overrides_from

    from tests.activities import ALL

    original = sessionq.Worker(
        "redis://example:6379/0", task_queue="orig", activities=ALL, enable_sessions=True,
        max_concurrent_sessions=3, identity="from-module", heartbeat_timeout=7, prefix="mine",
    )  # fmt: skip
    none = dict.fromkeys(("redis_url", "task_queue", "max_sessions", "concurrency", "identity",
                          "heartbeat_timeout", "shutdown_grace", "sessions", "prefix"))  # fmt: skip
    assert build_worker(original, "m:w", overrides_from(**none)) is original
    rebuilt = build_worker(
        original, "m:w", overrides_from(**{**none, "identity": "flag-id", "max_sessions": 0})
    )
    assert rebuilt is not original
    assert (rebuilt.worker_id, rebuilt.max_concurrent_sessions) == ("flag-id", None)
    assert (rebuilt.task_queue, rebuilt.prefix, rebuilt.heartbeat_timeout) == ("orig", "mine", 7)
    assert rebuilt.enable_sessions and set(rebuilt.registry) == set(original.registry)


# --- the worker command ------------------------------------------------------------------


async def test_s05_cli_worker_serves_session_and_inspect_json_shows_it(
    redis_url: str, key_prefix: str, task_queue: str, cli_worker: StartWorker, tmp_path: Path
) -> None:
    worker = await cli_worker("tests.activities:ALL", "--max-sessions", "2", "--heartbeat-timeout", "2")
    options = sessionq.SessionOptions(creation_timeout=10, execution_timeout=60)
    async with sessionq.Client(redis_url, prefix=key_prefix) as client:
        session = await client.create_session(task_queue, options)
        ran_on = [await session.execute_activity("whoami") for _ in range(3)]
        assert ran_on == ["cli-w1"] * 3
        marker = str(tmp_path / "long")
        long = await session.start_activity("sleep_for", 30, marker)
        await wait_for(lambda: Path(marker + ".started").exists(), message="activity never started")

        def busy(doc: dict[str, Any]) -> bool:  # counters are published with the heartbeat
            w = doc["workers"][0]
            s = doc["sessions"][0]
            return w["running_activities"] == 1 and s["activities_run"] == 4 and s["queued"] == 0

        last: list[Any] = []

        async def snapshot_shows_work() -> bool:
            polled = await collect_in_process(redis_url, key_prefix)
            last[:] = [polled]
            return bool(polled["workers"] and polled["sessions"] and busy(polled))

        try:
            await wait_for(snapshot_shows_work, timeout=10, interval=0.1, message="inspect never showed work")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last snapshot: {last}\n{worker.output()}") from None
        doc = await inspect_json(redis_url, key_prefix)  # the real command
        assert doc["schema"] == 1 and doc["prefix"] == key_prefix
        [w] = doc["workers"]
        assert (w["identity"], w["task_queue"], w["alive"], w["pid"]) == (
            "cli-w1",
            task_queue,
            True,
            worker.process.pid,
        )
        assert (w["open_sessions"], w["max_sessions"], w["sessions_enabled"]) == (1, 2, True)
        assert 0 <= w["last_heartbeat_age_s"] < 10 and "sleep_for" in w["activities"]
        [s] = doc["sessions"]
        assert (s["session_id"], s["worker"], s["state"], s["worker_alive"]) == (
            session.session_id, "cli-w1", "OPEN", True,
        )  # fmt: skip
        assert 50 < s["deadline_in_s"] <= 60 and s["queued"] == 0
        [q] = doc["queues"]
        assert (q["task_queue"], q["workers_alive"], q["open_sessions"], q["free_session_slots"]) == (
            task_queue, 1, 1, 1,
        )  # fmt: skip

        one = await collect_in_process(redis_url, key_prefix, "session", session_id=session.session_id)
        assert set(one) == {"schema", "prefix", "now_ms", "session"}
        assert one["session"]["session_id"] == session.session_id and one["session"]["state"] == "OPEN"

        await session.complete()
        with pytest.raises(sessionq.ActivityCancelledError):
            await long.result()
        after = await collect_in_process(redis_url, key_prefix, "sessions")
        assert after["sessions"] == []
        ended = await collect_in_process(redis_url, key_prefix, "sessions", include_ended=True)
        assert [(s["session_id"], s["state"]) for s in ended["sessions"]] == [
            (session.session_id, "COMPLETED")
        ]
    worker.signal(signal.SIGTERM)
    assert await worker.wait() == 0


async def test_cli_sigterm_lets_running_work_finish_then_fails_sessions_and_exits_0(
    redis_url: str,
    key_prefix: str,
    task_queue: str,
    cli_worker: StartWorker,
    tmp_path: Path,
    redis_client: redis.asyncio.Redis,
) -> None:
    """The graceful stop as the README and the log line say: running activities (session ones
    too) get the grace to finish; nothing new is taken; what still runs at the end of the
    grace is cancelled and the sessions fail then, well before any heartbeat expires."""
    grace = 2.0
    # A long heartbeat timeout: if callers learned only from the heartbeat, they would wait 20 s.
    worker = await cli_worker(
        "tests.activities:ALL", "--heartbeat-timeout", "20", "--shutdown-grace", str(grace)
    )
    options = sessionq.SessionOptions(creation_timeout=10, execution_timeout=60)
    async with sessionq.Client(redis_url, prefix=key_prefix) as client:
        finishing, stuck, idle = [await client.create_session(task_queue, options) for _ in range(3)]
        quick = await finishing.start_activity("sleep_for", 1.0, str(tmp_path / "quick"))
        endless = await stuck.start_activity("sleep_for", 60, str(tmp_path / "endless"))
        plain = await client.start_activity("sleep_for", 1.0, str(tmp_path / "plain"), task_queue=task_queue)
        for name in ("quick", "endless", "plain"):
            await wait_for((tmp_path / f"{name}.started").exists, message=f"{name} activity never started")

        worker.signal(signal.SIGTERM)
        sent = time.monotonic()
        await wait_for(lambda: "stopping" in worker.output(), message="SIGTERM not handled")
        with pytest.raises(sessionq.SessionFailedError, match="shutting down"):
            await idle.execute_activity("whoami")  # nothing new is started during the grace
        assert await quick.result() == "cli-w1"  # running session work finished within the grace
        assert await plain.result() == "cli-w1"  # and so did plain work
        with pytest.raises(sessionq.SessionFailedError):
            await endless.result()
        assert grace - 0.5 <= time.monotonic() - sent < grace + 5, "cancelled at the end of the grace"
        assert (tmp_path / "endless.cancelled").exists()
        assert await worker.wait() == 0
        assert time.monotonic() - sent < grace + 8, "callers learn as the grace ends, not the heartbeat"
    keys = QueueKeys(key_prefix, task_queue)
    assert not await redis_client.sismember(keys.workers, "cli-w1"), "the worker must deregister"
    output = worker.output()
    assert "get up to shutdown_grace=2s to finish; no new work is taken" in output
    assert "worker cli-w1 stopped" in output


async def test_cli_second_sigint_exits_at_once(
    redis_url: str, key_prefix: str, task_queue: str, cli_worker: StartWorker, tmp_path: Path
) -> None:
    worker = await cli_worker("tests.activities:ALL", "--shutdown-grace", "60")
    async with sessionq.Client(redis_url, prefix=key_prefix) as client:
        await client.start_activity("sleep_for", 60, str(tmp_path / "plain"), task_queue=task_queue)
        await wait_for((tmp_path / "plain.started").exists, message="activity never started")
        worker.signal(signal.SIGINT)
        await wait_for(lambda: "SIGINT: stopping" in worker.output(), message="first SIGINT not handled")
        worker.signal(signal.SIGINT)
        assert await worker.wait(timeout=5) == 130


async def test_cli_worker_from_module_instance_with_flag_overrides(
    redis_url: str,
    key_prefix: str,
    task_queue: str,
    cli_worker: StartWorker,
    tmp_path: Path,
    redis_client: redis.asyncio.Redis,
) -> None:
    """`sessionq worker app:worker` from the current directory: the module's settings apply,
    flags override them."""
    app = tmp_path / "myapp_cli_test.py"
    app.write_text(
        "import sessionq\n"
        "@sessionq.activity\n"
        "async def hello(name):\n"
        "    return f'hello {name} from ' + sessionq.activity_info().worker_id\n"
        "worker = sessionq.Worker('redis://nowhere.invalid:1/0',\n"
        f"    task_queue={task_queue!r}, activities=[hello],\n"
        "    enable_sessions=True, max_concurrent_sessions=3, identity='module-id', prefix='wrong')\n"
    )
    worker = await cli_worker(
        "myapp_cli_test:worker", "-n", "flag-id", identity="flag-id", cwd=tmp_path, queue=task_queue
    )
    record = await redis_client.hgetall(QueueKeys(key_prefix, task_queue).worker("flag-id"))
    assert record[b"max_sessions"] == b"3", "the module's max_concurrent_sessions must be kept"
    async with sessionq.Client(redis_url, prefix=key_prefix) as client:
        options = sessionq.SessionOptions(creation_timeout=10, execution_timeout=30)
        async with client.create_session(task_queue, options) as session:
            assert await session.execute_activity("hello", "you") == "hello you from flag-id"
    worker.signal(signal.SIGTERM)
    assert await worker.wait() == 0


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_cli_worker_burst_drains_the_queue_and_exits(
    redis_url: str, key_prefix: str, task_queue: str, tmp_path: Path, loop: str
) -> None:
    """On either event loop (--loop; uvloop comes with the `fast` extra)."""
    if loop == "uvloop":
        pytest.importorskip("uvloop", reason="uvloop is not installed (pip install 'sessionq[fast]')")
    async with sessionq.Client(redis_url, prefix=key_prefix) as client:
        handles = [await client.start_activity("echo", i, task_queue=task_queue) for i in range(5)]
        ran = await run_cli(
            "worker", "tests.activities:ALL", "--burst", "--redis-url", redis_url, "--prefix", key_prefix,
            "-Q", task_queue, "-n", "burst-w", "--heartbeat-timeout", "1", "--loop", loop,
        )  # fmt: skip
        assert ran.code == 0, ran.err
        assert f"{loop} event loop" in ran.err
        assert [await h.result() for h in handles] == list(range(5))


def test_worker_loop_uvloop_without_uvloop_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from sessionq.cli.common import CliError
    from sessionq.cli.worker_cmd import event_loop

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    with pytest.raises(CliError, match=r"sessionq\[fast\]"):
        event_loop("uvloop")
    assert event_loop("auto")[0] == "asyncio"
    assert event_loop("asyncio")[0] == "asyncio"


# --- inspect -------------------------------------------------------------------------------


async def key_state(client: redis.asyncio.Redis, prefix: str) -> dict[bytes, Any]:
    """Every key under `prefix` with its type and full value (TTLs left out: they tick)."""
    state: dict[bytes, Any] = {}
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        kind = (await client.type(key)).decode()
        if kind == "string":
            value: Any = await client.get(key)
        elif kind == "hash":
            value = await client.hgetall(key)
        elif kind == "set":
            value = sorted(await client.smembers(key))
        elif kind == "zset":
            value = await client.zrange(key, 0, -1, withscores=True)
        elif kind == "list":
            value = await client.lrange(key, 0, -1)
        elif kind == "stream":
            groups = await client.xinfo_groups(key)
            pending = [await client.xpending(key, g["name"]) for g in groups]
            value = (await client.xrange(key), [(g["name"], g["pending"]) for g in groups], pending)
        else:
            value = None
        state[key] = (kind, value)
    return state


async def test_inspect_is_read_only_and_shows_a_dead_worker_and_its_stuck_session(
    redis_url: str,
    key_prefix: str,
    task_queue: str,
    cli_worker: StartWorker,
    redis_client: redis.asyncio.Redis,
) -> None:
    """SIGKILL a worker holding a session; until someone reaps it, inspect shows it DEAD and
    its session OPEN on a dead worker, and running every view changes nothing in Redis."""
    worker = await cli_worker("tests.activities:ALL", "--heartbeat-timeout", "1")
    # No owner lease: its renewals would write to Redis while inspect is checked for writing none.
    options = sessionq.SessionOptions(creation_timeout=10, execution_timeout=60, owner_timeout=None)
    client = sessionq.Client(redis_url, prefix=key_prefix)  # kept open: closing completes its sessions
    session = await client.create_session(task_queue, options)
    assert await session.execute_activity("whoami") == "cli-w1"
    worker.signal(signal.SIGKILL)
    await worker.process.wait()
    await client.start_activity("echo", "nobody runs me", task_queue=task_queue)
    alive_key = QueueKeys(key_prefix, task_queue).alive("cli-w1")
    await wait_for(lambda: _gone(redis_client, alive_key), timeout=5, message="heartbeat key never expired")

    before = await key_state(redis_client, key_prefix)
    where = ("--redis-url", redis_url, "--prefix", key_prefix)
    table_run, json_run, session_run, health_run = await asyncio.gather(
        run_cli("inspect", *where),  # the real command: every table of the overview
        run_cli("inspect", "--json", *where),
        run_cli("inspect", "session", session.session_id[:12], *where),  # as the tables show it
        run_cli("inspect", "health", *where),
    )
    for view, extra in (("workers", {}), ("sessions", {"include_ended": True}), ("queues", {})):
        await collect_in_process(redis_url, key_prefix, view, **extra)  # every other view's reads
    after = await key_state(redis_client, key_prefix)
    assert [r.code for r in (table_run, json_run, session_run)] == [0, 0, 0], table_run.err + json_run.err
    assert after == before, "inspect changed Redis"
    assert health_run.code == 1 and health_run.out.startswith("UNHEALTHY: "), health_run
    assert "cli-w1 is dead with 1 open session" in health_run.out or "no live worker" in health_run.out

    doc = json.loads(json_run.out)
    [w] = doc["workers"]
    assert (w["identity"], w["alive"], w["state"], w["open_sessions"]) == ("cli-w1", False, "dead", 1)
    [s] = doc["sessions"]
    assert (s["session_id"], s["state"], s["worker_alive"]) == (session.session_id, "OPEN", False)
    [q] = doc["queues"]
    assert (q["length"], q["workers"], q["workers_alive"]) == (1, 1, 0)
    assert q["oldest_age_s"] is not None and q["oldest_age_s"] >= 0
    table = table_run.out
    assert "DEAD" in table and "worker is dead" in table and session.session_id[:12] in table
    assert "1 activity queued and no live worker" in table  # the queue is flagged
    shown = session_run.out
    assert session.session_id in shown and re.search(r"worker alive\s+│\s+no\b", shown), shown
    assert re.search(r"created\s+│\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(.* ago\)", shown), shown
    assert str(doc["sessions"][0]["created_ms"]) not in shown, "epoch milliseconds are for --json"

    missing = await run_cli(
        "inspect", "session", "nosuchsession", "--redis-url", redis_url, "--prefix", key_prefix
    )
    assert_one_line_error(missing, 1, "no session 'nosuchsession'")
    await client.close()


async def test_inspect_health_and_a_session_looked_up_by_the_start_of_its_id(
    redis_url: str, key_prefix: str, task_queue: str, cli_worker: StartWorker,
) -> None:  # fmt: skip
    where = ("--redis-url", redis_url, "--prefix", key_prefix)
    worker = await cli_worker("tests.activities:ALL", "--max-sessions", "4")
    ok = await run_cli("inspect", "health", "-Q", task_queue, *where)
    assert ok.code == 0 and ok.out.startswith(f"OK: task queue {task_queue!r}, 1 live worker(s)"), ok
    other = await run_cli("inspect", "health", "-Q", "nobody-serves-this", *where)
    assert other.code == 1 and other.out.strip() == "UNHEALTHY: queue 'nobody-serves-this': no live worker"
    wrong = await run_cli("inspect", "health", "--redis-url", redis_url, "--prefix", key_prefix + "-typo")
    assert wrong.code == 1 and "no task queues under prefix" in wrong.out, wrong
    short = await run_cli("inspect", "session", "abc", *where)
    assert_one_line_error(short, 2, "at least 6 characters")

    async with sessionq.Client(redis_url, prefix=key_prefix) as client:
        sessions = [await client.create_session(task_queue) for _ in range(3)]
        ids = sorted(s.session_id for s in sessions)
        found = await run_cli("inspect", "session", ids[0][:8], "--json", *where)
        assert found.code == 0 and json.loads(found.out)["session"]["session_id"] == ids[0]
        # Two ids that share a start: the lookup names both instead of picking one.
        twin = ids[0][:8] + "zzzzzzzz"
        record = QueueKeys(key_prefix, task_queue).session(twin)
        async with redis.asyncio.Redis.from_url(redis_url) as r:
            await r.hset(record, mapping={"state": "COMPLETED", "worker": worker.identity})
            await r.pexpire(record, 60_000)
            ambiguous = await run_cli("inspect", "session", ids[0][:8], *where)
            await r.delete(record)
        assert_one_line_error(ambiguous, 2, f"2 sessions begin with {ids[0][:8]!r}", ids[0], twin)
        for session in sessions:
            await session.complete()
        listed = await run_cli("inspect", "sessions", "--all", *where)
    assert listed.code == 0
    ended = [line for line in listed.out.splitlines() if ids[0][:12] in line]
    assert ended and "COMPLETED" in ended[0] and " in " not in ended[0], "an ended session shows a deadline"


async def test_inspect_shows_work_waiting_inside_a_worker_a_stopping_worker_and_an_unserved_queue(
    redis_url: str, key_prefix: str, task_queue: str, cli_worker: StartWorker, tmp_path: Path,
) -> None:  # fmt: skip
    worker = await cli_worker(
        "tests.activities:ALL", "-c", "1", "--heartbeat-timeout", "1", "--shutdown-grace", "30"
    )
    unserved = task_queue + "-typo"
    async with sessionq.Client(redis_url, prefix=key_prefix) as client:
        session = await client.create_session(task_queue)
        marker = tmp_path / "m"
        for _ in range(3):  # one runs, two wait inside the worker for its only slot
            await session.start_activity(acts.sleep_for, 30, str(marker))
        await client.start_activity(acts.whoami, task_queue=unserved)

        async def shown(view: str, test: Callable[[dict[str, Any]], bool]) -> bool:
            return test(await collect_in_process(redis_url, key_prefix, view))

        def waiting(doc: dict[str, Any]) -> bool:
            return [w["waiting_activities"] for w in doc["workers"]] == [2]

        await wait_for(lambda: shown("workers", waiting), message="the waiting activities never showed")
        table = await run_cli("inspect", "--redis-url", redis_url, "--prefix", key_prefix)
        assert "1/1 +2 waiting" in table.out, table.out
        assert unserved in table.out and "1 activity queued and no live worker" in table.out, table.out

        worker.signal(signal.SIGTERM)  # the running activity has 30 s to finish

        def stopping(doc: dict[str, Any]) -> bool:
            return [w["state"] for w in doc["workers"]] == ["stopping"]

        await wait_for(lambda: shown("workers", stopping), message="the worker never showed as stopping")
        listed = await run_cli("inspect", "workers", "--redis-url", redis_url, "--prefix", key_prefix)
        assert "stopping: takes nothing new" in listed.out, listed.out
        worker.signal(signal.SIGKILL)


async def _gone(client: redis.asyncio.Redis, key: str) -> bool:
    return not await client.exists(key)


# --- demo ------------------------------------------------------------------------------------


def test_demo_uses_a_configured_redis_else_the_default_else_an_embedded_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sessionq.cli import demo
    from sessionq.cli.embedded import answers

    monkeypatch.delenv("SESSIONQ_REDIS_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setattr(demo, "ping", lambda url, timeout=3.0: "connection refused")  # nothing on :6379
    backend = demo.choose_backend(None, False, None)
    assert backend.embedded is not None and not backend.users_redis
    try:
        assert answers(backend.url)
    finally:
        backend.embedded.stop()
    assert not answers(backend.url)

    monkeypatch.setattr(demo, "ping", lambda url, timeout=3.0: None)  # a Redis answers on :6379
    assert demo.choose_backend(None, False, None) == demo.Backend(
        "redis://localhost:6379/0", "the Redis answering at redis://localhost:6379/0", users_redis=True
    )
    monkeypatch.setattr(demo, "require_redis", lambda url: None)
    monkeypatch.setenv("REDIS_URL", "redis://configured:7/0")
    assert demo.choose_backend(None, False, None).url == "redis://configured:7/0"
    assert demo.choose_backend("redis://flag:8/0", False, None).url == "redis://flag:8/0"


def test_an_embedded_server_that_fails_to_start_is_a_clear_error(tmp_path: Path) -> None:
    """What redis-server said when it exited at once; a hint when it ran but never answered
    (no loopback interface, as in a bare network namespace): never a traceback."""
    from sessionq.cli.embedded import EmbeddedError, start_redis_server

    exits = tmp_path / "exits"
    exits.write_text("#!/bin/sh\necho 'FATAL: cannot use this config'\nexit 3\n")
    exits.chmod(0o755)
    with pytest.raises(EmbeddedError, match="FATAL: cannot use this config"):
        start_redis_server(str(exits), attempts=1)
    silent = tmp_path / "silent"
    silent.write_text("#!/bin/sh\nexec sleep 30\n")
    silent.chmod(0o755)
    with pytest.raises(EmbeddedError, match=r"did not answer .* within 0\.5 s \(is the loopback"):
        start_redis_server(str(silent), attempts=1, answer_within=0.5)


def test_demo_runs_only_modules_the_wheel_ships() -> None:
    """`pip install sessionq` (a wheel, no checkout) is enough for the demo: its pipeline and
    the workers' MODULE:ATTR live in sessionq.cli.fileprocessing, a package pyproject.toml
    ships (an editable install would hide a missing one), and the workers run in a scratch
    directory with no PYTHONPATH into the sources."""
    tomllib = pytest.importorskip("tomllib")
    import sessionq.cli
    from sessionq.cli import demo, fileprocessing
    from sessionq.cli.fileprocessing import activities, starter, worker

    module, _, attr = demo.WORKER_TARGET.partition(":")
    assert module == worker.__name__ == "sessionq.cli.fileprocessing.worker"
    assert isinstance(getattr(worker, attr), sessionq.Worker)
    assert demo.TASK_QUEUE == fileprocessing.TASK_QUEUE == worker.worker.task_queue
    cli_root = Path(sessionq.cli.__file__).resolve().parent
    for packaged in (activities, starter, worker):
        assert Path(str(packaged.__file__)).resolve().parent == cli_root / "fileprocessing"

    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"]["sessionq.cli"] == "cli"
    subpackages = {
        ".".join(("sessionq.cli", *init.parent.relative_to(cli_root).parts))
        for init in cli_root.rglob("__init__.py")
    }
    assert "sessionq.cli.fileprocessing" in subpackages
    assert subpackages <= set(config["packages"]), "a package under cli/ is missing from the wheel"

    made = demo.Demo(Console(), demo.Backend("redis://unused:1/0", "unused"), sessions=1, work_seconds=0.1)
    try:
        assert made.starter is starter
        assert made.fleet.target == demo.WORKER_TARGET
        assert REPO_ROOT not in made.fleet.cwd.resolve().parents and "PYTHONPATH" not in made.fleet.env
    finally:
        made.cleanup_files()


def test_the_wheel_ships_every_data_file_of_the_core() -> None:
    """The workers of a wheel install read sessionq/lua/ (includes too) and py.typed: every
    non-Python file of the package must match pyproject.toml's package-data."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    root = REPO_ROOT / "sessionq"
    shipped = {path for pattern in config["package-data"]["sessionq"] for path in root.glob(pattern)}
    data = {
        path
        for path in root.rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts
    }
    assert root / "py.typed" in data
    missing = sorted(str(path.relative_to(root)) for path in data - shipped)
    assert not missing, f"not in the wheel: {missing}"


async def run_demo(*flags: str) -> Ran:
    ran = await run_cli("demo", *flags, "--sessions", "3", "--work-seconds", "0.3", timeout=90, cwd=Path("/"))
    assert ran.code == 0, f"demo failed ({ran.code}):\n{ran.out}\n{ran.err}"
    assert "SessionFailedError" in ran.out
    assert "All 3 files processed" in ran.out
    assert "The host session survived its process's SIGKILL and restart" in ran.out
    for pid in map(int, re.findall(r"\(pid (\d+)\)", ran.out)):
        assert not pid_running(pid), f"the demo left worker pid {pid} running"
    return ran


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server binary")
async def test_demo_runs_on_embedded_redis_server() -> None:
    ran = await run_demo("--embedded", "--embedded-backend", "redis-server")
    match = re.search(r"embedded redis-server on 127\.0\.0\.1:(\d+)", ran.out)
    assert match, ran.out
    with pytest.raises(OSError):  # the private server is gone
        socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=1).close()


async def test_demo_runs_on_embedded_fakeredis() -> None:
    ran = await run_demo("--embedded-backend", "fakeredis")
    assert "embedded fakeredis" in ran.out
