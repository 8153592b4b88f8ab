"""One place that makes Redis clients and retries Redis calls across connection errors."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_delay,
    wait_random_exponential,
)

from .errors import ConfigurationError, RedisUnavailableError

log = logging.getLogger("sessionq")
T = TypeVar("T")

DEFAULT_URL = "redis://localhost:6379/0"
TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


def resolve_url(url: str | None = None) -> str:
    """The Redis URL: the argument, else SESSIONQ_REDIS_URL, else REDIS_URL, else localhost."""
    return url or os.environ.get("SESSIONQ_REDIS_URL") or os.environ.get("REDIS_URL") or DEFAULT_URL


def connect(target: Any) -> aredis.Redis:
    """A client speaking RESP2 with raw bytes and no hidden command retries.

    redis-py retries a command after a connection error on its own; for a script that
    claims a slot that could run it twice, so sessionq retries explicitly (see `retrying`)
    and only where the operation is idempotent. A given client is not used as is: a new
    one is built on its connection settings, so user settings like decode_responses
    cannot change what sessionq reads.
    """
    if isinstance(target, str):
        if not target.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigurationError(
                "redis", f"{target!r} is not a Redis URL; use e.g. redis://localhost:6379/0"
            )
        return aredis.Redis.from_url(
            target,
            protocol=2,
            decode_responses=False,
            retry=Retry(NoBackoff(), 0),
            socket_keepalive=True,
            health_check_interval=15,
        )
    if isinstance(target, aredis.Redis):
        kwargs = dict(target.connection_pool.connection_kwargs)
        kwargs.update(protocol=2, decode_responses=False, retry=Retry(NoBackoff(), 0))
        pool = aredis.ConnectionPool(connection_class=target.connection_pool.connection_class, **kwargs)
        return aredis.Redis(connection_pool=pool)
    raise ConfigurationError(
        "redis", f"expected a Redis URL or a redis.asyncio.Redis, got {type(target).__name__}"
    )


async def retrying(call: Callable[[], Awaitable[T]], *, within: float = 15.0, what: str = "Redis call") -> T:
    """Run `call`, retrying connection errors with jittered backoff for up to `within` s.

    Only for idempotent operations. Raises RedisUnavailableError when Redis stays away.
    """
    try:  # the common case pays nothing for the retry machinery
        return await call()
    except TRANSIENT as exc:
        log.warning("%s: Redis connection error (%s); retrying", what, exc)
    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(TRANSIENT),
            wait=wait_random_exponential(multiplier=0.05, max=2.0),
            stop=stop_after_delay(within),
            before_sleep=before_sleep_log(log, logging.WARNING),
            reraise=True,
        ):
            with attempt:
                return await call()
    except TRANSIENT as exc:
        raise RedisUnavailableError(
            f"{what} failed: Redis unreachable for {within:.0f}s ({exc}). Check that Redis is "
            "running and the URL is right (SESSIONQ_REDIS_URL / --redis-url)"
        ) from exc
    raise AssertionError("unreachable")  # pragma: no cover
