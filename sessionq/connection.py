"""One place that makes Redis clients and retries Redis calls across connection errors.

Two deployments are supported, with the same code above this module:

- one Redis server: ``redis://``, ``rediss://`` or ``unix://`` URLs, or a ``redis.asyncio.Redis``;
- Redis Cluster: ``redis+cluster://host:port[,host:port...]`` (``rediss+cluster://`` for TLS),
  or a ``redis.asyncio.cluster.RedisCluster``. Every key of a task queue carries the hash tag
  ``{queue}`` (see keys.py), so a task queue lives in one slot, its Lua scripts run on one
  node, and different task queues spread over the masters.

Connections: sessionq sends every command through wire.py's connections (one shared
connection per server for short commands, one per blocking read), made from the client's
settings but outside its pool. The pool made here bounds only what the user's own code sends
through the redis-py client: at most ``max_connections`` (100 by default; per node on a
cluster); commands beyond that queue, first come first served, for up to ``pool_timeout``
seconds (default 10), then raise ConnectionPoolExhaustedError, which says how to raise the
limit: ``?max_connections=N&pool_timeout=S`` in the URL, or max_connections on the redis-py
client you pass. (On a cluster the queue counts commands in flight per client, all nodes
together, so no node's pool can run dry.)

Cluster specifics handled here: the slot map is loaded before the first command (redis-py
would otherwise route the first concurrent commands at random, and the MOVED replies make it
drop every connection); the keys of XREAD/XREADGROUP/BLMPOP are read locally instead of with
COMMAND GETKEYS. Which failures are retried: faults.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import inspect
import logging
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aredis
import redis.exceptions as rexc
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .errors import ConfigurationError, ConnectionPoolExhaustedError
from .sentinel import is_sentinel_client, is_sentinel_url, sentinel_from_client, sentinel_from_url

log = logging.getLogger("sessionq")

DEFAULT_URL = "redis://localhost:6379/0"
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
DEFAULT_POOL_TIMEOUT = 10.0
"""Seconds a command waits for a free cluster connection before ConnectionPoolExhaustedError."""
DEFAULT_COMMAND_TIMEOUT = 5.0
"""Seconds a command may wait for its reply before its connection counts as dead (a frozen
network path, a half-open socket) and is replaced; ``?socket_timeout=S`` in the URL sets it."""
DEFAULT_CONNECT_TIMEOUT = 5.0
"""Seconds to open a connection, handshake included; ``?socket_connect_timeout=S`` sets it."""
_TIMEOUTS = {"socket_timeout": DEFAULT_COMMAND_TIMEOUT, "socket_connect_timeout": DEFAULT_CONNECT_TIMEOUT}

_MaxConnectionsError: type[Exception] = getattr(rexc, "MaxConnectionsError", rexc.ConnectionError)
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
            pool = _pool_from_url(target)
        except ValueError as exc:
            raise ConfigurationError("redis", f"{target!r} is not a valid Redis URL: {exc}") from exc
        return aredis.Redis(connection_pool=pool)
    if isinstance(target, RedisCluster):
        return cluster_from_client(target)
    if is_sentinel_client(target):
        return sentinel_from_client(target, _SENTINEL_DEFAULTS, _FORCED)
    return _from_client(target)


def _pool_from_url(target: str) -> WaitingPool:
    return WaitingPool.from_url(  # type: ignore[no-any-return]
        target,
        protocol=2,
        decode_responses=False,
        retry=Retry(NoBackoff(), 0),
        socket_keepalive=True,
        health_check_interval=15,
        **_TIMEOUTS,  # the URL's own values win
    )


def _from_client(target: Any) -> Any:
    """A client on the settings of the user's redis.asyncio.Redis (never the object itself)."""
    if isinstance(target, aredis.Redis):
        given = target.connection_pool
        kwargs = dict(given.connection_kwargs)
        for owned in _POOL_OWNED_KWARGS:  # state the given pool made for itself (redis-py >= 7)
            kwargs.pop(owned, None)
        kwargs.update(protocol=2, decode_responses=False, retry=Retry(NoBackoff(), 0))
        with_default_timeouts(kwargs)
        kwargs.setdefault("max_connections", getattr(given, "max_connections", None) or 100)
        kwargs.setdefault("pool_timeout", getattr(given, "pool_timeout", DEFAULT_POOL_TIMEOUT))
        pool = WaitingPool(connection_class=given.connection_class, **kwargs)
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


class WaitingPool(aredis.BlockingConnectionPool):
    """One server's connection pool: a command waits up to `pool_timeout` s for a free
    connection (redis-py's default pool fails at once), then ConnectionPoolExhaustedError."""

    def __init__(
        self, *, max_connections: int | None = None, pool_timeout: Any = DEFAULT_POOL_TIMEOUT, **kwargs: Any
    ) -> None:
        super().__init__(max_connections=max_connections or 100, timeout=float(pool_timeout), **kwargs)

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().get_connection(*args, **kwargs)
        except rexc.ConnectionError as exc:
            if "No connection available" not in str(exc):
                raise
            raise pool_exhausted(self.max_connections, self.timeout, "redis://") from exc


