"""The Lua scripts (one file per atomic operation), and one typed Python call per script.

A script file may pull in a shared fragment with a line ``-- @include NAME`` (from
``lua/includes/NAME.lua``). Scripts run by SHA over the hot-path connections (wire.py); a
server that does not know a script yet (NOSCRIPT: first use, a restart, another cluster
node) gets it through one EVAL, which also caches it there.

The methods of `Scripts` below are the only place that knows each script's KEYS and ARGV
order (their headers in ``lua/`` say what each one is); everything else calls them by name.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

from .faults import error_code
from .keys import CONSUMER_GROUP, QueueKeys
from .wire import Wire

_INCLUDE = re.compile(r"^-- @include (\w+)\s*$", re.MULTILINE)


@cache
def source(name: str) -> str:
    """The full text of script `name` (e.g. "create_session"), includes expanded."""
    folder = resources.files("sessionq") / "lua"
    matches = [p for p in folder.iterdir() if p.name.startswith(name + "-") and p.name.endswith(".lua")]
    if len(matches) != 1:
        raise LookupError(f"no single Lua script named {name!r} in sessionq/lua")
    text = matches[0].read_text()
    return _INCLUDE.sub(lambda m: (folder / "includes" / f"{m.group(1)}.lua").read_text(), text)


@dataclass(frozen=True)
class Claim:
    """What create_session answered: a session now, a place in the line, or neither."""

    status: str
    """"OK" (a slot was claimed), "WAIT" (queued), "FULL" (no slot, no wait) or "DEAD"
    (the recreate target is gone)."""
    worker_id: str = ""
    hostname: str = ""
    deadline_ms: int = 0
    hb_ms: int = 0


@dataclass(frozen=True)
class Registered:
    """What register_worker answered."""

    status: str
    """"FRESH" (registered anew: earlier sessions are gone), "KNOWN" (the registration
    survived), "CONFLICT" (a live process of the host runs with other values) or "REAP"
    (the host's grace passed: reap it, then register again)."""
    host_status: str = ""
    """"" (no host), "NEW" (the host was made anew) or "JOINED"."""
    max_sessions: int = 0
    """For CONFLICT: the host's limit (0 = none)."""
    grace_ms: int = 0
    """For CONFLICT: the host's restart grace."""
    hb_ms: int = 0
    """For CONFLICT: the heartbeat timeout of the host's processes."""
    resources: str = ""
    """For CONFLICT: the host's session resources (text form, resources.py)."""


@dataclass(frozen=True)
class Swept:
    """What the sweep did, and what it hands to the calling worker."""

    expired: int
    """Sessions failed for their execution timeout."""
    now_ms: int
    """The time it went by: Redis' own clock when `timed`, else the worker's reckoning of it."""
    reaped: list[tuple[str, int]]
    """(worker, sessions failed) for each dead worker it reaped."""
    marks: list[str]
    """Takeover marks for the caller: "o:<worker>" (shared stream, due), "h:<host_id>:<worker>"
    (its host's stream)."""
    audit: bool
    """The queue's periodic audit is due, and this worker's to do."""
    timed: bool = True
    """`now_ms` came from Redis (TIME): the worker may learn its clock from it."""


def audit_ms(hb_ms: int) -> int:
    """How often one worker of a queue audits it all (a safety net behind the index)."""
    return max(5_000, 10 * hb_ms)


@dataclass(frozen=True)
class Ended:
    """What end_session answered."""

    state: str
    """"COMPLETED", "FAILED", "OPEN" (an expire or owner check that was not due) or "MISSING"."""
    reason: str
    ms_left: int
    """For an early expire: how long until the deadline, on Redis' clock."""


class Scripts:
    """The scripts, run over one Client's or Worker's Wire."""

    NAMES = (
        "create_session",
        "cancel_wait",
        "end_session",
        "sweep",
        "register_worker",
        "heartbeat",
        "reap_worker",
        "claim_orphans",
        "open_inbox",
        "renew_lease",
        "publish_count",
    )

    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self._sources = {name: source(name) for name in self.NAMES}
        self._shas = {name: hashlib.sha1(text.encode()).hexdigest() for name, text in self._sources.items()}

    async def run(self, name: str, keys: list[str], args: list[Any], *, timeout: float | None = None) -> Any:
        """Run script `name`: EVALSHA, or EVAL when the server does not have it yet.
        `timeout` may shorten the wait for the reply (see Wire.execute)."""
        wire = self.wire
        try:
            return await wire.execute(
                keys[0], "EVALSHA", self._shas[name], len(keys), *keys, *args, timeout=timeout
            )
        except ResponseError as exc:
            if not _no_script(exc):
                raise
        return await wire.execute(
            keys[0], "EVAL", self._sources[name], len(keys), *keys, *args, timeout=timeout
        )

    # -- sessions -----------------------------------------------------------------------
    async def create_session(
        self,
        k: QueueKeys,
        session_id: str,
        *,
        client_id: str,
        exec_ms: int,
        wait_ms: int,
        target: str,
        owner: str,
        owner_ms: int,
        lease_ms: int,
        resources: str = "",
    ) -> Claim:
        reply = await self.run(
            "create_session",
            [k.free, k.waiters, k.tickets, k.deadlines, k.session(session_id), k.lease(client_id), k.guard],
            [k.base, session_id, client_id, exec_ms, wait_ms, target, owner, owner_ms, lease_ms, resources],
        )
        status = reply[0].decode()
        if status != "OK":
            return Claim(status)
        return Claim(status, reply[1].decode(), reply[2].decode(), int(reply[3]), int(reply[4] or 0))

    async def cancel_wait(self, k: QueueKeys, session_id: str) -> str:
        """Leave the line: "LEFT", "GRANTED" (the session exists) or "GONE"."""
        reply = await self.run(
            "cancel_wait",
            [k.waiters, k.tickets, k.deadlines, k.session(session_id), k.guard],
            [k.base, session_id],
        )
        return reply.decode()  # type: ignore[no-any-return]

    async def end_session(
        self, k: QueueKeys, session_id: str, mode: str, reason: str, retention_ms: int
    ) -> Ended:
        """mode: "complete", "fail", "expire" (if due) or "owner" (if the owner's lease lapsed)."""
        state, text, ms_left = await self.run(
            "end_session",
            [k.session(session_id), k.free, k.waiters, k.tickets, k.deadlines, k.guard],
            [k.base, session_id, mode, reason, retention_ms],
        )
        return Ended(state.decode(), text.decode(errors="replace"), int(ms_left))

    async def sweep(
        self,
        k: QueueKeys,
        retention_ms: int,
        *,
        me: str,
        may_reap: bool,
        retry_ms: int,
        audit_ms: int,
        host_id: str = "",
        free: int = 1,
        limit: int = 100,
        max_reaps: int = 10,
        now_ms: float | None = None,
        look_at_deadlines: bool = True,
    ) -> Swept:
        """Do what is due: expire sessions, drop expired tickets, reap dead workers; and say
        which takeover marks and whether the queue's audit are now this worker's to do.
        `now_ms`: Redis' clock as the worker reckons it, which spares the idle sweep a TIME
        (Redis' own clock still decides whatever is due); None to ask Redis.
        `look_at_deadlines`: look at the deadline index whether or not its earliest moment
        has come (False: only then; its writers of this version mark that moment)."""
        guess = "" if now_ms is None else int(now_ms)
        args = [k.base, retention_ms, limit, me, int(may_reap), retry_ms, audit_ms, host_id, max_reaps, free]
        expired, now, reaped, marks, audit, timed = await self.run(
            "sweep", [k.deadlines, k.beats, k.guard], [*args, guess, int(look_at_deadlines)]
        )
        pairs = [(reaped[i].decode(), int(reaped[i + 1])) for i in range(0, len(reaped), 2)]
        return Swept(int(expired), int(now), pairs, [m.decode() for m in marks], bool(audit), bool(timed))

    async def publish_counts(self, k: QueueKeys, counts: dict[str, int], field: str = "activities") -> None:
        """Record each open session's activity count in `field` (a lost record is not re-created)."""
        sha = self._shas["publish_count"]
        commands = [("EVALSHA", sha, 1, k.session(sid), count, field) for sid, count in counts.items()]
        replies = await self.wire.execute_many(commands[0][3], commands, return_exceptions=True)
        if any(_no_script(r) for r in replies):
            for sid, count in counts.items():
                await self.run("publish_count", [k.session(sid)], [count, field])
            return
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply

    async def renew_lease(self, k: QueueKeys, client_id: str, ttl_ms: int) -> int:
        return int(await self.run("renew_lease", [k.lease(client_id)], [ttl_ms]))

    async def open_inbox(self, inbox: str, ttl_ms: int, token: str) -> bool:
        """Make `inbox` if missing and renew its TTL; True when this opening (`token`) made it."""
        return bool(await self.run("open_inbox", [inbox], [ttl_ms, token]))

    # -- workers ---------------------------------------------------------------------------
    async def register_worker(
        self,
        k: QueueKeys,
        worker_id: str,
        *,
        hb_ms: int,
        max_sessions: int,
        fields: list[Any],
        host_id: str = "",
        grace_ms: int = 0,
        retention_ms: int = 3_600_000,
    ) -> Registered:
        """Register (again), and join or make the worker's host when it has one."""
        reply = await self.run(
            "register_worker",
            [k.workers, k.worker(worker_id), k.alive(worker_id), k.stream(worker_id), k.guard],
            [
                k.base,
                worker_id,
                hb_ms,
                max_sessions,
                host_id,
                grace_ms,
                retention_ms,
                audit_ms(hb_ms),
                *fields,
            ],
        )
        status = reply[0].decode()
        if status == "CONFLICT":
            return Registered(
                status, "", int(reply[1] or 0), int(reply[2] or 0), int(reply[3] or 0), reply[4].decode()
            )
        if status == "REAP":
            return Registered(status)
        return Registered(status, reply[1].decode())

    async def heartbeat(
        self,
        k: QueueKeys,
        worker_id: str,
        *,
        hb_ms: int,
        counts: tuple[int, int, int] | None,
        now_ms: float,
        timeout: float | None,
        host_id: str = "",
        grace_ms: int = 0,
        stopping: bool = False,
    ) -> bool:
        """Renew the heartbeat (and its host's, whose key lives `grace_ms` longer); False when
        the worker is no longer registered. `counts` (running, done, waiting for a slot) for
        inspect, None when unchanged since the last beat. A host's process that is `stopping`
        keeps the host's sessions alive but takes no new one."""
        running, done, waiting = counts if counts is not None else ("", "", "")
        flag = "1" if stopping else "0"
        reply = await self.run(
            "heartbeat",
            [k.beats, k.worker(worker_id), k.alive(worker_id), k.guard],
            [worker_id, hb_ms, running, done, k.base, host_id, flag, int(now_ms), waiting, grace_ms],
            timeout=timeout,
        )
        return bool(reply)

    async def reap_worker(
        self, k: QueueKeys, worker_id: str, reason: str, *, force: bool, retention_ms: int
    ) -> int:
        """Declare a worker dead; the number of its sessions failed + 1, or 0 if not reaped."""
        return int(
            await self.run(
                "reap_worker",
                [k.beats, k.guard],
                [k.base, worker_id, reason, "1" if force else "0", retention_ms],
            )
        )

    async def claim_orphans(
        self,
        k: QueueKeys,
        consumer: str,
        me: str,
        count: int,
        stream: str | None = None,
        *,
        host_id: str | None = None,
        marked: bool = False,
    ) -> list[Any]:
        """Take over what a dead consumer had read from `stream` (the task queue's, or the
        stream of host `host_id`); [[id, deliveries, [field, value...]], ...]. With `marked`,
        its takeover mark is removed once nothing of the consumer's is left (or it turned
        out alive)."""
        if host_id is None:
            where, mark = k.beats, "o:" + consumer
        else:
            where, mark = k.host_marks(host_id), consumer
        reply = await self.run(
            "claim_orphans",
            [stream or k.tasks, k.alive(consumer), where],
            [CONSUMER_GROUP, consumer, me, count, mark if marked else "", int(host_id is not None)],
        )
        return reply or []


def _no_script(reply: object) -> bool:
    """A NOSCRIPT error reply (the server does not know the script yet)."""
    return isinstance(reply, NoScriptError) or (
        isinstance(reply, ResponseError) and error_code(reply) == "NOSCRIPT"
    )
