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

if TYPE_CHECKING:
    from typing_extensions import TypeVarTuple

    Ts = TypeVarTuple("Ts")
    """The activity's positional parameters."""


class ActivityCallOptions(TypedDict, total=False):
    """The options a call takes as keywords (the fields of ActivityOptions, or one whole)."""

    options: ActivityOptions
    start_to_close_timeout: Duration | None
    schedule_to_close_timeout: Duration | None
    schedule_to_start_timeout: Duration | None
    heartbeat_timeout: Duration | None
    retry_policy: RetryPolicy | None


class SessionCall(ActivityCallOptions, total=False):
    """Session.execute_activity's keywords: the options, and the activity's keyword arguments."""

    kwargs: dict[str, Any] | None


class SessionCallWithKwargs(ActivityCallOptions):
    """As SessionCall, for the variant that takes an activity needing `kwargs` (required)."""

    kwargs: dict[str, Any]


class ClientCall(SessionCall, total=False):
    """Client.execute_activity's keywords: a session's, and the task queue."""

    task_queue: str | None


class ClientCallWithKwargs(SessionCallWithKwargs, total=False):
    """As ClientCall, with `kwargs` required."""

    task_queue: str | None
