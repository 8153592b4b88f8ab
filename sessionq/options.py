"""Public option types: frozen dataclasses, validated when built, one docstring per field."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from . import resources
from .durations import Duration, seconds
from .errors import ConfigurationError
from .keys import validate_name


@dataclass(frozen=True)
class RetryPolicy:
    """How a failed activity is retried. The default retries 3 times in all, with backoff."""

    initial_interval: Duration = 1.0
    """Wait before the first retry."""
    backoff_coefficient: float = 2.0
    """Each further wait is the previous one times this (at least 1)."""
    maximum_interval: Duration | None = None
    """Cap on a single wait; default 100 x initial_interval."""
    maximum_attempts: int = 3
    """Attempts in all, the first included; 1 means no retry, 0 means unlimited."""
    non_retryable_error_types: Sequence[str] = ()
    """Exception type names (e.g. "ValueError") that fail the activity at once."""

    def __post_init__(self) -> None:
        initial = seconds("retry_policy.initial_interval", self.initial_interval, optional=False)
        object.__setattr__(self, "initial_interval", initial)
        maximum = seconds("retry_policy.maximum_interval", self.maximum_interval)
        object.__setattr__(self, "maximum_interval", maximum)
        coefficient = self.backoff_coefficient
        if isinstance(coefficient, bool) or not isinstance(coefficient, (int, float)) or coefficient < 1:
            raise ConfigurationError(
                "retry_policy.backoff_coefficient", f"must be a number >= 1, got {coefficient!r}"
            )
        attempts = self.maximum_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
            raise ConfigurationError(
                "retry_policy.maximum_attempts",
                f"must be an int >= 0 (0 = unlimited), got {attempts!r}",
            )
        if isinstance(self.non_retryable_error_types, str):
            raise ConfigurationError(
                "retry_policy.non_retryable_error_types", "must be a list of type names, not a str"
            )
        object.__setattr__(self, "non_retryable_error_types", tuple(self.non_retryable_error_types))

    def delay_before(self, attempt: int) -> float:
        """The wait before running `attempt` (2 = the first retry)."""
        assert isinstance(self.initial_interval, float)  # __post_init__ made both seconds
        assert self.maximum_interval is None or isinstance(self.maximum_interval, float)
        cap = self.maximum_interval or self.initial_interval * 100
        return float(min(cap, self.initial_interval * self.backoff_coefficient ** max(0, attempt - 2)))

    def allows(self, attempt: int, error_type: str) -> bool:
        """Whether `attempt` (which just failed with `error_type`) may be followed by another."""
        if error_type in self.non_retryable_error_types:
            return False
        return self.maximum_attempts == 0 or attempt < self.maximum_attempts

    def to_wire(self) -> list[Any]:
        return [
            self.initial_interval,
            self.backoff_coefficient,
            self.maximum_interval,
            self.maximum_attempts,
            list(self.non_retryable_error_types),
        ]

    @classmethod
    def from_wire(cls, data: list[Any]) -> RetryPolicy:
        """A policy read from a task; raises ConfigurationError (a ValueError) if malformed."""
        if len(data) != 5 or not isinstance(data[4], list):
            raise ConfigurationError("retry_policy", f"malformed on the wire: {data!r}")
        return cls(data[0], data[1], data[2], data[3], tuple(data[4]))


@dataclass(frozen=True)
class ActivityOptions:
    """How one activity execution is scheduled, timed and retried."""

    task_queue: str | None = None
    """The task queue to send it to (sessions fill this in)."""
    start_to_close_timeout: Duration | None = None
    """Longest a single attempt may run on a worker; None = no limit."""
    schedule_to_close_timeout: Duration | None = None
    """Longest the caller waits in all, across queueing and every retry; None = no limit."""
    schedule_to_start_timeout: Duration | None = None
    """Longest the activity may wait in the queue before a worker starts it."""
    heartbeat_timeout: Duration | None = None
    """If set, the activity must call heartbeat() at least this often or it times out."""
    retry_policy: RetryPolicy | None = None
    """Retries of a failed attempt; default RetryPolicy()."""

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name.endswith("_timeout"):
                object.__setattr__(self, f.name, seconds(f.name, getattr(self, f.name)))
        if self.retry_policy is not None and not isinstance(self.retry_policy, RetryPolicy):
            raise ConfigurationError("retry_policy", "must be a sessionq.RetryPolicy")
        if self.task_queue is not None:
            validate_name("task_queue", self.task_queue)

    def merged(self, **overrides: Any) -> ActivityOptions:
        """A copy with the given non-None keyword options applied (validated again)."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigurationError(
                sorted(unknown)[0], f"is not an activity option; known: {', '.join(sorted(known))}"
            )
        changes = {k: v for k, v in overrides.items() if v is not None}
        return replace(self, **changes) if changes else self


DEFAULT_RETRY_POLICY = RetryPolicy()


@dataclass(frozen=True)
class SessionOptions:
    """How long to wait for a session slot, and how long a session may live."""

    creation_timeout: Duration = 60.0
    """Longest create_session/recreate_session waits for a worker with a free slot."""
    execution_timeout: Duration = 3600.0
    """Longest the session may stay open; after it the session fails and its slot frees,
    even if the caller's process has vanished."""
    activity_options: ActivityOptions = field(default_factory=ActivityOptions)
    """Defaults for activities run through the session (task_queue is the session's)."""
    owner_timeout: Duration | None = 60.0
    """The owner lease: while the session is open its client renews a lease (one per client,
    not per session); if the client stays silent this long (it crashed, or was killed), the
    session fails with "its owner went away" and its slot frees within owner_timeout plus
    one heartbeat interval of its worker. None: no lease (the execution timeout still holds)."""
    resources: Mapping[str, int] | None = field(default=None, hash=False)  # a dict: left out of hash()
    """Session resources the session takes on its worker, e.g. {"gpu": 1, "scratch_gb": 100}:
    it is placed only on a worker (host) whose free capacity (Worker(session_resources=...))
    covers every amount, and gives them back when it ends. None: none (for recreate_session:
    the same as the session that gave the token)."""

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "creation_timeout",
            seconds("creation_timeout", self.creation_timeout, optional=False),
        )
        object.__setattr__(
            self,
            "execution_timeout",
            seconds("execution_timeout", self.execution_timeout, optional=False),
        )
        object.__setattr__(self, "owner_timeout", seconds("owner_timeout", self.owner_timeout))
        if self.resources is not None:
            object.__setattr__(self, "resources", resources.validate("resources", self.resources))
        if not isinstance(self.activity_options, ActivityOptions):
            raise ConfigurationError("activity_options", "must be a sessionq.ActivityOptions")
