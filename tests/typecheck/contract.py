"""What a type checker must say about calls of execute_activity / start_activity.

tests/test_typing.py runs `mypy --strict` on this file: every line marked ``# E: code``
must get that error (mypy may add others on the line), and no other line may get one.
Nothing here runs.
"""

from __future__ import annotations

from typing import Any

from typing_extensions import assert_type

import sessionq


@sessionq.activity
async def resize(path: str, width: int, keep_ratio: bool = True) -> bytes:
    return b""


@sessionq.activity
def count_words(text: str) -> dict[str, int]:
    return {}


@sessionq.activity
async def ping() -> None:
    return None


@sessionq.activity
async def tag(path: str, *, label: str) -> str:
    return label


async def client_calls(client: sessionq.Client) -> None:
    q = "media"
    assert_type(await client.execute_activity(resize, "a.png", 64, task_queue=q), bytes)
    assert_type(await client.execute_activity(resize, "a.png", 64, False, task_queue=q), bytes)
    assert_type(await client.execute_activity(count_words, "a b", task_queue=q), dict[str, int])
    assert_type(await client.execute_activity(ping, task_queue=q, start_to_close_timeout=5), None)
    handle = await client.start_activity(resize, "a.png", 64, task_queue=q)
    assert_type(await handle.result(), bytes)
    assert_type(await client.execute_activity("resize", 1, 2, 3, task_queue=q), Any)
    assert_type(await client.execute_activity(tag, "a.png", task_queue=q, kwargs={"label": "x"}), Any)
    options = sessionq.ActivityOptions(start_to_close_timeout=5)
    await client.execute_activity(resize, "a.png", 64, task_queue=q, options=options)
    await client.execute_activity(resize, "a.png", 64, task_queue=q, retry_policy=sessionq.RetryPolicy())
    await client.execute_activity(resize, "a.png", 64, task_queue=q, options=None)  # a wrapper's default
    timeouts: sessionq.ActivityCallOptions = {"start_to_close_timeout": 10, "schedule_to_close_timeout": 30}
    assert_type(await client.execute_activity(resize, "a.png", 64, task_queue=q, **timeouts), bytes)
    handles: list[sessionq.ActivityHandle[object]] = [handle]  # handles of any activities, together
    handles.append(await client.start_activity(count_words, "a b", task_queue=q))

    await client.execute_activity(resize, "a.png", "64", task_queue=q)  # E: arg-type
    await client.execute_activity(resize, "a.png", task_queue=q)  # E: arg-type
    await client.execute_activity(count_words, "a", "b", task_queue=q)  # E: arg-type
    await client.execute_activity(resize, "a.png", 64, task_queue=q, start_to_close=5)  # E: call-overload
    await client.execute_activity(resize, "a.png", 64, task_queue=q, retry_policy=3)  # E: call-overload
    await client.execute_activity(count_words, "a", task_queue=7)  # E: call-overload
    words: list[str] = await client.execute_activity(count_words, "a b", task_queue=q)  # noqa: F841  # E: arg-type
    untyped = {"start_to_close_timeout": 10}  # a plain dict[str, int]: annotate it (above)
    await client.execute_activity(resize, "a.png", 64, task_queue=q, **untyped)  # E: call-overload


async def session_calls(client: sessionq.Client) -> None:
    async with client.create_session("media") as session:
        assert_type(await session.execute_activity(resize, "a.png", 64), bytes)
        handle = await session.start_activity(count_words, "a b")
        assert_type(await handle.result(), dict[str, int])
        assert_type(await session.execute_activity("resize", "a.png"), Any)
        await session.execute_activity(resize, 64, "a.png")  # E: arg-type
        await session.execute_activity(resize, "a.png", 64, task_queue="other")  # E: call-overload


def sync_calls(client: sessionq.SyncClient) -> None:
    assert_type(client.execute_activity(resize, "a.png", 64, task_queue="media"), bytes)
    assert_type(client.start_activity(count_words, "a b", task_queue="media").result(), dict[str, int])
    with client.create_session("media") as session:
        assert_type(session.execute_activity(count_words, "a b"), dict[str, int])
        assert_type(session.start_activity(resize, "a.png", 64).result(), bytes)
        session.execute_activity(count_words, 3)  # E: arg-type
    client.execute_activity(ping, task_queue="media", heartbeat_timeout="5")  # E: call-overload
