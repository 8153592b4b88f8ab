"""The worker: registers itself, takes work, holds sessions, and stops cleanly.

How it is put together (each part owns its state):

- `Worker` (this module): options, start-up and registration, the loops that read work
  (`_poll_shared`: plain activities from the task queue's stream, only as many as it has
  free slots; `_poll_own`: its own stream: sessions opened and ended, session
  activities, cancel requests), and the graceful stop.
- `ActivityRunner` (runner.py): the activity slots (a hard limit over plain and session
  activities) and the executions running in them.
- `HeldSessions` (held.py): the sessions it holds, their execution timeouts and owners.
- `Outbox` (outbox.py): results and acks, written in batches by the flush loop.
- `Housekeeping` (housekeeping.py): the periodic pass (reap, take over, sweep, trim...).
- `Heartbeat` (keepalive.py): the heartbeat, from a thread of its own.

Every loop runs under `_loop`, which rides out Redis outages with jittered backoff and,
when Redis lost the worker's state (NOGROUP, a lost registration), makes it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from redis.exceptions import ResponseError

from .activity import ActivityDefinition, definition_of
from .codec import Codec, default_codec
from .connection import connect, resolve_url, server_time_ms
from .durations import Duration, seconds
from .envelope import RemoteError, decode_task, encode_error
from .errors import ConfigurationError, SessionqError
from .faults import Kind, describe, is_transient, kind_of, public, retrying
from .held import HeldSessions
from .housekeeping import Housekeeping
from .keepalive import Heartbeat
from .keys import CONSUMER_GROUP, DEFAULT_PREFIX, QueueKeys, queues_index, validate_name
from .outbox import Outbox
from .runner import ActivityRunner
from .scripts import Scripts
from .wire import BlockingRead, Wire, stream_entries

log = logging.getLogger("sessionq")

POLL_BLOCK_MS = 1000
OWN_BATCH = 256

_RUNNING_HERE: set[tuple[str, str, str]] = set()
"""(prefix, task queue, identity) of the Workers running in this process: a second one with
the same identity would share the first's stream (every session activity run twice)."""


