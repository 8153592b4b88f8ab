"""The hot path's Redis connections: one shared connection for short commands, and a
connection of its own for each blocking read.

redis-py's client takes a connection from its pool for every command, wraps the call in
retry and timeout helpers, parses the reply through a callback and gives the connection
back. On the path of a session activity that bookkeeping costs more CPU than everything
else together. The hot path therefore drives redis-py's own ``Connection`` objects
directly (connect, AUTH, SELECT, TLS and the hiredis parser all stay redis-py's):

- `Multiplexer`: any number of concurrent commands share one connection. Each is written
  the moment it is issued and answered in order (auto-pipelining, as ioredis and
  node-redis do), so commands issued together travel together and no call waits for a
  free connection.
- `BlockingConnection`: one blocking read (XREAD/XREADGROUP BLOCK, BLMPOP) at a time, on a
  connection nothing else uses.
- `Wire`: routes a command by its key. One server has one multiplexer; a Redis Cluster has
  one per master. A MOVED reply makes it learn the slot map again (redis-py's nodes manager)
  and resend; an ASK reply, ASKING and the command to the node named. TRYAGAIN and
  CLUSTERDOWN are raised: they are transient, and the callers retry them.

Replies are raw RESP2 values (bytes, ints, lists, None); a Redis error reply raises
redis-py's ResponseError, and a lost connection fails every command in flight with
redis-py's ConnectionError, which `connection.retrying` and the worker loops retry.
A ``socket_timeout`` in the URL bounds each multiplexed command too; blocking reads are
bounded by their own BLOCK timeout.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import redis.exceptions as rexc
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .connection import is_cluster
from .errors import SessionqError

try:  # hiredis' C command packer: byte for byte what redis-py's Python one writes, ~6x faster
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # hiredis not installed, or older than 2.1
    _hiredis_pack = None

Command = Sequence[Any]
ConnectionFactory = Callable[[], AbstractConnection]


class Multiplexer:
    """Concurrent commands over one connection, written at once and answered in order."""

    def __init__(self, make_connection: ConnectionFactory, timeout: float | None = None) -> None:
        self._make_connection = make_connection
        self._timeout = timeout
        self._conn: AbstractConnection | None = None
        self._connecting: asyncio.Task[AbstractConnection] | None = None
        self._replies: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._reader: asyncio.Task[None] | None = None
        self._closed = False

    async def execute(self, *args: Any) -> Any:
        """Send one command and return its reply."""
        (future,) = await self.send((args,))
        if self._timeout is None:
            return await future
        try:
            return await asyncio.wait_for(future, self._timeout)
        except asyncio.TimeoutError:
            self._broken(self._conn, rexc.TimeoutError(f"Redis did not answer within {self._timeout:g}s"))
            raise rexc.TimeoutError(f"Redis did not answer {_name(args)} within {self._timeout:g}s") from None

    async def send(self, commands: Sequence[Command]) -> list[asyncio.Future[Any]]:
        """Write `commands` in one go and return futures for their replies, in order.

        The futures fail with ConnectionError if the connection drops before they are
        answered (the commands may or may not have run)."""
        conn = self._conn
        if conn is None or not conn.is_connected:
            conn = await self._connect()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        self._replies.extend(futures)
        packed = pack(conn, commands)
        try:
            await conn.send_packed_command(packed, check_health=False)
        except BaseException as exc:
            self._broken(conn, exc)
            raise
        return futures

    async def _connect(self) -> AbstractConnection:
        if self._closed:  # not a ConnectionError: retrying would wait for Redis in vain
            raise SessionqError("this Client (or Worker) was closed; create a new one to talk to Redis")
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._open())
        return await asyncio.shield(self._connecting)

    async def _open(self) -> AbstractConnection:
        conn = self._make_connection()
        await conn.connect()
        self._conn = conn
        self._reader = asyncio.create_task(self._read(conn), name="sessionq-wire-reader")
        return conn

    async def _read(self, conn: AbstractConnection) -> None:
        """Answer the oldest waiting future with each reply, until the connection fails."""
        replies = self._replies
        while True:
            try:
                reply: Any = await conn.read_response()
            except rexc.ResponseError as exc:
                reply = exc
            except BaseException as exc:  # the connection is gone (or we are closing)
                self._broken(conn, exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            if not replies:  # a reply nobody asked for: the stream is out of step
                self._broken(conn, rexc.ConnectionError("unexpected reply from Redis"))
                return
            future = replies.popleft()
            if future.done():
                continue  # its caller stopped waiting (cancelled or timed out)
            if isinstance(reply, rexc.ResponseError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def _broken(self, conn: AbstractConnection | None, exc: BaseException) -> None:
        """Drop the connection and fail every command still waiting on it."""
        if conn is None or conn is not self._conn:
            return
        self._conn = None
        error = (
            exc
            if isinstance(exc, rexc.ConnectionError | rexc.TimeoutError)
            else rexc.ConnectionError(f"Redis connection lost: {exc!r}")
        )
        while self._replies:
            future = self._replies.popleft()
            if not future.done():
                future.set_exception(error)
        reader = self._reader
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        self._reader = None
        task = asyncio.ensure_future(conn.disconnect(nowait=True))
        task.add_done_callback(_swallow)

    async def aclose(self) -> None:
        self._closed = True
        conn, reader = self._conn, self._reader
        self._broken(conn, rexc.ConnectionError("this sessionq connection was closed"))
        if reader is not None:
            with contextlib.suppress(BaseException):
                await reader
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)


class BlockingConnection:
    """A connection of its own for one blocking read at a time (XREAD BLOCK, BLMPOP)."""

    def __init__(self, make_connection: ConnectionFactory) -> None:
        self._make_connection = make_connection
        self._conn: AbstractConnection | None = None

    async def execute(self, *args: Any) -> Any:
        """Send the command and wait for its reply. A cancelled or failed read closes the
        connection (its late reply must not answer the next command); the next call reconnects."""
        conn = self._conn
        if conn is None:
            conn = self._conn = self._make_connection()
        if not conn.is_connected:
            await conn.connect()
        await conn.send_packed_command(pack(conn, (args,)), check_health=False)
        return await conn.read_response()

    async def aclose(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.disconnect(nowait=True)
            self._conn = None


class Wire:
    """The hot-path connections of one Client or Worker, to one server or a cluster."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self.cluster = is_cluster(redis)
        self._muxes: dict[str, Multiplexer] = {}
        self._blocking: set[BlockingConnection] = set()
        if not self.cluster:
            pool = redis.connection_pool
            timeout = pool.connection_kwargs.get("socket_timeout")
            self._single: Multiplexer | None = Multiplexer(_unbounded(pool.make_connection), timeout)
        else:
            self._single = None

    async def execute(self, key: Any, *args: Any) -> Any:
        """Run a command on the server that holds `key`; returns the raw reply."""
        if self._single is not None:
            return await self._single.execute(*args)
        try:
            return await (await self._mux_for(key)).execute(*args)
        except rexc.AskError as exc:  # MOVED or ASK (a MovedError is an AskError)
            return await self._redirected(key, exc, args)

    async def execute_many(self, key: Any, commands: Sequence[Command]) -> list[Any]:
        """Run several commands on keys of `key`'s slot, written at once; their replies in order.

        Raises the first error reply, after every command has been answered. On a cluster a
        command redirected elsewhere (MOVED, ASK) runs again where the reply points."""
        mux = self._single if self._single is not None else await self._mux_for(key)
        futures = await mux.send(commands)
        replies = await asyncio.gather(*futures, return_exceptions=True)
        for index, reply in enumerate(replies):
            if isinstance(reply, rexc.AskError) and self.cluster:
                replies[index] = await self._redirected(key, reply, commands[index])
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return replies

    async def _redirected(self, key: Any, redirect: rexc.AskError, command: Command) -> Any:
        """Run `command` where a cluster redirect points. MOVED: the slot has a new owner, so
        learn the slot map again and use it. ASK: the slot is being migrated and the key is
        already on the target, so send ASKING and the command there, in one write."""
        if isinstance(redirect, rexc.MovedError):
            await self.relearn_slots()
            return await (await self._mux_for(key)).execute(*command)
        node = self.redis.get_node(host=redirect.host, port=redirect.port)
        if node is None:  # a node the slot map does not know yet
            await self.relearn_slots()
            node = self.redis.get_node(host=redirect.host, port=redirect.port)
            if node is None:
                raise rexc.ClusterDownError(f"ASK points at {redirect.host}:{redirect.port}, no known node")
        _, reply = await asyncio.gather(*await self._mux_of(node).send([("ASKING",), command]))
        return reply

    async def relearn_slots(self) -> None:
        """Ask the cluster which master holds which slot (after a MOVED: resharding, failover)."""
        await self.redis.nodes_manager.initialize()

    def blocking(self, key: Any) -> BlockingRead:
        """A dedicated connection for blocking reads of `key` (kept until aclose)."""
        return BlockingRead(self, key)

    def _new_blocking(self, make_connection: ConnectionFactory) -> BlockingConnection:
        conn = BlockingConnection(make_connection)
        self._blocking.add(conn)
        return conn

    async def _drop_blocking(self, conn: BlockingConnection) -> None:
        self._blocking.discard(conn)
        await conn.aclose()

    async def _mux_for(self, key: Any) -> Multiplexer:
        return self._mux_of(await self._node_for(key))

    def _mux_of(self, node: Any) -> Multiplexer:
        mux = self._muxes.get(node.name)
        if mux is None:
            mux = Multiplexer(
                _unbounded(_node_connection_factory(node)), node.connection_kwargs.get("socket_timeout")
            )
            self._muxes[node.name] = mux
        return mux

    async def _node_for(self, key: Any) -> Any:
        if self.redis._initialize:  # the slot map is not known yet
            await self.redis.initialize()
        return self.redis.get_node_from_key(key)

    async def aclose(self) -> None:
        muxes = [self._single] if self._single is not None else list(self._muxes.values())
        for mux in muxes:
            await mux.aclose()
        for conn in list(self._blocking):
            await conn.aclose()


