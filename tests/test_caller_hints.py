"""The caller is quiet unless something is wrong, and says what to do when it is (issue
Operability): one warning per Redis outage, a hint for a forgotten `await`, a
ConfigurationError for SyncClient inside an event loop, and 0 meaning "no limit" for a
worker's sessions in the API as on the command line.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import pytest

import sessionq
from sessionq import Client, ConfigurationError, Worker
from tests import activities as acts
from tests.faultkit import Relay


async def test_forgetting_await_or_async_with_on_create_session_gives_a_hint(
    client: Client, task_queue: str
) -> None:
    opener = client.create_session(task_queue)
    with pytest.raises(AttributeError, match=r"session = await client.create_session\(\.\.\.\)"):
        opener.execute_activity  # noqa: B018 - the attribute a forgotten await reaches for
    with pytest.raises(TypeError, match="needs `async with`"), client.create_session(task_queue):  # type: ignore[attr-defined]
        pass
    with pytest.raises(AttributeError, match="has no attribute 'no_such_thing'"):
        opener.no_such_thing  # noqa: B018 - any other name: the usual error


async def test_sync_client_inside_a_running_event_loop_says_to_use_client(redis_url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"running event loop.*use sessionq\.Client"):
        sessionq.SyncClient(redis_url)


async def test_max_concurrent_sessions_zero_means_no_limit_as_on_the_command_line(
    redis_url: str, key_prefix: str, task_queue: str, client: Client
) -> None:
    async with Worker(
        redis_url, task_queue=task_queue, activities=acts.ALL, prefix=key_prefix,
        enable_sessions=True, max_concurrent_sessions=0,
    ) as worker:  # fmt: skip
        assert worker.max_concurrent_sessions is None
        sessions = [await client.create_session(task_queue) for _ in range(3)]
        assert {s.info.worker_id for s in sessions} == {worker.worker_id}
        for session in sessions:
            await session.complete()
    with pytest.raises(ConfigurationError, match="max_concurrent_sessions"):
        Worker(redis_url, task_queue=task_queue, activities=acts.ALL, max_concurrent_sessions=-1)


async def test_an_outage_is_one_warning_and_one_line_when_redis_is_back(
    redis_url: str, key_prefix: str, task_queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Five calls retry through a 3-second cut: the log says so once, and once more
    when Redis answers again, not once a retry (that was about two lines a second a call)."""
    async with Relay(redis_url) as relay:
        client = Client(relay.url, prefix=key_prefix, unavailable_timeout=30)
        try:
            await client.start_activity(acts.echo, 0, task_queue=task_queue)  # connected, inbox open
            caplog.clear()
            with caplog.at_level(logging.DEBUG, logger="sessionq"):
                relay.cut()  # connections dropped, new ones refused
                calls = [
                    asyncio.ensure_future(client.start_activity(acts.echo, i, task_queue=task_queue))
                    for i in range(5)
                ]
                await asyncio.sleep(3.0)  # the length of the outage, not a wait for an event
                relay.heal()
                handles: list[Any] = await asyncio.wait_for(asyncio.gather(*calls), 30)
            assert len(handles) == 5
            warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert len(warnings) == 2, warnings
            assert "retrying (quietly until Redis answers)" in warnings[0]
            assert warnings[1].startswith("Redis answers again, after ")
            retries = [r for r in caplog.records if r.levelno == logging.DEBUG and "etry" in r.getMessage()]
            assert retries, "the retries themselves are still there, at DEBUG"
        finally:
            await client.close()


async def test_no_future_exception_was_never_retrieved_after_timeouts_or_a_close(
    redis_url: str, key_prefix: str, task_queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A schedule_to_close timeout, activities started and never awaited, a close with
    calls in flight: the caller gets its errors where it asks for them, and asyncio has
    nothing to complain about when the futures are collected."""
    async with Worker(
        redis_url, task_queue=task_queue, activities=acts.ALL, prefix=key_prefix, enable_sessions=True
    ):
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            client = Client(redis_url, prefix=key_prefix)
            with pytest.raises(sessionq.ActivityTimeoutError):
                await client.execute_activity(
                    acts.sleep_for, 2, task_queue=task_queue, schedule_to_close_timeout=0.3
                )
            await client.start_activity(acts.fail, "unseen", task_queue=task_queue)  # never awaited
            await client.start_activity(acts.echo, 1, task_queue=task_queue + "-nobody")
            session = await client.create_session(task_queue)
            await session.start_activity(acts.sleep_for, 30)  # cancelled by the close below
            await client.close()
            gc.collect()
            await asyncio.sleep(0.1)
            gc.collect()
    assert "never retrieved" not in caplog.text and "was destroyed" not in caplog.text, caplog.text


async def test_an_outage_after_a_call_cancelled_in_an_earlier_one_still_warns(
    redis_url: str, key_prefix: str, task_queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A call cancelled while it retried must not leave the process thinking the outage
    goes on: the next outage warns again."""
    async with Relay(redis_url) as relay:
        client = Client(relay.url, prefix=key_prefix, unavailable_timeout=30)
        try:
            await client.start_activity(acts.echo, 0, task_queue=task_queue)
            for _ in range(2):
                caplog.clear()
                with caplog.at_level(logging.WARNING, logger="sessionq"):
                    relay.cut()
                    with pytest.raises(asyncio.TimeoutError):
                        started = client.start_activity(acts.echo, 1, task_queue=task_queue)
                        await asyncio.wait_for(started, 0.5)
                    relay.heal()
                    await client.start_activity(acts.echo, 2, task_queue=task_queue)
                told = [m for r in caplog.records if "quietly until Redis answers" in (m := r.getMessage())]
                assert len(told) == 1, told
        finally:
            await client.close()
