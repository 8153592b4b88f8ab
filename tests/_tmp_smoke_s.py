import asyncio, time
import sessionq
from tests import activities as acts

async def test_smoke(redis_url, key_prefix, task_queue, redis_client):
    async with sessionq.Worker(redis_url, prefix=key_prefix, task_queue=task_queue, activities=acts.ALL,
                               enable_sessions=True, max_concurrent_sessions=1, identity="w1", heartbeat_timeout=2):
        client = sessionq.Client(redis_url, prefix=key_prefix)
        t = time.monotonic()
        if True:
            s = await client.create_session(task_queue)
            print("created", time.monotonic() - t)
            t = time.monotonic()
            print(await s.execute_activity(acts.whoami), time.monotonic() - t)
            w = asyncio.create_task(client.create_session(task_queue, sessionq.SessionOptions(creation_timeout=5)).open())
            await asyncio.sleep(0.3)
            print(await redis_client.lrange(f"{key_prefix}:{{{task_queue}}}:waiters", 0, -1))
            t = time.monotonic()
        s2 = await w
        print("waiter woke", time.monotonic() - t, s2.info)
        await s2.complete()
        await client.close()
