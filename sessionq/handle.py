"""A started activity, as its caller holds it: wait for its result, or cancel it.

Shared by plain activities (client.py) and session activities (session.py); a failure the
worker reports becomes the sessionq error the caller sees here (`to_exception`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic

from .calls import R_co
from .envelope import RemoteError, Result
from .errors import (
    REMOTE_ERRORS,
    ActivityCancelledError,
    ActivityError,
    ActivityTimeoutError,
    ApplicationError,
    SessionqError,
)
from .faults import public

if TYPE_CHECKING:
    from .inbox import Inbox


def to_exception(error: RemoteError, name: str, activity_id: str) -> SessionqError:
    """The exception a caller sees for a failure the worker reported."""
    if error.kind == "ApplicationError":
        cause = ApplicationError(
            error.message, type=error.type, traceback=error.traceback, non_retryable=error.non_retryable
        )
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


class ActivityHandle(Generic[R_co]):
    """A started activity; `await handle.result()` for its value or its error (typed as
    the activity's return value when it was started with the decorated function)."""

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
        """The activity execution's id (retries keep it): in the worker's logs, and in
        ``sessionq inspect``."""
        self.name = name
        """The activity's registered name."""
        self._future = future
        self._inbox = inbox
        self._deadline = None if schedule_to_close is None else time.monotonic() + schedule_to_close
        self._on_done = on_done
        self._cancel = cancel

    def done(self) -> bool:
        """Whether the activity's outcome has arrived (``result()`` would not wait)."""
        return self._future.done()

    @public("waiting for an activity's result")
    async def result(self) -> R_co:
        """Wait for the activity and return what it returned.

        Raises:
            ActivityError: the activity raised, after the retry policy's attempts.
            ActivityTimeoutError: a timeout passed (``timeout_type`` says which).
            ActivityCancelledError: it was cancelled.
            ActivityNotRegisteredError: the worker that took it does not have it.
            SessionFailedError: its session failed (a session activity).
            RedisUnavailableError: Redis stayed unreachable for ``unavailable_timeout``.
            RedisDataLostError: Redis lost the task or its result.
        """
        return await self.outcome()

    async def outcome(self) -> R_co:
        """result() without the public-API wrapper, for callers that already have one."""
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
        value: R_co = message.value  # decoded by the codec: the activity's return type, we trust
        return value

    async def _wait_until_deadline(self) -> Any:
        assert self._deadline is not None
        try:
            remaining = max(0.0, self._deadline - time.monotonic())
            return await asyncio.wait_for(asyncio.shield(self._future), remaining)
        except asyncio.TimeoutError:
            self._inbox.fail(self.activity_id, ActivityTimeoutError("", timeout_type="schedule_to_close"))
            if self._on_done is not None:
                self._on_done(self.activity_id)
            raise ActivityTimeoutError(
                f"activity {self.name!r} ({self.activity_id}) did not finish within its "
                "schedule_to_close_timeout; raise the timeout or check the workers "
                "(sessionq inspect workers)",
                timeout_type="schedule_to_close",
            ) from None

    @public("cancelling an activity")
    async def cancel(self) -> None:
        """Ask the worker to cancel the activity; `result()` then raises ActivityCancelledError.
        (A future cancelled with the task that awaited it was not answered: the worker is told.)"""
        if self._cancel is not None and (not self._future.done() or self._future.cancelled()):
            await self._cancel()
        if self._on_done is not None:
            self._on_done(self.activity_id)  # settled here: the session no longer waits for it
        self._inbox.fail(
            self.activity_id, ActivityCancelledError(f"activity {self.name!r} was cancelled by its caller")
        )
