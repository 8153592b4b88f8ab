"""The README's Python runs as written (issue Operability): its Quick start files are cut
out of README.md, a real `sessionq worker activities:worker` serves them, and both callers
run against the test's Redis, with only the environment variables the README names.
The README's other Python blocks are fragments; they must at least compile.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import re
import sys
from pathlib import Path

import redis.asyncio

from sessionq.keys import QueueKeys
from tests.helpers import wait_for
from tests.test_cli import REPO_ROOT, clean_env, cli_argv

BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks() -> list[str]:
    return BLOCK.findall((REPO_ROOT / "README.md").read_text())


def named_files(blocks: list[str]) -> dict[str, str]:
    """The blocks whose first line names a file ("# caller.py — ..."), by that name."""
    out = {}
    for block in blocks:
        first = block.splitlines()[0]
        if match := re.match(r"# (\w+\.py)\b", first):
            out[match.group(1)] = block
    return out


def test_every_python_block_of_the_readme_compiles() -> None:
    blocks = python_blocks()
    assert len(blocks) >= 5
    for block in blocks:
        compile(block, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


async def run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 60) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), timeout)
    text = out.decode(errors="replace")
    assert process.returncode == 0, f"{' '.join(argv)} exited {process.returncode}:\n{text}"
    return text


async def test_the_quick_start_runs_as_written(
    redis_url: str, key_prefix: str, tmp_path: Path, redis_client: redis.asyncio.Redis
) -> None:
    files = named_files(python_blocks())
    assert sorted(files) == ["activities.py", "caller.py", "sync_caller.py"]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    source = tmp_path / "input.txt"
    source.write_text("hello, sessions\n")
    env = clean_env(SESSIONQ_REDIS_URL=redis_url, SESSIONQ_PREFIX=key_prefix)
    log = tmp_path / "worker.log"
    with open(log, "wb") as sink:
        worker = await asyncio.create_subprocess_exec(
            *cli_argv("worker", "activities:worker", "--identity", "quick"),
            cwd=tmp_path, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=sink, stderr=sink,
        )  # fmt: skip
    try:
        alive = QueueKeys(key_prefix, "fileprocessing").alive("quick")
        await wait_for(lambda: redis_client.exists(alive), timeout=20, message="the worker never registered")
        said = await run([sys.executable, "caller.py", source.as_uri()], tmp_path, env)
        assert "16 bytes, all on quick at " in said, said
        assert "outside the session: FileNotFoundError" in said, said
        said = await run([sys.executable, "sync_caller.py", source.as_uri()], tmp_path, env)
        assert said.strip() == "16 bytes on quick", said
    finally:
        with contextlib.suppress(ProcessLookupError):
            worker.kill()
        await worker.wait()
