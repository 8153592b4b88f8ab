"""The caller side of the file-processing example: each file in its own session.

    python -m sessionq.cli.fileprocessing.starter --files 6

Needs workers (`sessionq worker sessionq.cli.fileprocessing.worker:worker`). Kill one
of them with `kill -9 <pid>` (see `sessionq inspect workers`) while files are being
processed: the file it held fails with SessionFailedError within the worker's heartbeat
timeout, is started again in a new session on another worker, and the other files finish.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sessionq

from . import TASK_QUEUE
from .activities import download_file, process_file, upload_file

EventSink = Callable[["Event"], None]


@dataclass
class Event:
    """Something that happened to one file, for whoever displays progress."""

    kind: str
    """'session' (opened), 'step' (started), 'stepdone', 'failed' (SessionFailedError), 'done'."""
    file: str
    attempt: int
    worker: str = ""
    step: str = ""
    detail: Any = None
    elapsed: float = 0.0


@dataclass
class Outcome:
    """What happened to one file across its attempts."""

    file: str
    result: dict[str, Any] | None = None
    workers: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def ignore(event: Event) -> None:
    return None


async def process_in_session(
    client: sessionq.Client,
    url: str,
    destination: str,
    *,
    attempt: int = 1,
    on_event: EventSink = ignore,
    options: sessionq.SessionOptions | None = None,
    task_queue: str = TASK_QUEUE,
) -> dict[str, Any]:
    """The specification's workflow: download, process and upload, all on one worker."""
    name = Path(url).name
    options = options or sessionq.SessionOptions(creation_timeout=120, execution_timeout=600)
    async with client.create_session(task_queue, options) as session:
        worker = session.info.worker_id
        on_event(Event("session", name, attempt, worker, detail=session.info.session_id))
        path: Any = url
        for step, activity, extra in (
            ("download", download_file, ()),
            ("process", process_file, ()),
            ("upload", upload_file, (destination,)),
        ):
            on_event(Event("step", name, attempt, worker, step))
            path = await session.execute_activity(activity, path, *extra, start_to_close_timeout=60)
            on_event(Event("stepdone", name, attempt, worker, step, detail=path))
        return path


async def process_with_retry(
    client: sessionq.Client,
    url: str,
    destination: str,
    *,
    attempts: int = 3,
    on_event: EventSink = ignore,
    options: sessionq.SessionOptions | None = None,
) -> Outcome:
    """Run the workflow; when the session's worker dies, start over in a new session.

    Starting over (from the download) is the point: the half-done work was on the dead
    worker's disk. A failed activity (ActivityError) is not retried here: it is a bug or
    bad input, not a lost worker.
    """
    name = Path(url).name
    outcome = Outcome(name)
    started = time.monotonic()
    for attempt in range(1, attempts + 1):
        attempt_started = time.monotonic()
        worker_seen: list[str] = []

        def sink(event: Event, seen: list[str] = worker_seen) -> None:
            if event.kind == "session":
                seen.append(event.worker)
            on_event(event)

        try:
            outcome.result = await process_in_session(
                client, url, destination, attempt=attempt, on_event=sink, options=options
            )
            outcome.workers += worker_seen
            break
        except sessionq.SessionFailedError as exc:
            outcome.workers += worker_seen
            outcome.failures.append(str(exc))
            on_event(
                Event(
                    "failed",
                    name,
                    attempt,
                    worker_seen[-1] if worker_seen else "",
                    detail=exc,
                    elapsed=time.monotonic() - attempt_started,
                )
            )
            if attempt == attempts:
                raise
    outcome.seconds = time.monotonic() - started
    on_event(Event("done", name, len(outcome.workers), outcome.workers[-1], detail=outcome.result))
    return outcome


def make_inputs(folder: Path, count: int) -> list[str]:
    """Write `count` small text files and return their file:// URLs (our "internet")."""
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for i in range(1, count + 1):
        path = folder / f"file-{i}.txt"
        path.write_text(f"file {i}: the quick brown fox jumps over the lazy dog\n" * (i + 2))
        urls.append(path.resolve().as_uri())
    return urls


def print_event(event: Event) -> None:
    if event.kind == "session":
        print(f"{event.file}: session {str(event.detail)[:8]} on {event.worker} (attempt {event.attempt})")
    elif event.kind == "stepdone":
        print(f"{event.file}: {event.step} done on {event.worker}")
    elif event.kind == "failed":
        print(f"{event.file}: SessionFailedError after {event.elapsed:.1f}s: {event.detail}; starting over")


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sessionq.cli.fileprocessing.starter", description=__doc__
    )
    parser.add_argument("--files", type=int, default=6)
    parser.add_argument("--redis-url", default=None, help="default: SESSIONQ_REDIS_URL, REDIS_URL, localhost")
    parser.add_argument("--prefix", default="sq")
    parser.add_argument("--keep", action="store_true", help="keep the input and uploaded files")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fileprocessing-"))
    try:
        urls = make_inputs(work / "inputs", args.files)
        async with sessionq.Client(args.redis_url, prefix=args.prefix) as client:
            uploads = str(work / "uploaded")
            outcomes = await asyncio.gather(
                *(process_with_retry(client, url, uploads, on_event=print_event) for url in urls)
            )
        for outcome in outcomes:
            result = outcome.result or {}
            workers = " -> ".join(outcome.workers)
            print(f"{outcome.file}: {workers}: {result.get('uploaded')} ({outcome.seconds:.1f}s)")
    finally:
        if args.keep:
            print(f"inputs and uploads kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
