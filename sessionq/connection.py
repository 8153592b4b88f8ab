"""One place that makes Redis clients and retries Redis calls across connection errors.

Two deployments are supported, with the same code above this module:

- one Redis server: ``redis://``, ``rediss://`` or ``unix://`` URLs, or a ``redis.asyncio.Redis``;
- Redis Cluster: ``redis+cluster://host:port[,host:port...]`` (``rediss+cluster://`` for TLS),
  or a ``redis.asyncio.cluster.RedisCluster``. Every key of a task queue carries the hash tag
  ``{queue}`` (see keys.py), so a task queue lives in one slot, its Lua scripts run on one
  node, and different task queues spread over the masters.

Connections: sessionq sends every command through wire.py's connections (one shared
connection per server for short commands, one per blocking read), made from the client
built here but never taken from its pool; the pool's ``max_connections`` therefore has no
effect (``?max_connections=`` and ``?pool_timeout=`` in a URL are accepted and ignored).

A Redis Cluster client serves as the slot map (wire.py routes by it and relearns it after
redirects and failures); a Sentinel-managed one (sentinel.py) as the way to find the
primary. Which failures are retried: faults.py.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import redis.asyncio as aredis
import redis.exceptions as rexc
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .errors import ConfigurationError
from .sentinel import is_sentinel_client, is_sentinel_url, sentinel_from_client, sentinel_from_url
from .urls import host_list

log = logging.getLogger("sessionq")

DEFAULT_URL = "redis://localhost:6379/0"
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
DEFAULT_COMMAND_TIMEOUT = 5.0
"""Seconds a command may wait for its reply before its connection counts as dead (a frozen
network path, a half-open socket) and is replaced; ``?socket_timeout=S`` in the URL sets it."""
DEFAULT_CONNECT_TIMEOUT = 5.0
"""Seconds to open a connection, handshake included; ``?socket_connect_timeout=S`` sets it."""
_TIMEOUTS = {"socket_timeout": DEFAULT_COMMAND_TIMEOUT, "socket_connect_timeout": DEFAULT_CONNECT_TIMEOUT}

_POOL_OWNED_KWARGS = (
    "maint_notifications_pool_handler",
    "maint_notifications_config",
    "orig_host_address",
    "orig_socket_timeout",
    "orig_socket_connect_timeout",
    "himport_registry",
)
"""Keys a redis-py pool adds to its own connection_kwargs; copied into a RESP2 pool, the
maintenance-notification handler makes it raise ("only supported with RESP version 3")."""


def resolve_url(url: str | None = None) -> str:
    """The Redis URL: the argument, else SESSIONQ_REDIS_URL, else REDIS_URL, else localhost.
    An empty URL given on purpose is an error, not a silent fall back to the defaults."""
    if url is not None:
        if not url.strip():
            raise ConfigurationError(
                "redis",
                "the Redis URL is empty; give one (redis://host:6379/0), or leave it out to use "
                "SESSIONQ_REDIS_URL, REDIS_URL or redis://localhost:6379/0",
            )
        return url
    return os.environ.get("SESSIONQ_REDIS_URL") or os.environ.get("REDIS_URL") or DEFAULT_URL


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def as_cluster_url(url: str) -> str:
    """``redis://h:p`` -> ``redis+cluster://h:p`` (for a CLI ``--cluster`` flag); others unchanged."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() in ("redis", "rediss"):
        return f"{scheme.lower()}+cluster://{rest}"
    if sep and scheme.lower() in CLUSTER_SCHEMES:
        return url
    raise ConfigurationError("redis", f"{url!r} cannot name a Redis Cluster; use redis+cluster://host:port")


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


def connect(target: Any) -> Any:
    """A client speaking RESP2 with raw bytes and no hidden command retries.

    redis-py retries a command after a connection error on its own; for a script that
    claims a slot that could run it twice, so sessionq retries explicitly (see `faults.retrying`)
    and only where the operation is idempotent. A given client is not used as is: a new
    one is built on its connection settings, so user settings like decode_responses
    cannot change what sessionq reads.
    """
    if isinstance(target, str):
        if is_cluster_url(target):
            return cluster_from_url(target)
        if is_sentinel_url(target):
            return sentinel_from_url(target, _SENTINEL_DEFAULTS, _FORCED)
        if not target.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigurationError(
                "redis",
                f"{target!r} is not a Redis URL; use e.g. redis://localhost:6379/0, "
                "redis+cluster://host:port[,host:port...] for Redis Cluster, or "
                "redis+sentinel://host:port[,host:port...]/service_name for Sentinel",
            )
        try:
            pool = aredis.ConnectionPool.from_url(target, **_SINGLE_DEFAULTS, **_FORCED)
        except ValueError as exc:
            raise ConfigurationError("redis", f"{target!r} is not a valid Redis URL: {exc}") from exc
        for ignored in _POOL_ONLY:  # no pool serves sessionq's commands (see above)
            pool.connection_kwargs.pop(ignored, None)
        return aredis.Redis(connection_pool=pool)
    if isinstance(target, RedisCluster):
        return cluster_from_client(target)
    if is_sentinel_client(target):
        return sentinel_from_client(target, _SENTINEL_DEFAULTS, _FORCED)
    return _from_client(target)


