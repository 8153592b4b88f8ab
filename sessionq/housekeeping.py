"""A worker's housekeeping, one pass every third of heartbeat_timeout (a quarter second
while an activity with a heartbeat timeout runs).

Each pass, in order: trim what the worker read from its own stream; learn Redis' clock
again (a clock step on this host must not fail sessions early); publish per-session
activity counts (for inspect); do what is due on Redis' clock (sessions past their
execution deadline fail even if their worker is gone; expired tickets leave the line);
end sessions whose owner went away; every fifth pass, make the sessions it holds and the
ones Redis says it holds agree (after Redis restored an older snapshot); reap dead workers;
take over the plain activities
they held (never while this worker is stopping); drop consumers nobody will come back
for; stop a burst worker with nothing left to do; time out activities that stopped
heartbeating.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from .keys import CONSUMER_GROUP
from .registration import server_time_ms
from .replies import field_map
from .shared_queue import SharedQueue

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("sessionq")


class Housekeeping:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.passes = 0

    async def step(self) -> None:
        w = self.worker
        await self.trim_own_stream()
        w.clock_offset_ms = await server_time_ms(w) - time.time() * 1000
        await w.sessions.publish_counts()
        if await w.scripts.sweep(w.keys, w.retention_ms):
            log.info("worker %s: expired session(s) past their execution timeout", w.worker_id)
        await w.sessions.check_owners()
        self.passes += 1
        if self.passes % 5 == 1:
            await w.sessions.reconcile()
        await self.reap_dead_workers()
        if not w.stopping:
            for queue in (w.shared_queue, w.host_queue):
                if queue is None:
                    continue
                try:
                    await self.claim_orphans(queue)
                except Exception:
                    # A claim whose reply was lost moved entries into our pending list unseen:
                    # walk it again (the next poll does).
                    queue.recover_pending()
                    raise
        if w.burst and await self.drained():
            log.info("worker %s: burst mode and nothing left to do; stopping", w.worker_id)
            w.stop()
        self.check_activity_heartbeats()
        interval = w.heartbeat_timeout / 3
        await asyncio.sleep(min(interval, 0.25) if self.any_heartbeat_timeouts() else interval)

    async def trim_own_stream(self) -> None:
        """Trim what was read, the last entry included, so what remains is queued (inspect counts it)."""
        w = self.worker
        last = w.own_stream.last_id
        if last != b"0-0":
            ms, _, seq = last.partition(b"-")
            read_up_to = ms + b"-" + str(int(seq) + 1).encode()
            own = w.own_stream.key
            await w.wire.execute(own, "XTRIM", own, "MINID", read_up_to)

    async def reap_dead_workers(self) -> None:
        """Declare dead every registered worker whose heartbeat key is gone. Not while this
        worker's own heartbeat failed within the last heartbeat_timeout: whatever cut it off
        (a network blip, a Redis restart) likely cut the others off too, and they are about
        to beat again."""
        w = self.worker
        if w.heartbeat is not None and time.monotonic() - w.heartbeat.failed_at < w.heartbeat_timeout:
            return
        k = w.keys
        members = [m.decode() for m in await w.wire.execute(k.tasks, "SMEMBERS", k.workers)]
        members = [m for m in members if m != w.worker_id]
        if not members:
            return
        alive = await w.wire.execute_many(k.tasks, [("EXISTS", k.alive(other)) for other in members])
        for other, is_alive in zip(members, alive, strict=True):
            if is_alive:
                continue
            reason = f"worker {other} died (no heartbeat for {w.heartbeat_timeout:g}s)"
            reaped = await w.scripts.reap_worker(k, other, reason, force=False, retention_ms=w.retention_ms)
            if reaped:
                log.warning(
                    "worker %s: reaped dead worker %s (%d session(s) failed)", w.worker_id, other, reaped - 1
                )

    async def claim_orphans(self, queue: SharedQueue) -> None:
        """Take over activities that dead workers had read but not finished (plain ones from
        the shared stream; a host's session activities from its stream, among its processes),
        and drop the consumers of dead workers once nothing of theirs is pending."""
        w = self.worker
        tasks = queue.stream
        consumers = await w.wire.execute(
            tasks, "XINFO", "CONSUMERS", tasks, CONSUMER_GROUP
        )  # NOGROUP: re-created
        for consumer in map(field_map, consumers):
            name = consumer[b"name"].decode()
            if name == w.worker_id:
                continue
            if consumer.get(b"pending"):
                count = w.runner.free
            else:  # nothing to take over; drop it if it is long silent (the script checks it is dead)
                count = 1 if consumer.get(b"idle", 0) > 2000 * w.heartbeat_timeout else 0
            if count <= 0:
                continue
            claimed = await w.scripts.claim_orphans(w.keys, name, w.worker_id, count, stream=tasks)
            if claimed:
                log.warning(
                    "worker %s: took over %d activity(ies) of %s worker %s",
                    w.worker_id, len(claimed), "dead" if queue is w.shared_queue else "stopped or dead", name,
                )  # fmt: skip
            for entry_id, deliveries, flat in claimed:
                queue.start(entry_id, field_map(flat), delivery_count=int(deliveries) + 1)

    async def drained(self) -> bool:
        w = self.worker
        if w.runner.in_use or len(w.sessions) or not w.outbox.empty:
            return False
        tasks = w.keys.tasks
        for group in map(field_map, await w.wire.execute(tasks, "XINFO", "GROUPS", tasks)):
            if group[b"name"] == CONSUMER_GROUP.encode():
                if group.get(b"pending"):
                    return False
                # Anything after the last entry delivered is still queued ("lag" is unknown on
                # Redis 6.2, and on 7 once an entry in the middle was deleted).
                last = group.get(b"last-delivered-id") or b"0-0"
                return not await w.wire.execute(tasks, "XRANGE", tasks, b"(" + last, "+", "COUNT", 1)
        return True

    def any_heartbeat_timeouts(self) -> bool:
        return any(e.task.heartbeat_timeout for e in self.worker.runner.executions.values())

    def check_activity_heartbeats(self) -> None:
        now = time.monotonic()
        for execution in list(self.worker.runner.executions.values()):
            limit = execution.task.heartbeat_timeout
            if limit and now - execution.running.last_heartbeat > limit:
                execution.cancel(
                    "heartbeat", f"activity {execution.task.name!r} sent no heartbeat for {limit:g}s"
                )
