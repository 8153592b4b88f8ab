"""Hello, sessionq (1 of 2): a worker process that runs activities.

    python examples/hello/worker.py          # then, in another terminal:
    python examples/hello/client.py

Redis comes from SESSIONQ_REDIS_URL or REDIS_URL (default redis://localhost:6379/0) and the key
prefix from SESSIONQ_PREFIX (default "sq"). Ctrl-C or SIGTERM stops the worker
gracefully: it finishes what it is running, then deregisters.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import sessionq
from sessionq.connection import resolve_url

TASK_QUEUE = "hello"


@sessionq.activity
async def greet(name: str) -> str:
    """An async activity: runs on the worker's event loop (use it for I/O)."""
    await asyncio.sleep(0.01)  # stands in for a network call
    return f"Hello, {name}!"


@sessionq.activity
def word_count(text: str) -> dict[str, int]:
    """A plain def: runs in the worker's thread pool (blocking or CPU-bound work is fine)."""
    counts: dict[str, int] = {}
    for word in text.lower().split():
        counts[word] = counts.get(word, 0) + 1
    return counts


@sessionq.activity
def divide(a: float, b: float) -> float:
    """Raises ZeroDivisionError for b == 0: the caller gets it back as an ActivityError."""
    return a / b


ACTIVITIES = [greet, word_count, divide]


def settings() -> tuple[str, str]:
    """(Redis URL, key prefix) from the environment, as the library and the CLI read them
    (SESSIONQ_REDIS_URL, else REDIS_URL, else localhost): client and worker must agree."""
    return resolve_url(), os.environ.get("SESSIONQ_PREFIX", "sq")


async def main() -> None:
    url, prefix = settings()
    worker = sessionq.Worker(url, task_queue=TASK_QUEUE, activities=ACTIVITIES, prefix=prefix)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, worker.stop)
    async with worker:  # returns once the worker is registered and polling
        print(f"worker {worker.worker_id} ready on task queue {TASK_QUEUE!r}", flush=True)
        await worker.wait_stopped()
    print("worker stopped", flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(main())
