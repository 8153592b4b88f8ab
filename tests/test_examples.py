"""The examples run as documented: real processes, talking only through Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from tests.conftest import REPO_ROOT
from tests.helpers import wait_for

HELLO = REPO_ROOT / "examples" / "hello"


def example_env(redis_url: str, key_prefix: str) -> dict[str, str]:
    """The environment the examples read: which Redis, which key prefix."""
    env = dict(os.environ)
    env.update(
        SESSIONQ_REDIS_URL=redis_url,
        SESSIONQ_PREFIX=key_prefix,
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        PYTHONUNBUFFERED="1",
    )
    return env


@contextlib.asynccontextmanager
async def running(script: Path, env: dict[str, str], out: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run `script` with its stdout+stderr in `out`; SIGKILL it on the way out if still alive."""
    with out.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(script), cwd=REPO_ROOT, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=sink, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            yield process
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


async def test_hello_example_two_processes(redis_url: str, key_prefix: str, tmp_path: Path) -> None:
    env = example_env(redis_url, key_prefix)
    worker_out, client_out = tmp_path / "worker.out", tmp_path / "client.out"
    async with running(HELLO / "worker.py", env, worker_out) as worker:
        await wait_for(
            lambda: "ready on task queue 'hello'" in worker_out.read_text() or worker.returncode is not None,
            20,
            message="the hello worker never said it was ready",
        )
        assert worker.returncode is None, worker_out.read_text()
        async with running(HELLO / "client.py", env, client_out) as client:
            code = await asyncio.wait_for(client.wait(), 30)
        output = client_out.read_text()
        assert code == 0, output
        assert output.splitlines() == [
            "greet: Hello, world!",
            'word_count: {"cat": 2, "other": 1, "saw": 1, "the": 2}',
            "divide: remote ZeroDivisionError: division by zero",
        ], output
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.wait(), 20) == 0, worker_out.read_text()
    assert "worker stopped" in worker_out.read_text()
