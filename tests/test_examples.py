"""The examples run as documented: real processes, talking only through Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import redis.asyncio

from sessionq.keys import QueueKeys
from tests.conftest import REPO_ROOT
from tests.helpers import wait_for

EXAMPLES = REPO_ROOT / "examples"
HELLO = EXAMPLES / "hello"


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
async def running(
    args: Sequence[str], env: dict[str, str], out: Path, cwd: Path = REPO_ROOT
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run `python ARGS...` with its stdout+stderr in `out`; SIGKILL it on the way out if still alive."""
    with out.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable, *args, cwd=cwd, env=env,
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
    async with running([str(HELLO / "worker.py")], env, worker_out) as worker:
        await wait_for(
            lambda: "ready on task queue 'hello'" in worker_out.read_text() or worker.returncode is not None,
            20,
            message="the hello worker never said it was ready",
        )
        assert worker.returncode is None, worker_out.read_text()
        async with running([str(HELLO / "client.py")], env, client_out) as client:
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


async def test_fileprocessing_example_by_hand_from_examples(
    redis_url: str, key_prefix: str, redis_client: redis.asyncio.Redis, tmp_path: Path
) -> None:
    """The README's walkthrough, run from examples/: its modules re-export the packaged
    sessionq.cli.fileprocessing (one copy of the code), and each file goes through one session."""
    env = example_env(redis_url, key_prefix)
    env.update(FILEPROCESSING_WORK_SECONDS="0.05", FILEPROCESSING_SCRATCH=str(tmp_path / "disks"))
    worker_out, starter_out = tmp_path / "worker.out", tmp_path / "starter.out"
    worker_argv = ["-m", "sessionq.cli", "worker", "fileprocessing.worker:worker", "-n", "ex-w1",
                   "--prefix", key_prefix]  # fmt: skip
    alive = QueueKeys(key_prefix, "fileprocessing").alive("ex-w1")
    async with running(worker_argv, env, worker_out, cwd=EXAMPLES) as worker:
        await wait_for(
            lambda: worker.returncode is not None or redis_client.exists(alive),
            20,
            message="the fileprocessing worker never registered",
        )
        assert worker.returncode is None, worker_out.read_text()
        starter_argv = ["-m", "fileprocessing.starter", "--files", "2", "--prefix", key_prefix]
        async with running(starter_argv, env, starter_out, cwd=EXAMPLES) as starter:
            code = await asyncio.wait_for(starter.wait(), 60)
        output = starter_out.read_text()
        assert code == 0, output + worker_out.read_text()
        for name in ("file-1.txt", "file-2.txt"):
            assert f"{name}: ex-w1: " in output, output
            assert f"{name}: upload done on ex-w1" in output, output
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.wait(), 20) == 0, worker_out.read_text()
    shims = (EXAMPLES / "fileprocessing").glob("*.py")
    assert all("from sessionq.cli.fileprocessing" in shim.read_text() for shim in shims)


async def test_gpu_example_runs_two_jobs_at_once_and_the_third_when_a_gpu_frees(
    redis_url: str, key_prefix: str, redis_client: redis.asyncio.Redis, tmp_path: Path
) -> None:
    """examples/gpu: a worker offering 2 GPUs, three sessions asking for one each."""
    env = example_env(redis_url, key_prefix)
    worker_out, client_out = tmp_path / "worker.out", tmp_path / "client.out"
    alive = QueueKeys(key_prefix, "gpu").alive("gpu-box")
    async with running([str(EXAMPLES / "gpu" / "worker.py")], env, worker_out) as worker:
        await wait_for(
            lambda: worker.returncode is not None or redis_client.exists(alive),
            20,
            message="the gpu worker never registered",
        )
        assert worker.returncode is None, worker_out.read_text()
        async with running([str(EXAMPLES / "gpu" / "client.py")], env, client_out) as client:
            code = await asyncio.wait_for(client.wait(), 60)
        output = client_out.read_text()
        assert code == 0, output + worker_out.read_text()
        lines = output.splitlines()
        got = [line.split(":")[0] for line in lines if "got a gpu" in line]
        assert got == ["job-1", "job-2", "job-3"], output  # first come, first served
        done_1 = next(i for i, line in enumerate(lines) if line.startswith("job-1: trained"))
        assert lines.index(next(line for line in lines if line.startswith("job-3: got"))) > done_1, output
        assert "job-3: trained 1 epoch(s) on 1 gpu(s) of gpu-box" in output
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.wait(), 20) == 0, worker_out.read_text()
