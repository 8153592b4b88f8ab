"""Session resources (1 of 2): a worker on a "GPU box" that offers 2 GPUs to sessions.

    python examples/gpu/worker.py          # then, in another terminal:
    python examples/gpu/client.py

A session that asks for SessionOptions(resources={"gpu": 1}) is placed only on a worker
with a GPU free, holds it until it ends, and gives it back; a third such session waits,
first come first served, until one frees. Same settings as examples/hello:
SESSIONQ_REDIS_URL (or REDIS_URL) and SESSIONQ_PREFIX; GPUS sets how many GPUs this box offers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import sessionq
from sessionq.connection import resolve_url

TASK_QUEUE = "gpu"


def settings() -> tuple[str, str]:
    """(Redis URL, key prefix) from the environment, as the library and the CLI read them
    (SESSIONQ_REDIS_URL, else REDIS_URL, else localhost): client and worker must agree."""
    return resolve_url(), os.environ.get("SESSIONQ_PREFIX", "sq")


@sessionq.activity
async def train(epochs: int) -> str:
    """Stands in for work on the session's GPU(s): what the session holds is in its info."""
    info = sessionq.get_session_info()
    assert info is not None
    await asyncio.sleep(0.2 * epochs)
    return f"trained {epochs} epoch(s) on {info.resources['gpu']} gpu(s) of {info.worker_id}"


async def main() -> None:
    url, prefix = settings()
    worker = sessionq.Worker(
        url,
        task_queue=TASK_QUEUE,
        activities=[train],
        enable_sessions=True,
        session_resources={"gpu": int(os.environ.get("GPUS", "2"))},
        identity="gpu-box",
        prefix=prefix,
    )
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, worker.stop)
    async with worker:
        print(f"worker {worker.worker_id} offers {worker.session_resources}", flush=True)
        await worker.wait_stopped()
    print("worker stopped", flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(main())
