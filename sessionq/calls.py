"""The keyword options of execute_activity / start_activity, as types, so that a type
checker checks a call against the decorated activity.

The methods are overloaded (client.py, session.py, sync.py): an activity's positional
arguments are matched to its parameters with a TypeVarTuple (PEP 646), the options are
typed keywords (PEP 692), and the result is the activity's return type (awaited for an
``async def``). ParamSpec cannot do it: it allows no keyword-only options beside the
activity's own. Three calls are checked less:

- by name (``execute_activity("resize", ...)``): arguments and result are ``Any``;
- with ``kwargs=`` and an activity that needs them: arguments unchecked, result ``Any``;
- a fault of the arguments makes the overload fail: the error lists every variant.

Nothing here runs: the names used only in annotations (`Ts`, `Unpack`) exist for type
checkers alone, and typing_extensions is not needed at run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

from .durations import Duration
from .options import ActivityOptions, RetryPolicy

R = TypeVar("R")
"""What the activity returns (awaited, for an ``async def``)."""

R_co = TypeVar("R_co", covariant=True)
"""What a handle's ``result()`` gives: covariant, so an ``ActivityHandle[bytes]`` is an
``ActivityHandle[object]`` (a list of handles of different activities)."""

if TYPE_CHECKING:
    from typing_extensions import TypeVarTuple

    Ts = TypeVarTuple("Ts")
    """The activity's positional parameters."""


class ActivityCallOptions(TypedDict, total=False):
    """The options execute_activity / start_activity take as keywords: the fields of
    ActivityOptions, or ``options``, one whole. Annotate a dict of them with it to pass it
    as ``**options`` (a type checker cannot match a plain ``dict[str, int]`` to them)::

        TIMEOUTS: sessionq.ActivityCallOptions = {"start_to_close_timeout": 10}
        await client.execute_activity(greet, "world", task_queue="hello", **TIMEOUTS)
    """

    options: ActivityOptions | None
    """All of them at once; the other keywords override its fields."""
    start_to_close_timeout: Duration | None
    """As ActivityOptions.start_to_close_timeout."""
    schedule_to_close_timeout: Duration | None
    """As ActivityOptions.schedule_to_close_timeout."""
    schedule_to_start_timeout: Duration | None
    """As ActivityOptions.schedule_to_start_timeout."""
    heartbeat_timeout: Duration | None
    """As ActivityOptions.heartbeat_timeout."""
    retry_policy: RetryPolicy | None
    """As ActivityOptions.retry_policy."""


class SessionCall(ActivityCallOptions, total=False):
    """Session.execute_activity's keywords: the options, and the activity's keyword arguments."""

    kwargs: dict[str, Any] | None
    """The activity's keyword arguments (the call's own keywords are its options)."""


class SessionCallWithKwargs(ActivityCallOptions):
    """As SessionCall, for the variant that takes an activity needing `kwargs` (required)."""

    kwargs: dict[str, Any]


class ClientCall(SessionCall, total=False):
    """Client.execute_activity's keywords: a session's, and the task queue."""

    task_queue: str | None
    """The queue whose workers may run it (required, here or in ``options``)."""


class ClientCallWithKwargs(SessionCallWithKwargs, total=False):
    """As ClientCall, with `kwargs` required."""

    task_queue: str | None
