"""A client's inbox on one task queue: one blocking read serves every waiting call.

Workers append results, and Lua scripts append session grants, to one Redis stream per
(client, task queue). A single reader task reads new entries in batches, by id, and
resolves the matching futures, so a thousand concurrent waits hold one Redis connection
and a result reaches its caller the moment it is written (no polling).

Why a stream read by id and not a list popped: a pop removes the message in Redis before
its reply reaches us, so a connection lost in between loses the message. A read by id
removes nothing; entries are trimmed only once dispatched (in batches, the trim travelling
with a read), and a reader that reconnects reads again from the last id it dispatched.

The client owns the key. It creates the stream (open_inbox) before anything can be sent
to it, renews its TTL while it waits, and deletes it on close. Writers append with
NOMKSTREAM, so nothing re-creates an inbox without its TTL: a message for a client that
is gone is dropped. An inbox found missing while the client had it (Redis lost its data,
or the key expired while the process was stalled) fails every waiting call with
RedisDataLostError, since their messages can no longer come. Redis can also lose part of
its data and keep the inbox (a failover to a replica that lagged, a restart from an older
snapshot): so once the reader is back in touch after losing it, it checks each waiting
plain activity's task entry. An entry leaves its stream only after its result was
written, so an entry gone with no result in the inbox was lost, and its call fails with
RedisDataLostError instead of waiting for ever. A reader that cannot read
(Redis down, a refused command, any error) keeps retrying with backoff; once it has
failed for `unavailable_timeout` seconds, the calls waiting on it fail with
RedisUnavailableError instead of waiting blind.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgpack

from .codec import Codec
from .envelope import Grant, Refusal, RemoteError, Result, decode_result
from .errors import RedisDataLostError, SessionqError
from .faults import describe, outage, retrying, unavailable
from .replies import raw_stream_entries
from .scripts import Scripts
from .wire import Wire

log = logging.getLogger("sessionq")

READ_BLOCK = 2.0
"""Seconds one read blocks for new messages; when it returns empty the TTL is renewed."""
READ_BATCH = 256
TRIM_EVERY = 64
"""Dispatched entries are trimmed with the read that follows every 64th (one command in 64)."""
INBOX_TTL = 600.0
"""Seconds an inbox outlives its client's last sign of life."""
RENEW_EVERY = INBOX_TTL / 4
CHECKS_AFTER_OUTAGE = (0.0, 5.0, 15.0)
"""When, in seconds after the reader is back in touch, the waiting plain activities' tasks
are checked: at once, and again after a worker's result batch and the acks that follow
it have had time to be re-sent (a result lost with the old primary, its task acked on the
new one, shows only then)."""

Message = Result | Grant | Refusal


