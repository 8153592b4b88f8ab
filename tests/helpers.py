"""Helpers shared by the tests: ``wait_for`` and the worker-subprocess plumbing.

Tests synchronise on events with a deadline, never on bare sleeps: a sleep is either too
short on a loaded CI box (flaky) or too long everywhere else (slow).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import signal
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

TAIL_LINES = 200
"""How many lines of a worker's stdout and stderr to keep for failure messages."""
STREAM_LIMIT = 4 * 1024 * 1024
"""Longest line read from a worker's pipes (asyncio's default of 64 KiB is easy to hit)."""


async def wait_for(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition not met",
) -> T:
    """Poll ``predicate`` (sync or async) until it returns something truthy; return that.

    Raises ``AssertionError(message)`` once ``timeout`` seconds pass without success.
    Exceptions raised by the predicate propagate at once.
    """
    __tracebackhide__ = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if loop.time() >= deadline:
            raise AssertionError(f"{message} (waited {timeout:g} s)")
        await asyncio.sleep(interval)


class WorkerStartError(RuntimeError):
    """A worker subprocess died, or never said READY, while starting."""


@dataclass
class WorkerProcess:
    """A sessionq worker running as a real OS process (made by the ``spawn_worker`` fixture).

    A real process, so that ``kill()`` is a true SIGKILL: no ``finally`` blocks, no graceful
    deregistration; only the heartbeat TTL tells the rest of the system.
    """

    identity: str
    process: asyncio.subprocess.Process
    worker_id: str = ""
    stdout_tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    drainers: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def kill(self) -> int:
        """SIGKILL the worker and return its exit code (negative signal number)."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        return await self.process.wait()

    def terminate(self) -> None:
        """SIGTERM: ask the worker to stop gracefully; ``await wait()`` for the exit code."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float = 10.0) -> int:
        """Wait for the worker to exit and return its exit code; AssertionError on timeout."""
        __tracebackhide__ = True
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(
                f"worker {self.identity} (pid {self.pid}) did not exit within {timeout:g} s\n"
                + self.output_tail()
            ) from None

    def output_tail(self, lines: int = 40) -> str:
        """The last lines the worker wrote, for failure messages."""
        out = list(self.stdout_tail)[-lines:]
        err = list(self.stderr_tail)[-lines:]
        return (
            f"--- {self.identity} stdout (last {len(out)} lines) ---\n"
            + "\n".join(out)
            + f"\n--- {self.identity} stderr (last {len(err)} lines) ---\n"
            + "\n".join(err)
        )


class SpawnWorker(Protocol):
    """Signature of the ``spawn_worker`` fixture, for annotating tests."""

    async def __call__(
        self,
        *,
        task_queue: str | None = None,
        activities: str = "tests.activities:ALL",
        identity: str | None = None,
        max_sessions: int | None = None,
        heartbeat_timeout: float = 2.0,
        concurrency: int = 10,
        enable_sessions: bool = True,
        extra_args: Sequence[str] = (),
        ready_timeout: float = 20.0,
    ) -> WorkerProcess: ...


async def _drain(
    stream: asyncio.StreamReader,
    tail: deque[str],
    label: str,
    on_line: Callable[[str], None] | None = None,
) -> None:
    """Read a child's pipe to EOF so it never blocks on a full pipe.

    Lines are kept in ``tail`` and echoed to our stderr, which pytest captures and shows,
    interleaved in time order, only when the test fails.
    """
    while True:
        try:
            raw = await stream.readline()
        except ValueError:  # a line beyond STREAM_LIMIT: note it and carry on
            tail.append("<line too long, dropped>")
            continue
        if not raw:
            return
        line = raw.decode(errors="replace").rstrip("\r\n")
        tail.append(line)
        print(f"[{label}] {line}", file=sys.stderr, flush=True)
        if on_line is not None:
            on_line(line)


