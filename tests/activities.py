"""Activities the test workers register (``tests.activities:ALL``).

Most return the worker id they ran on, so tests can check where work went (S05, S06).
The optional ``marker`` arguments are file paths the activity writes at known moments
(``<marker>.started``, ``<marker>.cancelled``): tests wait for those files with
``wait_for`` instead of sleeping and hoping the activity got that far.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import sessionq


def _worker_id() -> str:
    return sessionq.activity_info().worker_id


def _touch(marker: str | None, suffix: str, text: str = "") -> None:
    if marker:
        Path(f"{marker}.{suffix}").write_text(text)


def local_dir() -> Path:
    """This worker's private scratch directory: stands in for a host's local disk."""
    safe_id = re.sub(r"[^A-Za-z0-9_.@-]", "_", _worker_id())
    path = Path(tempfile.gettempdir()) / "sessionq-test" / safe_id
    path.mkdir(parents=True, exist_ok=True)
    return path


@sessionq.activity
async def whoami() -> str:
    """The id of the worker running this (async) activity."""
    return _worker_id()


@sessionq.activity
def whoami_sync() -> str:
    """The id of the worker running this (thread-pool) activity."""
    return _worker_id()


@sessionq.activity
async def echo(x: Any) -> Any:
    return x


@sessionq.activity
async def sleep_for(seconds: float, marker: str | None = None) -> str:
    """Sleep (the stand-in for slow work); writes ``<marker>.cancelled`` if cancelled."""
    _touch(marker, "started", _worker_id())
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        _touch(marker, "cancelled", _worker_id())
        raise
    return _worker_id()


@sessionq.activity
def sleep_sync(seconds: float, marker: str | None = None) -> str:
    """Busy a pool thread, polling ``is_cancelled()`` every 10 ms as sync activities must."""
    _touch(marker, "started", _worker_id())
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if sessionq.is_cancelled():
            _touch(marker, "cancelled", _worker_id())
            return "cancelled"
        time.sleep(0.01)
    return _worker_id()


@sessionq.activity
async def fail(msg: str) -> None:
    raise ValueError(msg)


@sessionq.activity
def write_local(name: str, data: str) -> str:
    """Write a file on this worker's "local disk"; returns its path."""
    path = local_dir() / Path(name).name
    path.write_text(data)
    return str(path)


@sessionq.activity
def read_local(name: str) -> str:
    """Read a file written by ``write_local``: FileNotFoundError on any other worker."""
    return (local_dir() / Path(name).name).read_text()


@sessionq.activity
async def session_id() -> str | None:
    """The id of the session this activity runs in, or None outside a session."""
    info = sessionq.get_session_info()
    return info.session_id if info is not None else None


@sessionq.activity
def mark(path: str) -> str:
    """Append this worker's id to ``path``: counts runs, e.g. to prove a task never ran."""
    worker_id = _worker_id()
    with open(path, "a") as f:
        f.write(worker_id + "\n")
    return worker_id


@sessionq.activity
async def describe() -> dict[str, Any]:
    """What ``activity_info()`` says, for tests of attempts, names and sessions."""
    info = sessionq.activity_info()
    return {
        "activity_id": info.activity_id,
        "name": info.name,
        "attempt": info.attempt,
        "task_queue": info.task_queue,
        "worker_id": info.worker_id,
        "session_id": info.session.session_id if info.session is not None else None,
    }


ALL = [
    whoami,
    whoami_sync,
    echo,
    sleep_for,
    sleep_sync,
    fail,
    write_local,
    read_local,
    session_id,
    mark,
    describe,
]
