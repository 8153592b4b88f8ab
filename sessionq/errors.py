"""Every error sessionq raises. Each message says what happened and what to do next."""

from __future__ import annotations


class SessionqError(Exception):
    """Base class of every sessionq error, so callers can catch them all at once."""


class ConfigurationError(SessionqError, ValueError):
    """An option is invalid; `field` names it. Raised before anything touches Redis."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class SerializationError(SessionqError, ValueError):
    """An argument or result cannot be encoded, or is over the size limit.

    Raised before anything is written to Redis, so nothing is half-sent.
    """


class SessionCreationTimeoutError(SessionqError, TimeoutError):
    """No worker could take the session within `creation_timeout`."""


class SessionFailedError(SessionqError):
    """The session's worker died or the session's execution timeout passed."""

    def __init__(self, message: str, session_id: str | None = None) -> None:
        super().__init__(message)
        self.session_id = session_id


class SessionAlreadyOpenError(SessionqError):
    """create_session was called inside a context that already holds an open session."""


class SessionCompletedError(SessionqError):
    """execute_activity was called on a session that was already completed."""


class ApplicationError(SessionqError):
    """The error an activity raised on the worker, carried back to the caller.

    `type` is the remote exception's qualified type name, `message` its text and
    `traceback` the remote traceback as text (it cannot be re-raised locally).
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
        self.type = type
        self.traceback = traceback
        self.non_retryable = non_retryable


class ActivityError(SessionqError):
    """An activity failed after its retries; `cause` is the remote ApplicationError."""

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
        self.activity_name = activity_name
        self.attempt = attempt
        self.cause = cause
        self.__cause__ = cause


class ActivityTimeoutError(SessionqError, TimeoutError):
    """A start-to-close, schedule-to-close, schedule-to-start or heartbeat timeout passed.

    `timeout_type` says which one.
    """

    def __init__(self, message: str, *, timeout_type: str = "start_to_close") -> None:
        super().__init__(message)
        self.timeout_type = timeout_type


class ActivityCancelledError(SessionqError):
    """The activity was cancelled: its session was completed, or the caller cancelled it."""


class ActivityNotRegisteredError(SessionqError, LookupError):
    """No worker on the task queue knows that activity name (reported by the worker)."""


class RedisUnavailableError(SessionqError, ConnectionError):
    """Redis could not be reached after bounded retries."""


class RedisDataLostError(SessionqError):
    """Redis lost state a call depended on: it restarted without persistence, failed over
    to a replica that lagged behind, or keys were deleted. Raised instead of waiting for a
    message that can no longer come; the activity may or may not have run."""


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
