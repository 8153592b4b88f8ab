"""The sessions a worker holds: opened by a grant, ended by their caller, their execution
timeout (on Redis' clock), their owner's silence, or the worker's own end.

Redis is the authority on a session's state (session.py and the Lua scripts); this is the
worker's copy, which decides whether a session activity may start and cancels what runs
for a session that ended. A session ends here only once Redis says it ended.

The worker is also what ends its sessions at their execution deadline: its record says
``expiry=own``, so they have no entry in the queue's deadline index (120 bytes a session at
fleet scale). Its timer asks end_session, Redis' clock decides, and an ask that fails is
made again a second later; a session it does not hold is ended by reconcile, and if the
worker dies its reap fails them all.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import resources
from .execution import Execution
from .faults import describe
from .replies import time_ms
from .session_info import SessionInfo, SessionState

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("sessionq")

RECONCILE_BATCH = 500
"""Most sessions of either side one reconcile pass looks at (unless Redis counts some the
worker does not hold: then it walks them all)."""
MAX_WALK_STEPS = 1000
"""Most SSCAN steps of such a walk (500,000 sessions)."""
EXPIRE_RETRY_MAX = 10.0
"""Longest wait before asking again to expire a session, after asks that failed."""
STRAY_BATCH = 1000
"""Most records of unheld sessions read in one round trip."""
ENDED_MEMORY = 10_000
"""How many ended sessions a worker remembers (to answer their late activities rightly)."""


@dataclass
class HeldSession:
    """A session this worker holds: its info and the executions running for it."""

    info: SessionInfo
    deadline_ms: int
    info_exec_ms: int = 0
    """Its execution timeout, ms (deadline - this = when it opened, on Redis' clock)."""
    owner_client: str = ""
    owner_ms: int = 0
    executions: dict[str, Execution] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None
    activities_run: int = 0
    published_run: int = 0
    expire_failures: int = 0
    """Asks to expire it that failed in a row (Redis out of reach): the next waits longer."""


def _seconds(seconds: float) -> str:
    return f"{max(0.0, seconds):.0f} s" if seconds < 3600 else f"{seconds / 3600:.1f} h"


class HeldSessions:
    """The worker's sessions, by id, and the ones it saw end."""

    def __init__(self, worker: Worker, spawn: Callable[..., None]) -> None:
        self.worker = worker
        self.spawn = spawn
        self.open: dict[str, HeldSession] = {}
        self.ended: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._scan_cursor = 0  # where reconcile's walk of Redis' set of our sessions is
        self._check_from = 0  # where its walk of the sessions held here is
        self._expiry_failing = False  # an ask to expire a session failed, none succeeded since

    def __len__(self) -> int:
        return len(self.open)

    # -- opening ------------------------------------------------------------------------
    def opened(self, sid: str, fields: dict[bytes, bytes], entry_id: bytes) -> None:
        """A grant opened session `sid` here (an 'o' entry of the worker's own stream)."""
        deadline = fields.get(b"d")  # absent in an older version's message: created + execution timeout
        created_ms = int(entry_id.split(b"-")[0])
        deadline_ms = int(deadline) if deadline is not None else created_ms + int(fields[b"x"])
        self._hold(
            sid,
            deadline_ms,
            int(fields.get(b"x") or 0),
            fields.get(b"c", b"").decode(),
            int(fields.get(b"l") or 0),
            resources.decode(fields.get(b"r")),
        )

    def _hold(
        self,
        sid: str,
        deadline_ms: int,
        exec_ms: int,
        owner_client: str,
        owner_ms: int,
        held_resources: dict[str, int] | None = None,
    ) -> HeldSession | None:
        if sid in self.open or sid in self.ended:
            return self.open.get(sid)
        w = self.worker
        info = SessionInfo(
            sid,
            w.hostname,
            w.worker_id,
            w.task_queue,
            prefix=w.prefix,
            host_id=w.host_id,
            resources=held_resources or {},
        )
        held = HeldSession(
            info, deadline_ms, info_exec_ms=exec_ms, owner_client=owner_client, owner_ms=owner_ms
        )
        self.open[sid] = held
        left = (deadline_ms - w.redis_now_ms()) / 1000
        self._arm(held, left)
        if w.metrics is not None:
            w.metrics.session_opened()
        if log.isEnabledFor(logging.INFO):
            asked = f", holding {resources.encode(held_resources)}" if held_resources else ""
            fields = {"worker": w.worker_id, "queue": w.task_queue, "session": sid, "event": "session_opened"}
            log.info(
                "worker %s: session %s opened (execution timeout in %s%s)",
                w.worker_id, sid, _seconds(left), asked, extra=fields,
            )  # fmt: skip
        return held

    # -- a host's sessions ----------------------------------------------------------------
    _RECORD = ("state", "worker", "deadline", "exec_ms", "client", "owner_ms", "reason", "res")

    def _from_record(self, sid: str, record: list[bytes | None]) -> HeldSession | None:
        """Hold a session of this process's host from its record in Redis, if it is open."""
        state, placed_on, deadline, exec_ms, client, owner_ms, reason, held_resources = record
        if state is None or placed_on is None or placed_on.decode() != self.worker.host_worker_id:
            return None
        if state != b"OPEN":
            if sid not in self.open:
                kind = "completed" if state == b"COMPLETED" else "failed"
                self.ended[sid] = (
                    kind,
                    (reason or b"").decode()
                    or ("session was completed" if kind == "completed" else "session failed"),
                )
            return None
        return self._hold(
            sid,
            int(deadline or 0),
            int(exec_ms or 0),
            (client or b"").decode(),
            int(owner_ms or 0),
            resources.decode(held_resources),
        )

    async def adopt(self, sid: str) -> HeldSession | None:
        """An activity of a host session arrived before the message that it opened (the two
        come on different streams): read the session's record and hold it if it is open and
        counted on this process's host."""
        w = self.worker
        k = w.keys
        assert w.host_worker_id is not None
        record, counted = await w.wire.execute_many(
            k.tasks,
            [
                ("HMGET", k.session(sid), *self._RECORD),
                ("SISMEMBER", k.worker_sessions(w.host_worker_id), sid),
            ],
        )
        if not counted and record[0] == b"OPEN":
            return None  # not (or no longer) one of the host's sessions
        return self._from_record(sid, record)

    async def load_host(self) -> None:
        """This process (re)registered as part of a host: hold every session the host has
        open (those it held before this process started, in its restart grace too), and end
        here those it no longer has, as their records say they ended (the host was made
        anew after its grace: they failed)."""
        w = self.worker
        k = w.keys
        assert w.host_worker_id is not None
        before = set(self.open)  # opened before the snapshot below: in it unless they ended
        members = await w.wire.execute(k.tasks, "SMEMBERS", k.worker_sessions(w.host_worker_id))
        sids = sorted({m.decode() for m in members} | before)
        records = (
            await w.wire.execute_many(k.tasks, [("HMGET", k.session(sid), *self._RECORD) for sid in sids])
            if sids
            else []
        )
        counted = {m.decode() for m in members}
        taken = 0
        for sid, record in zip(sids, records, strict=True):
            state = record[0]
            if sid in counted and state == b"OPEN":
                if sid not in self.open and self._from_record(sid, record) is not None:
                    taken += 1
                continue
            if sid not in before or sid not in self.open:
                continue
            if state == b"COMPLETED":  # held here, but the host no longer has it open
                self.end(sid, "completed", "session was completed")
                continue
            why = (record[6] or b"").decode() or f"host {w.host_id} no longer holds it (its grace passed)"
            log.warning(
                "worker %s: session %s is no longer open on host %s: %s", w.worker_id, sid, w.host_id, why
            )
            self.end(sid, "failed", why)
        if taken:
            log.info("worker %s: holds %d open session(s) of host %s", w.worker_id, taken, w.host_id)

    def _arm(self, held: HeldSession, seconds: float) -> None:
        sid = held.info.session_id
        held.timer = asyncio.get_running_loop().call_later(
            max(0.0, seconds), lambda: self.spawn(self._expire(sid))
        )

    async def _expire(self, sid: str) -> None:
        """The session's execution timeout is due by our clock. Redis' clock decides: if it
        says not yet (our clock runs ahead, or stepped), wait what it says is left."""
        w = self.worker
        try:
            ended = await w.scripts.end_session(
                w.keys, sid, "expire", "execution timeout passed", w.retention_ms
            )
        except Exception as exc:  # nobody else ends it (no deadline entry): ask again soon
            if not self._expiry_failing:  # once an outage, not once a session
                log.warning(
                    "worker %s: could not expire session %s now (%s); retrying with backoff",
                    w.worker_id, sid, describe(exc),
                )  # fmt: skip
            self._expiry_failing = True
            held = self.open.get(sid)
            if held is not None:
                # Backoff with jitter: ten thousand sessions overdue after an outage must not
                # all ask again in the same second.
                held.expire_failures += 1
                wait = min(EXPIRE_RETRY_MAX, 2.0**held.expire_failures / 2)
                self._arm(held, wait * random.uniform(0.5, 1.0))
            return
        self._expiry_failing = False
        held = self.open.get(sid)
        if ended.state == "OPEN" and held is not None:
            self._arm(held, ended.ms_left / 1000 + 0.005)
        elif ended.state != "OPEN":
            self.end(sid, "failed", ended.reason or "execution timeout passed")

    def overdue(self, now_ms: float) -> list[str]:
        """The sessions held whose execution deadline is `now_ms` or earlier. Called from the
        heartbeat thread while this worker's loop is blocked (keepalive.py): the copy of
        the dict is made in one step under the GIL, and a blocked loop changes nothing."""
        try:
            held = list(self.open.items())
        except RuntimeError:  # changed while copied: the loop runs again, its timers do this
            return []
        return [sid for sid, session in held if session.deadline_ms <= now_ms]

    # -- ending -----------------------------------------------------------------------------
    def end(self, sid: str, kind: str, reason: str) -> None:
        """Forget a session; cancel what runs for it (its callers are told why)."""
        held = self.open.pop(sid, None)
        self.ended[sid] = (kind, reason)
        while len(self.ended) > ENDED_MEMORY:
            self.ended.popitem(last=False)
        if held is None:
            return
        if held.timer is not None:
            held.timer.cancel()
        held.info.state = SessionState.COMPLETED if kind == "completed" else SessionState.FAILED
        for execution in list(held.executions.values()):
            execution.cancel(
                "session_completed" if kind == "completed" else "session_failed",
                f"session {sid} {'was completed' if kind == 'completed' else 'failed: ' + reason}",
            )
        w = self.worker
        if w.metrics is not None:
            w.metrics.session_ended(kind)
        how = kind if kind == "completed" else f"{kind} ({reason})"
        fields = {"worker": w.worker_id, "queue": w.task_queue, "session": sid, "event": "session_ended"}
        fields.update(outcome=kind, reason=reason)
        log.info("worker %s: session %s ended: %s", w.worker_id, sid, how, extra=fields)

    def why_not_open(self, sid: str) -> tuple[str, str]:
        """For an activity of a session not held here: ("completed"|"failed", reason)."""
        return self.ended.get(sid, ("failed", f"session {sid} is not open on worker {self.worker.worker_id}"))

    async def fail_all(self, reason: str) -> None:
        """Fail every session still held, in Redis and here (the worker is stopping)."""
        w = self.worker
        for sid in list(self.open):
            await w.scripts.end_session(w.keys, sid, "fail", reason, w.retention_ms)
            self.end(sid, "failed", reason)

    # -- owners -------------------------------------------------------------------------
    async def check_owners(self) -> None:
        """End the sessions whose owner's lease lapsed (the caller crashed or was killed).
        One round trip reads every owner's lease; end_session checks again, atomically."""
        owned = [h for h in self.open.values() if h.owner_ms > 0 and h.owner_client]
        if not owned:
            return
        w = self.worker
        clients = sorted({h.owner_client for h in owned})
        leases = [w.keys.lease(client) for client in clients]
        replies = await w.wire.execute_many(leases[0], [("TIME",), *(("GET", key) for key in leases)])
        now_ms = time_ms(replies[0])
        renewed = dict(zip(clients, replies[1:], strict=True))
        for held in owned:
            last = renewed.get(held.owner_client)
            if last is not None and now_ms - int(last) <= held.owner_ms:
                continue
            sid = held.info.session_id
            ended = await w.scripts.end_session(w.keys, sid, "owner", "its owner went away", w.retention_ms)
            if ended.state == "MISSING":
                self.end(sid, "failed", "its record is gone from Redis (Redis lost its data?)")
            elif ended.state != "OPEN":
                if ended.reason == "its owner went away":
                    log.warning(
                        "worker %s: session %s ended: its owner (client %s) went silent for over %g s",
                        w.worker_id, sid, held.owner_client, held.owner_ms / 1000,
                    )  # fmt: skip
                self.end(sid, "failed" if ended.state == "FAILED" else "completed", ended.reason or "ended")

    async def reconcile(self) -> None:
        """Make this worker and Redis agree on the sessions it holds, after Redis came back
        from an older snapshot (say): a session Redis says it holds while it does not is
        ended there (nobody else would ever end it); one it holds while Redis has no record
        of it, or has it ended, is ended here. A session granted a moment ago may not have
        reached the worker yet, so only older ones count. Each call looks at up to
        RECONCILE_BATCH sessions of either side, walking on from where the last one stopped,
        so a worker holding ten thousand sessions never sends ten thousand commands at once;
        but when Redis counts more sessions on this worker than it holds, the whole set is
        walked at once (SSCAN, RECONCILE_BATCH a step): such a session is ended by nobody
        else (a worker's sessions have no deadline entry), and it keeps its slot."""
        w = self.worker
        k = w.keys
        mine = k.worker_sessions(w.worker_id)
        if self.open:
            count, (cursor, members) = await w.wire.execute_many(
                k.tasks, [("SCARD", mine), ("SSCAN", mine, self._scan_cursor, "COUNT", RECONCILE_BATCH)]
            )
            self._scan_cursor = int(cursor)
        else:  # an idle worker: the count says it all (one command a pass)
            count, members = await w.wire.execute(k.tasks, "SCARD", mine), []
        if int(count) > len(self.open):  # some it does not hold (or a grant on its way here)
            members, at = [], 0
            for _ in range(MAX_WALK_STEPS):
                cursor, step = await w.wire.execute(k.tasks, "SSCAN", mine, at, "COUNT", RECONCILE_BATCH)
                members += step
                at = int(cursor)
                if at == 0:
                    break
        strays = [sid for sid in (m.decode() for m in members) if sid not in self.open]
        await self._forget_unknown()
        for start in range(0, len(strays), STRAY_BATCH):
            await self._end_strays(strays[start : start + STRAY_BATCH])

    async def _end_strays(self, strays: list[str]) -> None:
        """End the sessions Redis counts on this worker while it does not hold them, once
        they are old enough not to be grants on their way here."""
        w = self.worker
        k = w.keys
        commands: list[tuple[object, ...]] = [("TIME",)]
        commands += [("HMGET", k.session(sid), "state", "deadline", "exec_ms") for sid in strays]
        replies = await w.wire.execute_many(k.session(strays[0]), commands)
        now_ms = time_ms(replies[0])
        for sid, (state, deadline, exec_ms) in zip(strays, replies[1:], strict=True):
            if (
                state == b"OPEN"
                and deadline is not None
                and now_ms - (int(deadline) - int(exec_ms or 0)) > 2000 * w.heartbeat_timeout
            ):
                reason = f"worker {w.worker_id} no longer held it (Redis came back from an older state?)"
                log.warning("worker %s: ending session %s: %s", w.worker_id, sid, reason)
                await w.scripts.end_session(k, sid, "fail", reason, w.retention_ms)

    async def _forget_unknown(self) -> None:
        w = self.worker
        settled = w.redis_now_ms() - 2000 * w.heartbeat_timeout
        sids = list(self.open)
        if self._check_from >= len(sids):
            self._check_from = 0
        batch = sids[self._check_from : self._check_from + RECONCILE_BATCH]
        self._check_from += len(batch)
        held = [sid for sid in batch if self.open[sid].deadline_ms - self.open[sid].info_exec_ms < settled]
        if not held:
            return
        states = await w.wire.execute_many(
            w.keys.session(held[0]), [("HGET", w.keys.session(sid), "state") for sid in held]
        )
        for sid, state in zip(held, states, strict=True):
            if state != b"OPEN" and sid in self.open:
                why = "its record is gone from Redis" if state is None else f"Redis has it {state.decode()}"
                log.warning("worker %s: dropping session %s: %s", w.worker_id, sid, why)
                self.end(sid, "failed" if state != b"COMPLETED" else "completed", why)

    async def publish_counts(self) -> None:
        """Record how many activities each open session ran here, for `sessionq inspect`
        (the processes of a host each in a field of their own, which inspect adds up)."""
        changed = [h for h in self.open.values() if h.activities_run != h.published_run]
        if not changed:
            return
        w = self.worker
        sent = {h.info.session_id: h.activities_run for h in changed}
        field = "activities" if w.host_id is None else f"activities:{w.worker_id}"
        await w.scripts.publish_counts(w.keys, sent, field)
        for held in changed:  # what was sent: an activity started meanwhile is published next pass
            held.published_run = sent[held.info.session_id]
