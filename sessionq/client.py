"""The caller's side: send activities, wait for results, open sessions."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .activity import name_of
from .codec import Codec, default_codec
from .connection import connect, resolve_url
from .durations import Duration, seconds
from .envelope import RemoteError, Result, encode_task
from .errors import (
    REMOTE_ERRORS,
    ActivityCancelledError,
    ActivityError,
    ActivityTimeoutError,
    ApplicationError,
    ConfigurationError,
    SessionqError,
)
from .faults import DEFAULT_UNAVAILABLE_TIMEOUT, describe, public, retrying
from .inbox import Inbox
from .keys import DEFAULT_PREFIX, QueueKeys, validate_name
from .options import ActivityOptions, SessionOptions
from .scripts import Scripts
from .wire import Wire

if TYPE_CHECKING:
    from .session import SessionOpener

log = logging.getLogger("sessionq")


def to_exception(error: RemoteError, name: str, activity_id: str) -> SessionqError:
    """The exception a caller sees for a failure the worker reported."""
    if error.kind == "ApplicationError":
        cause = ApplicationError(error.message, type=error.type, traceback=error.traceback)
        return ActivityError(
            f"activity {name!r} ({activity_id}) failed after {error.attempt} attempt(s): "
            f"{error.type}: {error.message}",
            activity_id=activity_id,
            activity_name=name,
            attempt=error.attempt,
            cause=cause,
        )
    if error.kind == "ActivityTimeoutError":
        return ActivityTimeoutError(error.message, timeout_type=error.timeout_type or "start_to_close")
    cls = REMOTE_ERRORS.get(error.kind, SessionqError)
    return cls(error.message)


class ActivityHandle:
    """A started activity; `await handle.result()` for its value or its error."""

    def __init__(
        self,
        *,
        activity_id: str,
        name: str,
        future: asyncio.Future[Any],
        inbox: Inbox,
        schedule_to_close: float | None,
        on_done: Callable[[str], None] | None = None,
        cancel: Callable[[], Any] | None = None,
    ) -> None:
        self.activity_id = activity_id
        self.name = name
        self._future = future
        self._inbox = inbox
        self._deadline = None if schedule_to_close is None else time.monotonic() + schedule_to_close
        self._on_done = on_done
        self._cancel = cancel

    def done(self) -> bool:
        return self._future.done()

    @public("waiting for an activity's result")
    async def result(self) -> Any:
        """The activity's return value; raises the sessionq error for any failure."""
        try:
            if self._deadline is None:
                message = await self._future
            else:
                message = await self._wait_until_deadline()
        finally:
            if self._on_done is not None and self._future.done():
                self._on_done(self.activity_id)
        assert isinstance(message, Result)
        if message.error is not None:
            raise to_exception(message.error, self.name, self.activity_id)
        return message.value

    async def _wait_until_deadline(self) -> Any:
        assert self._deadline is not None
        try:
            remaining = max(0.0, self._deadline - time.monotonic())
            return await asyncio.wait_for(asyncio.shield(self._future), remaining)
        except asyncio.TimeoutError:
            self._inbox.fail(self.activity_id, ActivityTimeoutError("", timeout_type="schedule_to_close"))
            raise ActivityTimeoutError(
                f"activity {self.name!r} ({self.activity_id}) did not finish within its "
                "schedule_to_close_timeout; raise the timeout or check the workers "
                "(sessionq inspect workers)",
                timeout_type="schedule_to_close",
            ) from None

    @public("cancelling an activity")
    async def cancel(self) -> None:
        """Ask the worker to cancel the activity; `result()` then raises ActivityCancelledError."""
        if self._cancel is not None and not self._future.done():
            await self._cancel()
        self._inbox.fail(
            self.activity_id, ActivityCancelledError(f"activity {self.name!r} was cancelled by its caller")
        )


