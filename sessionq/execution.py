"""Running one activity on a worker: context, timeouts, retries, cancellation, the reply.

Each execution runs in its own asyncio task. Cancelling it from outside (session
completed, caller cancelled, timeout) goes through `Execution.cancel(kind, reason)`:
an async activity receives CancelledError, a plain-def one sees `is_cancelled()` turn
true (and `heartbeat()` raise), and the caller is answered at once either way.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

from . import activity_log
from .activity import ActivityDefinition, ActivityInfo, _current, _RunningActivity
from .codec import Codec
from .envelope import RemoteError, Task, clean_text, encode_error, encode_outcome
from .errors import ApplicationError
from .options import DEFAULT_RETRY_POLICY

log = logging.getLogger("sessionq")

# Why an execution was cancelled -> the error its caller gets.
CANCEL_ERRORS = {
    "cancelled": "ActivityCancelledError",
    "session_completed": "ActivityCancelledError",
    "session_failed": "SessionFailedError",
    "shutdown": "ActivityCancelledError",
    "start_to_close": "ActivityTimeoutError",
    "heartbeat": "ActivityTimeoutError",
}


class Execution:
    """One activity execution (all of its attempts) on this worker."""

    def __init__(self, task: Task, running: _RunningActivity) -> None:
        self.task = task
        self.running = running
        self.cancel_kind: str | None = None
        self.cancel_reason = ""
        self.asyncio_task: asyncio.Task[Any] | None = None
        self.threads: list[Future[Any]] = []
        """Calls of a plain-def activity in their threads; one that ignores its cancellation
        runs on after the execution ended, and holds its activity slot until it returns."""

    def cancel(self, kind: str, reason: str) -> None:
        """Stop the execution; the caller is told `kind` (see CANCEL_ERRORS)."""
        if self.cancel_kind is not None:
            return
        self.cancel_kind = kind
        self.cancel_reason = reason
        self.running.cancel_reason = reason
        self.running.cancelled.set()
        if self.asyncio_task is not None and not self.asyncio_task.done():
            self.asyncio_task.cancel()


Reply = tuple[bytes, "RemoteError | None"]
"""The inbox message for the caller, and the error it carries (None: the activity's result)."""


def failed(codec: Codec, activity_id: str, error: RemoteError) -> Reply:
    return encode_error(codec, activity_id, error), error


def cancelled_reply(codec: Codec, execution: Execution) -> Reply:
    """The caller's answer for an execution cancelled for `execution.cancel_kind`."""
    kind = execution.cancel_kind or "cancelled"
    error = RemoteError(
        CANCEL_ERRORS[kind], "", execution.cancel_reason, attempt=execution.task.attempt, timeout_type=kind
    )
    return failed(codec, execution.task.activity_id, error)


def application_error(exc: BaseException, attempt: int) -> RemoteError:
    """The report of an exception an activity raised. An ApplicationError raised on purpose
    keeps its own `type` and `non_retryable` (as in the Temporal SDKs); any other exception
    is named by its class. Never raises, whatever `str()` of the exception does."""
    if isinstance(exc, ApplicationError):
        name, message, non_retryable = exc.type, exc.message, exc.non_retryable
    else:
        kind = type(exc)
        name = (
            kind.__qualname__
            if kind.__module__ in ("builtins", "__main__")
            else f"{kind.__module__}.{kind.__qualname__}"
        )
        message, non_retryable = _text_of(exc), False
    frames = exc.__traceback__
    while frames is not None and _calls_activities(frames.tb_frame.f_globals.get("__name__", "")):
        frames = frames.tb_next  # the frames that called the activity: noise to its author
    try:
        text = "".join(traceback.format_exception(type(exc), exc, frames))
    except Exception as broken:
        text = f"(the traceback could not be formatted: {broken!r})"
    return RemoteError("ApplicationError", name, message, text, attempt, non_retryable=non_retryable)


def _calls_activities(module: str) -> bool:
    """Whether a frame of `module` is machinery between the worker and an activity: this
    module, the thread a plain `def` runs on, asyncio's and concurrent.futures' plumbing."""
    return module in (__name__, "sessionq.threads") or module.startswith(("asyncio.", "concurrent.futures."))


def _text_of(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception as broken:
        return f"<{type(exc).__qualname__} whose str() raised {type(broken).__qualname__}: {broken}>"


async def execute(
    execution: Execution,
    definition: ActivityDefinition,
    codec: Codec,
    pool: Executor,
    redis_now_ms: Callable[[], float],
) -> Reply:
    """Run all attempts of the execution; the inbox message for its caller, and its error."""
    task, running = execution.task, execution.running
    policy = task.retry_policy or DEFAULT_RETRY_POLICY
    give_up_at = None if task.schedule_to_close is None else task.enqueued_ms + task.schedule_to_close * 1000
    loop = asyncio.get_running_loop()
    while True:
        timer = None
        attempt_began = time.perf_counter()
        if task.start_to_close is not None:
            timer = loop.call_later(
                task.start_to_close,
                execution.cancel,
                "start_to_close",
                f"activity {task.name!r} exceeded start_to_close_timeout={task.start_to_close:g}s",
            )
        try:
            try:
                value = await _invoke(definition, task, running, pool, execution)
            except asyncio.CancelledError as cancelled:
                if execution.cancel_kind is None and not _cancelled_from_outside():
                    raise _RaisedByActivity(cancelled) from cancelled  # the activity's own doing
                raise
            return encode_outcome(codec, task.activity_id, value, task.name)
        except asyncio.CancelledError:
            if execution.cancel_kind in (None, "shutdown"):
                raise  # the worker itself is going away
            error = RemoteError(
                CANCEL_ERRORS[execution.cancel_kind],
                "",
                execution.cancel_reason,
                attempt=task.attempt,
                timeout_type=execution.cancel_kind,
            )
            if error.kind != "ActivityTimeoutError" or not _may_retry(
                task, policy, error.type, give_up_at, redis_now_ms
            ):
                return failed(codec, task.activity_id, error)
            execution.cancel_kind = None
            _consumed_cancellation()  # the timer's cancel is handled: it must not count later
            # The attempt that timed out may still run in its thread (a def activity that never
            # looks at is_cancelled()): the retry waits for it, so the two never run at once.
            await _threads_done(execution, task)
            # A fresh state for the retry: the old attempt's thread must keep seeing
            # is_cancelled() (clearing a shared flag revived it).
            execution.running = running = _RunningActivity(running.info)
            why = f"timed out ({clean_text(error.message, 500)})"
            activity_log.retrying(
                running.info, time.perf_counter() - attempt_began, why, policy.delay_before(task.attempt + 1)
            )
        except BaseException as raised:  # SystemExit, KeyboardInterrupt...: they fail it, never the worker
            exc = raised.cancelled if isinstance(raised, _RaisedByActivity) else raised
            if execution.cancel_kind is not None:  # a sync activity noticed cancellation and raised
                return cancelled_reply(codec, execution)
            error = application_error(exc, task.attempt)
            short_type = error.type.rsplit(".", 1)[-1]
            if error.non_retryable or not _may_retry(task, policy, short_type, give_up_at, redis_now_ms):
                return failed(codec, task.activity_id, error)
            why = f"failed ({error.type}: {clean_text(error.message, 500)})"
            activity_log.retrying(
                running.info, time.perf_counter() - attempt_began, why, policy.delay_before(task.attempt + 1)
            )
        finally:
            if timer is not None:
                timer.cancel()
        try:
            await asyncio.sleep(policy.delay_before(task.attempt + 1))
        except asyncio.CancelledError:
            if execution.cancel_kind is None:
                raise
            return cancelled_reply(codec, execution)
        task.attempt += 1
        running.info = _with_attempt(running.info, task.attempt)
        running.last_heartbeat = time.monotonic()


class _RaisedByActivity(Exception):
    """A CancelledError the activity raised itself (nobody cancelled it): it fails the
    activity like any other exception, instead of passing for the worker going away."""

    def __init__(self, cancelled: asyncio.CancelledError) -> None:
        super().__init__("the activity raised CancelledError itself")
        self.cancelled = cancelled


def cancel_requests(task: asyncio.Task[Any] | None) -> int:
    """How many cancellations of `task` are pending (Python 3.11+ can tell; 0 on 3.10)."""
    cancelling = getattr(task, "cancelling", None)
    return int(cancelling()) if cancelling is not None else 0


def _cancelled_from_outside() -> bool:
    """Whether the running task itself is being cancelled."""
    return cancel_requests(asyncio.current_task()) > 0


def _consumed_cancellation() -> None:
    """A cancellation of the running task was caught and acted on (a timed-out attempt is
    retried): take it off the task's count, as asyncio.timeout does, so a CancelledError the
    next attempt raises itself is not mistaken for a cancellation from outside."""
    task = asyncio.current_task()
    uncancel = getattr(task, "uncancel", None)
    if uncancel is not None and cancel_requests(task):
        uncancel()


async def _threads_done(execution: Execution, task: Task) -> None:
    lingering = [call for call in execution.threads if not call.done()]
    if lingering:
        log.warning(
            "activity %s (%s): attempt %d timed out but its thread runs on; the retry waits for it",
            task.name, task.activity_id, task.attempt,
        )  # fmt: skip
        await asyncio.wait([asyncio.wrap_future(call) for call in lingering])


def _may_retry(
    task: Task, policy: Any, error_type: str, give_up_at: float | None, now: Callable[[], float]
) -> bool:
    if not policy.allows(task.attempt, error_type):
        return False
    return give_up_at is None or now() + policy.delay_before(task.attempt + 1) * 1000 < give_up_at


def _with_attempt(info: ActivityInfo, attempt: int) -> ActivityInfo:
    return ActivityInfo(
        info.activity_id,
        info.name,
        attempt,
        info.task_queue,
        info.worker_id,
        info.session,
        info.heartbeat_timeout,
    )


async def _invoke(
    definition: ActivityDefinition,
    task: Task,
    running: _RunningActivity,
    pool: Executor,
    execution: Execution,
) -> Any:
    """Call the activity function once, with its info available to the code it runs."""
    token = _current.set(running)
    try:
        if definition.is_async:
            running.task = asyncio.current_task()
            return await definition.fn(*task.args, **task.kwargs)
        running.task = None
        context = contextvars.copy_context()
        thread_call = pool.submit(context.run, definition.fn, *task.args, **task.kwargs)
        execution.threads.append(thread_call)
        return await asyncio.wrap_future(thread_call)
    finally:
        _current.reset(token)
