"""The worker of the file-processing example.

    sessionq worker sessionq.cli.fileprocessing.worker:worker
    python -m sessionq.cli.fileprocessing.worker          # the same, without the CLI's signal handling

Start three of them (three terminals, or three hosts) to see sessions spread out. The
Redis URL comes from SESSIONQ_REDIS_URL / REDIS_URL (or `sessionq worker --redis-url`).
"""

from __future__ import annotations

import asyncio
import logging

import sessionq

from . import TASK_QUEUE
from .activities import ACTIVITIES

worker = sessionq.Worker(
    task_queue=TASK_QUEUE,
    activities=ACTIVITIES,
    enable_sessions=True,
    max_concurrent_sessions=2,  # this host has room for two files at a time
    heartbeat_timeout=5,  # silent this long = dead: its sessions' callers get SessionFailedError
)


def main() -> None:
    """Run the worker in the foreground (`sessionq worker` adds graceful SIGTERM handling)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(worker.run())  # Ctrl-C stops it


if __name__ == "__main__":
    main()
