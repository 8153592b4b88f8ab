"""Run one sessionq worker as its own OS process, for the test suite.

    python -m tests.workerproc tests.activities:ALL --redis-url URL --prefix P --task-queue Q

Prints ``READY <worker_id>`` on stdout once the worker runs (the ``spawn_worker`` fixture
waits for it). SIGTERM or SIGINT stops it gracefully (exit code 0). It also stops when
its parent (the pytest process) dies, so a killed test run leaves no workers behind.
Uses only the public API, as a user's worker would.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import sessionq

PARENT_POLL_INTERVAL = 0.5
"""How often to check whether the parent process is gone."""
STOP_GRACE = 10.0
"""After an orphaned worker's stop() this long without exiting, exit hard."""

_background: set[asyncio.Future[Any]] = set()
"""Strong references to stop() coroutines scheduled from signal handlers."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.workerproc", description=__doc__)
    parser.add_argument("activities", help="MODULE:ATTR naming a list of activities")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--prefix", required=True, help="key prefix (per test)")
    parser.add_argument("--task-queue", required=True)
    parser.add_argument("--identity", default=None)
    parser.add_argument("--heartbeat-timeout", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--max-sessions", type=int, default=None)
    parser.add_argument("--shutdown-grace", type=float, default=None)
    parser.add_argument("--no-sessions", action="store_true", help="enable_sessions=False")
    parser.add_argument("--host-id", default=None, help="host_id= (a host's process)")
    parser.add_argument("--restart-grace", type=float, default=None)
    parser.add_argument("--resource", action="append", default=[], help="NAME=AMOUNT (repeatable)")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("SESSIONQ_TEST_WORKER_LOG_LEVEL", "INFO"),
        help="sessionq log level on stderr (env SESSIONQ_TEST_WORKER_LOG_LEVEL)",
    )
    return parser.parse_args(argv)


def load_object(spec: str) -> Any:
    """Import ``module:attr``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"expected MODULE:ATTR, got {spec!r}")
    return getattr(importlib.import_module(module_name), attr)


def request_stop(worker: sessionq.Worker) -> None:
    """Call ``worker.stop()`` from a signal handler, whether it is sync or a coroutine."""
    result = worker.stop()
    if inspect.isawaitable(result):
        future = asyncio.ensure_future(result)
        _background.add(future)
        future.add_done_callback(_background.discard)


async def watch_parent(worker: sessionq.Worker, parent_pid: int) -> None:
    """Stop the worker once we are orphaned (pytest was killed); exit hard if that hangs."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(PARENT_POLL_INTERVAL)
    request_stop(worker)
    with contextlib.suppress(OSError):  # our stderr pipe most likely died with the parent
        print("parent process gone; stopping", file=sys.stderr, flush=True)
    await asyncio.sleep(STOP_GRACE)
    os._exit(3)


async def run(args: argparse.Namespace, parent_pid: int) -> int:
    options: dict[str, Any] = {}
    if args.max_sessions is not None:  # otherwise the library's default (unlimited)
        options["max_concurrent_sessions"] = args.max_sessions
    if args.shutdown_grace is not None:
        options["shutdown_grace"] = args.shutdown_grace
    if args.host_id is not None:
        options["host_id"] = args.host_id
    if args.restart_grace is not None:
        options["restart_grace"] = args.restart_grace
    if args.resource:
        options["session_resources"] = {k: int(v) for k, _, v in (r.partition("=") for r in args.resource)}
    worker = sessionq.Worker(
        args.redis_url,
        task_queue=args.task_queue,
        activities=list(load_object(args.activities)),
        enable_sessions=not args.no_sessions,
        max_concurrent_activities=args.concurrency,
        identity=args.identity,
        heartbeat_timeout=args.heartbeat_timeout,
        prefix=args.prefix,
        **options,
    )
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, request_stop, worker)
    async with worker:
        watcher = asyncio.create_task(watch_parent(worker, parent_pid))
        print(f"READY {worker.worker_id}", flush=True)
        try:
            await worker.wait_stopped()
        finally:
            watcher.cancel()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parent_pid = os.getppid()
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("sessionq").setLevel(args.log_level.upper())
    return asyncio.run(run(args, parent_pid))


if __name__ == "__main__":
    sys.exit(main())
