"""The blocking SyncClient under faults: interrupted calls give back what they took, close()
ends every call under way in other threads, and nothing but SessionqErrors comes out.

A Ctrl-C is a real SIGINT, sent to a caller process of its own (pytest's would stop the run).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio

import sessionq
from sessionq import SessionOptions, SyncClient, Worker
from sessionq.keys import QueueKeys
from tests import activities as acts
from tests.faultkit import Relay
from tests.helpers import wait_for


@pytest_asyncio.fixture
async def worker(redis_url: str, key_prefix: str, task_queue: str) -> AsyncIterator[Worker]:
    async with Worker(
        redis_url, task_queue=task_queue, activities=acts.ALL, identity="w1", heartbeat_timeout=2.0,
        enable_sessions=True, max_concurrent_sessions=1, prefix=key_prefix, shutdown_grace=1.0,
    ) as w:  # fmt: skip
        yield w


def test_s19_a_sync_client_closed_twice_or_used_after_close_raises_only_sessionq_errors(
    redis_url: str, key_prefix: str
) -> None:
    client = SyncClient(redis_url, prefix=key_prefix)
    client.close()
    client.close()  # safe, as the async close()
    with pytest.raises(sessionq.SessionqError, match="closed"):
        client.execute_activity("echo", 1, task_queue="q")
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(sessionq.ConfigurationError):
        SyncClient("http://not-redis", prefix=key_prefix)
    assert "sessionq-sync" not in {t.name for t in threading.enumerate()} - before, "a thread was left behind"


async def test_d07_closing_a_sync_client_ends_the_calls_other_threads_wait_on(
    relay: Relay, key_prefix: str, task_queue: str
) -> None:
    """A thread waits on a call that retries against an unreachable Redis; the main thread
    closes the client: the waiting call ends at once, in a SessionqError."""
    relay.partition()
    client = await asyncio.to_thread(SyncClient, f"{relay.url}?socket_timeout=1", prefix=key_prefix,
                                     unavailable_timeout=30)  # fmt: skip
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["value"] = client.execute_activity("echo", 1, task_queue=task_queue)
        except BaseException as exc:  # what crosses the API is what this test is about
            outcome["error"] = exc

    waiting = threading.Thread(target=call, daemon=True)
    waiting.start()
    await asyncio.sleep(0.5)  # the call is under way (retrying): the set-up
    await asyncio.to_thread(client.close)
    await asyncio.to_thread(waiting.join, 10)
    assert not waiting.is_alive(), "the call kept waiting after close()"
    assert isinstance(outcome.get("error"), sessionq.SessionqError), outcome


@pytest_asyncio.fixture
async def relay(redis_url: str) -> AsyncIterator[Relay]:
    async with Relay(redis_url) as relay:
        yield relay


INTERRUPTED_CALLER = """
import json, os, signal, sys, threading, time
import sessionq

url, prefix, queue = sys.argv[1:4]
client = sessionq.SyncClient(url, prefix=prefix)
out = {}
threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
try:
    client.create_session(queue, sessionq.SessionOptions(creation_timeout=30))
    out["create"] = "got a session"
except KeyboardInterrupt:
    out["create"] = "interrupted"
out["held_after_create"] = len(client.client._sessions)
threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
try:
    client.execute_activity("sleep_for", 30, sys.argv[4], task_queue=queue)
    out["activity"] = "finished"
except KeyboardInterrupt:
    out["activity"] = "interrupted"
client.close()
print(json.dumps(out), flush=True)
"""


async def test_d06_a_ctrl_c_in_a_sync_call_gives_back_its_slot_and_cancels_its_activity(
    redis_url: str, key_prefix: str, task_queue: str, worker: Worker, tmp_path: Any,
    redis_client: redis.asyncio.Redis,
) -> None:  # fmt: skip
    """Ctrl-C while a SyncClient waits for a slot, then while it waits on an activity: the
    slot it would have got is given back, and the activity is cancelled on its worker."""
    keys = QueueKeys(key_prefix, task_queue)
    async with sessionq.Client(redis_url, prefix=key_prefix) as holder_client:
        holder = await holder_client.create_session(task_queue)
        marker = str(tmp_path / "m")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", INTERRUPTED_CALLER, redis_url, key_prefix, task_queue, marker,
            stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        await wait_for(lambda: redis_client.zcard(keys.waiters), message="the caller never queued")
        await asyncio.sleep(1.5)  # the Ctrl-C came (at 1 s) and the caller's cleanup ran: the fault
        await holder.complete()
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        await process.wait()
    out = json.loads(line)
    assert out["create"] == "interrupted" and out["held_after_create"] == 0
    assert out["activity"] == "interrupted"
    await wait_for(lambda: _exists(f"{marker}.cancelled"), message="the activity kept running")
    assert int(await redis_client.hget(keys.worker("w1"), "open") or 0) == 0, "the slot leaked"
    started = time.monotonic()
    async with sessionq.Client(redis_url, prefix=key_prefix) as again:
        session = await again.create_session(task_queue, SessionOptions(creation_timeout=5))
        assert time.monotonic() - started < 2
        await session.complete()


def _exists(path: str) -> bool:
    import os

    return os.path.exists(path)
