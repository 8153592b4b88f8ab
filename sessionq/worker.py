"""The worker: registers itself, takes work, holds sessions, and stops cleanly.

How it is put together (each part owns its state):

- `Worker` (this module): options, the lifecycle (run, the loops, the graceful stop).
- `Registration` (registration.py): start-up, its record in Redis, the consumer group,
  and making them again when Redis lost them.
- `SharedQueue` (shared_queue.py): plain activities read from the task queue's stream,
  only as many as there are free slots, and the walk of its own pending list.
- `HostQueue` (host_queue.py): for a process of a host (`host_id`), its sessions'
  activities, read the same way from the host's stream.
- `OwnStream` (own_stream.py): the worker's own stream: sessions opened and ended,
  session activities, cancel requests.
- `ActivityRunner` (runner.py): the activity slots (a hard limit over plain and session
  activities) and the executions running in them.
- `HeldSessions` (held.py): the sessions it holds, their execution timeouts and owners.
- `Outbox` (outbox.py): results and acks, written in batches by the flush loop.
- `Housekeeping` (housekeeping.py): the periodic pass (reap, take over, sweep, trim...).
- `Heartbeat` (keepalive.py): the heartbeat, from a thread of its own.
- `DeadLetters` (dead_letters.py): malformed entries moved aside, their callers told.

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
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any

from . import resources
from .activity import ActivityDefinition, definition_of
from .codec import Codec, default_codec
from .connection import connect, resolve_url
from .dead_letters import DeadLetters
from .durations import Duration, seconds
from .errors import ConfigurationError, SessionqError
from .execution import cancel_requests
from .faults import Kind, describe, kind_of, public, retrying
from .held import HeldSessions
from .host_queue import HostQueue
from .housekeeping import Housekeeping
from .keepalive import Heartbeat
from .keys import HOST_MARK, QueueKeys, default_prefix, host_worker_id, validate_name
from .metrics import WorkerMetrics
from .outbox import Outbox
from .own_stream import OwnStream
from .registration import Registration
from .runner import ActivityRunner
from .scripts import Scripts
from .shared_queue import SharedQueue
from .wire import Wire

log = logging.getLogger("sessionq")

_RUNNING_HERE: set[tuple[str, str, str]] = set()
"""(prefix, task queue, identity) of the Workers running in this process: a second one with
the same identity would share the first's stream (every session activity run twice)."""


