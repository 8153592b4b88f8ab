"""Every error sessionq raises. Each message says what happened and what to do next."""

from __future__ import annotations


class SessionqError(Exception):
    """Base class of every sessionq error, so callers can catch them all at once: no
    redis-py or builtin exception leaves the public API."""


class ConfigurationError(SessionqError, ValueError):
    """An option or argument is invalid; `field` names it. Raised where the value is given,
    before anything is written to Redis: fix the value. ``Worker.run()`` raises it too when
    another live worker has its identity or the host's processes disagree on its settings,
    and SyncClient when called from a running event loop."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        """The option at fault, e.g. "retry_policy.maximum_attempts"."""


class SerializationError(SessionqError, ValueError):
    """An argument or result cannot be encoded, or is over the size limit.

    Raised before anything is written to Redis, so nothing is half-sent; also to a caller
    whose message a worker could not read (it is moved to the queue's ``dead`` stream).
    Pass msgpack types, teach the Codec the type (the same on every process), or pass large
    data by reference.
    """


class SessionCreationTimeoutError(SessionqError, TimeoutError):
    """No worker could take the session within `creation_timeout`; the message says why
    (all full, no session worker polls the queue, a resource nobody offers). Start more
    workers, raise their session limit or `creation_timeout`, or complete sessions sooner."""


class SessionFailedError(SessionqError):
    """The session ended without its caller: its worker died or stopped, its execution
    timeout passed, its owner went away, or Redis lost its record; also raised by
    `recreate_session` when the token's worker is gone.

    An activity in flight when it failed may or may not have run. Open a new session to go
    on (its worker's local files may be gone with it).
    """

    def __init__(self, message: str, session_id: str | None = None) -> None:
        super().__init__(message)
        self.session_id = session_id
        """The session that failed, when known."""


class SessionAlreadyOpenError(SessionqError):
    """create_session was called inside a context that already holds an open session (a
    task started inside ``async with session`` inherits it). Complete that session first,
    or create the new one outside its block; ``await client.create_session(...)`` without
    ``with`` leaves the context alone, so one caller may hold many sessions."""


class SessionCompletedError(SessionqError):
    """execute_activity was called on a session that was already completed; it never runs
    elsewhere. Create a new session to run more activities."""


class ApplicationError(SessionqError):
    """The error an activity raised on the worker, carried back to the caller as
    `ActivityError.cause`.

    An activity may raise one itself to choose the `type` its caller sees and to fail at
    once with ``non_retryable=True`` (as in the Temporal SDKs); any other exception is
    reported as one named after its class.

    Args:
        message: what went wrong.
        type: the type name the caller sees (default "Exception").
        traceback: the remote traceback as text (filled in by sessionq).
        non_retryable: fail the activity at once, whatever its retry policy allows.
    """

    def __init__(
        self,
        message: str,
        *,
        type: str = "Exception",
        traceback: str = "",
        non_retryable: bool = False,
    ) -> None:
        super().__init__(f"{type}: {message}" if message else type)
        self.message = message
        """The remote exception's text."""
        self.type = type
        """The remote exception's type name: bare for a builtin or a class of ``__main__``
        ("ValueError"), else qualified by its module ("myapp.errors.Invalid"), or the `type`
        an ApplicationError was raised with; "sessionq.WorkerLost" when the worker died with
        no attempt left."""
        self.traceback = traceback
        """The remote traceback as text (it cannot be re-raised locally)."""
        self.non_retryable = non_retryable
        """Whether it was raised as not to be retried."""


class ActivityError(SessionqError):
    """An activity raised, after the attempts its retry policy allows; `cause` is the
    remote ApplicationError (type, message, traceback). Fix the activity or its input;
    ``RetryPolicy.non_retryable_error_types`` stops retries that cannot help."""

    def __init__(
        self,
        message: str,
        *,
        activity_id: str,
        activity_name: str,
        attempt: int,
        cause: ApplicationError,
    ) -> None:
        super().__init__(message)
        self.activity_id = activity_id
        """The execution's id (``handle.activity_id``, ``activity_info().activity_id``)."""
        self.activity_name = activity_name
        """The activity's registered name."""
        self.attempt = attempt
        """The attempt that failed last (1 = the first)."""
        self.cause = cause
        """The remote error: its type name, message and traceback text."""
        self.__cause__ = cause


class ActivityTimeoutError(SessionqError, TimeoutError):
    """A start-to-close, schedule-to-close, schedule-to-start or heartbeat timeout passed.

    `timeout_type` says which one. Start-to-close and heartbeat timeouts were retried first,
    as the retry policy allows. Raise the timeout, heartbeat more often, or look at the
    workers (``sessionq inspect workers``).
    """

    def __init__(self, message: str, *, timeout_type: str = "start_to_close") -> None:
        super().__init__(message)
        self.timeout_type = timeout_type
        """ "start_to_close", "schedule_to_close", "schedule_to_start" or "heartbeat"."""


class ActivityCancelledError(SessionqError):
    """The activity was cancelled: its session was completed, or the caller cancelled it
    (``handle.cancel()``, or the task awaiting it was cancelled). Inside a plain ``def``
    activity, `heartbeat()` raises it once the activity is cancelled, so the code stops."""


class ActivityNotRegisteredError(SessionqError, LookupError):
    """The worker that took the activity has none of that name (it reports so, and lists
    what it has). Register it in ``Worker(activities=[...])`` on every worker of the task
    queue, or fix the name."""


class RedisUnavailableError(SessionqError, ConnectionError):
    """Redis could not be reached, or refused commands (LOADING, READONLY, OOM...), for the
    call's ``unavailable_timeout``; the message names the cause. The call may still have
    taken effect (an activity may run): retry it if that is safe. The same client works
    again once Redis is back."""


class RedisDataLostError(SessionqError):
    """Redis lost state a call depended on: it restarted without persistence, failed over
    to a replica that lagged behind, or keys were deleted. Raised instead of waiting for a
    message that can no longer come; the activity may or may not have run, so send it
    again if running it twice is safe."""


class ConnectionPoolExhaustedError(SessionqError):
    """No longer raised: sessionq's commands take no connection from a pool (see the
    README's "Connections"). Kept so that code catching it still imports."""


#: Error types a worker may send back by name; the caller re-raises the same class.
REMOTE_ERRORS: dict[str, type[SessionqError]] = {
    cls.__name__: cls
    for cls in (
        SessionFailedError,
        SessionCompletedError,
        ActivityTimeoutError,
        ActivityCancelledError,
        ActivityNotRegisteredError,
        SerializationError,
    )
}
