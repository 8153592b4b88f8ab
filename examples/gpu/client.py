"""Session resources (2 of 2): three jobs, each asking for one GPU, on a box with two.

    python examples/gpu/client.py          # with examples/gpu/worker.py running

Two jobs start at once; the third waits for a GPU and starts when the first job
completes its session (the GPU goes back at complete(), failure, timeout or worker death).
"""

from __future__ import annotations

import asyncio
import time

from worker import TASK_QUEUE, settings, train

import sessionq


async def job(
    client: sessionq.Client, name: str, epochs: int, started: float, holding: asyncio.Event | None = None
) -> None:
    options = sessionq.SessionOptions(resources={"gpu": 1}, creation_timeout=30)
    async with client.create_session(TASK_QUEUE, options) as session:
        print(f"{name}: got a gpu after {time.monotonic() - started:.1f}s", flush=True)
        if holding is not None:
            holding.set()
        print(f"{name}: {await session.execute_activity(train, epochs)}", flush=True)


async def main() -> None:
    url, prefix = settings()
    async with sessionq.Client(url, prefix=prefix) as client:
        started = time.monotonic()
        # Ask in order (the line is first come, first served): each of the first two holds
        # its gpu before the next asks; the third finds none free and waits.
        holding = asyncio.Event()
        first = asyncio.create_task(job(client, "job-1", 2, started, holding))
        await holding.wait()
        holding = asyncio.Event()
        second = asyncio.create_task(job(client, "job-2", 4, started, holding))
        await holding.wait()
        third = asyncio.create_task(job(client, "job-3", 1, started))
        await asyncio.gather(first, second, third)


if __name__ == "__main__":
    asyncio.run(main())
