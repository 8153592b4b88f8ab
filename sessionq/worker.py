"""The worker: registers itself, heartbeats, runs activities, holds sessions, reaps the dead.

Loops, each one task, each readable top to bottom:
- `_poll_shared`: XREADGROUP plain activities from the task queue's stream, only as
  many as there are free activity slots, so busy workers leave work to idle ones.
- `_poll_own`: XREAD the worker's own stream: session opened / ended, session
  activities, cancel requests.
- `_heartbeat`: refresh the heartbeat key (a TTL key) every third of heartbeat_timeout,
  in a task of its own so that slow housekeeping never delays it.
- `_maintain`: trim the own stream, enforce activity heartbeat timeouts, reap dead
  workers and reclaim the plain activities they held.
- `_flush`: write each batch of results (one RPUSH per caller inbox) and acks in one write.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from .activity import ActivityDefinition, ActivityInfo, _RunningActivity, definition_of
from .codec import Codec, default_codec
from .connection import connect, resolve_url, server_time_ms
from .durations import Duration, seconds
from .envelope import RemoteError, Task, decode_task, encode_error
from .errors import ConfigurationError
from .execution import Execution, execute
from .faults import Kind, describe, is_transient, kind_of, retrying
from .keys import CONSUMER_GROUP, DEFAULT_PREFIX, QueueKeys, queues_index, validate_name
from .scripts import Scripts
from .session_info import SessionInfo, SessionState
from .wire import BlockingRead, Wire, stream_entries

log = logging.getLogger("sessionq")

POLL_BLOCK_MS = 1000
OWN_BATCH = 256
ENDED_MEMORY = 10_000


@dataclass
class LocalSession:
    """A session this worker holds: its info and the executions running for it."""

    info: SessionInfo
    executions: dict[str, Execution] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None
    activities_run: int = 0
    published_run: int = 0


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
        self.heartbeat_timeout = seconds("heartbeat_timeout", heartbeat_timeout, optional=False)
        self.shutdown_grace = seconds("shutdown_grace", shutdown_grace, optional=False)
        retention_s = seconds("retention", retention, optional=False)
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
        self.retention_ms = int(retention_s * 1000)  # type: ignore[operator]
        self._redis_target = resolve_url(redis) if redis is None or isinstance(redis, str) else redis
        self.redis: Any = None
        self.scripts: Scripts | None = None
        self.wire: Wire | None = None
        self._shared_reader: BlockingRead | None = None
        self._own_reader: BlockingRead | None = None
        # run state
        self._stopping: asyncio.Event | None = None  # events are made in run(), on its loop
        self._stopped: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._executions: dict[str, Execution] = {}
        self._sessions: dict[str, LocalSession] = {}
        self._ended: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._in_use = 0
        self._slot_freed: asyncio.Event | None = None
        self._outbox: list[tuple[str, bytes]] = []
        self._acks: list[bytes] = []
        self._outbox_ready: asyncio.Event | None = None
        self._last_own_id = b"0-0"
        self._clock_offset_ms = 0.0
        self._done_count = 0
        self._pool = ThreadPoolExecutor(
            max_workers=max_concurrent_activities, thread_name_prefix="sessionq-activity"
        )
        self._runner: asyncio.Task[None] | None = None
        self._plain_running: set[bytes] = set()  # stream ids read and not yet acknowledged
        self._recover_pending = True  # look at our own pending list first (see _poll_shared)
        self._pending_cursor: bytes = b"0"  # how far that look has come
        self._reestablishing: asyncio.Future[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._burst = False

    # -- public lifecycle -----------------------------------------------------------------
    async def run(self, *, burst: bool = False) -> None:
        """Run until stop() (or, with burst=True, until the queue is drained and no
        session is open). Stops gracefully: running work finishes within shutdown_grace."""
        self._burst = burst
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._outbox_ready = asyncio.Event()
        self.redis = connect(self._redis_target)
        self.wire = Wire(self.redis)
        self.scripts = Scripts(self.wire)
        self._shared_reader = self.wire.blocking(self.keys.tasks, POLL_BLOCK_MS / 1000)
        self._own_reader = self.wire.blocking(self.keys.stream(self.worker_id), POLL_BLOCK_MS / 1000)
        try:
            await retrying(self._startup, within=5.0, what=f"starting worker {self.worker_id}")
            self._tasks = [
                asyncio.create_task(self._loop(self._poll_shared), name="sessionq-poll-shared"),
                asyncio.create_task(self._loop(self._heartbeat), name="sessionq-heartbeat"),
                asyncio.create_task(self._loop(self._maintain), name="sessionq-maintain"),
                asyncio.create_task(self._loop(self._flush), name="sessionq-flush"),
            ]
            # Every worker reads its own stream: sessions, and cancel requests for plain work.
            self._tasks.append(asyncio.create_task(self._loop(self._poll_own), name="sessionq-poll-own"))
            log.info(
                "worker %s started on task queue %r (sessions %s, max sessions %s, concurrency %d)",
                self.worker_id,
                self.task_queue,
                "on" if self.enable_sessions else "off",
                self.max_concurrent_sessions or "unlimited",
                self.max_concurrent_activities,
            )
            await self._stopping.wait()
            try:  # never hang on the way out, whatever Redis does
                await asyncio.wait_for(self._shutdown(), self.shutdown_grace + 15)  # type: ignore[operator]
            except asyncio.TimeoutError:
                log.error("worker %s: graceful stop overran; exiting anyway", self.worker_id)
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._pool.shutdown(wait=False, cancel_futures=True)
            await self.wire.aclose()
            await self.redis.aclose()
            self._stopped.set()

    def stop(self) -> None:
        """Ask the worker to stop gracefully (safe to call from a signal handler)."""
        if self._stopping is not None:
            self._stopping.set()

    async def wait_stopped(self) -> None:
        while self._stopped is None:
            await asyncio.sleep(0.01)
        await self._stopped.wait()

    async def wait_started(self, timeout: float = 30.0) -> None:
        """Wait until the worker is registered and polling (for scripts and tests)."""
        deadline = time.monotonic() + timeout
        while not self._tasks:
            if self._runner is not None and self._runner.done():
                self._runner.result()  # re-raise the start-up error
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {self.worker_id} did not start within {timeout}s")
            await asyncio.sleep(0.005)

    async def __aenter__(self) -> Worker:
        self._runner = asyncio.create_task(self.run(), name=f"sessionq-worker:{self.worker_id}")
        await self.wait_started()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
        if self._runner is not None:
            await self._runner

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

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
        self._clock_offset_ms = now_ms - time.time() * 1000
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
        k, w = self.keys, self.worker_id
        assert self.scripts is not None
        await self.scripts.run(
            "reap_worker",
            [k.workers, k.worker(w), k.alive(w), k.stream(w), k.worker_sessions(w), k.waiters],
            [k.base, w, reason, "1", self.retention_ms],
        )

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.tasks, CONSUMER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _reestablish(self) -> None:
        """Redis lost our state (a restart without its data, a failover, keys deleted by
        hand): make the task stream's consumer group and our registration again. Several
        loops may notice at once; they share one attempt."""
        if self._reestablishing is None or self._reestablishing.done():
            self._reestablishing = asyncio.ensure_future(self._reestablish_once())
        await asyncio.shield(self._reestablishing)

    async def _reestablish_once(self) -> None:
        log.warning(
            "worker %s: its state in Redis is gone (Redis restarted without its data?); "
            "re-creating the consumer group and registering again",
            self.worker_id,
        )
        await self._ensure_group()
        await self._register()
        self._recover_pending = True

    async def _register(self) -> None:
        k = self.keys
        cap = (self.max_concurrent_sessions or 0) if self.enable_sessions else -1
        fields = [
            "host",
            self.hostname,
            "pid",
            os.getpid(),
            "identity",
            self.worker_id,
            "concurrency",
            self.max_concurrent_activities,
            "activities",
            ",".join(sorted(self.registry)),
            "running",
            self._in_use,
            "done",
            self._done_count,
        ]
        assert self.scripts is not None
        held = list(self._sessions)  # sessions granted while the script runs are new: keep them
        outcome = await self.scripts.run(
            "register_worker",
            [k.workers, k.worker(self.worker_id), k.alive(self.worker_id), k.stream(self.worker_id)],
            [k.base, self.worker_id, int(self.heartbeat_timeout * 1000), cap, *fields],  # type: ignore[operator]
        )
        if outcome == b"FRESH":
            self._last_own_id = b"0-0"
            lost = [sid for sid in held if sid in self._sessions]
            if lost:
                log.warning(
                    "worker %s was declared dead while cut off from Redis; its %d session(s) failed",
                    self.worker_id,
                    len(lost),
                )
                for sid in lost:
                    self._end_local(sid, "failed", "the worker was declared dead (heartbeat expired)")

    # -- the loops ----------------------------------------------------------------------
    async def _loop(self, step: Any) -> None:
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
                    self.worker_id, describe(exc), backoff,
                )  # fmt: skip
                await asyncio.sleep(backoff * (0.5 + os.urandom(1)[0] / 255))
                backoff = min(backoff * 2, 5.0)

    async def _poll_shared(self) -> None:
        assert self._slot_freed is not None
        free = self.max_concurrent_activities - self._in_use
        if free <= 0:
            self._slot_freed.clear()
            await self._slot_freed.wait()
            return
        if self._recover_pending:
            await self._recover_own_pending(free)
            return
        started = time.monotonic()
        assert self._shared_reader is not None
        try:
            reply = await self._shared_reader.execute(
                "XREADGROUP", "GROUP", CONSUMER_GROUP, self.worker_id,
                "COUNT", free, "BLOCK", POLL_BLOCK_MS, "STREAMS", self.keys.tasks, ">",
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
            self._start_plain(entry_id, fields)

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
            if entry_id in self._plain_running:
                continue
            if not fields:  # deleted meanwhile: nothing to run
                await self.redis.xack(self.keys.tasks, CONSUMER_GROUP, entry_id)
                continue
            log.warning(
                "worker %s: resuming activity %s whose delivery was interrupted",
                self.worker_id,
                entry_id.decode(),
            )
            self._start_plain(entry_id, fields)

    def _spawn(self, coro: Any) -> None:
        """Start a background task and keep a reference until it ends."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _start_plain(self, entry_id: bytes, fields: dict[bytes, bytes], delivery_count: int = 1) -> None:
        try:
            task = decode_task(self.codec, fields[b"d"], entry_id)
        except Exception as exc:
            self._spawn(self._move_aside(self.keys.tasks, entry_id, fields, exc, ack=True))
            return
        task.delivery_count = delivery_count
        if delivery_count > task.attempt:
            task.attempt = delivery_count  # an earlier holder died mid-attempt: that attempt counts
        self._in_use += 1
        self._plain_running.add(entry_id)
        self._spawn(self._run(task, None, ack=entry_id))

    async def _poll_own(self) -> None:
        stream = self.keys.stream(self.worker_id)
        assert self._own_reader is not None
        reply = await self._own_reader.execute(
            "XREAD", "COUNT", OWN_BATCH, "BLOCK", POLL_BLOCK_MS, "STREAMS", stream, self._last_own_id
        )
        entries = stream_entries(reply)
        if not entries:
            return
        self._last_own_id = entries[-1][0]
        ending = {f.get(b"s") for _, f in entries if f.get(b"t") == b"c"}
        for entry_id, fields in entries:
            try:
                await self._own_entry(stream, entry_id, fields, ending)
            except Exception as exc:  # D04: one malformed entry must not swallow the rest of the batch
                await self._move_aside(stream, entry_id, fields, exc)

    async def _own_entry(
        self, stream: str, entry_id: bytes, fields: dict[bytes, bytes], ending: set[Any]
    ) -> None:
        """Act on one entry of the worker's own stream; raises on a malformed one."""
        kind = fields.get(b"t")
        if kind == b"a":
            self._start_session_activity(entry_id, fields, ending)
        elif kind == b"o":
            self._open_local(fields[b"s"].decode(), int(fields[b"x"]), entry_id)
        elif kind == b"c":
            reason = fields.get(b"r", b"complete").decode()
            sid = fields[b"s"].decode()
            if reason == "complete":
                self._end_local(sid, "completed", "session was completed")
            else:
                why = "execution timeout passed" if reason == "expire" else "session failed"
                self._end_local(sid, "failed", why)
        elif kind == b"x":
            execution = self._executions.get(fields.get(b"i", b"").decode())
            if execution is not None:
                execution.cancel("cancelled", "the caller cancelled the activity")
        elif kind != b"h":
            await self._move_aside(stream, entry_id, fields, ValueError(f"unknown entry type {kind!r}"))

    def _start_session_activity(self, entry_id: bytes, fields: dict[bytes, bytes], ending: set[Any]) -> None:
        try:
            task = decode_task(self.codec, fields[b"d"], entry_id)
        except Exception as exc:
            self._spawn(self._move_aside(self.keys.stream(self.worker_id), entry_id, fields, exc))
            return
        sid = task.session_id or ""
        local = self._sessions.get(sid)
        if local is None or sid.encode() in ending:
            kind, reason = self._ended.get(
                sid, ("failed", f"session {sid} is not open on worker {self.worker_id}")
            )
            if sid.encode() in ending and local is not None:
                kind, reason = "completed", "session was completed"
            error = "ActivityCancelledError" if kind == "completed" else "SessionFailedError"
            self._reply(
                task,
                encode_error(
                    self.codec,
                    task.activity_id,
                    RemoteError(error, "", f"activity {task.name!r} was not started: {reason}"),
                ),
            )
            return
        local.activities_run += 1
        self._spawn(self._run(task, local, ack=None))

    # -- sessions held locally ------------------------------------------------------------
    def _open_local(self, sid: str, exec_ms: int, entry_id: bytes) -> None:
        if sid in self._sessions or sid in self._ended:
            return
        info = SessionInfo(
            session_id=sid,
            hostname=self.hostname,
            worker_id=self.worker_id,
            task_queue=self.task_queue,
            prefix=self.prefix,
        )
        local = LocalSession(info)
        created_ms = int(entry_id.split(b"-")[0])
        remaining = (created_ms + exec_ms - self._redis_now_ms()) / 1000
        local.timer = asyncio.get_running_loop().call_later(
            max(0.0, remaining), lambda: self._spawn(self._expire(sid))
        )
        self._sessions[sid] = local
        log.debug("worker %s: session %s opened", self.worker_id, sid)

    async def _expire(self, sid: str) -> None:
        """The session's execution timeout passed: fail it in Redis (frees its slot)."""
        k = self.keys
        assert self.scripts is not None
        for _ in range(100):
            state, _reason = await self.scripts.run(
                "end_session",
                [k.session(sid), k.free, k.waiters],
                [k.base, sid, "expire", "execution timeout passed", self.retention_ms],
            )
            if state != b"OPEN":
                break
            await asyncio.sleep(0.02)  # Redis' clock is a hair behind ours
        self._end_local(sid, "failed", "execution timeout passed")

    def _end_local(self, sid: str, kind: str, reason: str) -> None:
        """Forget a session; cancel what runs for it (its callers are told why)."""
        local = self._sessions.pop(sid, None)
        self._ended[sid] = (kind, reason)
        while len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)
        if local is None:
            return
        if local.timer is not None:
            local.timer.cancel()
        local.info.state = SessionState.COMPLETED if kind == "completed" else SessionState.FAILED
        for execution in list(local.executions.values()):
            execution.cancel(
                "session_completed" if kind == "completed" else "session_failed",
                f"session {sid} {'was completed' if kind == 'completed' else 'failed: ' + reason}",
            )
        log.debug("worker %s: session %s ended (%s: %s)", self.worker_id, sid, kind, reason)

    # -- running activities -------------------------------------------------------------
    async def _acquire_slot(self) -> None:
        assert self._slot_freed is not None
        while self._in_use >= self.max_concurrent_activities:
            self._slot_freed.clear()
            await self._slot_freed.wait()
        self._in_use += 1

    def _release_slot(self) -> None:
        assert self._slot_freed is not None
        self._in_use -= 1
        self._done_count += 1
        self._slot_freed.set()

    async def _run(self, task: Task, local: LocalSession | None, ack: bytes | None) -> None:
        """Execute one task and queue its reply (and ack)."""
        if local is not None:
            await self._acquire_slot()
            if local.info.session_id not in self._sessions:  # ended while waiting for a slot
                self._release_slot()
                kind, reason = self._ended.get(local.info.session_id, ("failed", "session ended"))
                self._reply(
                    task,
                    encode_error(
                        self.codec,
                        task.activity_id,
                        RemoteError(
                            "ActivityCancelledError" if kind == "completed" else "SessionFailedError",
                            "",
                            f"activity {task.name!r} was not started: {reason}",
                        ),
                    ),
                )
                return
        try:
            message = await self._execute(task, local)
        except asyncio.CancelledError:
            if local is None:
                self._plain_running.discard(ack or b"")
                return  # shutting down: left pending, a live worker takes it over (at-least-once)
            message = encode_error(
                self.codec,
                task.activity_id,
                RemoteError(
                    "SessionFailedError",
                    "",
                    f"worker {self.worker_id} shut down while activity {task.name!r} ran",
                ),
            )
        finally:
            self._release_slot()
        self._reply(task, message, ack)

    async def _execute(self, task: Task, local: LocalSession | None) -> bytes:
        definition = self.registry.get(task.name)
        if definition is None:
            return encode_error(
                self.codec,
                task.activity_id,
                RemoteError(
                    "ActivityNotRegisteredError",
                    "",
                    f"activity {task.name!r} is not registered on worker "
                    f"{self.worker_id} of task queue {self.task_queue!r} "
                    f"(it has: {', '.join(sorted(self.registry))}); "
                    "register it in Worker(activities=[...]) on every worker of the queue",
                ),
            )
        if (
            task.schedule_to_start is not None
            and self._redis_now_ms() - task.enqueued_ms > task.schedule_to_start * 1000
        ):
            return encode_error(
                self.codec,
                task.activity_id,
                RemoteError(
                    "ActivityTimeoutError",
                    "",
                    f"activity {task.name!r} waited in the queue longer than "
                    f"schedule_to_start_timeout={task.schedule_to_start:g}s; "
                    "add workers or raise the timeout",
                    timeout_type="schedule_to_start",
                ),
            )
        info = ActivityInfo(
            task.activity_id,
            task.name,
            task.attempt,
            self.task_queue,
            self.worker_id,
            local.info if local else None,
            task.heartbeat_timeout,
        )
        execution = Execution(task, _RunningActivity(info))
        execution.asyncio_task = asyncio.current_task()
        self._executions[task.activity_id] = execution
        if local is not None:
            local.executions[task.activity_id] = execution
        try:
            return await execute(execution, definition, self.codec, self._pool, self._redis_now_ms)
        finally:
            self._executions.pop(task.activity_id, None)
            if local is not None:
                local.executions.pop(task.activity_id, None)

    def _reply(self, task: Task, message: bytes, ack: bytes | None = None) -> None:
        assert self._outbox_ready is not None
        self._outbox.append((self.keys.inbox(task.client_id), message))
        if ack is not None:
            self._acks.append(ack)
        self._outbox_ready.set()

    async def _flush(self) -> None:
        """Write queued replies and acks in one round trip: one XADD per caller inbox.

        Whatever Redis could not take for a transient reason (a lost connection, READONLY,
        LOADING, OOM...) is kept and written again; only what it refused for good (say
        WRONGTYPE on an inbox) is reported and dropped. An inbox that no longer exists (its
        client is gone) takes nothing: NOMKSTREAM drops the result."""
        assert self._outbox_ready is not None and self.wire is not None
        await self._outbox_ready.wait()
        self._outbox_ready.clear()
        outbox, acks = self._outbox, self._acks
        if not outbox and not acks:
            return
        self._outbox, self._acks = [], []
        by_inbox: dict[str, list[bytes]] = {}
        for inbox, message in outbox:
            by_inbox.setdefault(inbox, []).append(message)
        commands: list[tuple[Any, ...]] = []
        for inbox, messages in by_inbox.items():
            fields: list[bytes] = []
            for message in messages:
                fields += (b"r", message)
            commands.append(("XADD", inbox, "NOMKSTREAM", "*", *fields))
        if acks:
            commands.append(("XACK", self.keys.tasks, CONSUMER_GROUP, *acks))
            commands.append(("XDEL", self.keys.tasks, *acks))
        try:
            replies = await self.wire.execute_many(self.keys.tasks, commands, return_exceptions=True)
        except BaseException:
            self._outbox[:0] = outbox  # nothing is known to have been written: keep it all
            self._acks[:0] = acks
            self._outbox_ready.set()
            raise
        retry: BaseException | None = None
        lost: BaseException | None = None
        acked = True
        for (inbox, messages), reply in zip(by_inbox.items(), replies, strict=False):
            if isinstance(reply, BaseException):
                if is_transient(reply):
                    self._outbox[:0] = [(inbox, m) for m in messages]
                    retry = reply
                else:
                    log.error(
                        "worker %s: Redis refused %d result(s) for inbox %s (%s); they are dropped",
                        self.worker_id, len(messages), inbox, describe(reply),
                    )  # fmt: skip
        for reply in replies[len(by_inbox) :]:
            if isinstance(reply, BaseException):
                acked = False
                kind = kind_of(reply)
                if kind is Kind.TRANSIENT:
                    retry = reply
                elif kind is Kind.LOST:
                    lost = reply  # the task stream vanished, and the entries with it
                else:
                    log.error("worker %s: Redis refused an ack (%s)", self.worker_id, describe(reply))
        if acks and not acked and retry is not None:
            self._acks[:0] = acks  # XACK and XDEL are idempotent: send both again
        else:
            self._plain_running.difference_update(acks)
        if retry is not None:
            self._outbox_ready.set()
            raise retry  # _loop backs off, then this runs again
        if lost is not None:
            raise lost  # _loop re-creates the group

    # -- maintenance ----------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        assert self.scripts is not None
        k = self.keys
        interval = self.heartbeat_timeout / 3  # type: ignore[operator]
        # A reply later than one interval means a dead connection: drop it and beat on a new
        # one, well before the heartbeat key (heartbeat_timeout) expires.
        alive = await self.scripts.run(
            "heartbeat",
            [k.workers, k.worker(self.worker_id), k.alive(self.worker_id)],
            [self.worker_id, int(self.heartbeat_timeout * 1000), self._in_use, self._done_count],  # type: ignore[operator]
            timeout=interval,
        )
        if not alive:
            log.warning(
                "worker %s: registration lost (declared dead or Redis restarted); re-registering",
                self.worker_id,
            )
            await self._reestablish()
        await asyncio.sleep(interval)

    async def _maintain(self) -> None:
        interval = self.heartbeat_timeout / 3  # type: ignore[operator]
        k = self.keys
        if self._last_own_id != b"0-0":
            # Trim what was read, the last entry included, so what remains is queued (inspect counts it).
            ms, _, seq = self._last_own_id.partition(b"-")
            read_up_to = ms + b"-" + str(int(seq) + 1).encode()
            await self.redis.xtrim(k.stream(self.worker_id), minid=read_up_to, approximate=False)
        await self._publish_session_counts()
        await self._reap_dead_workers()
        await self._claim_orphans()
        if self._burst and await self._drained():
            log.info("worker %s: burst mode and nothing left to do; stopping", self.worker_id)
            self.stop()
        self._check_heartbeat_timeouts()
        await asyncio.sleep(min(interval, 0.25) if self._has_heartbeat_timeouts() else interval)

    async def _publish_session_counts(self) -> None:
        """Record how many activities each open session ran, for `sessionq inspect`."""
        changed = [local for local in self._sessions.values() if local.activities_run != local.published_run]
        if not changed:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for local in changed:
                pipe.hset(self.keys.session(local.info.session_id), "activities", local.activities_run)
            await pipe.execute()
        for local in changed:
            local.published_run = local.activities_run

    def _has_heartbeat_timeouts(self) -> bool:
        return any(e.task.heartbeat_timeout for e in self._executions.values())

    def _check_heartbeat_timeouts(self) -> None:
        now = time.monotonic()
        for execution in list(self._executions.values()):
            limit = execution.task.heartbeat_timeout
            if limit and now - execution.running.last_heartbeat > limit:
                execution.cancel(
                    "heartbeat", f"activity {execution.task.name!r} sent no heartbeat for {limit:g}s"
                )

    async def _drained(self) -> bool:
        if self._in_use or self._sessions or self._outbox:
            return False
        groups = await self.redis.xinfo_groups(self.keys.tasks)
        for group in groups:
            if group["name"] == CONSUMER_GROUP.encode():
                return not group.get("lag") and not group.get("pending")
        return True

    async def _reap_dead_workers(self) -> None:
        """Declare dead every registered worker whose heartbeat key is gone."""
        k = self.keys
        assert self.scripts is not None
        members = [m.decode() for m in await self.redis.smembers(k.workers) if m.decode() != self.worker_id]
        if not members:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for w in members:
                pipe.exists(k.alive(w))
            alive = await pipe.execute()
        for w, is_alive in zip(members, alive, strict=True):
            if not is_alive:
                reaped = await self.scripts.run(
                    "reap_worker",
                    [k.workers, k.worker(w), k.alive(w), k.stream(w), k.worker_sessions(w), k.waiters],
                    [
                        k.base,
                        w,
                        f"worker {w} died (no heartbeat for {self.heartbeat_timeout:g}s)",
                        "0",
                        self.retention_ms,
                    ],
                )
                if reaped:
                    log.warning(
                        "worker %s: reaped dead worker %s (%d session(s) failed)",
                        self.worker_id,
                        w,
                        int(reaped) - 1,
                    )

    async def _claim_orphans(self) -> None:
        """Take over plain activities that dead workers had read but not finished."""
        k = self.keys
        assert self.scripts is not None
        consumers = await self.redis.xinfo_consumers(k.tasks, CONSUMER_GROUP)  # NOGROUP: _loop re-creates it
        for consumer in consumers:
            name = consumer["name"].decode()
            if name == self.worker_id or not consumer.get("pending"):
                continue
            free = self.max_concurrent_activities - self._in_use
            if free <= 0:
                return
            claimed = await self.scripts.run(
                "claim_orphans", [k.tasks, k.alive(name)], [CONSUMER_GROUP, name, self.worker_id, free]
            )
            if claimed:
                log.warning(
                    "worker %s: took over %d activity(ies) of dead worker %s",
                    self.worker_id,
                    len(claimed),
                    name,
                )
            for entry_id, deliveries, flat in claimed:
                fields = dict(zip(flat[::2], flat[1::2], strict=True))
                self._start_plain(entry_id, fields, delivery_count=int(deliveries) + 1)

    async def _move_aside(
        self,
        stream: str,
        entry_id: bytes,
        fields: dict[bytes, bytes],
        error: BaseException,
        ack: bool = False,
    ) -> None:
        """D04: keep a malformed entry for inspection and drop it from the queue."""
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

    # -- shutdown -------------------------------------------------------------------------
    async def _shutdown(self) -> None:
        """Stop taking work, fail our sessions now, let running work finish, deregister."""
        k = self.keys
        assert self.scripts is not None
        for task in self._tasks:
            if task.get_name() in ("sessionq-poll-shared", "sessionq-poll-own"):
                task.cancel()
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(k.worker(self.worker_id), "max_sessions", -1)  # no new sessions
                pipe.zrem(k.free, self.worker_id)
                pipe.delete(k.stream(self.worker_id))  # callers' next send fails at once
                await pipe.execute()
            for sid in list(self._sessions):
                await self.scripts.run(
                    "end_session",
                    [k.session(sid), k.free, k.waiters],
                    [k.base, sid, "fail", f"worker {self.worker_id} shut down", self.retention_ms],
                )
                self._end_local(sid, "failed", f"worker {self.worker_id} shut down")
        except Exception as exc:
            log.warning("worker %s: could not fail sessions on shutdown (%s)", self.worker_id, describe(exc))
        deadline = time.monotonic() + self.shutdown_grace  # type: ignore[operator]
        while self._executions and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for execution in list(self._executions.values()):
            execution.cancel("shutdown", f"worker {self.worker_id} shut down before the activity finished")
        while self._executions and time.monotonic() < deadline + 2:
            await asyncio.sleep(0.01)
        while (self._outbox or self._acks) and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.01)
        for task in self._tasks:  # no heartbeat may re-register us after this
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self._deregister(f"worker {self.worker_id} shut down")
        except Exception as exc:
            log.warning(
                "worker %s: could not deregister (%s); its heartbeat will expire",
                self.worker_id,
                describe(exc),
            )
        log.info("worker %s stopped", self.worker_id)

    def _redis_now_ms(self) -> float:
        return time.time() * 1000 + self._clock_offset_ms
