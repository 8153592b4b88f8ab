"""The worker's own stream: what callers and Redis address to this worker alone.

Entries, by their `t` field (the wire format is in envelope.py): `o` a session was placed
here, `a` a session activity, `c` a session ended (its caller completed it, or Redis
expired or failed it), `x` cancel an activity, `h` the registration's first entry. The
stream is read with XREAD from the last entry handled (`last_id`; housekeeping trims
what was read), in order, so a session's activities start in the order they were sent.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .envelope import RemoteError, decode_task, encode_error
from .replies import stream_entries
from .shared_queue import read_block_ms
from .wire import BlockingRead

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("sessionq")

BATCH = 256


Endings = dict[bytes, tuple[str, str]]
"""The sessions a batch ends (their 'c' entries): session id -> ending_of its entry."""


def ending_of(fields: dict[bytes, bytes]) -> tuple[str, str]:
    """How a 'c' entry says its session ended: ("completed"|"failed", reason), the reason as
    Redis recorded it, or (an earlier version's entry, without it) as its mode says."""
    mode, why = fields.get(b"r", b"complete"), fields.get(b"m")
    if why:
        return ("completed" if mode == b"complete" else "failed"), why.decode(errors="replace")
    if mode == b"complete":
        return "completed", "session was completed"
    fallback = {b"expire": "execution timeout passed", b"owner": "its owner went away"}
    return "failed", fallback.get(mode, "session failed")


class OwnStream:
    """Reads the worker's own stream and acts on each entry."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.key = worker.keys.stream(worker.worker_id)
        self.last_id = b"0-0"  # how far the stream was read
        self._block_ms = read_block_ms(worker.heartbeat_timeout)
        self._reader: BlockingRead = worker.wire.blocking(self.key, self._block_ms / 1000)

    async def poll(self) -> None:
        """Read the next batch and handle it (one loop step)."""
        reply = await self._reader.execute(
            "XREAD", "COUNT", BATCH, "BLOCK", self._block_ms, "STREAMS", self.key, self.last_id
        )
        entries = stream_entries(reply)
        if not entries:
            return
        ending = {f[b"s"]: ending_of(f) for _, f in entries if f.get(b"t") == b"c" and b"s" in f}
        for entry_id, fields in entries:
            try:
                self._handle(entry_id, fields, ending)
            except Exception as exc:  # D04: one malformed entry must not swallow the rest of the batch
                await self.worker.dead_letters.move_aside(
                    self.key, entry_id, fields, exc
                )  # fails: read again
            self.last_id = entry_id  # past this entry only once it is handled

    def _handle(self, entry_id: bytes, fields: dict[bytes, bytes], ending: Endings) -> None:
        """Act on one entry; raises on a malformed one."""
        w = self.worker
        kind = fields.get(b"t")
        if kind == b"a":
            self._start_session_activity(entry_id, fields, ending)
        elif kind == b"o":
            w.sessions.opened(fields[b"s"].decode(), fields, entry_id)
        elif kind == b"c":
            w.sessions.end(fields[b"s"].decode(), *ending_of(fields))
        elif kind == b"x":
            activity_id = fields.get(b"i", b"").decode()
            w.runner.cancel(activity_id, "cancelled", "the caller cancelled the activity")
        elif kind != b"h":
            raise ValueError(f"unknown entry type {kind!r}")

    def _start_session_activity(self, entry_id: bytes, fields: dict[bytes, bytes], ending: Endings) -> None:
        """Start it if its session is open here (and not ending in this same batch);
        otherwise tell the caller why it did not start."""
        w = self.worker
        try:
            task = decode_task(w.codec, fields[b"d"], entry_id)
        except Exception as exc:
            w.spawn(w.dead_letters.move_aside(self.key, entry_id, fields, exc))
            return
        sid = task.session_id or ""
        held = w.sessions.open.get(sid)
        ended_here = ending.get(sid.encode())
        if held is None or ended_here is not None:
            kind, reason = ended_here if held is not None and ended_here else w.sessions.why_not_open(sid)
            error = "ActivityCancelledError" if kind == "completed" else "SessionFailedError"
            message = encode_error(
                w.codec,
                task.activity_id,
                RemoteError(error, "", f"activity {task.name!r} was not started: {reason}"),
            )
            w.outbox.reply(task.client_id, message)
            return
        held.activities_run += 1
        w.spawn(w.runner.run(task, held, ack=None))

    def restart(self) -> None:
        """Read the stream from its start again (Redis lost it, and with it what was read)."""
        self.last_id = b"0-0"
