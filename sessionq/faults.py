"""What a Redis failure means, decided in one place, and what callers do about it.

Every path that talks to Redis (the caller's sends and waits, the worker's loops and its
result flush) asks `kind_of(exc)` instead of catching its own list of exceptions:

- ``TRANSIENT``: Redis cannot serve us right now but will: a dropped or frozen connection
  (the command may or may not have run), or an error reply that says "not now" without
  running the command: ``LOADING``, ``BUSY``, ``READONLY`` (a demoted primary),
  ``MASTERDOWN``, ``CLUSTERDOWN``, ``TRYAGAIN``, a redirect (``MOVED``/``ASK``) that the wire
  could not follow at once, ``OOM``, ``MISCONF``, ``NOREPLICAS``, and ``NOPERM``/auth errors
  (an operator changing ACLs or passwords). Retried with backoff, for a bounded time.
- ``LOST``: the state the command needs is gone: ``NOGROUP`` (the task stream or its
  consumer group vanished: Redis restarted without its data, or someone deleted it).
  The caller re-creates what it owns; work that lived there is gone.
- ``FATAL``: anything else (``WRONGTYPE``, a syntax error, a bug): retrying cannot help.

The error code is the first word of a Redis error reply (the protocol's own field);
redis-py strips it for the codes it maps to exception classes, so both are looked at.

`retrying` runs an idempotent call through transient failures; `public` converts whatever
escapes into a `SessionqError` at the edge of the public API, so no redis-py or builtin
exception ever reaches a user.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.exceptions as rexc
from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception,
    stop_after_delay,
    wait_random_exponential,
)

from .errors import RedisUnavailableError, SessionqError

log = logging.getLogger("sessionq")
T = TypeVar("T")

DEFAULT_UNAVAILABLE_TIMEOUT = 15.0
"""Seconds a call keeps retrying while Redis is unreachable or refusing, by default."""


class Kind(enum.Enum):
    TRANSIENT = "transient"
    LOST = "lost"
    FATAL = "fatal"


_TRANSIENT_CLASSES: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,  # includes BusyLoadingError (LOADING) and AuthenticationError
    rexc.TimeoutError,
    rexc.ReadOnlyError,
    rexc.ClusterDownError,  # includes MasterDownError
    rexc.TryAgainError,
    rexc.AskError,  # MovedError is one too
    rexc.SlotNotCoveredError,
    rexc.NoPermissionError,
    rexc.OutOfMemoryError,
    ConnectionError,
    TimeoutError,
    asyncio.TimeoutError,  # not the builtin TimeoutError before Python 3.11
    OSError,
)
_TRANSIENT_CODES = frozenset(
    {
        "LOADING", "BUSY", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "MOVED", "ASK",
        "OOM", "MISCONF", "NOREPLICAS", "NOPERM", "NOAUTH", "WRONGPASS", "UNBLOCKED",
    }
)  # fmt: skip
_LOST_CODES = frozenset({"NOGROUP"})


def error_code(exc: BaseException) -> str:
    """The Redis error code of an error reply ("NOGROUP", "MISCONF"...), else ""."""
    if not isinstance(exc, rexc.ResponseError):
        return ""
    first = str(exc).split(" ", 1)[0]
    return first if first.isupper() and first.isalpha() else ""


def kind_of(exc: BaseException) -> Kind:
    """Whether `exc` is worth retrying (TRANSIENT), means lost state (LOST), or neither."""
    if isinstance(exc, SessionqError):
        return Kind.FATAL  # already decided (RedisUnavailableError included: retries are over)
    code = error_code(exc)
    if code in _LOST_CODES:
        return Kind.LOST
    if code in _TRANSIENT_CODES or isinstance(exc, _TRANSIENT_CLASSES):
        return Kind.TRANSIENT
    return Kind.FATAL


def is_transient(exc: BaseException) -> bool:
    return kind_of(exc) is Kind.TRANSIENT


_FAILOVER_CODES = frozenset({"READONLY", "MASTERDOWN", "CLUSTERDOWN"})


def suggests_failover(exc: BaseException) -> bool:
    """Whether a failure could mean that another server now holds the data: the server was
    unreachable or silent, or it answered that it is a replica (READONLY), that its master
    is down (MASTERDOWN) or that the cluster is down (CLUSTERDOWN)."""
    return (
        isinstance(
            exc,
            rexc.ConnectionError
            | rexc.TimeoutError
            | rexc.ReadOnlyError
            | rexc.ClusterDownError
            | rexc.SlotNotCoveredError
            | ConnectionError
            | TimeoutError
            | asyncio.TimeoutError,
        )
        or error_code(exc) in _FAILOVER_CODES
    )


def describe(exc: BaseException) -> str:
    """A short, human description of a Redis failure, with what to check."""
    code = error_code(exc)
    text = str(exc) or type(exc).__name__
    if isinstance(exc, rexc.NoPermissionError) or code == "NOPERM":
        return f"Redis refused a command (NOPERM {text}): check the ACL of the user in the URL"
    if isinstance(exc, rexc.AuthenticationError) or code in ("NOAUTH", "WRONGPASS"):
        return f"Redis refused our credentials ({text}): check the user and password in the URL"
    if isinstance(exc, rexc.OutOfMemoryError) or code == "OOM":
        return f"Redis is out of memory ({text}): free memory or raise maxmemory"
    if code == "MISCONF":
        return f"Redis refuses writes after a failed snapshot ({text}): check its disk and logs"
    if isinstance(exc, rexc.ReadOnlyError) or code == "READONLY":
        return f"the server is a read-only replica ({text}): a failover may be under way"
    if isinstance(exc, rexc.BusyLoadingError) or code == "LOADING":
        return f"Redis is loading its data set ({text})"
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, rexc.RedisError) else text


def unavailable(what: str, waited: float, exc: BaseException) -> RedisUnavailableError:
    return RedisUnavailableError(
        f"{what} failed: Redis could not serve it for {waited:.0f}s ({describe(exc)}). Check that "
        "Redis is running and the URL is right (SESSIONQ_REDIS_URL / --redis-url); the call may be "
        "retried once Redis is back"
    )


class Outage:
    """Tells of a Redis outage once: one warning when a call first finds Redis away, one
    line when a retried call gets through again; the retries in between, of any call of
    this process, log at DEBUG only (a minute of outage was a hundred lines before)."""

    def __init__(self) -> None:
        self.since: float | None = None

    def failed(self, what: str, exc: BaseException) -> None:
        if self.since is None:
            self.since = time.monotonic()
            log.warning("%s: %s; retrying (quietly until Redis answers)", what, describe(exc))
        else:
            log.debug("%s: %s; retrying", what, describe(exc))

    def gave_up(self) -> None:
        self.since = None

    def answered(self) -> None:
        if self.since is not None:
            log.warning("Redis answers again, after %.1f s", time.monotonic() - self.since)
            self.since = None


outage = Outage()
"""This process's: calls of every Client and Worker share one account of the outage."""


