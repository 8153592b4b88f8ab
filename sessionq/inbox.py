"""A client's inbox on one task queue: one blocking pop serves every waiting call.

Workers push results, and Lua scripts push session grants, onto one Redis list per
(client, task queue). A single reader task pops them in batches and resolves the
matching futures, so a thousand concurrent waits hold one Redis connection, and a
result reaches its caller the moment it is pushed (no polling).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.exceptions import ResponseError

from .codec import Codec
from .connection import TRANSIENT
from .envelope import Grant, Refusal, Result, decode_inbox
from .wire import BlockingRead

log = logging.getLogger("sessionq")

POP_TIMEOUT = 2.0
POP_BATCH = 256


class Inbox:
    """Resolves futures by id (activity id or session id) as messages arrive."""

    def __init__(self, connection: BlockingRead, key: str, codec: Codec) -> None:
        self.connection = connection
        self.key = key
        self.codec = codec
        self._futures: dict[str, asyncio.Future[Result | Grant | Refusal]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._use_blmpop = True

    def expect(self, message_id: str) -> asyncio.Future[Result | Grant | Refusal]:
        """A future for the message with this id; call before the message can be sent."""
        future: asyncio.Future[Result | Grant | Refusal] = asyncio.get_running_loop().create_future()
        self._futures[message_id] = future
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read(), name=f"sessionq-inbox:{self.key}")
        return future

    def forget(self, message_id: str) -> None:
        self._futures.pop(message_id, None)

    def fail(self, message_id: str, error: BaseException) -> None:
        """Resolve a waiting future with an error raised locally (e.g. session failed)."""
        future = self._futures.pop(message_id, None)
        if future is not None and not future.done():
            future.set_exception(error)

    async def _pop(self) -> list[bytes]:
        if self._use_blmpop:
            try:
                reply = await self.connection.execute(
                    "BLMPOP", POP_TIMEOUT, 1, self.key, "LEFT", "COUNT", POP_BATCH
                )
                return list(reply[1]) if reply else []
            except ResponseError as exc:
                if "unknown command" not in str(exc).lower():
                    raise
                self._use_blmpop = False  # Redis < 7: one message per pop
        reply = await self.connection.execute("BLPOP", self.key, POP_TIMEOUT)
        return [reply[1]] if reply else []

    async def _read(self) -> None:
        backoff = 0.05
        while self._futures:
            try:
                messages = await self._pop()
                backoff = 0.05
            except TRANSIENT as exc:
                log.warning("inbox %s: Redis error %s; retrying in %.2fs", self.key, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            for raw in messages:
                self._dispatch(raw)

    def _dispatch(self, raw: bytes) -> None:
        try:
            message = decode_inbox(self.codec, raw)
        except Exception:
            log.exception("inbox %s: dropped a malformed message %r", self.key, raw[:80])
            return
        message_id = message.activity_id if isinstance(message, Result) else message.session_id
        future = self._futures.pop(message_id, None)
        if future is None:
            log.debug("inbox %s: no one waits for %s any more (late or duplicate)", self.key, message_id)
        elif not future.done():
            future.set_result(message)

    async def close(self, error: BaseException) -> None:
        """Stop reading; every still-waiting future fails with `error`."""
        for future in self._futures.values():
            if not future.done():
                future.set_exception(error)
        self._futures.clear()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