async def start_worker_process(
    argv: Sequence[str],
    *,
    identity: str,
    cwd: Path,
    env: Mapping[str, str],
    ready_timeout: float,
    register: Callable[[WorkerProcess], None],
) -> WorkerProcess:
    """Start ``argv`` and wait until it prints ``READY <worker_id>`` on stdout.

    ``register`` receives the process before anything can fail, so the caller can kill
    it at teardown whatever happens here.
    """
    __tracebackhide__ = True  # failures show the worker's output, not our locals (env!)
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=STREAM_LIMIT,
    )
    worker = WorkerProcess(identity=identity, process=process)
    register(worker)
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def on_stdout(line: str) -> None:
        if not ready.done() and line.startswith("READY "):
            ready.set_result(line.removeprefix("READY ").strip())

    label = f"{identity}:{process.pid}"
    assert process.stdout is not None and process.stderr is not None
    worker.drainers = [
        asyncio.create_task(_drain(process.stdout, worker.stdout_tail, f"{label} out", on_stdout)),
        asyncio.create_task(_drain(process.stderr, worker.stderr_tail, f"{label} err")),
    ]
    exited = asyncio.ensure_future(process.wait())
    try:
        await asyncio.wait({ready, exited}, timeout=ready_timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        exited.cancel()
    if ready.done():
        worker.worker_id = ready.result()
        return worker
    if process.returncode is None:
        await worker.kill()
        problem = f"printed no READY line within {ready_timeout:g} s (killed)"
    else:
        problem = f"exited with code {process.returncode} before READY"
    await asyncio.wait(worker.drainers, timeout=5)  # collect its last words
    raise WorkerStartError(f"worker {identity} (pid {process.pid}) {problem}\n{worker.output_tail()}")


_COMMAND_NAME = re.compile(rb"(?:^|\r\n)\*\d+\r\n\$\d+\r\n([A-Za-z]+)\r\n")


def with_client_name(url: str, name: str) -> str:
    """The URL with a CLIENT SETNAME for every connection made from it."""
    return f"{url}{'&' if '?' in url else '?'}client_name={name}"


@contextlib.contextmanager
def commands_sent_by(client_name: str) -> Iterator[list[str]]:
    """Record the name of every command written on a connection named `client_name`.

    Counted where bytes enter the socket's StreamWriter, so no path (pool, pipeline,
    sessionq's multiplexed and blocking connections) is missed. A connection is known by
    its name from its handshake (CLIENT SETNAME), which goes through redis-py's
    send_packed_command on every path."""
    import weakref

    from redis.asyncio.connection import AbstractConnection

    sent: list[str] = []
    named: weakref.WeakSet[asyncio.StreamWriter] = weakref.WeakSet()
    original_send = AbstractConnection.send_packed_command
    original_write, original_writelines = asyncio.StreamWriter.write, asyncio.StreamWriter.writelines

    async def learning(self: Any, command: Any, check_health: bool = True) -> None:
        writer = getattr(self, "_writer", None)
        if writer is not None and getattr(self, "client_name", None) == client_name:
            named.add(writer)
        await original_send(self, command, check_health)

    def record(writer: asyncio.StreamWriter, chunks: Any) -> None:
        if writer in named:
            data = b"".join(bytes(chunk) for chunk in chunks)
            sent.extend(m.group(1).decode().upper() for m in _COMMAND_NAME.finditer(data))

    def write(self: asyncio.StreamWriter, data: Any) -> None:
        record(self, [data])
        original_write(self, data)

    def writelines(self: asyncio.StreamWriter, data: Any) -> None:
        chunks = list(data)
        record(self, chunks)
        original_writelines(self, chunks)

    AbstractConnection.send_packed_command = learning  # type: ignore[method-assign]
    asyncio.StreamWriter.write = write  # type: ignore[method-assign]
    asyncio.StreamWriter.writelines = writelines  # type: ignore[method-assign]
    try:
        yield sent
    finally:
        AbstractConnection.send_packed_command = original_send  # type: ignore[method-assign]
        asyncio.StreamWriter.write = original_write  # type: ignore[method-assign]
        asyncio.StreamWriter.writelines = original_writelines  # type: ignore[method-assign]


def failover_worker(url: object, prefix: str, queue: str, identity: str, heartbeat_timeout: float) -> Any:
    """A session worker (two slots) for the failover tests, which kill Redis, not workers:
    the heartbeat timeout is chosen to outlast the failover."""
    import sessionq
    from tests import activities as acts

    return sessionq.Worker(
        url,
        task_queue=queue,
        activities=acts.ALL,
        enable_sessions=True,
        max_concurrent_sessions=2,
        identity=identity,
        heartbeat_timeout=heartbeat_timeout,
        shutdown_grace=2.0,
        prefix=prefix,
    )


def wait_replicated(host: str, port: int, key: str, timeout_ms: int = 5000) -> int:
    """How many replicas of the server at host:port have every write it took so far, waiting
    up to `timeout_ms` for one (WAIT 1). `key`: a key of a slot this server holds (on a
    cluster node); its slot takes a probe write.

    WAIT waits only for what its own connection wrote before it: sent first on a connection
    (no write, and on Redis 7.0 no command at all, before it) it answers at once with the
    number of replicas connected, however far behind they are. redis-py 5.0.8 (RESP2)
    opens a connection without a command Redis 7.0 runs, so `Redis(...).wait(1, 5000)` made
    this way checked nothing there; the newest redis-py's HELLO 3 made it work by accident
    (and on newer Redis only a write counts). So write first, on the same connection:
    replication is in order, so a replica that has this write has every earlier one."""
    import redis

    tag = key
    start = key.find("{")
    end = key.find("}", start + 1)
    if start >= 0 and end > start + 1:
        tag = key[start + 1 : end]
    probe = "sessionq-test:replicated:{" + tag + "}"  # the same slot as `key`
    with redis.Redis(
        host=host, port=port, single_connection_client=True, socket_timeout=timeout_ms / 1000 + 5
    ) as conn:
        conn.incr(probe)
        return int(conn.wait(1, timeout_ms))


def stop_processes(processes: Sequence[Any]) -> None:
    """SIGTERM every process still running, then wait for each (SIGKILL after 5 s)."""
    import subprocess

    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def pid_running(pid: int) -> bool:
    """Whether a process with this pid exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