class Worker:
    """Runs activities from a task queue and, with `enable_sessions`, holds sessions.

    Start it with ``await worker.run()`` (or ``sessionq worker MODULE:ATTR``, which runs a
    Worker defined in your module); ``async with worker:`` runs it in the background.
    Durations are in seconds (or a timedelta).

    Args:
        redis: a URL (default: SESSIONQ_REDIS_URL, REDIS_URL, then localhost;
            ``redis+cluster://`` and ``redis+sentinel://`` too) or a redis.asyncio client whose
            connection settings are reused.
        task_queue: the queue it serves.
        activities: the functions it runs, decorated with ``@sessionq.activity`` (a plain
            function is registered under its ``__name__``). Give every worker of a queue the
            same ones: an activity sent to a worker without it fails.
        enable_sessions: hold sessions (default False: plain activities only).
        max_concurrent_sessions: the most sessions it holds at once, a hard limit (for the
            whole host with `host_id`); None or 0: no limit.
        max_concurrent_activities: the most activities it runs at once, plain and session
            ones together, a hard limit (default 100); it reads no more plain activities
            than it has free slots, leaving work to idle workers.
        identity: its id in Redis, unique on the queue (default ``<pid>@<hostname>``); the
            tables of ``sessionq inspect`` show it.
        heartbeat_timeout: how long after its last heartbeat it counts as dead (default 10;
            it beats every third of it). Its sessions' callers learn of its death within
            this plus ``min(1 s, heartbeat_timeout / 5)``; keep it above Redis' failover
            time.
        shutdown_grace: on a graceful stop, how long running activities get to finish
            (default 30) before they are cancelled.
        prefix: the key prefix (default: SESSIONQ_PREFIX, then "sq"); clients must use the
            same.
        codec: the Codec for arguments and results (default: a plain ``Codec()``); clients
            must be taught the same types.
        retention: how long an ended session's record stays in Redis for ``sessionq
            inspect`` (default 3600).
        host_id: make this process one of a host's: processes with the same host_id share
            one session limit and one set of sessions, which outlive any one process (needs
            `enable_sessions`).
        restart_grace: with `host_id`, how long the host's sessions wait for a process of it
            after its last one stopped beating (default 30); then they fail.
        session_resources: typed capacity sessions can ask for, e.g. ``{"gpu": 2}`` (the
            host's, with `host_id`; needs `enable_sessions`).
        metrics_registry: a prometheus_client CollectorRegistry to publish the worker's
            metrics in (``pip install 'sessionq[metrics]'``); None: no metrics.

    Raises:
        ConfigurationError: an invalid option (nothing touched Redis).
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
        prefix: str | None = None,
        codec: Codec | None = None,
        retention: Duration = 3600.0,
        host_id: str | None = None,
        restart_grace: Duration = 30.0,
        session_resources: Mapping[str, int] | None = None,
        metrics_registry: Any = None,
    ) -> None:
        validate_name("task_queue", task_queue)
        prefix = validate_name("prefix", prefix if prefix is not None else default_prefix())
        if max_concurrent_sessions is not None and (
            isinstance(max_concurrent_sessions, bool)
            or not isinstance(max_concurrent_sessions, int)
            or max_concurrent_sessions < 0
        ):
            raise ConfigurationError(
                "max_concurrent_sessions",
                f"must be an int >= 1, or 0 or None for no limit; got {max_concurrent_sessions!r}",
            )
        if max_concurrent_sessions == 0:
            max_concurrent_sessions = None  # as `sessionq worker --max-sessions 0`: no limit
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
        if self.worker_id.startswith(HOST_MARK):
            raise ConfigurationError("identity", f"must not begin with {HOST_MARK!r} (hosts are named so)")
        self.host_id = None if host_id is None else validate_name("host_id", host_id)
        if self.host_id is not None and not enable_sessions:
            raise ConfigurationError(
                "host_id", "groups worker processes for sessions; it needs enable_sessions=True"
            )
        self.host_worker_id = None if self.host_id is None else host_worker_id(self.host_id)
        """The id the host is placed under (its sessions' record names it), or None."""
        self.restart_grace: float = seconds("restart_grace", restart_grace, optional=False)  # type: ignore[assignment]
        self.session_resources = resources.validate("session_resources", session_resources)
        """Typed capacity for sessions (the host's, with host_id), e.g. {"gpu": 2}."""
        if self.session_resources and not enable_sessions:
            raise ConfigurationError("session_resources", "are for sessions; they need enable_sessions=True")
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
        self.registration: Registration = None  # type: ignore[assignment]
        self.shared_queue: SharedQueue = None  # type: ignore[assignment]
        self.host_queue: HostQueue | None = None
        self.own_stream: OwnStream = None  # type: ignore[assignment]
        self.dead_letters: DeadLetters = None  # type: ignore[assignment]
        self.heartbeat: Heartbeat | None = None
        self.metrics_registry = metrics_registry
        self.metrics = (
            None if metrics_registry is None else WorkerMetrics(metrics_registry, task_queue, self.worker_id)
        )
        """Prometheus series (metrics.py), when a registry was given."""
        self._stopping = asyncio.Event()  # set by stop(), even before run() starts
        self._stopped = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._runner_task: asyncio.Task[None] | None = None
        self.clock_offset_ms = 0.0
        """Redis' clock minus our monotonic one (ms), re-learnt at registration, every few
        housekeeping passes and after a failure: a step of this host's wall clock changes
        nothing."""
        self.burst = False

    # -- public lifecycle -----------------------------------------------------------------
    @public("running a worker")
    async def run(self, *, burst: bool = False) -> None:
        """Register, serve the task queue, and return once stopped: after stop() (or, with
        ``burst=True``, once the queue is drained and no session is open). The stop is
        graceful: nothing new is taken, running activities get ``shutdown_grace`` to
        finish, then the sessions still held fail and the worker deregisters.
        ``async with worker:`` runs it in the background instead, until the block ends.

        Raises:
            ConfigurationError: another live worker uses this identity on the queue, or
                the host's other processes run with other settings.
            RedisUnavailableError: Redis could not be reached to register.
        """
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
        self.sessions = HeldSessions(self, self.spawn)
        self.shared_queue = SharedQueue(self)
        if self.host_worker_id is not None:
            self.host_queue = HostQueue(self, self.host_worker_id)
        self.own_stream = OwnStream(self)
        self.dead_letters = DeadLetters(self)
        self.registration = Registration(self)
        self.outbox = Outbox(self.wire, self.keys, self.worker_id, self._acknowledged)
        housekeeping = Housekeeping(self)
        try:
            if self.stopping:  # stop() came before run(): nothing to do
                return
            await retrying(self.registration.start, within=5.0, what=f"starting worker {self.worker_id}")
            self.heartbeat = Heartbeat(
                self._redis_target,
                self.keys,
                self.worker_id,
                self.heartbeat_timeout,
                asyncio.get_running_loop(),
                counts=lambda: (self.runner.in_use, self.runner.done, self.runner.waiting),
                redis_now_ms=self.redis_now_ms,
                on_lost=lambda: self.spawn(self.registration.lost()),
                blame=self.runner.blame,
                stall_limit=max(60.0, 10 * self.heartbeat_timeout),
                host_id=self.host_id or "",
                grace_ms=int(self.restart_grace * 1000),
                overdue=self.sessions.overdue,
                retention_ms=self.retention_ms,
            )
            await self.heartbeat.start()
            if self.metrics is not None:
                beat = self.heartbeat
                self.metrics.watch(
                    running=lambda: self.runner.in_use,
                    slots_used=lambda: len(self.sessions),
                    slots_total=(self.max_concurrent_sessions or 0) if self.enable_sessions else None,
                    last_beat=lambda: beat.last_ok,
                )
            self._tasks = [
                asyncio.create_task(self._loop(self.shared_queue.poll), name="sessionq-poll-shared"),
                asyncio.create_task(self._loop(self.own_stream.poll), name="sessionq-poll-own"),
                asyncio.create_task(self._loop(housekeeping.step), name="sessionq-housekeeping"),
                asyncio.create_task(self._loop(self.outbox.flush), name="sessionq-flush"),
            ]
            if self.host_queue is not None:
                self._tasks.append(
                    asyncio.create_task(self._loop(self.host_queue.poll), name="sessionq-poll-host")
                )
            log.info(
                "worker %s started on task queue %r (sessions %s, max sessions %s%s, concurrency %d)",
                self.worker_id,
                self.task_queue,
                "on" if self.enable_sessions else "off",
                self.max_concurrent_sessions or "unlimited",
                f" per host {self.host_id}, restart_grace {self.restart_grace:g}s" if self.host_id else "",
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
            if self.metrics is not None:
                self.metrics.close()
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
        """Whether stop() was called (the worker takes nothing new)."""
        return self._stopping.is_set()

    async def wait_stopped(self) -> None:
        """Wait until run() has finished stopping."""
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
        """How many sessions this worker process holds now."""
        return len(self.sessions) if self.sessions is not None else 0

    def redis_now_ms(self) -> float:
        """Redis' clock, as this worker last learnt it (time on the server holding its keys)."""
        return time.monotonic() * 1000 + self.clock_offset_ms

    def learn_redis_clock(self, redis_ms: float) -> None:
        """Redis said its time is `redis_ms` (just now)."""
        self.clock_offset_ms = redis_ms - time.monotonic() * 1000

    # -- the loops ----------------------------------------------------------------------
    async def _loop(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run `step` until stopped, riding out Redis outages with jittered backoff."""
        backoff = 0.05
        task = asyncio.current_task()
        while True:
            # Python < 3.12's wait_for, which redis-py uses to send, can swallow a cancel: honour
            # it anyway, or stopping would wait on this loop until the shutdown timeout.
            if task is not None and cancel_requests(task):
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
                        await self.registration.reestablish()
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
                backoff = min(backoff * 2, 2.0)  # short: a failover is over in seconds

    async def _withdraw(self) -> None:
        """Take no new session: a worker leaves placement; a host's process stops counting as
        one of the host's serving processes (the host takes none once all of them stop)."""
        k = self.keys
        if self.heartbeat is not None and self.host_id is not None:
            self.heartbeat.stopping = True
            await self.scripts.heartbeat(
                k,
                self.worker_id,
                hb_ms=int(self.heartbeat_timeout * 1000),
                counts=(self.runner.in_use, self.runner.done, self.runner.waiting),
                now_ms=self.redis_now_ms(),
                timeout=None,
                host_id=self.host_id,
                grace_ms=int(self.restart_grace * 1000),
                stopping=True,
            )
            return
        await self.wire.execute_many(
            k.tasks,
            [
                ("HSET", k.worker(self.worker_id), "max_sessions", -1, "stopping", 1),
                ("ZREM", k.free, self.worker_id),
            ],
        )

    def _acknowledged(self, stream: str, entry_ids: Iterable[bytes]) -> None:
        """The outbox wrote these entries' acks."""
        queue = self.host_queue if self.host_queue is not None and stream == self.host_queue.stream else None
        (queue or self.shared_queue).acknowledged(entry_ids)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Start a background task and keep a reference until it ends."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- shutdown -------------------------------------------------------------------------
    async def _shutdown(self) -> None:
        """The graceful stop. Nothing new is taken from now on (no plain activity read, no
        session placed here, no session activity started, no dead worker's work taken
        over); what runs, session activities included, gets up to shutdown_grace to finish;
        then what still runs is cancelled, the sessions still held fail, and the worker
        deregisters. A plain activity cancelled this way is left to another worker.

        A process of a host fails no session: they are the host's, and stay open for its
        other processes, or for the one that replaces it within restart_grace; a session
        activity it cancelled is left, like a plain one, to the process that takes over."""
        running = len(self.runner.executions)
        log.info(
            "worker %s stopping: %d running activit%s get up to shutdown_grace=%gs to finish; "
            "no new work is taken",
            self.worker_id, running, "y" if running == 1 else "ies", self.shutdown_grace,
        )  # fmt: skip
        for task in self._tasks:
            if task.get_name() in ("sessionq-poll-shared", "sessionq-poll-host"):
                task.cancel()
        try:
            await self._withdraw()  # no new sessions
        except Exception as exc:
            log.warning("worker %s: could not withdraw from placement (%s)", self.worker_id, describe(exc))
        deadline = time.monotonic() + self.shutdown_grace
        while self.runner.executions and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self.runner.cancel_all("shutdown", f"worker {self.worker_id} shut down before the activity finished")
        while self.runner.executions and time.monotonic() < deadline + 2:
            await asyncio.sleep(0.01)
        if self.host_id is None:
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
            await self.registration.deregister(f"worker {self.worker_id} shut down")
            await self.registration.drop_consumer()
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
