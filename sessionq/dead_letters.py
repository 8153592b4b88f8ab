"""Malformed entries (D04): kept for an operator, taken out of the queue, their caller told.

An entry a worker cannot read (a payload that does not decode, options of the wrong type,
an unknown entry type) must neither stay pending unanswered nor stop the entries after
it. It is copied to the task queue's dead stream (``sessionq inspect`` counts it), with
the stream and id it came from and the error, removed from its stream, and, when its
payload still names a caller, that caller gets a SerializationError saying where it went.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .codec import Codec
from .envelope import RemoteError, encode_error
from .keys import CONSUMER_GROUP

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("sessionq")

DEAD_STREAM_MAXLEN = 10_000


class DeadLetters:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def move_aside(
        self,
        stream: str,
        entry_id: bytes,
        fields: dict[bytes, bytes],
        error: BaseException,
        ack: bool = False,
    ) -> None:
        """Move one entry of `stream` to the dead stream; `ack` it too when it was read
        through the consumer group (the shared stream)."""
        w = self.worker
        dead = w.keys.dead
        log.error(
            "worker %s: malformed entry %s in %s moved to %s: %r",
            w.worker_id,
            entry_id.decode(),
            stream,
            dead,
            error,
        )
        flat: list[Any] = [b"_stream", stream, b"_id", entry_id, b"_error", repr(error)[:500]]
        for key, value in fields.items():
            flat += [b"f:" + key, value]
        commands: list[tuple[Any, ...]] = [("XADD", dead, "MAXLEN", "~", DEAD_STREAM_MAXLEN, "*", *flat)]
        if ack:
            commands.append(("XACK", stream, CONSUMER_GROUP, entry_id))
        commands.append(("XDEL", stream, entry_id))
        await w.wire.execute_many(dead, commands)
        caller = _caller_of(w.codec, fields.get(b"d"))
        if caller is not None:
            client_id, activity_id = caller
            message = encode_error(
                w.codec,
                activity_id,
                RemoteError(
                    "SerializationError",
                    "SerializationError",
                    f"worker {w.worker_id} could not read this activity's task ({error}); it was moved "
                    f"to {dead} for an operator to look at",
                ),
            )
            w.outbox.reply(client_id, message)


def _caller_of(codec: Codec, data: bytes | None) -> tuple[str, str] | None:
    """(client id, activity id) of a task payload that names them, else None."""
    if not data:
        return None
    try:
        body = codec.loads(data)
        client_id, activity_id = body["c"], body["i"]
    except Exception:
        return None
    if isinstance(client_id, str) and isinstance(activity_id, str) and client_id and activity_id:
        return client_id, activity_id
    return None
