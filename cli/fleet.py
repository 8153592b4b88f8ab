"""Worker processes for `sessionq demo`: start them, SIGKILL one, stop the rest gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sessionq.connection import connect
from sessionq.keys import QueueKeys


@dataclass
class WorkerProc:
    identity: str
    process: subprocess.Popen[bytes]
    log_path: Path
    killed: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Fleet:
    """Worker subprocesses running `sessionq worker MODULE:ATTR` on one Redis and prefix.

    MODULE must be importable by the worker processes as installed (the demo's is
    sessionq.cli.fileprocessing); `cwd` is their working directory, which the CLI also
    puts on sys.path.
    """

    target: str
    cwd: Path
    redis_url: str
    prefix: str
    task_queue: str
    logs: Path
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, WorkerProc] = field(default_factory=dict)

    def start(self, identity: str, *flags: str) -> WorkerProc:
        argv = [sys.executable, "-m", "sessionq.cli", "worker", self.target,
                "--redis-url", self.redis_url, "--prefix", self.prefix, "--identity", identity,
                "--stop-with-parent", "--log-level", "WARNING", *flags]  # fmt: skip
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{identity}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                argv, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        proc = WorkerProc(identity, process, log_path)
        self.procs[identity] = proc
        return proc

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Return once every worker has registered; raise RuntimeError with its log if one fails."""
        keys = QueueKeys(self.prefix, self.task_queue)
        client = connect(self.redis_url)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            waiting = set(self.procs)
            while waiting:
                for identity in list(waiting):
                    proc = self.procs[identity]
                    if proc.process.poll() is not None:
                        code = proc.process.returncode
                        raise RuntimeError(f"worker {identity} exited with code {code}:\n{proc.log_tail()}")
                    if await client.exists(keys.alive(identity)):
                        waiting.discard(identity)
                if waiting and loop.time() > deadline:
                    raise RuntimeError(
                        f"workers {', '.join(sorted(waiting))} did not start within {timeout:g}s"
                    )
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    def kill(self, identity: str) -> WorkerProc:
        """SIGKILL: no cleanup, no goodbye; only its heartbeat's expiry tells the others."""
        proc = self.procs[identity]
        with contextlib.suppress(ProcessLookupError):
            proc.process.send_signal(signal.SIGKILL)
        proc.killed = True
        return proc

    async def stop_all(self, timeout: float = 15.0) -> dict[str, int | None]:
        """SIGTERM every live worker and wait (SIGKILL after `timeout`); their exit codes."""
        for proc in self.procs.values():
            if proc.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.process.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(p.process.poll() is None for p in self.procs.values()) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for proc in self.procs.values():
            if proc.process.poll() is None:
                proc.process.kill()
                proc.process.wait()
        return {identity: proc.process.returncode for identity, proc in self.procs.items()}

    def kill_all_now(self) -> None:
        """Last-resort cleanup: leave no process behind."""
        for proc in self.procs.values():
            if proc.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.process.kill()
                proc.process.wait()

    def describe(self) -> list[Any]:
        return [(p.identity, p.pid) for p in self.procs.values()]
