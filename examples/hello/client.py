"""Hello, sessionq (2 of 2): a client process that calls the worker's activities.

    python examples/hello/client.py          # with examples/hello/worker.py running

Same settings as the worker: SESSIONQ_REDIS_URL and SESSIONQ_PREFIX.
"""

from __future__ import annotations

import asyncio
import json
import sys

# Importing the worker module only defines its activities (nothing runs): a client may call
# an activity by its function, or by its name when it does not have the worker's code.
from worker import TASK_QUEUE, divide, greet, settings

import sessionq

TIMEOUTS = sessionq.ActivityOptions(start_to_close_timeout=10, schedule_to_close_timeout=30)
"""No worker running? Then the call fails after 30 s instead of waiting forever."""


async def main() -> int:
    url, prefix = settings()
    async with sessionq.Client(url, prefix=prefix) as client:
        greeting = await client.execute_activity(greet, "world", task_queue=TASK_QUEUE, options=TIMEOUTS)
        print(f"greet: {greeting}")

        counts = await client.execute_activity(
            "word_count", "the cat saw the other cat", task_queue=TASK_QUEUE, options=TIMEOUTS
        )
        print(f"word_count: {json.dumps(counts, sort_keys=True)}")

        try:
            await client.execute_activity(
                divide, 1, 0, task_queue=TASK_QUEUE,
                options=TIMEOUTS,
                retry_policy=sessionq.RetryPolicy(maximum_attempts=1),  # a bug, not a hiccup: no retry
            )  # fmt: skip
        except sessionq.ActivityError as exc:
            print(f"divide: remote {exc.cause.type}: {exc.cause.message}")
        else:
            print("divide: unexpectedly succeeded")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
