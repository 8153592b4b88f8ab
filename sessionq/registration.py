"""A worker's place in Redis: its registration, the task stream's consumer group, and
making both again when Redis lost them.

At start a worker refuses an identity a live worker holds, fails whatever an earlier
process of its identity left open, makes the consumer group and registers (the
register_worker script: its record, its heartbeat, its free slots). Redis can lose that
state later (a restart without its data, a failover, keys deleted by hand, a partition
long enough to be declared dead): the heartbeat or a loop notices, and `reestablish`
makes it again, once for all the loops that noticed. Sessions the worker held before it
was declared dead have failed in Redis, so they end here too; sessions granted while
the registration runs are new and stay.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from redis.exceptions import ResponseError

from . import resources
from .errors import ConfigurationError
from .faults import describe, error_code, is_transient
from .keys import CONSUMER_GROUP, host_of, queues_index
from .replies import time_ms
from .scripts import Registered

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("sessionq")

ACTIVITY_PEERS = 100
"""Most other workers a starting worker compares its activities with."""


async def server_time_ms(worker: Worker) -> float:
    """Redis' clock in ms, read on the node that holds the queue's keys (where its scripts run)."""
    return time_ms(await worker.wire.execute(worker.keys.tasks, "TIME"))


class Registration:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._reestablishing: asyncio.Future[None] | None = None

    async def start(self) -> None:
        """Register a starting worker (retried by the caller while Redis is unreachable)."""
        w = self.worker
        k = w.keys
        try:
            now_ms = await server_time_ms(w)
        except Exception as exc:
            if not is_transient(exc):
                raise
            raise ConnectionError(
                f"worker {w.worker_id} cannot reach Redis ({exc}); check that Redis runs and "
                "the URL is right (--redis-url / SESSIONQ_REDIS_URL)"
            ) from exc
        w.learn_redis_clock(now_ms)
        alive, pid = await w.wire.execute_many(
            k.tasks, [("EXISTS", k.alive(w.worker_id)), ("HGET", k.worker(w.worker_id), "pid")]
        )
        if alive and pid is not None and int(pid) != os.getpid():
            raise ConfigurationError(
                "identity",
                f"another live worker already uses identity {w.worker_id!r} on task queue "
                f"{w.task_queue!r}; give each worker process its own identity (if that "
                f"worker just crashed, its heartbeat expires within its heartbeat_timeout)",
            )
        # A registration left by an earlier process with this identity holds sessions this
        # process knows nothing of: fail them and start clean. (A host's sessions are the
        # host's: an earlier process of it held none, and they stay.)
        await self.deregister(f"worker {w.worker_id} restarted")
        await self.ensure_group()
        await self.register()
        await w.wire.execute(queues_index(w.prefix), "SADD", queues_index(w.prefix), w.task_queue)
        await self.compare_activities()

    async def compare_activities(self) -> None:
        """Warn, once at start, when other live workers of the queue register other
        activities: a session placed on one that lacks the caller's activities fails them
        with ActivityNotRegisteredError, and a plain activity may land there too. Looks at
        up to ACTIVITY_PEERS workers (two round trips)."""
        w = self.worker
        k = w.keys
        peers = [
            m.decode()
            for m in await w.wire.execute(k.tasks, "SRANDMEMBER", k.workers, ACTIVITY_PEERS)
            if m.decode() != w.worker_id and host_of(m.decode()) is None
        ]
        if not peers:
            return
        replies = await w.wire.execute_many(
            k.tasks,
            [("HGET", k.worker(p), "activities") for p in peers] + [("EXISTS", k.alive(p)) for p in peers],
        )
        mine = set(w.registry)
        differ = []
        for peer, names, alive in zip(peers, replies[: len(peers)], replies[len(peers) :], strict=True):
            if names is None or not alive:
                continue
            theirs = {n for n in names.decode().split(",") if n}
            if theirs != mine:
                lacks, extra = sorted(mine - theirs), sorted(theirs - mine)
                parts = ([f"lacks {', '.join(lacks)}"] if lacks else []) + (
                    [f"also runs {', '.join(extra)}"] if extra else []
                )
                differ.append(f"{peer} {' and '.join(parts)}")
        if differ:
            shown = "; ".join(differ[:3]) + (f"; and {len(differ) - 3} more" if len(differ) > 3 else "")
            log.warning(
                "worker %s: workers of task queue %r register other activities than this one (%s); "
                "an activity sent to a worker without it fails with ActivityNotRegisteredError: give "
                "every worker of a queue the same activities, or use another task queue",
                w.worker_id, w.task_queue, shown,
            )  # fmt: skip

    async def deregister(self, reason: str) -> None:
        """Remove this worker's registration and stream; any session still open fails."""
        w = self.worker
        await w.scripts.reap_worker(w.keys, w.worker_id, reason, force=True, retention_ms=w.retention_ms)

    async def ensure_group(self, host: bool = False) -> None:
        """Make the task stream's consumer group (with `host`, the host stream's instead:
        made with the host, and again only once the host is registered, so the stream
        always has an owner)."""
        w = self.worker
        stream = w.host_queue.stream if host and w.host_queue is not None else w.keys.tasks
        try:
            await w.wire.execute(stream, "XGROUP", "CREATE", stream, CONSUMER_GROUP, "0", "MKSTREAM")
        except ResponseError as exc:
            if error_code(exc) != "BUSYGROUP":
                raise

    async def register(self) -> None:
        w = self.worker
        cap = (w.max_concurrent_sessions or 0) if w.enable_sessions else -1
        if w.stopping and w.host_id is None:
            cap = -1  # no new sessions for a worker on its way out (a host has other processes)
        fields = [
            "host", w.hostname, "pid", os.getpid(), "identity", w.worker_id,
            "concurrency", w.max_concurrent_activities, "activities", ",".join(sorted(w.registry)),
            "running", w.runner.in_use, "done", w.runner.done,
            "res", resources.encode(w.session_resources),
            "expiry", "own",  # it ends its sessions at their deadline (slots.lua open_session)
        ]  # fmt: skip
        held = list(w.sessions.open)  # sessions granted while the script runs are new: keep them
        registered = await self._register_script(cap, fields)
        if w.host_id is not None:
            await w.sessions.load_host()
            if registered.status == "FRESH":
                w.own_stream.restart()
            return
        if registered.status == "FRESH":
            w.own_stream.restart()
            lost = [sid for sid in held if sid in w.sessions.open]
            if lost:
                log.warning(
                    "worker %s registered anew (it was declared dead while cut off from Redis, or its "
                    "record there was lost); its %d session(s) failed",
                    w.worker_id,
                    len(lost),
                )
                for sid in lost:
                    w.sessions.end(sid, "failed", "the worker was declared dead (heartbeat expired)")

    async def _register_script(self, cap: int, fields: list[object]) -> Registered:
        """Run register_worker; for a host's process, refuse a disagreement on the host's
        settings, and reap the host first if its grace passed (its sessions fail)."""
        w = self.worker
        for _ in range(3):
            registered = await w.scripts.register_worker(
                w.keys,
                w.worker_id,
                hb_ms=int(w.heartbeat_timeout * 1000),
                max_sessions=cap,
                fields=fields,
                host_id=w.host_id or "",
                grace_ms=int(w.restart_grace * 1000),
                retention_ms=w.retention_ms,
            )
            if registered.status == "CONFLICT":
                raise ConfigurationError(
                    "max_concurrent_sessions",
                    f"host {w.host_id!r} of task queue {w.task_queue!r} runs with "
                    f"max_concurrent_sessions={registered.max_sessions or None}, "
                    f"restart_grace={registered.grace_ms / 1000:g}s, "
                    f"heartbeat_timeout={registered.hb_ms / 1000:g}s, "
                    f"session_resources={resources.decode(registered.resources)}, but this process has "
                    f"max_concurrent_sessions={cap or None}, restart_grace={w.restart_grace:g}s, "
                    f"heartbeat_timeout={w.heartbeat_timeout:g}s, session_resources={w.session_resources}; "
                    "give every process of a host the same values (or another host_id)",
                )
            if registered.status != "REAP":
                return registered
            assert w.host_worker_id is not None
            await w.scripts.reap_worker(
                w.keys, w.host_worker_id, "", force=False, retention_ms=w.retention_ms
            )  # the script words the reason for a host
        raise ConfigurationError("host_id", f"host {w.host_id!r} could not be registered; try again")

    async def lost(self) -> None:
        """The heartbeat found the registration gone (declared dead, or Redis lost its data)."""
        w = self.worker
        if w.stopping:
            return
        log.warning(
            "worker %s: registration lost (declared dead or Redis restarted); registering again", w.worker_id
        )
        try:
            await self.reestablish()
        except Exception as exc:  # the next heartbeat tries again
            log.warning("worker %s: could not register again yet (%s)", w.worker_id, describe(exc))

    async def reestablish(self) -> None:
        """Redis lost our state (a restart without its data, a failover, keys deleted by
        hand): make the task stream's consumer group and our registration again. Several
        loops may notice at once; they share one attempt."""
        if self._reestablishing is None or self._reestablishing.done():
            self._reestablishing = asyncio.ensure_future(self._reestablish_once())
        await asyncio.shield(self._reestablishing)

    async def _reestablish_once(self) -> None:
        w = self.worker
        log.warning(
            "worker %s: its state in Redis is gone; making its consumer group and registration again",
            w.worker_id,
        )
        await self.ensure_group()
        try:
            await self.register()
        except ConfigurationError as exc:  # the host's other processes now run with other settings
            log.error("worker %s cannot register again, so it stops: %s", w.worker_id, exc)
            w.stop()
            raise
        w.shared_queue.recover_pending()
        if w.host_queue is not None:
            await self.ensure_group(host=True)
            w.host_queue.recover_pending()

    async def drop_consumer(self) -> None:
        """Leave the consumer group, unless entries of ours are pending (another worker takes
        them over, and drops the consumer after)."""
        w = self.worker
        tasks = w.keys.tasks
        pending = await w.wire.execute(tasks, "XPENDING", tasks, CONSUMER_GROUP, "-", "+", 1, w.worker_id)
        if not pending:
            await w.wire.execute(tasks, "XGROUP", "DELCONSUMER", tasks, CONSUMER_GROUP, w.worker_id)