class Inbox:
    """Resolves futures by id (activity id or session id) as messages arrive."""

    def __init__(
        self, wire: Wire, scripts: Scripts, key: str, codec: Codec, unavailable_timeout: float
    ) -> None:
        self.wire = wire
        self.scripts = scripts
        self.key = key
        self.codec = codec
        self.unavailable_timeout = unavailable_timeout
        self.connection = wire.blocking(key, READ_BLOCK)
        self._futures: dict[str, asyncio.Future[Message]] = {}
        self._entries: dict[str, tuple[str, bytes]] = {}  # plain activity id -> (its stream, entry id)
        self._checks_due: list[float] = []  # monotonic times of the checks still to run
        self._reader: asyncio.Task[None] | None = None
        self._last_id = b"0-0"
        self._trim_below: bytes | None = None
        self._untrimmed = 0  # entries dispatched since the last trim
        self._renewed_at: float | None = None  # monotonic time of the last open/renew
        self._opening: asyncio.Future[None] | None = None
        self._open_token = uuid.uuid4().hex
        self._closed = False

    # -- the caller's side -------------------------------------------------------------
    async def expect(self, message_id: str) -> asyncio.Future[Message]:
        """A future for the message with this id; await before the message can be sent
        (it makes sure the inbox exists, so the message has somewhere to go)."""
        if self._closed:
            raise SessionqError("this Client was closed; create a new one")
        renewed = self._renewed_at
        if renewed is None or time.monotonic() - renewed > RENEW_EVERY:
            await retrying(self._open, within=self.unavailable_timeout, what="opening the client's inbox")
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieved)  # a handle never awaited must not log its error
        self._futures[message_id] = future
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read(), name=f"sessionq-inbox:{self.key}")
        return future

    def forget(self, message_id: str) -> None:
        self._futures.pop(message_id, None)
        self._entries.pop(message_id, None)

    def track(self, message_id: str, stream: str, entry_id: bytes) -> None:
        """Where the task of a waiting plain activity sits (checked after an outage)."""
        if message_id in self._futures:
            self._entries[message_id] = (stream, entry_id)

    def fail(self, message_id: str, error: BaseException) -> None:
        """Resolve a waiting future with an error raised locally (e.g. session failed)."""
        future = self._futures.pop(message_id, None)
        self._entries.pop(message_id, None)
        if future is not None and not future.done():
            future.set_exception(error)

    def _fail_all(self, error: Callable[[], BaseException], ids: list[str] | None = None) -> None:
        """Fail the waiting futures (`ids`, default all), each with an error of its own."""
        for message_id in list(self._futures) if ids is None else ids:
            self.fail(message_id, error())

    # -- the key's life ----------------------------------------------------------------
    async def _open(self) -> None:
        """Create the inbox if missing and renew its TTL (one at a time)."""
        if self._opening is None or self._opening.done():
            self._opening = asyncio.ensure_future(self._open_once())
        await asyncio.shield(self._opening)

    async def _open_once(self) -> None:
        had_it = self._renewed_at is not None
        made = await self.scripts.open_inbox(self.key, int(INBOX_TTL * 1000), self._open_token)
        self._open_token = uuid.uuid4().hex  # the next opening's (a resent one keeps the same)
        self._renewed_at = time.monotonic()
        if made and had_it:
            # Every call registered until now may have sent its message into the void.
            self._lost(list(self._futures))

    def _lost(self, waiting: list[str]) -> None:
        """The inbox vanished under us: whatever was on its way to it is gone."""
        log.error(
            "inbox %s vanished (Redis lost its data, or the key expired while this process was "
            "stalled); %d waiting call(s) fail",
            self.key,
            len(waiting),
        )
        self._last_id = b"0-0"
        self._trim_below, self._untrimmed = None, 0
        self._fail_all(
            lambda: RedisDataLostError(
                "Redis lost the message this call was waiting for (its inbox vanished: Redis restarted "
                "without persistence, failed over to a replica that lagged behind, or the key was "
                "deleted or expired). The activity may or may not have run; retry it if it is safe"
            ),
            waiting,
        )

    # -- the reader ----------------------------------------------------------------------
    async def _read(self) -> None:
        backoff = 0.05
        failing_since: float | None = None
        while self._futures:
            attempt = time.monotonic()
            try:
                entries = await self._next_batch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never die: a dead reader would strand every later call
                now = time.monotonic()
                if failing_since is None:
                    # Out of touch since the read should have answered (a timeout), or now.
                    failing_since = min(now, attempt + READ_BLOCK)
                    outage.failed(f"reading inbox {self.key}", exc)  # one warning a process
                if now - failing_since >= self.unavailable_timeout:
                    waited = now - failing_since
                    self._fail_all(functools.partial(unavailable, "waiting for a result", waited, exc))
                    outage.gave_up()
                    failing_since = None
                await asyncio.sleep(backoff * (0.5 + os.urandom(1)[0] / 255))
                backoff = min(backoff * 2, 2.0)
                continue
            self._take(entries)
            if failing_since is not None:
                outage.answered()
                log.debug("inbox %s: reading again", self.key)
                now = time.monotonic()
                self._checks_due = [now + delay for delay in CHECKS_AFTER_OUTAGE]
            backoff, failing_since = 0.05, None
            if self._checks_due and self._checks_due[0] <= time.monotonic():
                self._checks_due.pop(0)
                try:
                    await self._check_entries()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # out of touch again: the next recovery checks
                    log.warning("inbox %s: could not check the waiting calls (%s)", self.key, describe(exc))

    def _take(self, entries: list[tuple[bytes, list[Any]]]) -> None:
        """Dispatch what was read, and note how far (and what to trim)."""
        for entry_id, fields in entries:
            self._dispatch(entry_id, fields)
        if entries:
            self._last_id = entries[-1][0]
            self._untrimmed += len(entries)
            if self._untrimmed >= TRIM_EVERY:
                self._trim_below = _next_id(self._last_id)

    async def _check_entries(self) -> None:
        """After an outage: fail the waiting plain activities whose task entry is gone from
        its stream while no result came (Redis lost both with part of its data). Looked at
        twice, a second apart, so a result on its way is not mistaken for a loss."""
        waiting = [(mid, where) for mid, where in self._entries.items() if mid in self._futures]
        for look in range(2):
            if not waiting:
                return
            stream = waiting[0][1][0]
            found = await self.wire.execute_many(
                stream, [("XRANGE", key, entry_id, entry_id) for _, (key, entry_id) in waiting]
            )
            gone = [(mid, where) for (mid, where), entry in zip(waiting, found, strict=True) if not entry]
            if gone:  # their results may have come meanwhile
                read = await self.wire.execute(self.key, "XREAD", "STREAMS", self.key, self._last_id)
                self._take(raw_stream_entries(read))
            waiting = [(mid, where) for mid, where in gone if mid in self._futures]
            if waiting and look == 0:
                await asyncio.sleep(1.0)
        if waiting:
            log.error("inbox %s: %d waiting activit(ies) lost with Redis' data", self.key, len(waiting))
            self._fail_all(
                lambda: RedisDataLostError(
                    "Redis lost this activity's task and no result came (Redis failed over to a replica "
                    "that lagged behind, or restarted from an older snapshot). It may or may not have run; "
                    "retry it if it is safe"
                ),
                [mid for mid, _ in waiting],
            )

    async def _next_batch(self) -> list[tuple[bytes, list[Any]]]:
        """New entries after the last one dispatched; trims what was dispatched on the way."""
        renewed = self._renewed_at
        if renewed is None or time.monotonic() - renewed > RENEW_EVERY:
            await self._open()
        block_ms = int(READ_BLOCK * 1000)
        read = ("XREAD", "COUNT", READ_BATCH, "BLOCK", block_ms, "STREAMS", self.key, self._last_id)
        trim = self._trim_below
        if trim is None:
            reply = await self.connection.execute(*read)
        else:
            _, reply = await self.connection.execute_many((("XTRIM", self.key, "MINID", trim), read))
            if self._trim_below == trim:
                self._trim_below, self._untrimmed = None, 0
        if not reply:  # a quiet spell: renew the TTL, and find out whether the inbox still exists
            await self._open()
            return []
        return raw_stream_entries(reply)

    def _dispatch(self, entry_id: bytes, flat: list[Any]) -> None:
        try:
            messages = _messages(self.codec, flat)
        except Exception:
            log.exception("inbox %s: dropped malformed entry %s %r", self.key, entry_id, flat[:4])
            return
        for message in messages:
            message_id = message.activity_id if isinstance(message, Result) else message.session_id
            future = self._futures.pop(message_id, None)
            self._entries.pop(message_id, None)
            if future is None:
                log.debug("inbox %s: no one waits for %s any more (late or duplicate)", self.key, message_id)
            elif not future.done():
                future.set_result(message)

    def fail_waiting(self, error: BaseException) -> None:
        """Fail every waiting future (the client is closing); new ones are refused."""
        self._closed = True
        self._fail_all(lambda: error)

    async def close(self, error: BaseException) -> None:
        """Stop reading, fail every waiting future with `error`, and delete the inbox."""
        self.fail_waiting(error)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        await self.connection.aclose()
        if self._renewed_at is not None:
            with contextlib.suppress(Exception):  # best effort: its TTL removes it otherwise
                await self.wire.execute(self.key, "DEL", self.key)


