"""A worker's housekeeping, one pass every third of heartbeat_timeout (a quarter second
while an activity with a heartbeat timeout runs).

Each pass, in order: trim what the worker read from its own stream; run the sweep, which
does what is due on Redis' clock (sessions past their execution deadline fail even if
their worker is gone; expired tickets leave the line; workers whose heartbeat deadline
passed are reaped) and, every few passes and after a failure, tells Redis' time (between
them it finds what may be due by the worker's reckoning of that clock); take over what the
dead left pending (never while this worker is stopping); publish per-session activity
counts (for inspect); end sessions whose owner went away; every fifth pass, make the
sessions it holds and the ones Redis says it holds agree (after Redis restored an older
snapshot); stop a burst worker with nothing left to do; time out activities that stopped
heartbeating.

What an idle pass costs Redis does not grow with the fleet: dead workers are found through
the index of heartbeat deadlines (reap.lua), not by asking after every worker, and what
they left is found through takeover marks, not by listing the consumer group. One worker
of the queue at a time (whoever's sweep finds it due) also audits the whole queue every
`audit_ms` (scripts.py): every registered worker's heartbeat, every consumer of the group,
as a safety net behind the index (a worker registered by an older version, an entry
deleted by hand).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from . import resources
from .keys import CONSUMER_GROUP, HOST_MARK
from .replies import field_map
from .scripts import audit_ms
from .shared_queue import SharedQueue

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("sessionq")

MARK_RETRY_MS = 1000
"""A takeover mark handed out comes due again this much later (a third of heartbeat_timeout
when that is shorter), for another worker, in case its taker cannot finish it."""
HOST_AUDIT_EVERY = 10
"""A host's processes look at the host stream's whole consumer group about once every this
many passes between them: each process every HOST_AUDIT_EVERY x (consumers of the group)."""
DEADLINES_EVERY = 10
"""The sweep looks at the queue's deadline index every this many passes even when its
earliest moment (item 'd' of `beats`) has not come: what an earlier version's client wrote
there carries no such mark. Otherwise only when something there may be due."""
CLOCK_RELEARN_PASSES = 6
"""The sweep asks Redis' clock (TIME) at least once every this many passes, and after any
failure; in between it goes by the worker's reckoning, which is only a hint: Redis' clock
decides whatever is due (sweep.lua). An idle worker so sends one command less a pass."""


class Housekeeping:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.passes = 0
        self._trimmed_to = b"0-0"
        self._host_audit_every = HOST_AUDIT_EVERY  # grows with the host's processes (claim_orphans)
        self._clock_learnt_at: float | None = None  # monotonic time of the last TIME the sweep sent
        self._clock_passes = 0  # passes since then

    async def step(self) -> None:
        """One pass of housekeeping; after a failure, the next pass asks Redis' clock again."""
        try:
            await self._pass()
        except BaseException:
            self._clock_learnt_at = None
            raise

    async def _pass(self) -> None:
        w = self.worker
        await self.trim_own_stream()
        hb_ms = int(w.heartbeat_timeout * 1000)
        swept = await w.scripts.sweep(
            w.keys,
            w.retention_ms,
            me=w.worker_id,
            may_reap=self.may_reap(),
            retry_ms=min(MARK_RETRY_MS, hb_ms // 3),
            audit_ms=audit_ms(hb_ms),
            host_id=w.host_id or "",
            free=0 if w.stopping else w.runner.free,
            now_ms=w.redis_now_ms() if self.clock_known() else None,
            look_at_deadlines=self.passes % DEADLINES_EVERY == 0,
        )
        self._clock_passes += 1
        if swept.timed:
            w.learn_redis_clock(swept.now_ms)
            self._clock_learnt_at, self._clock_passes = time.monotonic(), 0
        if swept.expired:
            log.info(
                "worker %s: expired %d session(s) past their execution timeout", w.worker_id, swept.expired
            )
        for dead, failed in swept.reaped:
            log.warning("worker %s: reaped dead worker %s (%d session(s) failed)", w.worker_id, dead, failed)
        if not w.stopping:
            await self.take_over(swept.marks)
        await w.sessions.publish_counts()
        await w.sessions.check_owners()
        self.passes += 1
        if self.passes % 5 == 1:
            await w.sessions.reconcile()
        if swept.audit:
            await self.audit()
        if w.host_queue is not None and self.passes % self._host_audit_every == 1 and not w.stopping:
            await self.claim_orphans(w.host_queue)
        if w.burst and await self.drained():
            log.info("worker %s: burst mode and nothing left to do; stopping", w.worker_id)
            w.stop()
        self.check_activity_heartbeats()
        interval = w.heartbeat_timeout / 3
        await asyncio.sleep(min(interval, 0.25) if self.any_heartbeat_timeouts() else interval)

    def clock_known(self) -> bool:
        """Whether the worker's reckoning of Redis' clock is fresh: learnt within the last
        CLOCK_RELEARN_PASSES passes, and nothing failed since (a failover may have brought
        another server, with another clock). A failed sweep never counts its pass as learnt."""
        w = self.worker
        learnt = self._clock_learnt_at
        if learnt is None or self._clock_passes >= CLOCK_RELEARN_PASSES:
            return False
        return w.heartbeat is None or w.heartbeat.failed_at < learnt

    def may_reap(self) -> bool:
        """Not while this worker's own heartbeat failed within the last heartbeat_timeout:
        whatever cut it off (a network blip, a Redis restart) likely cut the others off too,
        and they are about to beat again."""
        w = self.worker
        return w.heartbeat is None or time.monotonic() - w.heartbeat.failed_at >= w.heartbeat_timeout

    async def trim_own_stream(self) -> None:
        """Trim what was read, the last entry included, so what remains is queued (inspect
        counts it). Nothing to do while nothing new was read."""
        w = self.worker
        last = w.own_stream.last_id
        if last != b"0-0" and last != self._trimmed_to:
            ms, _, seq = last.partition(b"-")
            read_up_to = ms + b"-" + str(int(seq) + 1).encode()
            own = w.own_stream.key
            await w.wire.execute(own, "XTRIM", own, "MINID", read_up_to)
            self._trimmed_to = last

    async def take_over(self, marks: list[str]) -> None:
        """Claim what reaped workers left pending, as their takeover marks say: the shared
        stream's for any worker ("o:<worker>"), a host stream's for a process of that host
        ("h:<host_id>:<worker>")."""
        w = self.worker
        for mark in dict.fromkeys(marks):
            kind, _, rest = mark.partition(":")
            if kind == "o" and rest != w.worker_id:
                await self.claim(w.shared_queue, rest, w.runner.free, marked=True)
            elif kind == "h" and w.host_queue is not None:
                host_id, _, consumer = rest.partition(":")
                if host_id == w.host_id and consumer != w.worker_id:
                    await self.claim(w.host_queue, consumer, w.runner.free, marked=True)

    async def claim(self, queue: SharedQueue, consumer: str, count: int, *, marked: bool = False) -> None:
        """Claim up to `count` entries `consumer` left pending in `queue`'s stream (the
        script checks it is dead) and start them here; with `marked`, its takeover mark goes
        once nothing of it is left."""
        w = self.worker
        if count <= 0:
            return
        try:
            claimed = await w.scripts.claim_orphans(
                w.keys,
                consumer,
                w.worker_id,
                count,
                stream=queue.stream,
                host_id=w.host_id if queue is w.host_queue else None,
                marked=marked,
            )
        except Exception:
            # A claim whose reply was lost moved entries into our pending list unseen: walk
            # it again (the next poll does).
            queue.recover_pending()
            raise
        if claimed:
            log.warning(
                "worker %s: took over %d activity(ies) of %s worker %s",
                w.worker_id, len(claimed), "dead" if queue is w.shared_queue else "stopped or dead", consumer,
            )  # fmt: skip
        for entry_id, deliveries, flat in claimed:
            queue.start(entry_id, field_map(flat), delivery_count=int(deliveries) + 1)

    async def audit(self) -> None:
        """The safety net behind the index, run by one worker of the queue at a time: reap
        every registered worker whose heartbeat key is gone, and take over what any consumer
        of the group that is not alive left pending."""
        await self.reap_dead_workers()
        if not self.worker.stopping:
            await self.claim_orphans(self.worker.shared_queue)

    async def reap_dead_workers(self) -> None:
        """Declare dead every registered worker whose heartbeat key is gone, make one whose
        record lost its fields register again, and put back in the resource index, and in
        its host's process set, any live one they lack (O(fleet): the audit only)."""
        w = self.worker
        if not self.may_reap():
            return
        k = w.keys
        members = [m.decode() for m in await w.wire.execute(k.tasks, "SMEMBERS", k.workers)]
        if not members:
            return
        checks = [
            (("EXISTS", k.alive(m)), ("HMGET", k.worker(m), "max_sessions", "res", "hid")) for m in members
        ]
        replies = await w.wire.execute_many(k.tasks, [cmd for pair in checks for cmd in pair])
        index: list[tuple[object, ...]] = []
        hosts_up = {m for m, up in zip(members, replies[::2], strict=True) if up and m.startswith(HOST_MARK)}
        for other, is_alive, (cap, offered, hid) in zip(members, replies[::2], replies[1::2], strict=True):
            if is_alive or other == w.worker_id:
                if cap is None and not other.startswith(HOST_MARK):  # its next beat registers it again
                    await w.wire.execute(k.tasks, "ZREM", k.beats, "w:" + other)
                elif cap is not None and int(cap) >= 0:
                    index += [("SADD", k.resource_index(name), other) for name in resources.decode(offered)]
                if cap is not None and hid and HOST_MARK + hid.decode() in hosts_up:
                    # A host's process: its beats add it only when they renew the host's keys.
                    index.append(("SADD", k.host_procs(hid.decode()), other))
                continue
            reaped = await w.scripts.reap_worker(k, other, "", force=False, retention_ms=w.retention_ms)
            if reaped:
                log.warning(
                    "worker %s: reaped dead worker %s (%d session(s) failed)", w.worker_id, other, reaped - 1
                )
        if index:
            await w.wire.execute_many(k.tasks, index)

    async def claim_orphans(self, queue: SharedQueue) -> None:
        """Take over what any consumer of `queue`'s group that is not alive left pending (the
        shared stream's plain activities; a host's session activities, among its processes),
        and drop such consumers once nothing of theirs is pending (O(consumers): the audit)."""
        w = self.worker
        tasks = queue.stream
        consumers = await w.wire.execute(
            tasks, "XINFO", "CONSUMERS", tasks, CONSUMER_GROUP
        )  # NOGROUP: re-created
        if queue is w.host_queue:  # its sibling processes audit it too: between them, as often as one
            self._host_audit_every = HOST_AUDIT_EVERY * max(1, len(consumers))
        for consumer in map(field_map, consumers):
            name = consumer[b"name"].decode()
            if name == w.worker_id:
                continue
            if consumer.get(b"pending"):
                count = w.runner.free
            else:  # nothing to take over; drop it if it is long silent (the script checks it is dead)
                count = 1 if consumer.get(b"idle", 0) > 2000 * w.heartbeat_timeout else 0
            await self.claim(queue, name, count)

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
