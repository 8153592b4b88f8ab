"""What a worker says about the activities it runs: one line per outcome, one per retry.

Logger ``sessionq.activity``. DEBUG: an activity starts. INFO: an activity completed, was
cancelled, ended with its session, was not started, or is retried. WARNING: an activity
failed for good (with its traceback), timed out, or could not run at all (not registered, a
result that cannot be sent). Every record also carries its fields as attributes (worker, queue, activity,
activity_id, session, attempt, duration_ms, outcome), which ``sessionq worker --log-format
json`` prints.
"""

from __future__ import annotations

import logging

from .activity import ActivityInfo
from .envelope import RemoteError, clean_text

log = logging.getLogger("sessionq.activity")

TRACEBACK_TEXT = 16_000
"""Longest traceback logged (the rest is cut, and says so; texts are cleaned of what
cannot be written, as a lone surrogate)."""
SHORT_ID = 12
"""Characters of an id shown in a line (as `sessionq inspect` shows them)."""

_QUIET_KINDS = {"ActivityCancelledError": "cancelled", "SessionFailedError": "ended with its session"}
"""Outcomes that are not the activity's fault: INFO, no traceback."""


def short(identifier: str) -> str:
    return identifier[:SHORT_ID]


def took(seconds: float) -> str:
    if seconds < 0.01:
        return f"{seconds * 1000:.2f} ms"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _took_all(info: ActivityInfo, seconds: float) -> str:
    """The time of the whole execution: of every attempt, and the waits between them."""
    return took(seconds) if info.attempt == 1 else f"{took(seconds)} ({info.attempt} attempts)"


def _fields(info: ActivityInfo, seconds: float, outcome: str) -> dict[str, object]:
    return {
        "worker": info.worker_id,
        "queue": info.task_queue,
        "activity": info.name,
        "activity_id": info.activity_id,
        "session": info.session.session_id if info.session is not None else None,
        "attempt": info.attempt,
        "duration_ms": round(seconds * 1000, 3),
        "outcome": outcome,
    }


def _head(info: ActivityInfo) -> str:
    where = f"on {info.task_queue}"
    if info.session is not None:
        where += f", session {short(info.session.session_id)}"
    what = f"activity {info.name} ({short(info.activity_id)})"
    return f"worker {info.worker_id}: {what} {where}, attempt {info.attempt}"


def _cause(error: RemoteError) -> str:
    name = clean_text(error.type or error.kind, 200)
    return f"{name}: {clean_text(error.message, 500)}" if error.message else name


def started(info: ActivityInfo) -> None:
    """DEBUG (`sessionq worker -v`): an execution begins."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s: started", _head(info), extra=_fields(info, 0.0, "started"))


def finished(info: ActivityInfo, seconds: float, error: RemoteError | None) -> None:
    """An execution ended with `error` (None: its result went to its caller)."""
    if error is None:
        if log.isEnabledFor(logging.INFO):
            fields = _fields(info, seconds, "completed")
            log.info("%s: completed in %s", _head(info), _took_all(info, seconds), extra=fields)
        return
    quiet = _QUIET_KINDS.get(error.kind)
    if quiet is not None:
        if log.isEnabledFor(logging.INFO):
            log.info(
                "%s: %s after %s (%s)", _head(info), quiet, took(seconds), clean_text(error.message, 500),
                extra=_fields(info, seconds, quiet.replace(" ", "_")),
            )  # fmt: skip
        return
    if error.kind == "ApplicationError":
        last = "not retryable" if error.non_retryable else "no attempt left"
        text = f"{_head(info)}: failed after {_took_all(info, seconds)}: {_cause(error)} ({last})"
        if error.traceback:
            text += "\n" + clean_text(error.traceback.rstrip(), TRACEBACK_TEXT)
        log.warning("%s", text, extra=_fields(info, seconds, "failed"))
    elif error.kind == "ActivityTimeoutError":
        log.warning(
            "%s: timed out after %s (%s)",
            _head(info), _took_all(info, seconds), clean_text(error.message, 500),
            extra=_fields(info, seconds, "timed_out"),
        )  # fmt: skip
    else:
        log.warning(
            "%s: %s after %s", _head(info), _cause(error), took(seconds),
            extra=_fields(info, seconds, error.kind),
        )  # fmt: skip


def interrupted(info: ActivityInfo, seconds: float, what_next: str) -> None:
    """The worker stopped while the activity ran (its shutdown grace passed)."""
    log.warning(
        "%s: interrupted after %s by the worker's stop; %s", _head(info), took(seconds), what_next,
        extra=_fields(info, seconds, "interrupted"),
    )  # fmt: skip


def not_started(info: ActivityInfo, error: RemoteError) -> None:
    """The worker answered without running the activity (cancelled before it started, its
    session ended while it waited for a slot, the worker is stopping, no attempt left)."""
    if error.kind == "ApplicationError":
        fields = _fields(info, 0.0, "not_started")
        log.warning("%s: not started: %s", _head(info), clean_text(error.message, 500), extra=fields)
    elif log.isEnabledFor(logging.INFO):
        fields = _fields(info, 0.0, "not_started")
        log.info("%s: %s", _head(info), clean_text(error.message, 500), extra=fields)


def retrying(info: ActivityInfo, seconds: float, why: str, delay: float) -> None:
    """Attempt `info.attempt` failed or timed out (`why`); the next one starts in `delay` s."""
    if log.isEnabledFor(logging.INFO):
        log.info(
            "%s: %s after %s; retrying in %s as attempt %d",
            _head(info), why, took(seconds), took(delay), info.attempt + 1,
            extra=_fields(info, seconds, "retrying"),
        )  # fmt: skip
