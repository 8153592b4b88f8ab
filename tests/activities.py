"""Activities the test workers register (``tests.activities:ALL``).

Most return the worker id they ran on, so tests can check where work went (S05, S06).
The optional ``marker`` arguments are file paths the activity writes at known moments
(``<marker>.started``, ``<marker>.cancelled``): tests wait for those files with
``wait_for`` instead of sleeping and hoping the activity got that far.
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import sessionq


def _worker_id() -> str:
    return sessionq.activity_info().worker_id


def _touch(marker: str | None, suffix: str, text: str = "") -> None:
    """Write ``<marker>.<suffix>`` whole or not at all (a test may read it the moment it exists)."""
    if marker:
        partial = Path(f"{marker}.{suffix}.partial")
        partial.write_text(text)
        os.replace(partial, f"{marker}.{suffix}")


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


@sessionq.activity
async def span(path: str, seconds: float) -> str:
    """Append "start <t>" and "end <t>" (monotonic) to ``path`` around a sleep: overlapping
    spans in one file show activities that ran at the same time."""
    with open(path, "a") as f:
        f.write(f"start {time.monotonic()}\n")
    await asyncio.sleep(seconds)
    with open(path, "a") as f:
        f.write(f"end {time.monotonic()}\n")
    return _worker_id()


@sessionq.activity
async def exit_with(how: str) -> None:
    """What a careless activity might do to its process: sys.exit(), SystemExit, Ctrl-C."""
    import sys

    if how == "sys.exit":
        sys.exit(3)
    raise {"SystemExit": SystemExit(4), "KeyboardInterrupt": KeyboardInterrupt()}[how]


@sessionq.activity
def exit_with_sync(how: str) -> None:
    """exit_with, from a thread-pool (def) activity."""
    import sys

    if how == "sys.exit":
        sys.exit(3)
    raise {"SystemExit": SystemExit(4), "KeyboardInterrupt": KeyboardInterrupt()}[how]


class _StrRaises(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


@sessionq.activity
async def raise_unencodable(kind: str) -> None:
    """Raise an exception whose report is hard to encode: huge, not valid UTF-8, or
    whose str() raises."""
    if kind == "huge":
        raise ValueError("x" * (2 * 1024 * 1024))
    if kind == "surrogate":
        raise ValueError("bad \udce9 text")
    raise _StrRaises()


@sessionq.activity
async def block_loop(seconds: float, marker: str) -> str:
    """A badly written async activity: blocks the worker's event loop (time.sleep). Appends
    this worker's id to ``marker`` each time it runs."""
    with open(marker, "a") as f:
        f.write(_worker_id() + "\n")
    time.sleep(seconds)
    return _worker_id()


@sessionq.activity
async def refuse(path: str, error_type: str) -> None:
    """Append a line to ``path`` (counts attempts), then raise an ApplicationError of
    `error_type` marked non-retryable, as the Temporal SDK's users do."""
    with open(path, "a") as f:
        f.write("attempt\n")
    raise sessionq.ApplicationError("the input is wrong", type=error_type, non_retryable=True)


@sessionq.activity
def ignore_cancel(seconds: float, marker: str) -> str:
    """A def activity that never looks at is_cancelled(): it runs its full time whatever happens."""
    _touch(marker, "started", _worker_id())
    time.sleep(seconds)
    _touch(marker, "finished", _worker_id())
    return _worker_id()


ALL = [
    span,
    exit_with,
    exit_with_sync,
    raise_unencodable,
    block_loop,
    refuse,
    ignore_cancel,
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


@sessionq.activity
async def raise_cancelled() -> None:
    """An async activity that raises CancelledError itself (awaiting a future that was
    cancelled), while nobody cancelled it."""
    future = asyncio.get_running_loop().create_future()
    future.cancel()
    await future


@sessionq.activity
async def tuple_keys() -> dict[Any, str]:
    """A result msgpack encodes but cannot decode back (tuple keys come back as lists)."""
    return {(1, 2): "x"}


@sessionq.activity
def ignore_cancel_span(path: str, seconds: float) -> str:
    """A def activity that ignores cancellation, logging "start"/"end" to ``path`` (see span)."""
    with open(path, "a") as f:
        f.write(f"start {time.monotonic()}\n")
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write(f"end {time.monotonic()}\n")
    return _worker_id()


ALL += [raise_cancelled, tuple_keys, ignore_cancel_span]


@sessionq.activity
async def slow_then_cancelled(seconds: float) -> None:
    """Attempt 1 sleeps `seconds` (to time out); later attempts raise CancelledError themselves."""
    if sessionq.activity_info().attempt == 1:
        await asyncio.sleep(seconds)
        return
    future = asyncio.get_running_loop().create_future()
    future.cancel()
    await future


ALL += [slow_then_cancelled]


def host_dir() -> Path:
    """The host's local disk, as its processes share it: one directory per host (and test
    prefix), whichever process of the host runs the activity."""
    info = sessionq.get_session_info()
    assert info is not None and info.host_id, "a host-session activity"
    path = Path(tempfile.gettempdir()) / "sessionq-test" / f"host-{info.prefix}-{info.host_id}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@sessionq.activity
async def host_write(name: str, text: str) -> str:
    """Write a file on the host's disk; returns the process that wrote it."""
    (host_dir() / name).write_text(text)
    return _worker_id()


@sessionq.activity
async def host_read(name: str) -> list[str]:
    """Read a file from the host's disk: [its text, the process that read it]."""
    return [(host_dir() / name).read_text(), _worker_id()]


@sessionq.activity
async def attempt_after(seconds: float, marker: str | None = None) -> list[Any]:
    """Sleep, then answer [attempt, process]; writes ``<marker>.started.<attempt>`` (the
    process id) as each attempt starts."""
    info = sessionq.activity_info()
    _touch(marker, f"started.{info.attempt}", info.worker_id)
    await asyncio.sleep(seconds)
    return [info.attempt, info.worker_id]


@sessionq.activity
async def session_token() -> bytes:
    """The recreate token of the session this activity runs in, as the activity sees it."""
    info = sessionq.get_session_info()
    assert info is not None
    return info.recreate_token


@sessionq.activity
async def session_resources() -> dict[str, int] | None:
    """The session resources of the session this activity runs in, as the activity sees them."""
    info = sessionq.get_session_info()
    return info.resources if info is not None else None


ALL += [host_write, host_read, attempt_after, session_token, session_resources]