class Worker:
    """Runs activities from a task queue and, with `enable_sessions`, holds sessions.

    `redis` is a URL or a redis.asyncio.Redis. See the README for every option.
    """

    def __init__(
        self,
        redis: Any = None,
        *,
        task_queue: str,
        activities: Iterable[Any],
        enable_sessions: bool = False,
        max_concurrent_sessions: int | None = None,
        max_concurrent_activities: int = 100,
        identity: str | None = None,
        heartbeat_timeout: Duration = 10.0,
        shutdown_grace: Duration = 30.0,
        prefix: str = DEFAULT_PREFIX,
        codec: Codec | None = None,
        retention: Duration = 3600.0,
    ) -> None:
        validate_name("task_queue", task_queue)
        validate_name("prefix", prefix)
        if max_concurrent_sessions is not None and (
            isinstance(max_concurrent_sessions, bool)
            or not isinstance(max_concurrent_sessions, int)
            or max_concurrent_sessions < 1
        ):
            raise ConfigurationError(
                "max_concurrent_sessions",
                f"must be an int >= 1, or None for no limit; got {max_concurrent_sessions!r}",
            )
        if (
            isinstance(max_concurrent_activities, bool)
            or not isinstance(max_concurrent_activities, int)
            or max_concurrent_activities < 1
        ):
            raise ConfigurationError(
                "max_concurrent_activities", f"must be an int >= 1; got {max_concurrent_activities!r}"
            )
        self.heartbeat_timeout: float = seconds("heartbeat_timeout", heartbeat_timeout, optional=False)  # type: ignore[assignment]
        self.shutdown_grace: float = seconds("shutdown_grace", shutdown_grace, optional=False)  # type: ignore[assignment]
        retention_s: float = seconds("retention", retention, optional=False)  # type: ignore[assignment]
        self.registry: dict[str, ActivityDefinition] = {}
        for fn in activities:
            definition = definition_of(fn)
            if definition.name in self.registry and self.registry[definition.name].fn is not definition.fn:
                raise ConfigurationError("activities", f"two activities are named {definition.name!r}")
            self.registry[definition.name] = definition
        if not self.registry:
            raise ConfigurationError("activities", "a worker needs at least one activity")
        self.hostname = socket.gethostname()
        self.worker_id = validate_name("identity", identity or f"{os.getpid()}@{self.hostname}")
        self.task_queue = task_queue
        self.enable_sessions = bool(enable_sessions)
        self.max_concurrent_sessions = max_concurrent_sessions
        self.max_concurrent_activities = max_concurrent_activities
        self.codec = codec or default_codec
        self.keys = QueueKeys(prefix, task_queue)
        self.prefix = prefix
        self.retention_ms = int(retention_s * 1000)
        self._redis_target = resolve_url(redis) if redis is None or isinstance(redis, str) else redis
        # Made in run(), on its loop:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.redis: Any = None
        self.wire: Wire = None  # type: ignore[assignment]
        self.scripts: Scripts = None  # type: ignore[assignment]
        self.runner: ActivityRunner = None  # type: ignore[assignment]
        self.sessions: HeldSessions = None  # type: ignore[assignment]
        self.outbox: Outbox = None  # type: ignore[assignment]
        self.heartbeat: Heartbeat | None = None
        self._shared_reader: BlockingRead | None = None
        self._own_reader: BlockingRead | None = None
        self._stopping = asyncio.Event()  # set by stop(), even before run() starts
        self._stopped = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._runner_task: asyncio.Task[None] | None = None
        # What the loops share:
        self.last_own_id = b"0-0"  # how far the worker's own stream was read
        self.clock_offset_ms = 0.0  # Redis' clock minus ours, re-learnt every housekeeping pass
        self.burst = False
        self._plain_held: set[bytes] = set()  # shared-stream ids read and not yet acknowledged
        self._recover_pending = True  # look at our own pending list first (see _poll_shared)
        self._pending_cursor: bytes = b"0"  # how far that look has come
        self._reestablishing: asyncio.Future[None] | None = None

    # -- public lifecycle -----------------------------------------------------------------
    @public("running a worker")
    async def run(self, *, burst: bool = False) -> None:
        """Run until stop() (or, with burst=True, until the queue is drained and no session
        is open). Stops gracefully: see `_shutdown`."""
        self.burst = burst
        self.loop = asyncio.get_running_loop()
        here = (self.prefix, self.task_queue, self.worker_id)
        if here in _RUNNING_HERE:
            self._stopped.set()
            raise ConfigurationError(
                "identity",
                f"another Worker of this process already runs as {self.worker_id!r} on task queue "
                f"{self.task_queue!r}; give each Worker its own identity=",
            )
        _RUNNING_HERE.add(here)
        self._stopped.clear()
        try:
            await self._run()
        finally:
            _RUNNING_HERE.discard(here)
            self._stopping.clear()  # the Worker may run again
            self._stopped.set()

    async def _run(self) -> None:
        self.redis = connect(self._redis_target)
        self.wire = Wire(self.redis)
        self.scripts = Scripts(self.wire)
        self.runner = ActivityRunner(self, self.max_concurrent_activities)
        self.sessions = HeldSessions(self, self._spawn)
        self.outbox = Outbox(self.wire, self.keys, self.worker_id, self._plain_held.difference_update)
        housekeeping = Housekeeping(self)
        self._shared_reader = self.wire.blocking(self.keys.tasks, POLL_BLOCK_MS / 1000)
        self._own_reader = self.wire.blocking(self.keys.stream(self.worker_id), POLL_BLOCK_MS / 1000)
        try:
            if self.stopping:  # stop() came before run(): nothing to do
                return
            await retrying(self._startup, within=5.0, what=f"starting worker {self.worker_id}")
            self.heartbeat = Heartbeat(
                self._redis_target,
                self.keys,
                self.worker_id,
                self.heartbeat_timeout,
                self.loop,
                counts=lambda: (self.runner.in_use, self.runner.done),
                on_lost=lambda: self._spawn(self._registration_lost()),
                blame=self.runner.blame,
                stall_limit=max(60.0, 10 * self.heartbeat_timeout),
            )
            await self.heartbeat.start()
            self._tasks = [
                asyncio.create_task(self._loop(self._poll_shared), name="sessionq-poll-shared"),
                asyncio.create_task(self._loop(self._poll_own), name="sessionq-poll-own"),
                asyncio.create_task(self._loop(housekeeping.step), name="sessionq-housekeeping"),
                asyncio.create_task(self._loop(self.outbox.flush), name="sessionq-flush"),
            ]
            log.info(
                "worker %s started on task queue %r (sessions %s, max sessions %s, concurrency %d)",
                self.worker_id,
                self.task_queue,
                "on" if self.enable_sessions else "off",
                self.max_concurrent_sessions or "unlimited",
                self.max_concurrent_activities,
            )
            await self._stopping.wait()
            try:  # never hang on the way out, whatever Redis or the activities do
                await asyncio.wait_for(self._shutdown(), self.shutdown_grace + 20)
            except asyncio.TimeoutError:
                log.error("worker %s: graceful stop overran; exiting anyway", self.worker_id)
        finally:
            if self.heartbeat is not None:
                await asyncio.to_thread(self.heartbeat.stop)
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self.runner.pool.shutdown(wait=False, cancel_futures=True)
            await self.wire.aclose()
            await self.redis.aclose()

    def stop(self) -> None:
        """Ask the worker to stop gracefully (safe to call from a signal handler, and before
        run() starts: it then returns at once)."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def wait_started(self, timeout: float = 30.0) -> None:
        """Wait until the worker is registered and polling (for scripts and tests)."""
        deadline = time.monotonic() + timeout
        while not self._tasks:
            if self._runner_task is not None and self._runner_task.done():
                self._runner_task.result()  # re-raise the start-up error
                raise SessionqError(f"worker {self.worker_id} stopped before it started")
            if time.monotonic() > deadline:
                raise SessionqError(f"worker {self.worker_id} did not start within {timeout}s")
            await asyncio.sleep(0.005)

    async def __aenter__(self) -> Worker:
        self._runner_task = asyncio.create_task(self.run(), name=f"sessionq-worker:{self.worker_id}")
        try:
            await self.wait_started()
        except BaseException:  # cancelled, or the start failed: leave no worker running unowned
            self.stop()
            with contextlib.suppress(BaseException):
                await self._runner_task
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
        if self._runner_task is not None:
            await self._runner_task

    @property
    def open_sessions(self) -> int:
        return len(self.sessions) if self.sessions is not None else 0

    def redis_now_ms(self) -> float:
        """Redis' clock, as this worker last learnt it (time on the server holding its keys)."""
        return time.time() * 1000 + self.clock_offset_ms

    # -- start-up and registration ------------------------------------------------------
    async def _startup(self) -> None:
        k = self.keys
        try:
            now_ms = await server_time_ms(self.redis, k.tasks)  # the node the queue's scripts run on
        except Exception as exc:
            if not is_transient(exc):
                raise
            raise ConnectionError(
                f"worker {self.worker_id} cannot reach Redis ({exc}); check that Redis runs and "
                "the URL is right (--redis-url / SESSIONQ_REDIS_URL)"
            ) from exc
        self.clock_offset_ms = now_ms - time.time() * 1000
        if await self.redis.exists(k.alive(self.worker_id)):
            pid = await self.redis.hget(k.worker(self.worker_id), "pid")
            if pid is not None and int(pid) != os.getpid():
                raise ConfigurationError(
                    "identity",
                    f"another live worker already uses identity {self.worker_id!r} on task queue "
                    f"{self.task_queue!r}; give each worker process its own identity (if that "
                    f"worker just crashed, its heartbeat expires within its heartbeat_timeout)",
                )
        # A registration left by an earlier process with this identity holds sessions this
        # process knows nothing of: fail them and start clean.
        await self._deregister(f"worker {self.worker_id} restarted")
        await self._ensure_group()
        await self._register()
        await self.redis.sadd(queues_index(self.prefix), self.task_queue)

    async def _deregister(self, reason: str) -> None:
        """Remove this worker's registration and stream; any session still open fails."""
        await self.scripts.reap_worker(
            self.keys, self.worker_id, reason, force=True, retention_ms=self.retention_ms
        )

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.tasks, CONSUMER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _register(self) -> None:
        cap = (self.max_concurrent_sessions or 0) if self.enable_sessions else -1
        if self.stopping:
            cap = -1  # no new sessions for a worker on its way out
        fields = [
            "host", self.hostname, "pid", os.getpid(), "identity", self.worker_id,
            "concurrency", self.max_concurrent_activities, "activities", ",".join(sorted(self.registry)),
            "running", self.runner.in_use, "done", self.runner.done,
        ]  # fmt: skip
        held = list(self.sessions.open)  # sessions granted while the script runs are new: keep them
        outcome = await self.scripts.register_worker(
            self.keys,
            self.worker_id,
            hb_ms=int(self.heartbeat_timeout * 1000),
            max_sessions=cap,
            fields=fields,
        )
        if outcome == "FRESH":
            self.last_own_id = b"0-0"
            lost = [sid for sid in held if sid in self.sessions.open]
            if lost:
                log.warning(
                    "worker %s was declared dead while cut off from Redis; its %d session(s) failed",
                    self.worker_id,
                    len(lost),
                )
                for sid in lost:
                    self.sessions.end(sid, "failed", "the worker was declared dead (heartbeat expired)")

    async def _registration_lost(self) -> None:
        """The heartbeat found the registration gone (declared dead, or Redis lost its data)."""
        if self.stopping:
            return
        log.warning(
            "worker %s: registration lost (declared dead or Redis restarted); registering again",
            self.worker_id,
        )
        try:
            await self._reestablish()
        except Exception as exc:  # the next heartbeat tries again
            log.warning("worker %s: could not register again yet (%s)", self.worker_id, describe(exc))

    async def _reestablish(self) -> None:
        """Redis lost our state (a restart without its data, a failover, keys deleted by
        hand): make the task stream's consumer group and our registration again. Several
        loops may notice at once; they share one attempt."""
        if self._reestablishing is None or self._reestablishing.done():
            self._reestablishing = asyncio.ensure_future(self._reestablish_once())
        await asyncio.shield(self._reestablishing)

    async def _reestablish_once(self) -> None:
        log.warning(
            "worker %s: its state in Redis is gone; making its consumer group and registration again",
            self.worker_id,
        )
        await self._ensure_group()
        await self._register()
        self._recover_pending = True

    # -- the loops ----------------------------------------------------------------------
    async def _loop(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run `step` until stopped, riding out Redis outages with jittered backoff."""
        backoff = 0.05
        task = asyncio.current_task()
        while True:
            # Python < 3.12's wait_for, which redis-py uses to send, can swallow a cancel: honour
            # it anyway, or stopping would wait on this loop until the shutdown timeout.
            if task is not None and getattr(task, "cancelling", lambda: 0)():
                raise asyncio.CancelledError
            try:
                await step()
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                kind = kind_of(exc)
                if kind is Kind.LOST:
                    try:
                        await self._reestablish()
                        continue
                    except asyncio.CancelledError:
                        raise
                    except Exception as again:
                        exc, kind = again, kind_of(again)
                if kind is Kind.FATAL:
                    log.exception(
                        "worker %s: unexpected error in %s; continuing", self.worker_id, step.__qualname__
                    )
                    await asyncio.sleep(0.5)
                    continue
                log.warning(
                    "worker %s: Redis unavailable (%s); retrying in %.2fs",
                    self.worker_id,
                    describe(exc),
                    backoff,
                )
                await asyncio.sleep(backoff * (0.5 + os.urandom(1)[0] / 255))
                backoff = min(backoff * 2, 5.0)

    async def _poll_shared(self) -> None:
        """Read plain activities from the task queue's stream, as many as there are free slots."""
        runner = self.runner
        if runner.free <= 0:
            await runner.wait_for_free_slot()
            return
        if self._recover_pending:
            await self._recover_own_pending(runner.free)
            return
        started = time.monotonic()
        assert self._shared_reader is not None
        try:
            reply = await self._shared_reader.execute(
                "XREADGROUP", "GROUP", CONSUMER_GROUP, self.worker_id,
                "COUNT", runner.free, "BLOCK", POLL_BLOCK_MS, "STREAMS", self.keys.tasks, ">",
            )  # fmt: skip
        except BaseException:
            # The reply may have been lost after Redis delivered entries to us: they now sit
            # in our pending list, where neither '>' reads nor other workers would find them.
            self._recover_pending = True
            raise
        entries = stream_entries(reply)
        if not entries:
            if time.monotonic() - started < POLL_BLOCK_MS / 2000:
                await asyncio.sleep(0.005)  # fakeredis returns from XREADGROUP BLOCK at once
            return
        for entry_id, fields in entries:
            self.start_plain(entry_id, fields)

    async def _recover_own_pending(self, free: int) -> None:
        """Start entries delivered to this consumer that it is not running (at-least-once).

        Walks the pending list with a cursor, a batch per call, skipping what already runs
        here, until the end: entries that run for long cannot pin it to its first page."""
        reply = await self.redis.xreadgroup(
            CONSUMER_GROUP, self.worker_id, {self.keys.tasks: self._pending_cursor}, count=free
        )
        entries = reply[0][1] if reply else []
        if not entries:
            self._recover_pending = False
            self._pending_cursor = b"0"
            return
        self._pending_cursor = entries[-1][0]
        for entry_id, fields in entries:
            if entry_id in self._plain_held:
                continue
            if not fields:  # deleted meanwhile (its caller cancelled it): nothing to run
                self.outbox.ack(entry_id)
                continue
            log.warning(
                "worker %s: resuming activity %s whose delivery was interrupted",
                self.worker_id,
                entry_id.decode(),
            )
            self.start_plain(entry_id, fields)

    def _spawn(self, coro: Any) -> None:
        """Start a background task and keep a reference until it ends."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def start_plain(self, entry_id: bytes, fields: dict[bytes, bytes], delivery_count: int = 1) -> None:
        """Start a plain activity read from the shared stream (it waits here for a free slot)."""
        if entry_id in self._plain_held:
            return
        if not fields:  # deleted after it was delivered (its caller cancelled it)
            self.outbox.ack(entry_id)
            return
        try:
            task = decode_task(self.codec, fields[b"d"], entry_id)
        except Exception as exc:
            self._spawn(self._move_aside(self.keys.tasks, entry_id, fields, exc, ack=True))
            return
        task.delivery_count = delivery_count
        if delivery_count > task.attempt:
            task.attempt = delivery_count  # an earlier holder died mid-attempt: that attempt counts
        self._plain_held.add(entry_id)
        self.runner.reserve()
        self._spawn(self._run_plain(task, entry_id))

    def lost_track_of(self, entry_id: bytes) -> None:
        """An entry read here ended without a reply: the pending list is walked again, so it
        runs (at-least-once) instead of sitting there unseen."""
        self._plain_held.discard(entry_id)
        self.recover_pending()

    def recover_pending(self) -> None:
        """Walk this worker's own pending list before the next read: entries may sit there
        that it does not run (a read or claim whose reply was lost)."""
        self._recover_pending = True

    async def _run_plain(self, task: Any, entry_id: bytes) -> None:
        try:
            await self.runner.run(task, None, ack=entry_id)
        finally:
            if self.stopping:
                self._plain_held.discard(entry_id)

    async def _poll_own(self) -> None:
        stream = self.keys.stream(self.worker_id)
        assert self._own_reader is not None
        reply = await self._own_reader.execute(
            "XREAD", "COUNT", OWN_BATCH, "BLOCK", POLL_BLOCK_MS, "STREAMS", stream, self.last_own_id
        )
        entries = stream_entries(reply)
        if not entries:
            return
        ending = {f.get(b"s") for _, f in entries if f.get(b"t") == b"c"}
        for entry_id, fields in entries:
            try:
                await self._own_entry(stream, entry_id, fields, ending)
            except Exception as exc:  # D04: one malformed entry must not swallow the rest of the batch
                await self._move_aside(stream, entry_id, fields, exc)  # if Redis fails here: read again
            self.last_own_id = entry_id  # past this entry only once it is handled

    async def _own_entry(
        self, stream: str, entry_id: bytes, fields: dict[bytes, bytes], ending: set[Any]
    ) -> None:
        """Act on one entry of the worker's own stream; raises on a malformed one."""
        kind = fields.get(b"t")
        if kind == b"a":
            self._start_session_activity(entry_id, fields, ending)
        elif kind == b"o":
            self.sessions.opened(fields[b"s"].decode(), fields, entry_id)
        elif kind == b"c":
            self.sessions.ended_remotely(fields[b"s"].decode(), fields.get(b"r", b"complete").decode())
        elif kind == b"x":
            activity_id = fields.get(b"i", b"").decode()
            self.runner.cancel(activity_id, "cancelled", "the caller cancelled the activity")
        elif kind != b"h":
            await self._move_aside(stream, entry_id, fields, ValueError(f"unknown entry type {kind!r}"))

    def _start_session_activity(self, entry_id: bytes, fields: dict[bytes, bytes], ending: set[Any]) -> None:
        try:
            task = decode_task(self.codec, fields[b"d"], entry_id)
        except Exception as exc:
            self._spawn(self._move_aside(self.keys.stream(self.worker_id), entry_id, fields, exc))
            return
        sid = task.session_id or ""
        held = self.sessions.open.get(sid)
        if held is None or sid.encode() in ending:
            kind, reason = self.sessions.why_not_open(sid)
            if sid.encode() in ending and held is not None:
                kind, reason = "completed", "session was completed"
            error = "ActivityCancelledError" if kind == "completed" else "SessionFailedError"
            message = encode_error(
                self.codec,
                task.activity_id,
                RemoteError(error, "", f"activity {task.name!r} was not started: {reason}"),
            )
            self.outbox.reply(task.client_id, message)
            return
        held.activities_run += 1
        self._spawn(self.runner.run(task, held, ack=None))

    async def _move_aside(
        self,
        stream: str,
        entry_id: bytes,
        fields: dict[bytes, bytes],
        error: BaseException,
        ack: bool = False,
    ) -> None:
        """D04: keep a malformed entry for inspection, drop it from the queue, and tell its
        caller when the entry says who that is."""
        log.error(
            "worker %s: malformed entry %s in %s moved to %s: %r",
            self.worker_id,
            entry_id.decode(),
            stream,
            self.keys.dead,
            error,
        )
        flat: dict[Any, Any] = {b"_stream": stream, b"_id": entry_id, b"_error": repr(error)[:500]}
        flat.update({b"f:" + key: value for key, value in fields.items()})
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(self.keys.dead, flat, maxlen=10_000, approximate=True)
            if ack:
                pipe.xack(stream, CONSUMER_GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            await pipe.execute()
        caller = _caller_of(self.codec, fields.get(b"d"))
        if caller is not None:
            client_id, activity_id = caller
            message = encode_error(
                self.codec,
                activity_id,
                RemoteError(
                    "SerializationError",
                    "SerializationError",
                    f"worker {self.worker_id} could not read this activity's task ({error}); it was moved "
                    f"to {self.keys.dead} for an operator to look at",
                ),
            )
            self.outbox.reply(client_id, message)

    # -- shutdown -------------------------------------------------------------------------
    async def _shutdown(self) -> None:
        """The graceful stop. Nothing new is taken from now on (no plain activity read, no
        session placed here, no session activity started, no dead worker's work taken
        over); what runs, session activities included, gets up to shutdown_grace to finish;
        then what still runs is cancelled, the sessions still held fail, and the worker
        deregisters. A plain activity cancelled this way is left to another worker."""
        running = len(self.runner.executions)
        log.info(
            "worker %s stopping: %d running activit%s get up to shutdown_grace=%gs to finish; "
            "no new work is taken",
            self.worker_id, running, "y" if running == 1 else "ies", self.shutdown_grace,
        )  # fmt: skip
        for task in self._tasks:
            if task.get_name() == "sessionq-poll-shared":
                task.cancel()
        k = self.keys
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(k.worker(self.worker_id), "max_sessions", -1)  # no new sessions
                pipe.zrem(k.free, self.worker_id)
                await pipe.execute()
        except Exception as exc:
            log.warning("worker %s: could not withdraw from placement (%s)", self.worker_id, describe(exc))
        deadline = time.monotonic() + self.shutdown_grace
        while self.runner.executions and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self.runner.cancel_all("shutdown", f"worker {self.worker_id} shut down before the activity finished")
        while self.runner.executions and time.monotonic() < deadline + 2:
            await asyncio.sleep(0.01)
        try:
            await self.sessions.fail_all(f"worker {self.worker_id} shut down")
        except Exception as exc:
            log.warning("worker %s: could not fail its sessions (%s)", self.worker_id, describe(exc))
        while not self.outbox.empty and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.01)
        if self.heartbeat is not None:  # no heartbeat may register us again after this
            await asyncio.to_thread(self.heartbeat.stop)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self._deregister(f"worker {self.worker_id} shut down")
            await self._drop_consumer()
        except Exception as exc:
            log.warning(
                "worker %s: could not deregister (%s); its heartbeat will expire",
                self.worker_id,
                describe(exc),
            )
        left = self.runner.pool.busy
        log.info(
            "worker %s stopped%s",
            self.worker_id,
            f"; {left} def activit{'y' if left == 1 else 'ies'} ignored cancellation and still run in "
            "their thread(s)"
            if left
            else "",
        )

    async def _drop_consumer(self) -> None:
        """Leave the consumer group, unless entries of ours are pending (another worker takes
        them over, and drops the consumer after)."""
        pending = await self.redis.xpending_range(
            self.keys.tasks, CONSUMER_GROUP, "-", "+", 1, self.worker_id
        )
        if not pending:
            await self.redis.xgroup_delconsumer(self.keys.tasks, CONSUMER_GROUP, self.worker_id)


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