class BlockingRead:
    """Blocking reads of one key over a dedicated connection (on a cluster: to the master
    that holds the key, followed to a new one after MOVED)."""

    def __init__(self, wire: Wire, key: Any) -> None:
        self.wire = wire
        self.key = key
        self._conn: BlockingConnection | None = None
        self._node: str | None = None

    async def execute(self, *args: Any) -> Any:
        wire = self.wire
        if not wire.cluster:
            if self._conn is None:
                pool = wire.redis.connection_pool
                self._conn = wire._new_blocking(_unbounded(pool.make_connection))
            return await self._conn.execute(*args)
        try:
            return await self._execute_on_owner(args)
        except rexc.MovedError:
            await wire.relearn_slots()
        except rexc.AskError as exc:  # the key moves right now: the caller's loop retries soon
            raise rexc.TryAgainError(f"{self.key!r} is being migrated to {exc.host}:{exc.port}") from exc
        return await self._execute_on_owner(args)

    async def _execute_on_owner(self, args: Command) -> Any:
        node = await self.wire._node_for(self.key)
        if self._conn is None or self._node != node.name:
            if self._conn is not None:
                await self.wire._drop_blocking(self._conn)
            self._conn = self.wire._new_blocking(_unbounded(_node_connection_factory(node)))
            self._node = node.name
        return await self._conn.execute(*args)


