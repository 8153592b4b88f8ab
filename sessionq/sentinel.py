"""Redis Sentinel: a primary and its replicas, watched by sentinels that promote a replica
when the primary fails.

    redis+sentinel://[user:pass@]host:port[,host:port...]/service_name[/db][?options]
    rediss+sentinel://...   TLS, to the data nodes and to the sentinels

The user and password are the data nodes'; sentinels that require their own credentials
take ``?sentinel_username=...&sentinel_password=...``. Other options are redis-py's
connection options (``socket_timeout``, ``ssl_cert_reqs``...). A redis.asyncio client made
by ``redis.asyncio.Sentinel(...).master_for(service)`` may be passed instead of a URL.

Every connection asks the sentinels for the current primary when it connects, and a
connection to a primary that was demoted (it answers READONLY) is dropped (redis-py's
SentinelManagedConnection), so after a failover the next retry reaches the new primary.
As with any client, sessionq never uses the given object itself: it builds its own
Sentinel manager and pool on the same settings, on the event loop that uses them (a
worker's heartbeat thread has a loop of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.connection import parse_url

from .errors import ConfigurationError
from .urls import host_list, shown

log = logging.getLogger("sessionq")

SENTINEL_SCHEMES = {"redis+sentinel": "redis", "rediss+sentinel": "rediss"}
DEFAULT_SENTINEL_PORT = 26379
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")
_SENTINEL_SOCKET = ("socket_timeout", "socket_connect_timeout", "socket_keepalive")


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SENTINEL_SCHEMES


def is_sentinel_client(target: Any) -> bool:
    return isinstance(getattr(target, "connection_pool", None), SentinelConnectionPool)


def split_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, dict[str, Any], dict[str, Any]]:
    """(sentinels, service name, data-node settings, sentinel settings) of a sentinel URL."""
    scheme, _, rest = url.partition("://")
    plain = SENTINEL_SCHEMES[scheme.lower()]
    parts = urlsplit(f"{plain}://{rest}")
    auth, _, hosts = parts.netloc.rpartition("@")
    sentinels = host_list(url, hosts, plain, DEFAULT_SENTINEL_PORT, _FORM, "sentinel")
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ConfigurationError(
            "redis", f"{shown(url)} must name the service (and at most a db); use {_FORM}"
        )
    service, db = path[0], path[1] if len(path) == 2 else "0"
    if not db.isdigit():
        raise ConfigurationError("redis", f"{shown(url)}: the database must be a number, not {db!r}")
    query = dict(parse_qsl(parts.query))
    sentinel_auth = {k.removeprefix("sentinel_"): query.pop(k) for k in _SENTINEL_OPTIONS if k in query}
    rebuilt = f"{plain}://{auth + '@' if auth else ''}{sentinels[0][0]}:{sentinels[0][1]}/{db}"
    if query:
        rebuilt += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    try:
        settings: dict[str, Any] = dict(parse_url(rebuilt))
    except ValueError as exc:
        raise ConfigurationError("redis", f"{shown(url)}: {exc}") from exc
    settings.pop("host", None)
    settings.pop("port", None)
    if settings.pop("connection_class", None) is not None:  # rediss: redis-py's SSLConnection
        settings["ssl"] = True
    sentinel_settings = {k: v for k, v in settings.items() if k in _SENTINEL_SOCKET or k.startswith("ssl")}
    sentinel_settings.update(sentinel_auth)
    return sentinels, service, settings, sentinel_settings


def sentinel_from_url(url: str, defaults: dict[str, Any], forced: dict[str, Any]) -> aredis.Redis:
    """A client of the service's primary, for a ``redis+sentinel://`` URL: the URL's settings
    over `defaults`, under `forced`."""
    sentinels, service, settings, sentinel_settings = split_sentinel_url(url)
    return _primary_client(sentinels, service, {**defaults, **settings, **forced}, sentinel_settings)


def sentinel_from_client(target: Any, defaults: dict[str, Any], forced: dict[str, Any]) -> aredis.Redis:
    """A client of the same primary as the user's Sentinel-managed client, on its settings."""
    pool: SentinelConnectionPool = target.connection_pool
    manager = pool.sentinel_manager
    sentinels = [
        (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
        for s in manager.sentinels
    ]
    settings = {k: v for k, v in pool.connection_kwargs.items() if k != "connection_pool"}
    connection_class = settings.pop("connection_class", None)
    if connection_class is not None and getattr(connection_class, "__name__", "").endswith("SSLConnection"):
        settings["ssl"] = True
    for owned in _POOL_OWNED:
        settings.pop(owned, None)
    settings = {**defaults, **{k: v for k, v in settings.items() if v is not None}, **forced}
    return _primary_client(sentinels, pool.service_name, settings, dict(manager.sentinel_kwargs))


_POOL_OWNED = ("maint_notifications_pool_handler", "maint_notifications_config", "himport_registry")


def _primary_client(
    sentinels: list[tuple[str, int]],
    service: str,
    settings: dict[str, Any],
    sentinel_settings: dict[str, Any],
) -> aredis.Redis:
    sentinel_settings.setdefault("retry", Retry(NoBackoff(), 0))
    for name in ("socket_timeout", "socket_connect_timeout"):
        if name in settings:
            sentinel_settings.setdefault(name, settings[name])
    manager = Sentinel(sentinels, sentinel_kwargs=sentinel_settings)
    pool = SentinelConnectionPool(service, manager, is_master=True, **settings)
    return aredis.Redis(connection_pool=pool)


_FORM = "redis+sentinel://host:port[,host:port]/service_name[/db]"


class PrimaryWatch:
    """Tells a Wire the moment the sentinels name a new primary for its service.

    redis-py's Sentinel-managed connections ask the sentinels for the primary only when
    they connect, and drop themselves only when the old primary answers READONLY. A
    connection that stays up to a primary the sentinels have replaced (a coordinated
    failover demotes the old primary a second or more after the switch) would keep
    writing there, and what it writes is lost when the old primary resyncs. So one task
    per Wire subscribes to the sentinels' ``+switch-master`` channel (trying each
    sentinel in turn, and asking for the current primary whenever it subscribes, for a
    switch it missed meanwhile) and calls `on_primary(address)`, which drops every
    connection that is not to that address.
    """

    def __init__(self, client: aredis.Redis, on_primary: Callable[[tuple[str, int]], None]) -> None:
        self.pool = cast(SentinelConnectionPool, client.connection_pool)
        self.on_primary = on_primary
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        if not self._closed and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._run(), name="sessionq-sentinel-watch")

    async def _run(self) -> None:
        manager, service = self.pool.sentinel_manager, self.pool.service_name
        turn = 0
        while True:
            sentinel = manager.sentinels[turn % len(manager.sentinels)]
            turn += 1
            pubsub = sentinel.pubsub()
            try:
                await pubsub.subscribe("+switch-master")
                self.on_primary(await manager.discover_master(service))
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is None:
                        continue
                    name, _, _, host, port = message["data"].decode().split()
                    if name == service:
                        log.warning(
                            "sentinels switched %s's primary to %s:%s; reconnecting", service, host, port
                        )
                        self.on_primary((host, int(port)))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # this sentinel is gone or silent: the next one
                log.debug("sentinel watch: %r; trying the next sentinel", exc)
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def aclose(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