class Client:
    """Sends activities to task queues and opens worker sessions.

    `redis` is a URL (default: SESSIONQ_REDIS_URL, REDIS_URL, then localhost) or a
    redis.asyncio.Redis whose connection settings are reused. `unavailable_timeout` is how
    long a call rides out Redis being unreachable or refusing commands (retrying, or waiting
    for its result) before it raises RedisUnavailableError.
    """

    def __init__(
        self,
        redis: Any = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        codec: Codec | None = None,
        identity: str | None = None,
        retention: float = 3600.0,
        unavailable_timeout: Duration = DEFAULT_UNAVAILABLE_TIMEOUT,
    ) -> None:
        validate_name("prefix", prefix)
        self.unavailable_timeout: float = seconds(  # type: ignore[assignment]
            "unavailable_timeout", unavailable_timeout, optional=False
        )
        self.redis = connect(resolve_url(redis) if redis is None or isinstance(redis, str) else redis)
        self.prefix = prefix
        self.codec = codec or default_codec
        self.client_id = uuid.uuid4().hex
        self.identity = identity or f"{os.getpid()}@{socket.gethostname()}"
        self.retention_ms = int(retention * 1000)
        self.wire = Wire(self.redis)
        self.scripts = Scripts(self.wire)
        self._inboxes: dict[str, Inbox] = {}
        self._closed = False
        self._background: set[asyncio.Task[Any]] = set()
        from .session import LivenessMonitor

        self.monitor = LivenessMonitor(self)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- plumbing shared with sessions --------------------------------------------------
    def keys(self, task_queue: str) -> QueueKeys:
        return QueueKeys(self.prefix, validate_name("task_queue", task_queue))

    def inbox(self, task_queue: str) -> Inbox:
        if self._closed:
            raise SessionqError("this Client was closed; create a new one")
        inbox = self._inboxes.get(task_queue)
        if inbox is None:
            key = self.keys(task_queue).inbox(self.client_id)
            inbox = Inbox(self.wire, self.scripts, key, self.codec, self.unavailable_timeout)
            self._inboxes[task_queue] = inbox
        return inbox

    @staticmethod
    def resolve_options(base: ActivityOptions | None, options: dict[str, Any]) -> ActivityOptions:
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
        activity_id = uuid.uuid4().hex
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
        still owes: leaving a waiting line, giving a slot back). Retried for a minute."""

        async def settle() -> None:
            try:
                await retrying(call, within=60.0, what=what)
            except Exception as exc:
                log.error("%s failed for good (%s); Redis' timeouts will clean up", what, describe(exc))

        task = asyncio.ensure_future(settle())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- plain activities -------------------------------------------------------------
    @public("starting an activity")
    async def start_activity(
        self,
        activity: Any,
        *args: Any,
        task_queue: str | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> ActivityHandle:
        """Queue an activity on the task queue's shared stream; any worker may run it."""
        opts = self.resolve_options(None, options)
        queue = task_queue or opts.task_queue
        if not queue:
            raise ConfigurationError("task_queue", "is required: pass task_queue='...'")
        keys = self.keys(queue)
        activity_id, name, payload = self.prepare(activity, args, kwargs, opts, queue, None)
        inbox = self.inbox(queue)
        future = await inbox.expect(activity_id)
        try:
            await self.retrying(
                lambda: self.wire.execute(keys.tasks, "XADD", keys.tasks, "*", "d", payload),
                what="queueing an activity",
            )
        except BaseException:
            inbox.forget(activity_id)
            raise
        return ActivityHandle(
            activity_id=activity_id,
            name=name,
            future=future,
            inbox=inbox,
            schedule_to_close=opts.schedule_to_close_timeout,  # type: ignore[arg-type]
            cancel=lambda: self._broadcast_cancel(keys, activity_id),
        )

    @public("running an activity")
    async def execute_activity(
        self,
        activity: Any,
        *args: Any,
        task_queue: str | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        """Run an activity on any worker of the task queue and return its result."""
        handle = await self.start_activity(activity, *args, task_queue=task_queue, kwargs=kwargs, **options)
        try:
            return await handle.result()
        except asyncio.CancelledError:
            await asyncio.shield(handle.cancel())
            raise

    async def _broadcast_cancel(self, keys: QueueKeys, activity_id: str) -> None:
        """A plain activity may run on any worker: ask every registered one to cancel it."""

        async def broadcast() -> None:
            workers = await self.redis.smembers(keys.workers)
            async with self.redis.pipeline(transaction=False) as pipe:
                for w in workers:
                    pipe.xadd(keys.stream(w.decode()), {"t": "x", "i": activity_id}, nomkstream=True)
                await pipe.execute()

        await self.retrying(broadcast, what="cancelling an activity")

    # -- sessions -----------------------------------------------------------------------
    def create_session(self, task_queue: str, options: SessionOptions | None = None) -> SessionOpener:
        """Reserve a slot on one worker of `task_queue`; use with `await` or `async with`."""
        from .session import SessionOpener

        return SessionOpener(self, task_queue, options or SessionOptions(), token=None)

    def recreate_session(self, token: bytes, options: SessionOptions | None = None) -> SessionOpener:
        """Open a new session on the same worker as the session that gave `token`."""
        from .session import SessionOpener
        from .session_info import decode_token

        parsed = decode_token(token)
        if parsed.prefix != self.prefix:
            raise ConfigurationError(
                "recreate_token", f"was made with prefix {parsed.prefix!r}, this client uses {self.prefix!r}"
            )
        return SessionOpener(self, parsed.task_queue, options or SessionOptions(), token=parsed)

    # -- lifecycle ----------------------------------------------------------------------
    @public("closing a Client")
    async def close(self) -> None:
        """Stop reading results, delete this client's inboxes and close the Redis connections."""
        if self._closed:
            return
        self._closed = True
        if self._background:  # cleanup still owed to Redis: give it a moment
            await asyncio.wait(self._background, timeout=5.0)
            for task in self._background:
                task.cancel()
        await self.monitor.close()
        for inbox in self._inboxes.values():
            await inbox.close(SessionqError("the Client was closed while this call was waiting"))
        await self.wire.aclose()
        await self.redis.aclose()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