def _messages(codec: Codec, flat: list[Any]) -> list[Message]:
    """The messages of one inbox entry. A worker's entry holds results (``r`` fields, one
    per result); a script's entry holds one grant (``g`` = session id, with ``w``, ``h``,
    ``d``, ``b``) or one refusal (``x`` = session id, with ``m``, the reason, and ``k``, its
    kind)."""
    if not flat:
        return []
    kind = flat[0]
    if kind == b"r":  # decoded one by one: a result this process cannot read fails its own call only
        return [_result(codec, value) for value in flat[1::2]]
    if kind == b"o":  # the marker open_inbox leaves in a new inbox
        return []
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    if kind == b"g":
        return [
            Grant(
                fields[b"g"].decode(),
                fields[b"w"].decode(),
                fields[b"h"].decode(),
                int(fields[b"d"]),
                int(fields.get(b"b") or 0),
            )
        ]
    if kind == b"x":
        kind = fields.get(b"k", b"").decode()
        return [Refusal(fields[b"x"].decode(), fields[b"m"].decode(errors="replace"), kind)]
    raise ValueError(f"unknown inbox entry kind {kind!r}")


def _result(codec: Codec, data: bytes) -> Result:
    try:
        return decode_result(codec, data)
    except Exception as exc:
        activity_id = _activity_id_of(data)
        if activity_id is None:
            raise
        return Result(
            activity_id,
            error=RemoteError(
                "SerializationError",
                "SerializationError",
                f"the result of activity {activity_id} could not be decoded here ({exc!r}); register the "
                "same Codec types on the callers as on the workers",
            ),
        )


def _activity_id_of(data: bytes) -> str | None:
    """The activity id of a result this codec cannot decode (read leniently: tuples for lists)."""
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=False, ext_hook=_any_ext)
        activity_id = body["i"]
    except Exception:
        return None
    return activity_id if isinstance(activity_id, str) else None


def _any_ext(code: int, data: bytes) -> msgpack.ExtType:
    return msgpack.ExtType(code, data)


def _next_id(entry_id: bytes) -> bytes:
    """The smallest stream id after `entry_id` (XTRIM MINID keeps ids >= its argument)."""
    ms, _, seq = entry_id.partition(b"-")
    return ms + b"-" + str(int(seq or b"0") + 1).encode()


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