async def retrying(
    call: Callable[[], Awaitable[T]],
    *,
    within: float = DEFAULT_UNAVAILABLE_TIMEOUT,
    what: str = "Redis call",
) -> T:
    """Run `call`, retrying transient failures with jittered backoff for up to `within` s.

    Only for idempotent operations (a dropped connection leaves it unknown whether the
    command ran). Raises RedisUnavailableError when Redis stays away or keeps refusing.
    """
    try:  # the common case pays nothing for the retry machinery (one attribute check)
        result = await call()
        if outage.since is not None:
            outage.answered()
        return result
    except Exception as exc:
        if not is_transient(exc):
            raise
        outage.failed(what, exc)
    started = time.monotonic()
    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(is_transient),
            wait=wait_random_exponential(multiplier=0.05, max=2.0),
            stop=stop_after_delay(within),
            before_sleep=before_sleep_log(log, logging.DEBUG),  # the outage was told once
            reraise=True,
        ):
            with attempt:
                result = await call()
                outage.answered()
                return result
    except Exception as exc:
        if not is_transient(exc):
            raise
        outage.gave_up()  # the caller hears of it now; the next failure warns again
        raise unavailable(what, time.monotonic() - started, exc) from exc
    except BaseException:  # cancelled while retrying: a later outage must still be told
        outage.gave_up()
        raise
    raise AssertionError("unreachable")  # pragma: no cover


def to_public(exc: BaseException, what: str) -> BaseException:
    """The exception a user sees for `exc` escaping `what`: a SessionqError, always."""
    if isinstance(exc, SessionqError) or not isinstance(exc, Exception):
        return exc  # ours already, or CancelledError / KeyboardInterrupt: never wrapped
    if is_transient(exc):
        return RedisUnavailableError(
            f"{what} failed: {describe(exc)}. Check that Redis is running and reachable; "
            "the call may be retried"
        )
    if isinstance(exc, rexc.RedisError):
        return SessionqError(f"{what} failed: Redis answered with an error: {describe(exc)}")
    return SessionqError(f"{what} failed with an internal error ({exc!r}); please report it to sessionq")


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def public(what: str) -> Callable[[F], F]:
    """Decorate an async public method: anything that is not a SessionqError leaves it as one."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(*args, **kwargs)
            except Exception as exc:
                converted = to_public(exc, what)
                if converted is exc:
                    raise
                raise converted from exc

        return wrapper  # type: ignore[return-value]

    return decorate
