"""The caller's side: send activities, wait for results, open sessions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, overload

from .activity import name_of
from .calls import R
from .codec import Codec, default_codec
from .connection import connect, resolve_url
from .durations import Duration, seconds
from .envelope import encode_task
from .errors import ConfigurationError, SessionqError
from .faults import DEFAULT_UNAVAILABLE_TIMEOUT, describe, public, retrying
from .handle import ActivityHandle
from .inbox import Inbox
from .keys import QueueKeys, default_prefix, host_of, new_id, queues_index, validate_name
from .lease import LeaseKeeper
from .liveness import LivenessMonitor
from .options import ActivityOptions, SessionOptions
from .scripts import Scripts
from .session import Session, SessionOpener
from .session_info import decode_token
from .wire import Wire

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .calls import ClientCall, ClientCallWithKwargs, Ts

log = logging.getLogger("sessionq")


class Client:
    """Sends activities to task queues and opens worker sessions.

    Use it as ``async with Client() as client:``, or call ``await client.close()``, which
    completes the sessions it still holds.

    Args:
        redis: a URL (default: SESSIONQ_REDIS_URL, REDIS_URL, then localhost) or a
            redis.asyncio.Redis whose connection settings are reused.
        prefix: begins every key (default: SESSIONQ_PREFIX, then "sq"); clients and
            workers must agree on it.
        codec: encodes arguments and results (default: a plain ``Codec()``); workers must
            be taught the same types.
        identity: the owner name its sessions record, shown by ``sessionq inspect``
            (default ``<pid>@<hostname>``).
        retention: seconds an ended session's record stays in Redis, for ``sessionq
            inspect`` (default 3600).
        unavailable_timeout: how long a call rides out Redis being unreachable or refusing
            commands (retrying, or waiting for its result) before it raises
            RedisUnavailableError, in seconds (default 15).
    """

    def __init__(
        self,
        redis: Any = None,
        *,
        prefix: str | None = None,
        codec: Codec | None = None,
        identity: str | None = None,
        retention: float = 3600.0,
        unavailable_timeout: Duration = DEFAULT_UNAVAILABLE_TIMEOUT,
    ) -> None:
        prefix = validate_name("prefix", prefix if prefix is not None else default_prefix())
        self.unavailable_timeout: float = seconds(  # type: ignore[assignment]
            "unavailable_timeout", unavailable_timeout, optional=False
        )
        self.redis = connect(resolve_url(redis) if redis is None or isinstance(redis, str) else redis)
        self.prefix = prefix
        self.codec = codec or default_codec
        self.client_id = new_id()
        self.identity = identity or f"{os.getpid()}@{socket.gethostname()}"
        self.retention_ms = int(retention * 1000)
        self.wire = Wire(self.redis)
        self.scripts = Scripts(self.wire)
        self._inboxes: dict[str, Inbox] = {}
        self._closing = False  # close() began: no new calls
        self._closed = False  # its connections are gone
        self._background: set[asyncio.Task[Any]] = set()
        self._opening: set[asyncio.Task[Any]] = set()  # create/recreate_session calls under way
        self._sessions: set[Session] = set()  # OPEN sessions this client holds
        self.monitor = LivenessMonitor(self)
        self.leases = LeaseKeeper(self)

    @property
    def closing(self) -> bool:
        """Whether close() began: the client takes no new calls."""
        return self._closing

    @property
    def closed(self) -> bool:
        """Whether close() finished: its connections are gone."""
        return self._closed

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        """Mark the current task as opening a session, so close() waits for it."""
        task = asyncio.current_task()
        if task is not None:
            self._opening.add(task)
        try:
            yield
        finally:
            if task is not None:
                self._opening.discard(task)

    def hold(self, session: Session) -> None:
        """A session opened: complete it on close, keep its owner lease alive meanwhile."""
        self._sessions.add(session)
        self.leases.own(session.info.task_queue, session.owner_ms)

    def release(self, session: Session) -> None:
        """A session ended (as its caller sees it)."""
        if session in self._sessions:
            self._sessions.discard(session)
            self.leases.disown(session.info.task_queue, session.owner_ms)

    # -- plumbing shared with sessions --------------------------------------------------
    def keys(self, task_queue: str) -> QueueKeys:
        """The Redis keys of `task_queue` under this client's prefix."""
        return QueueKeys(self.prefix, validate_name("task_queue", task_queue))

    def inbox(self, task_queue: str) -> Inbox:
        """This client's inbox on `task_queue`, where results and session grants arrive."""
        if self._closing:
            raise SessionqError("this Client was closed; create a new one")
        inbox = self._inboxes.get(task_queue)
        if inbox is None:
            key = self.keys(task_queue).inbox(self.client_id)
            inbox = Inbox(self.wire, self.scripts, key, self.codec, self.unavailable_timeout)
            self._inboxes[task_queue] = inbox
            # Listed for `sessionq inspect` from its first use, with or without a worker: work
            # sent to a mistyped queue shows there (flagged), not only under -Q.
            index = queues_index(self.prefix)
            listed = lambda: self.wire.execute(index, "SADD", index, task_queue)  # noqa: E731
            self.settle_later(listed, "listing a task queue")
        return inbox

    def forget_wait(self, task_queue: str, message_id: str) -> None:
        """Stop waiting for a message (works while the client closes, unlike inbox())."""
        inbox = self._inboxes.get(task_queue)
        if inbox is not None:
            inbox.forget(message_id)

    @staticmethod
    def resolve_options(base: ActivityOptions | None, options: dict[str, Any]) -> ActivityOptions:
        """A call's options: its ``options=`` (else `base`) with its keyword options applied."""
        given = options.pop("options", None)
        if given is not None and not isinstance(given, ActivityOptions):
            raise ConfigurationError("options", "must be a sessionq.ActivityOptions")
        return (given or base or ActivityOptions()).merged(**options)

    def prepare(
        self,
        activity: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        options: ActivityOptions,
        task_queue: str,
        session_id: str | None,
    ) -> tuple[str, str, bytes]:
        """Validate and encode one activity call: (activity_id, name, payload)."""
        name = name_of(activity)
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ConfigurationError("kwargs", "must be a dict of keyword arguments for the activity")
        activity_id = new_id()
        payload = encode_task(
            self.codec,
            activity_id=activity_id,
            name=name,
            args=args,
            kwargs=kwargs or {},
            client_id=self.client_id,
            session_id=session_id,
            options=options,
        )
        return activity_id, name, payload

    async def retrying(self, call: Callable[[], Any], what: str) -> Any:
        """Run an idempotent Redis call through transient failures, for up to unavailable_timeout."""
        return await retrying(call, within=self.unavailable_timeout, what=what)

    def settle_later(self, call: Callable[[], Any], what: str) -> None:
        """Finish `call` in the background once Redis answers again (cleanup a failed call
        still owes: leaving a waiting line, giving a slot back). Retried for a minute, or
        until close() gives up on it."""
        if self._closed:
            return

        async def settle() -> None:
            try:
                await retrying(call, within=60.0, what=what)
            except Exception as exc:
                log.error("%s failed for good (%s); Redis' timeouts will clean up", what, describe(exc))

        task = asyncio.ensure_future(settle())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- plain activities -------------------------------------------------------------
    async def _start_activity(
        self,
        activity: Any,
        *args: Any,
        task_queue: str | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> ActivityHandle[Any]:
        """start_activity, without the public-API wrapper (execute_activity has its own)."""
        opts = self.resolve_options(None, options)
        queue = task_queue or opts.task_queue
        if not queue:
            raise ConfigurationError("task_queue", "is required: pass task_queue='...'")
        keys = self.keys(queue)
        activity_id, name, payload = self.prepare(activity, args, kwargs, opts, queue, None)
        inbox = self.inbox(queue)
        future = await inbox.expect(activity_id)
        try:
            entry_id = await retrying(
                lambda: self.wire.execute(keys.tasks, "XADD", keys.tasks, "*", "d", payload),
                within=self.unavailable_timeout,
                what="queueing an activity",
            )
        except BaseException:
            inbox.forget(activity_id)
            raise
        inbox.track(activity_id, keys.tasks, entry_id)
        return ActivityHandle(
            activity_id=activity_id,
            name=name,
            future=future,
            inbox=inbox,
            schedule_to_close=opts.schedule_to_close_timeout,  # type: ignore[arg-type]
            cancel=lambda: self._cancel_plain(keys, activity_id, entry_id),
        )

    @overload
    async def start_activity(
        self, activity: Callable[[Unpack[Ts]], Awaitable[R]], *args: Unpack[Ts], **options: Unpack[ClientCall]
    ) -> ActivityHandle[R]: ...
    @overload
    async def start_activity(
        self, activity: Callable[[Unpack[Ts]], R], *args: Unpack[Ts], **options: Unpack[ClientCall]
    ) -> ActivityHandle[R]: ...
    @overload
    async def start_activity(
        self, activity: Callable[..., Any], *args: Any, **options: Unpack[ClientCallWithKwargs]
    ) -> ActivityHandle[Any]: ...
    @overload
    async def start_activity(
        self, activity: str, *args: Any, **options: Unpack[ClientCall]
    ) -> ActivityHandle[Any]: ...
    @public("starting an activity")  # type: ignore[misc]  # mypy misreads an implementation of *args: *Ts
    async def start_activity(
        self,
        activity: Any,
        *args: Any,
        task_queue: str | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> ActivityHandle[Any]:
        """Queue an activity on the task queue's shared stream, where any worker may take it,
        and return at once; its handle's ``result()`` waits for it.

        Args:
            activity: a function decorated with ``@sessionq.activity``, or its registered name.
            *args: its positional arguments (encoded by the client's codec: msgpack types,
                or what the Codec was taught).
            task_queue: the queue whose workers may run it (required here).
            kwargs: its keyword arguments, as a dict (this call's own keywords are options).
            **options: ActivityOptions fields: ``start_to_close_timeout``,
                ``schedule_to_close_timeout``, ``schedule_to_start_timeout``,
                ``heartbeat_timeout``, ``retry_policy``; or ``options``, a whole
                ActivityOptions, which those override.

        Returns:
            An ActivityHandle: ``await handle.result()``, ``await handle.cancel()``.

        Raises:
            RedisUnavailableError: Redis stayed unreachable for ``unavailable_timeout``.
            ConfigurationError, SerializationError: bad options or arguments; nothing was sent.
        """
        return await self._start_activity(activity, *args, task_queue=task_queue, kwargs=kwargs, **options)

    @overload
    async def execute_activity(
        self, activity: Callable[[Unpack[Ts]], Awaitable[R]], *args: Unpack[Ts], **options: Unpack[ClientCall]
    ) -> R: ...
    @overload
    async def execute_activity(
        self, activity: Callable[[Unpack[Ts]], R], *args: Unpack[Ts], **options: Unpack[ClientCall]
    ) -> R: ...
    @overload
    async def execute_activity(
        self, activity: Callable[..., Any], *args: Any, **options: Unpack[ClientCallWithKwargs]
    ) -> Any: ...
    @overload
    async def execute_activity(self, activity: str, *args: Any, **options: Unpack[ClientCall]) -> Any: ...
    @public("running an activity")  # type: ignore[misc]  # mypy misreads an implementation of *args: *Ts
    async def execute_activity(
        self,
        activity: Any,
        *args: Any,
        task_queue: str | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        """Run an activity on any worker of the task queue and return its result
        (at-least-once: a worker that dies while running it is replaced by another).

        Args:
            activity: a function decorated with ``@sessionq.activity``, or its registered name.
            *args: its positional arguments (encoded by the client's codec: msgpack types,
                or what the Codec was taught).
            task_queue: the queue whose workers may run it (required here).
            kwargs: its keyword arguments, as a dict (this call's own keywords are options).
            **options: ActivityOptions fields: ``start_to_close_timeout``,
                ``schedule_to_close_timeout``, ``schedule_to_start_timeout``,
                ``heartbeat_timeout``, ``retry_policy``; or ``options``, a whole
                ActivityOptions, which those override.

        Returns:
            What the activity returned.

        Raises:
            ActivityError: the activity raised, after the retry policy's attempts; its
                ``cause`` has the remote type, message and traceback.
            ActivityTimeoutError: a timeout passed (``timeout_type`` says which).
            ActivityCancelledError: it was cancelled (``handle.cancel()``, a cancelled await).
            ActivityNotRegisteredError: the worker that took it does not have it.
            RedisUnavailableError: Redis stayed unreachable for ``unavailable_timeout``.
            RedisDataLostError: Redis lost the task or its result (failover, restart).
            ConfigurationError, SerializationError: bad options or arguments; nothing was sent.
        """
        handle = await self._start_activity(activity, *args, task_queue=task_queue, kwargs=kwargs, **options)
        try:
            return await handle.outcome()
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # the cancellation stands, whatever Redis says
                await asyncio.shield(handle.cancel())
            raise

    async def _cancel_plain(self, keys: QueueKeys, activity_id: str, entry_id: bytes) -> None:
        """Stop a plain activity wherever it is: its entry is deleted from the task stream (so
        it never starts if no worker read it yet), and every registered worker is told (the
        one that read it cancels it, running or waiting for a slot)."""

        async def broadcast() -> None:
            await self.wire.execute(keys.tasks, "XDEL", keys.tasks, entry_id)
            members = await self.wire.execute(keys.tasks, "SMEMBERS", keys.workers)
            workers = [
                w for w in (m.decode() for m in members) if host_of(w) is None
            ]  # hosts run no plain ones
            if workers:
                await self.wire.execute_many(
                    keys.tasks,
                    [
                        ("XADD", keys.stream(w), "NOMKSTREAM", "*", "t", "x", "i", activity_id)
                        for w in workers
                    ],
                )

        await self.retrying(broadcast, what="cancelling an activity")

    # -- sessions -----------------------------------------------------------------------
    def create_session(self, task_queue: str, options: SessionOptions | None = None) -> SessionOpener:
        """Reserve a slot on one live worker of `task_queue` for a session: every activity
        run through it runs on that worker until the session ends.

        Use as ``session = await client.create_session(...)`` (then ``await
        session.complete()``, in a ``finally``) or ``async with client.create_session(...) as
        session:`` (completed when the block ends). Callers wait first come, first served,
        for up to ``options.creation_timeout``.

        Args:
            task_queue: the queue whose session workers may hold it.
            options: SessionOptions: creation_timeout, execution_timeout, owner_timeout,
                resources (default: SessionOptions()).

        Returns:
            A SessionOpener, to await or enter; it gives the Session, and raises the errors
                below (but ConfigurationError, raised at once).

        Raises:
            SessionCreationTimeoutError: no slot came free within creation_timeout.
            SessionAlreadyOpenError: this context already holds an open session.
            RedisUnavailableError: Redis stayed unreachable for ``unavailable_timeout``.
            ConfigurationError: bad options (raised at once).
        """
        return SessionOpener(self, task_queue, options or SessionOptions(), token=None)

    def recreate_session(self, token: bytes, options: SessionOptions | None = None) -> SessionOpener:
        """Open a new session on the same worker (or host) as the session that gave `token`,
        to carry on where its files are (``session.info.recreate_token`` of an earlier one).

        Args:
            token: bytes from ``SessionInfo.recreate_token``.
            options: as for create_session; resources default to the earlier session's.

        Returns:
            A SessionOpener, to await or enter; it gives the Session, and raises the errors
                below (but ConfigurationError, raised at once).

        Raises:
            SessionFailedError: that worker is gone (no other worker will do).
            SessionCreationTimeoutError: it had no free slot within creation_timeout.
            ConfigurationError: a token of another prefix, or not a token (raised at once).
        """
        parsed = decode_token(token)
        if parsed.prefix != self.prefix:
            raise ConfigurationError(
                "recreate_token", f"was made with prefix {parsed.prefix!r}, this client uses {self.prefix!r}"
            )
        return SessionOpener(self, parsed.task_queue, options or SessionOptions(), token=parsed)

    # -- lifecycle ----------------------------------------------------------------------
    @public("closing a Client")
    async def close(self) -> None:
        """Complete every session this client still holds, end the calls still waiting,
        delete this client's keys and close its connections.

        Bounded: a Redis that cannot be reached costs at most unavailable_timeout here (what
        could not be completed then ends by its owner lease or its execution timeout)."""
        if self._closing:
            return
        self._closing = True
        deadline = time.monotonic() + self.unavailable_timeout
        for inbox in self._inboxes.values():
            inbox.fail_waiting(SessionqError("the Client was closed while this call was waiting"))
        await asyncio.sleep(0)  # the calls just failed leave their waiting lines (in the background)
        completing = [asyncio.ensure_future(session.close_quietly()) for session in list(self._sessions)]
        me = asyncio.current_task()
        while True:  # cleanup owed to Redis: sessions to complete, lines to leave, claims under way
            candidates = (*completing, *self._background, *self._opening)
            pending = [task for task in candidates if not task.done() and task is not me]
            remaining = deadline - time.monotonic()
            if not pending or remaining <= 0:
                for task in pending:
                    if task not in self._opening:  # a caller's own task is not ours to cancel
                        task.cancel()
                break
            await asyncio.wait(pending, timeout=remaining)
        self._closed = True
        await self.monitor.close()
        await self.leases.close()
        for inbox in self._inboxes.values():
            await inbox.close(SessionqError("the Client was closed while this call was waiting"))
        await self.wire.aclose()
        await self.redis.aclose()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
