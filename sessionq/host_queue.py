"""A host's session activities, read by whichever of its processes has a free slot.

Callers send a host session's activities to the host's stream (`keys.stream` of its
placement id), read through the consumer group ``workers`` exactly as the shared stream is
(shared_queue.py): an entry stays in the reading process's pending list until its result
is written, so one that process never finished (it died, or stopped gracefully before the
activity ended) is taken over by another process of the host (housekeeping), or by the
process that replaces it within restart_grace, and runs again as its next attempt.

A process learns of the host's sessions from its own stream (the 'o' and 'c' messages go
to every process of the host) and, at registration, from Redis (`HeldSessions.load_host`).
An activity can still arrive before the process heard of its session (the two streams
are read apart): it then reads the session's record (`HeldSessions.adopt`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .envelope import RemoteError, Task, encode_error
from .faults import describe
from .shared_queue import SharedQueue

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("sessionq")


class HostQueue(SharedQueue):
    """One process's reads of its host's stream."""

    def __init__(self, worker: Worker, host_worker_id: str) -> None:
        super().__init__(worker, worker.keys.stream(host_worker_id))

    def runnable(self, fields: dict[bytes, bytes]) -> bool:
        return fields.get(b"t") == b"a"

    async def _run(self, task: Task, entry_id: bytes) -> None:
        w = self.worker
        sid = task.session_id or ""
        try:
            held = w.sessions.open.get(sid)
            if held is None and sid not in w.sessions.ended:
                held = await w.sessions.adopt(sid)
        except Exception as exc:  # Redis cannot say now: the pending list is walked again
            w.runner.unreserve()
            log.warning("worker %s: could not look up session %s (%s)", w.worker_id, sid, describe(exc))
            self.lost_track_of(entry_id)
            return
        if held is None:
            w.runner.unreserve()
            kind, reason = w.sessions.why_not_open(sid)
            error = "ActivityCancelledError" if kind == "completed" else "SessionFailedError"
            message = encode_error(
                w.codec,
                task.activity_id,
                RemoteError(error, "", f"activity {task.name!r} was not started: {reason}"),
            )
            w.outbox.reply(task.client_id, message, entry_id, self.stream)
            return
        held.activities_run += 1
        try:
            await w.runner.run(task, held, ack=entry_id, queue=self)
        finally:
            if w.stopping:
                self.held.discard(entry_id)
