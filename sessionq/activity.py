"""Defining activities, and what a running activity can ask: its info, heartbeat, cancellation."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from .errors import ActivityCancelledError, ConfigurationError
from .session_info import SessionInfo, current_session

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class ActivityDefinition:
    """A registered activity: its name, the function, and whether it is a coroutine."""

    name: str
    fn: Callable[..., Any]
    is_async: bool


@overload
def activity(fn: F) -> F: ...
@overload
def activity(*, name: str | None = None) -> Callable[[F], F]: ...


def activity(fn: Any = None, *, name: str | None = None) -> Any:
    """Mark a function as an activity. `async def` runs on the worker's event loop, a plain
    `def` in the worker's thread pool. The function stays callable as before.

    Use bare (``@sessionq.activity``) or called (``@sessionq.activity(name="process")``).

    Args:
        fn: the function, when used bare.
        name: the name callers send and workers register it under (default: the function's
            ``__name__``); callers may pass the name instead of the function, so a caller
            need not import the worker's code.
    """

    def mark(func: F) -> F:
        if not callable(func):
            raise ConfigurationError("activity", f"expected a function, got {func!r}")
        activity_name = name or getattr(func, "__name__", None)
        if not activity_name or not isinstance(activity_name, str):
            raise ConfigurationError("name", "an activity needs a name; pass name='...'")
        func.__sessionq_activity__ = ActivityDefinition(  # type: ignore[attr-defined]
            activity_name, func, inspect.iscoroutinefunction(func)
        )
        return func

    if fn is not None:
        return mark(fn)
    return mark


def definition_of(fn: Any) -> ActivityDefinition:
    """The definition of a decorated function (plain functions are accepted too)."""
    found = getattr(fn, "__sessionq_activity__", None)
    if isinstance(found, ActivityDefinition):
        return found
    if callable(fn) and getattr(fn, "__name__", None):
        return ActivityDefinition(fn.__name__, fn, inspect.iscoroutinefunction(fn))
    raise ConfigurationError("activities", f"{fn!r} is not an activity function")


def name_of(fn_or_name: Any) -> str:
    """The activity name to send: a str as is, or the decorated function's name."""
    if isinstance(fn_or_name, str):
        if not fn_or_name:
            raise ConfigurationError("activity", "the activity name must not be empty")
        return fn_or_name
    return definition_of(fn_or_name).name


@dataclass(frozen=True)
class ActivityInfo:
    """What a running activity knows about itself: ``sessionq.activity_info()``."""

    activity_id: str
    """Id of this activity execution, the same across its attempts (the caller's
    ``handle.activity_id``): a key for making a rerun idempotent."""
    name: str
    """The name it was sent and registered under."""
    attempt: int
    """1 for the first attempt, 2 for the first retry, and so on (an attempt cut short by its
    worker's death counts too)."""
    task_queue: str
    """The task queue of the worker running it."""
    worker_id: str
    """Identity of the worker process running it (in a host session: this process)."""
    session: SessionInfo | None = None
    """The session it runs in, or None for a plain activity."""
    heartbeat_timeout: float | None = None
    """Its ``heartbeat_timeout`` in seconds, or None: when set, call ``sessionq.heartbeat()``
    more often than this or the attempt is cancelled."""


@dataclass
class _RunningActivity:
    """Per-execution state the worker shares with the activity's code."""

    info: ActivityInfo
    cancelled: threading.Event = field(default_factory=threading.Event)
    last_heartbeat: float = field(default_factory=time.monotonic)
    task: asyncio.Task[Any] | None = None
    cancel_reason: str = ""


_current: ContextVar[_RunningActivity | None] = ContextVar("sessionq_activity", default=None)


def _running(what: str) -> _RunningActivity:
    running = _current.get()
    if running is None:
        raise RuntimeError(f"sessionq.{what}() can only be called inside a running activity")
    return running


def activity_info() -> ActivityInfo:
    """Info of the activity running in this context; RuntimeError outside activities."""
    return _running("activity_info").info


def heartbeat(details: Any = None) -> None:
    """Tell the worker this activity is alive (needed when it has a heartbeat_timeout).

    In a plain-def activity that was cancelled, raises ActivityCancelledError so the
    code stops at its next heartbeat. `details` is accepted for parity with Temporal's
    heartbeat and not recorded: a retried attempt starts from its arguments.
    """
    running = _running("heartbeat")
    running.last_heartbeat = time.monotonic()
    if running.cancelled.is_set() and running.task is None:
        raise ActivityCancelledError(running.cancel_reason or "activity was cancelled")


def is_cancelled() -> bool:
    """True once the activity was cancelled (session completed or failed, caller cancelled)."""
    return _running("is_cancelled").cancelled.is_set()


def get_session_info() -> SessionInfo | None:
    """The current session: inside an activity of a session, or inside `async with session`
    on the caller side; None elsewhere."""
    running = _current.get()
    if running is not None:
        return running.info.session
    return current_session.get()