def pack(conn: AbstractConnection, commands: Sequence[Command]) -> bytes | list[bytes]:
    """The wire form of `commands`: hiredis packs it when it can, redis-py otherwise (an
    argument type only redis-py's encoder knows, such as memoryview)."""
    if _hiredis_pack is not None:
        try:
            if len(commands) == 1:
                return _hiredis_pack(tuple(commands[0]))  # type: ignore[no-any-return]
            return b"".join([_hiredis_pack(tuple(command)) for command in commands])
        except TypeError:
            pass
    return conn.pack_command(*commands[0]) if len(commands) == 1 else conn.pack_commands(commands)


def stream_entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of a raw one-stream XREAD/XREADGROUP reply, fields as a dict ({} for an
    entry deleted after it was delivered)."""
    if not reply:
        return []
    return [
        (entry_id, dict(zip(flat[::2], flat[1::2], strict=True)) if flat else {})
        for entry_id, flat in reply[0][1]
    ]


def _node_connection_factory(node: Any) -> ConnectionFactory:
    """New connections to a cluster node, with its client's settings and no hidden retries."""
    kwargs = {**node.connection_kwargs, "retry": Retry(NoBackoff(), 0)}
    return lambda: node.connection_class(**kwargs)


def _unbounded(make_connection: ConnectionFactory) -> ConnectionFactory:
    """Connections without a socket read timeout: a multiplexed connection waits for replies
    while idle, and a blocking read for as long as its BLOCK says (the multiplexer applies
    any configured timeout per command instead)."""

    def make() -> AbstractConnection:
        conn = make_connection()
        conn.socket_timeout = None
        return conn

    return make


def _name(args: Command) -> str:
    first = args[0] if args else b"?"
    return first.decode() if isinstance(first, bytes) else str(first)


def _swallow(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()
