"""Plain activities from the task queue's shared stream: read, started, and never lost.

A worker reads with XREADGROUP as many entries as it has free slots (`poll`). An entry
read stays in the worker's pending list until its result is written (the outbox acks it
then), so a worker that dies leaves its entries for another to take over (housekeeping).

When a read's reply may have been lost after Redis delivered entries (a dropped
connection, a claim whose answer never came), those entries sit in this worker's pending
list where neither '>' reads nor other workers find them: the next poll walks that list
with a cursor (`recover_pending`) and starts what does not already run here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .envelope import Task, decode_task
from .keys import CONSUMER_GROUP
from .replies import stream_entries
from .wire import BlockingRead

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("sessionq")


def read_block_ms(heartbeat_timeout: float) -> int:
    """How long a worker's reads block while nothing comes: an entry ends the wait at once,
    so this only sets what an idle worker costs Redis (one read per stream per block) and
    how soon a read over a silently dead connection gives up (2 s after it)."""
    return int(1000 * min(5.0, max(1.0, heartbeat_timeout / 2)))


class SharedQueue:
    """The worker's reads of the shared stream and the plain activities it started."""

    def __init__(self, worker: Worker, stream: str | None = None) -> None:
        self.worker = worker
        self.stream = stream or worker.keys.tasks
        self.held: set[bytes] = set()  # ids read and not yet acknowledged
        self._block_ms = read_block_ms(worker.heartbeat_timeout)
        self._reader: BlockingRead = worker.wire.blocking(self.stream, self._block_ms / 1000)
        self._recovering = True  # walk our own pending list before the first read
        self._cursor: bytes = b"0"  # how far that walk has come

    async def poll(self) -> None:
        """Read plain activities, as many as there are free slots (one loop step)."""
        w = self.worker
        runner = w.runner
        if runner.free <= 0:
            await runner.wait_for_free_slot()
            return
        if self._recovering:
            await self._recover_own_pending(runner.free)
            return
        # A host's process reads two streams (plain activities, its host's session ones) at
        # once: each asks for half the free slots, so together they read at most one more
        # than fit (one waits here for a slot, where an idle sibling cannot take it).
        count = runner.free if w.host_queue is None else max(1, runner.free // 2)
        started = time.monotonic()
        try:
            reply = await self._reader.execute(
                "XREADGROUP", "GROUP", CONSUMER_GROUP, w.worker_id,
                "COUNT", count, "BLOCK", self._block_ms, "STREAMS", self.stream, ">",
            )  # fmt: skip
        except BaseException:
            # The reply may have been lost after Redis delivered entries to us: they now sit
            # in our pending list, where neither '>' reads nor other workers would find them.
            self._recovering = True
            raise
        entries = stream_entries(reply)
        if not entries:
            if time.monotonic() - started < self._block_ms / 2000:
                await asyncio.sleep(0.005)  # fakeredis returns from XREADGROUP BLOCK at once
            return
        for entry_id, fields in entries:
            self.start(entry_id, fields)

    async def _recover_own_pending(self, free: int) -> None:
        """Start entries delivered to this consumer that it is not running (at-least-once).

        Walks the pending list with a cursor, a batch per call, skipping what already runs
        here, until the end: entries that run for long cannot pin it to its first page."""
        w = self.worker
        reply = await w.wire.execute(
            self.stream,
            "XREADGROUP", "GROUP", CONSUMER_GROUP, w.worker_id,
            "COUNT", free, "STREAMS", self.stream, self._cursor,
        )  # fmt: skip
        entries = stream_entries(reply)
        if not entries:
            self._recovering = False
            self._cursor = b"0"
            return
        self._cursor = entries[-1][0]
        for entry_id, fields in entries:
            if entry_id in self.held:
                continue
            if not fields:  # deleted meanwhile (its caller cancelled it): nothing to run
                w.outbox.ack(entry_id, self.stream)
                continue
            log.warning(
                "worker %s: resuming activity %s whose delivery was interrupted",
                w.worker_id,
                entry_id.decode(),
            )
            self.start(entry_id, fields)

    def start(self, entry_id: bytes, fields: dict[bytes, bytes], delivery_count: int = 1) -> None:
        """Start an activity read from the stream (it waits for a free slot)."""
        w = self.worker
        if entry_id in self.held:
            return
        if not fields or not self.runnable(fields):  # deleted after delivery (its caller cancelled it)
            w.outbox.ack(entry_id, self.stream)
            return
        try:
            task = decode_task(w.codec, fields[b"d"], entry_id)
        except Exception as exc:
            w.spawn(w.dead_letters.move_aside(self.stream, entry_id, fields, exc, ack=True))
            return
        task.delivery_count = delivery_count
        if delivery_count > task.attempt:
            task.attempt = delivery_count  # an earlier holder died mid-attempt: that attempt counts
        self.held.add(entry_id)
        w.runner.reserve()
        w.spawn(self._run(task, entry_id))

    def runnable(self, fields: dict[bytes, bytes]) -> bool:
        """Whether an entry of this stream is an activity to run."""
        return True

    async def _run(self, task: Task, entry_id: bytes) -> None:
        try:
            await self.worker.runner.run(task, None, ack=entry_id, queue=self)
        finally:
            if self.worker.stopping:
                self.held.discard(entry_id)

    def acknowledged(self, entry_ids: Iterable[bytes]) -> None:
        """The outbox wrote these entries' acks: they are done here."""
        self.held.difference_update(entry_ids)

    def lost_track_of(self, entry_id: bytes) -> None:
        """An entry read here ended without a reply: the pending list is walked again, so it
        runs (at-least-once) instead of sitting there unseen."""
        self.held.discard(entry_id)
        self.recover_pending()

    def recover_pending(self) -> None:
        """Walk this worker's own pending list before the next read: entries may sit there
        that it does not run (a read or claim whose reply was lost)."""
        self._recovering = True