def pool_exhausted(limit: Any, waited: Any, scheme: str) -> ConnectionPoolExhaustedError:
    return ConnectionPoolExhaustedError(
        f"all {limit} connections this client may hold (max_connections) stayed busy for {waited:g}s. "
        "sessionq holds one blocked connection per task queue a Client waits on and two per Worker, "
        "so this means many concurrent calls or many task queues: raise the limit with "
        f"?max_connections=N in the {scheme} URL (or on the redis-py client you pass), or wait "
        "longer with ?pool_timeout=S"
    )


# --- Redis Cluster ---------------------------------------------------------------------

_FORCED = {"protocol": 2, "decode_responses": False, "retry": Retry(NoBackoff(), 0)}
"""Cluster and Sentinel settings sessionq needs whatever the user gave: raw RESP2 replies,
and no command re-sent by redis-py after a connection error (MOVED/ASK/TRYAGAIN redirects
are still followed: the server did not run the command then)."""
_SENTINEL_DEFAULTS = {**_TIMEOUTS, "socket_keepalive": True, "health_check_interval": 15}


class Permits:
    """A first-come-first-served counting semaphore whose waits time out.

    Each cluster client holds one: a command takes a permit for as long as it holds a
    connection, so no node's pool (``max_connections``) can run dry, and when all are
    taken callers queue in order instead of failing at once (redis-py's behaviour).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._queue: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self, timeout: float) -> bool:
        """Take a permit; False when none came free within `timeout` seconds."""
        if self.in_use < self.limit and not self._queue:
            self.in_use += 1
            return True
        waiter = asyncio.get_running_loop().create_future()
        self._queue.append(waiter)
        try:
            await asyncio.wait([waiter], timeout=timeout)
        except BaseException:  # cancelled: a permit handed over meanwhile goes to the next one
            self._abandon(waiter)
            raise
        if waiter.done():
            return True  # release() handed its permit over to us
        self._abandon(waiter)
        return False

    def _abandon(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done() and not waiter.cancelled():
            self.release()
        else:
            waiter.cancel()
            with contextlib.suppress(ValueError):
                self._queue.remove(waiter)

    def release(self) -> None:
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the permit passes on; in_use is unchanged
                return
        self.in_use -= 1


_HOLDING: contextvars.ContextVar[object] = contextvars.ContextVar("sessionq_cluster_permit", default=None)
"""The client whose permit the current task holds, so nested calls do not take a second one."""


class ClusterClient(RedisCluster):
    """A RedisCluster that queues commands when its connections are all busy.

    Every command and pipeline first takes one of `max_connections` permits (one per
    connection a node's pool may hold), waiting up to `pool_timeout` seconds in order of
    arrival, then raises ConnectionPoolExhaustedError. redis-py itself raises at once.
    """

    pool_timeout: float = DEFAULT_POOL_TIMEOUT
    permits: Permits | None = None  # made on first use; `permits.in_use` shows what is held

    @contextlib.asynccontextmanager
    async def permit(self) -> AsyncIterator[None]:
        if _HOLDING.get() is self:
            yield
            return
        if self.permits is None:
            self.permits = Permits(int(self.connection_kwargs.get("max_connections") or 100))
        permits = self.permits
        if not await permits.acquire(self.pool_timeout):
            raise self.exhausted()
        token = _HOLDING.set(self)
        try:
            yield
        finally:
            _HOLDING.reset(token)
            permits.release()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        # redis-py picks a command's routing before it learns the slot map, so the first
        # commands of a fresh client go to random nodes; their MOVED replies then make it
        # close every connection, cutting off concurrent blocked reads. Learn the map first.
        if self._initialize:
            await self.initialize()
        async with self.permit():
            try:
                return await super().execute_command(*args, **kwargs)
            except _MaxConnectionsError as exc:
                if _pool_exhausted(exc):
                    raise self.exhausted() from exc
                raise

    async def _determine_slot(self, command: str, *args: Any) -> int:
        # redis-py asks the server (COMMAND GETKEYS: one more round trip) for the keys of
        # commands with movable keys; sessionq's blocking reads are such commands.
        keys = movable_keys(command, args)
        if keys:
            slots = {self.keyslot(key) for key in keys}
            if len(slots) == 1:
                return slots.pop()
        return await super()._determine_slot(command, *args)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        if shard_hint or (transaction and not _PIPELINE_TAKES_TRANSACTION):
            return super().pipeline(transaction, shard_hint)  # raises redis-py's own error
        if _PIPELINE_TAKES_TRANSACTION:
            return _PermitPipeline(self, transaction)
        return _PermitPipeline(self)  # redis-py 5.0: no transaction argument

    def exhausted(self) -> ConnectionPoolExhaustedError:
        limit = self.connection_kwargs.get("max_connections", "?")
        return pool_exhausted(limit, self.pool_timeout, "redis+cluster://")


_PIPELINE_TAKES_TRANSACTION = "transaction" in inspect.signature(ClusterPipeline.__init__).parameters


class _PermitPipeline(ClusterPipeline):
    """A cluster pipeline that takes a permit of its client while it executes."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        owner: ClusterClient = getattr(self, "cluster_client", None) or self._client  # redis-py 5.0: _client
        async with owner.permit():
            return await super().execute(raise_on_error, allow_redirections)


def movable_keys(command: Any, args: tuple[Any, ...]) -> list[Any]:
    """The keys of XREAD / XREADGROUP / BLMPOP / LMPOP, read from their arguments ([] if unsure)."""
    name = _text(command).upper()
    try:
        if name in ("XREAD", "XREADGROUP"):
            start = 3 if name == "XREADGROUP" else 0  # skip GROUP <group> <consumer>
            tokens = [_text(a).upper() for a in args]
            rest = args[tokens.index("STREAMS", start) + 1 :]
            return list(rest[: len(rest) // 2]) if rest and len(rest) % 2 == 0 else []
        if name in ("BLMPOP", "LMPOP"):
            at = 1 if name == "BLMPOP" else 0  # after the timeout
            return list(args[at + 1 : at + 1 + int(args[at])])
    except (ValueError, IndexError, TypeError):
        pass
    return []


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, (bytes, bytearray)) else str(value)


def _pool_exhausted(exc: Exception) -> bool:
    return type(exc).__name__ == "MaxConnectionsError" or "Too many connections" in str(exc)


def split_cluster_url(url: str) -> tuple[str, list[tuple[str, int]]]:
    """``redis+cluster://u:p@h1:1,h2:2/0?x=1`` -> (``redis://u:p@h1:1/0?x=1``, [(h1, 1), (h2, 2)])."""
    scheme, _, rest = url.partition("://")
    plain = CLUSTER_SCHEMES[scheme.lower()]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    auth, _, hosts = netloc.rpartition("@")
    nodes = []
    for part in hosts.split(","):
        if not part.strip():
            continue
        parsed = urlsplit(f"{plain}://{part.strip()}")
        try:
            port = parsed.port or 6379
        except ValueError as exc:
            raise ConfigurationError("redis", f"{url!r}: bad port in {part!r}") from exc
        if not parsed.hostname:
            raise ConfigurationError("redis", f"{url!r}: no host in {part!r}")
        nodes.append((parsed.hostname, port))
    if not nodes:
        raise ConfigurationError("redis", f"{url!r} names no node; use redis+cluster://host:port")
    first = hosts.split(",")[0].strip()
    single = f"{plain}://{auth + '@' if auth else ''}{first}{tail}"
    return single, nodes


def cluster_from_url(url: str) -> ClusterClient:
    """A cluster client from ``redis+cluster://[user:pass@]host:port[,host:port...][/0][?opts]``.

    Query options are redis-py's (``max_connections``, ``socket_timeout``, ``ssl_cert_reqs``...)
    plus sessionq's ``pool_timeout`` (seconds to wait for a free connection).
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
    pool_timeout = kwargs.pop("pool_timeout", DEFAULT_POOL_TIMEOUT)
    kwargs.setdefault("socket_keepalive", True)
    kwargs.setdefault("health_check_interval", 15)
    with_default_timeouts(kwargs)
    return _make_cluster([ClusterNode(host, port) for host, port in nodes], kwargs, pool_timeout, url)


_NOT_COPIED = {"host", "port", "max_connections", "maint_notifications_config", "event_dispatcher"}
"""Settings of a user's RedisCluster not carried over: per node, set below, or RESP3-only."""


def cluster_from_client(target: RedisCluster) -> ClusterClient:
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
    pool_timeout = getattr(target, "pool_timeout", DEFAULT_POOL_TIMEOUT)
    with_default_timeouts(kwargs)
    nodes = [ClusterNode(n.host, n.port) for n in known]
    return _make_cluster(nodes, kwargs, pool_timeout, repr(target))


def _make_cluster(
    nodes: list[ClusterNode], kwargs: dict[str, Any], pool_timeout: Any, what: str
) -> ClusterClient:
    try:
        client = ClusterClient(startup_nodes=nodes, **{**kwargs, **_FORCED})
        client.pool_timeout = float(pool_timeout)
    except (TypeError, ValueError, rexc.RedisClusterException) as exc:
        raise ConfigurationError("redis", f"cannot make a Redis Cluster client for {what}: {exc}") from exc
    return client