def _from_client(target: Any) -> Any:
    """A client on the settings of the user's redis.asyncio.Redis (never the object itself)."""
    if isinstance(target, aredis.Redis):
        given = target.connection_pool
        kwargs = dict(given.connection_kwargs)
        for owned in _POOL_OWNED_KWARGS:  # state the given pool made for itself (redis-py >= 7)
            kwargs.pop(owned, None)
        kwargs.update(_FORCED)
        with_default_timeouts(kwargs)
        pool = aredis.ConnectionPool(connection_class=given.connection_class, **kwargs)
        return aredis.Redis(connection_pool=pool)
    raise ConfigurationError(
        "redis",
        "expected a Redis URL, a redis.asyncio.Redis or a redis.asyncio.cluster.RedisCluster, "
        f"got {type(target).__name__}",
    )


def with_default_timeouts(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Fill in sessionq's command and connect timeouts where none is set: without them a
    command on a half-open connection waits forever."""
    for name, default in _TIMEOUTS.items():
        if kwargs.get(name) is None:
            kwargs[name] = default
    return kwargs


# --- Redis Cluster ---------------------------------------------------------------------

_FORCED = {"protocol": 2, "decode_responses": False, "retry": Retry(NoBackoff(), 0)}
"""Cluster and Sentinel settings sessionq needs whatever the user gave: raw RESP2 replies,
and no command re-sent by redis-py after a connection error (MOVED/ASK/TRYAGAIN redirects
are still followed: the server did not run the command then)."""
_SINGLE_DEFAULTS = {**_TIMEOUTS, "socket_keepalive": True, "health_check_interval": 15}
"""Settings a URL's own values override."""
_SENTINEL_DEFAULTS = _SINGLE_DEFAULTS
_POOL_ONLY = ("pool_timeout",)
"""URL options of a pool that no sessionq command uses (accepted for old URLs, ignored)."""


def split_cluster_url(url: str) -> tuple[str, list[tuple[str, int]]]:
    """``redis+cluster://u:p@h1:1,h2:2/0?x=1`` -> (``redis://u:p@h1:1/0?x=1``, [(h1, 1), (h2, 2)])."""
    scheme, _, rest = url.partition("://")
    plain = CLUSTER_SCHEMES[scheme.lower()]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    auth, _, hosts = netloc.rpartition("@")
    nodes = host_list(url, hosts, plain, 6379, "redis+cluster://host:port[,host:port...]")
    first = hosts.split(",")[0].strip()
    single = f"{plain}://{auth + '@' if auth else ''}{first}{tail}"
    return single, nodes


def cluster_from_url(url: str) -> RedisCluster:
    """A cluster client from ``redis+cluster://[user:pass@]host:port[,host:port...][/0][?opts]``.

    Query options are redis-py's (``max_connections``, ``socket_timeout``, ``ssl_cert_reqs``...)
    (``max_connections`` and ``pool_timeout`` are accepted and have no effect: see above).
    """
    single, nodes = split_cluster_url(url)
    try:
        kwargs: dict[str, Any] = dict(parse_url(single))
    except ValueError as exc:
        raise ConfigurationError("redis", f"{url!r}: {exc}") from exc
    if kwargs.pop("connection_class", None) is SSLConnection:
        kwargs["ssl"] = True
    kwargs.pop("host", None)
    kwargs.pop("port", None)
    if kwargs.pop("db", 0) not in (0, None):
        raise ConfigurationError("redis", f"{url!r}: Redis Cluster has only database 0")
    for ignored in _POOL_ONLY:
        kwargs.pop(ignored, None)
    kwargs.setdefault("socket_keepalive", True)
    kwargs.setdefault("health_check_interval", 15)
    with_default_timeouts(kwargs)
    return _make_cluster([ClusterNode(host, port) for host, port in nodes], kwargs, url)


_NOT_COPIED = {"host", "port", "max_connections", "maint_notifications_config", "event_dispatcher"}
"""Settings of a user's RedisCluster not carried over: per node, set below, or RESP3-only."""


def cluster_from_client(target: RedisCluster) -> RedisCluster:
    """A new cluster client on the settings and nodes of the user's RedisCluster."""
    accepted = set(inspect.signature(RedisCluster.__init__).parameters)
    kwargs = {k: v for k, v in target.connection_kwargs.items() if k in accepted and k not in _NOT_COPIED}
    kwargs["max_connections"] = target.connection_kwargs.get("max_connections", 100)
    connection_class = target.connection_kwargs.get("connection_class")
    if isinstance(connection_class, type) and issubclass(connection_class, SSLConnection):
        kwargs["ssl"] = True
    manager = target.nodes_manager
    known = target.get_primaries() or list(manager.startup_nodes.values())
    kwargs.update(require_full_coverage=manager.require_full_coverage, address_remap=manager.address_remap)
    with_default_timeouts(kwargs)
    nodes = [ClusterNode(n.host, n.port) for n in known]
    return _make_cluster(nodes, kwargs, repr(target))


def _make_cluster(nodes: list[ClusterNode], kwargs: dict[str, Any], what: str) -> RedisCluster:
    try:
        client = RedisCluster(startup_nodes=nodes, **{**kwargs, **_FORCED})
    except (TypeError, ValueError, rexc.RedisClusterException) as exc:
        raise ConfigurationError("redis", f"cannot make a Redis Cluster client for {what}: {exc}") from exc
    return client
