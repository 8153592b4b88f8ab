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
    """How a failed activity attempt is retried, on the worker that ran it (for a session
    activity: the session's worker; for a plain one, a retry after its worker died may run
    on another).

    The default, ``RetryPolicy()``, makes 3 attempts in all, 1 s then 2 s apart. An attempt
    that raised, or passed its ``start_to_close_timeout`` or ``heartbeat_timeout``, is
    retried while attempts are left and the next one would begin before the activity's
    ``schedule_to_close_timeout``; then the caller gets the last attempt's error. A plain
    activity whose worker died mid-run counts that attempt too.
    """

    initial_interval: Duration = 1.0
    """Seconds to wait before the first retry (default 1)."""
    backoff_coefficient: float = 2.0
    """Each further wait is the previous one times this (default 2; at least 1, and 1 waits
    ``initial_interval`` every time)."""
    maximum_interval: Duration | None = None
    """Cap on a single wait, in seconds; None (the default) caps it at 100 x
    ``initial_interval``, so the waits stop growing."""
    maximum_attempts: int = 3
    """Attempts in all, the first included (default 3); 1 means no retry, 0 unlimited (then
    only a non-retryable error or ``schedule_to_close_timeout`` ends the retries)."""
    non_retryable_error_types: Sequence[str] = ()
    """Exception class names, without their module (e.g. ``["ValueError", "PermissionError"]``),
    that fail the activity at the first attempt that raises one: retrying a bad input only
    costs time. An ``ApplicationError`` is matched by the last dotted part of its ``type``,
    and one raised with ``non_retryable=True`` is never retried, listed here or not."""

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
        """The policy as it travels in a task (read back by `from_wire`)."""
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
    """How one activity execution is scheduled, timed and retried.

    Pass it as ``options=`` to ``execute_activity``/``start_activity``, or its fields as
    keywords there (``start_to_close_timeout=60``), which override it; a session's defaults
    are ``SessionOptions.activity_options``. Every timeout is in seconds (or a timedelta) and
    defaults to None, no limit: an activity that never returns is ended only by its own
    timeouts, so set at least one where that can happen.
    """

    task_queue: str | None = None
    """The task queue of a plain activity, when ``execute_activity`` is not given
    ``task_queue=``; a session activity goes to the session's worker whatever it says."""
    start_to_close_timeout: Duration | None = None
    """Longest a single attempt may run on a worker, in seconds. The worker cancels the
    attempt when it passes (``ActivityTimeoutError``, ``timeout_type="start_to_close"``),
    and the retry policy may run another."""
    schedule_to_close_timeout: Duration | None = None
    """Longest the caller waits in all, in seconds, from sending through queueing and every
    retry; then it raises ``ActivityTimeoutError`` (``timeout_type="schedule_to_close"``).
    The worker starts no retry that would begin after it, but does not cut an attempt
    already running (``start_to_close_timeout`` does that)."""
    schedule_to_start_timeout: Duration | None = None
    """Longest the activity may wait to be started, in seconds, counted on Redis' clock
    from its queueing; a worker that picks it up later fails it without running it
    (``ActivityTimeoutError``, ``timeout_type="schedule_to_start"``, not retried)."""
    heartbeat_timeout: Duration | None = None
    """If set, the activity must call ``sessionq.heartbeat()`` at least this often, in
    seconds, or the worker cancels the attempt (``timeout_type="heartbeat"``; retried like a
    start-to-close timeout): a hung long-running activity is caught without a short
    ``start_to_close_timeout``."""
    retry_policy: RetryPolicy | None = None
    """Retries of a failed attempt; None (the default) means ``RetryPolicy()``, 3 attempts
    in all."""

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
    """How long to wait for a session slot, how long a session may live, and what it takes.

    Pass it to ``create_session``/``recreate_session``; durations are in seconds (or a
    timedelta).
    """

    creation_timeout: Duration = 60.0
    """Longest ``create_session``/``recreate_session`` waits for a worker with a free slot,
    in seconds (default 60); then ``SessionCreationTimeoutError``, whose message says why
    (all workers full, none polls the queue, a resource nobody offers)."""
    execution_timeout: Duration = 3600.0
    """Longest the session may stay open, in seconds (default 3600), counted on Redis'
    clock from its creation; after it the session fails and its slot frees, even if the
    caller's process has vanished."""
    activity_options: ActivityOptions = field(default_factory=ActivityOptions)
    """Defaults for the activities run through the session (default ``ActivityOptions()``,
    no timeouts); keywords given to ``execute_activity`` override them. Its ``task_queue``
    is ignored: they go to the session's worker."""
    owner_timeout: Duration | None = 60.0
    """The owner lease, in seconds (default 60): while the session is open its client renews
    a lease (one per client, not per session); if the client stays silent this long (it
    crashed, or was killed), the session fails with "its owner went away" and its slot frees
    within owner_timeout plus one heartbeat interval of its worker. None: no lease (the
    execution timeout still holds)."""
    resources: Mapping[str, int] | None = field(default=None, hash=False)  # a dict: left out of hash()
    """Session resources the session takes on its worker, e.g. ``{"gpu": 1, "scratch_gb": 100}``:
    it is placed only on a worker (host) whose free capacity (``Worker(session_resources=...)``)
    covers every amount, and gives them back when it ends. None (the default): none; for
    ``recreate_session``, the same as the session that gave the token."""

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
