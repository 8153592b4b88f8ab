"""The three activities of the file-processing example.

Each step leaves its output on the worker's local disk, so the next step only works on
the same worker: exactly what a session guarantees. Run elsewhere, `process_file` would
raise FileNotFoundError.

``FILEPROCESSING_WORK_SECONDS`` (default 0.5) is how long each step pretends to work, so
you have time to watch it (and to kill a worker mid-session). ``FILEPROCESSING_SCRATCH``
is where the workers' "local disks" live (default: <tmp>/sessionq-fileprocessing).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import sessionq


def work_seconds() -> float:
    return float(os.environ.get("FILEPROCESSING_WORK_SECONDS", "0.5"))


def local_dir() -> Path:
    """This worker's private directory: stands in for the disk of the worker's host. The
    processes of one host (`sessionq worker --host-id`) share it, as they share a disk."""
    root = Path(
        os.environ.get("FILEPROCESSING_SCRATCH") or Path(tempfile.gettempdir()) / "sessionq-fileprocessing"
    )
    session = sessionq.get_session_info()
    owner = f"host-{session.host_id}" if session and session.host_id else sessionq.activity_info().worker_id
    path = root / re.sub(r"[^A-Za-z0-9_.@-]", "_", owner)
    path.mkdir(parents=True, exist_ok=True)
    return path


def pretend_to_work(seconds: float) -> None:
    """Sleep in small steps, heartbeating: a cancelled activity stops at the next step."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sessionq.heartbeat()  # raises ActivityCancelledError once the session ends
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


def session_tag() -> str:
    info = sessionq.get_session_info()
    return info.session_id[:8] if info is not None else "nosession"


@sessionq.activity
def download_file(url: str) -> str:
    """Fetch `url` (http, https or file) onto this worker's local disk; returns the local path."""
    with urllib.request.urlopen(url, timeout=30) as response:
        data = response.read()
    pretend_to_work(work_seconds())
    path = local_dir() / f"{session_tag()}-{Path(url).name or 'download'}"
    path.write_bytes(data)
    return str(path)


@sessionq.activity
def process_file(path: str) -> str:
    """Transform a downloaded file (upper-case it, add a word count); returns the new local path.

    Reads the local file, so it must run on the worker that downloaded it.
    """
    source = Path(path)
    content = source.read_text()  # FileNotFoundError on any other worker
    pretend_to_work(work_seconds())
    words = len(content.split())
    target = source.with_name(source.stem + ".processed" + source.suffix)
    target.write_text(
        f"# processed by {sessionq.activity_info().worker_id}: {words} words\n{content.upper()}"
    )
    source.unlink()
    return str(target)


@sessionq.activity
async def upload_file(path: str, destination: str) -> dict[str, Any]:
    """Copy the processed file to `destination` (a directory standing in for blob storage),
    remove it from the local disk, and say where it went and who did the work."""
    source = Path(path)
    await asyncio.sleep(work_seconds())  # an async activity: cancellation arrives as CancelledError
    target = Path(destination) / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(shutil.copyfile, source, target)
    size = source.stat().st_size
    source.unlink()
    with contextlib.suppress(OSError):  # the worker's directory, once nothing is left in it
        source.parent.rmdir()
    info = sessionq.activity_info()
    return {"uploaded": str(target), "bytes": size, "worker": info.worker_id, "pid": os.getpid()}


ACTIVITIES = [download_file, process_file, upload_file]
