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
- `BlockingConnection`: one blocking read (XREAD/XREADGROUP BLOCK) at a time, on a
  connection nothing else uses.
- `Wire`: routes a command by its key. One server has one multiplexer; a Redis Cluster has
  one per master. A MOVED reply makes it learn the slot map again (redis-py's nodes manager)
  and resend; an ASK reply, ASKING and the command to the node named. TRYAGAIN and
  CLUSTERDOWN are raised: they are transient, and the callers retry them.

Replies are raw RESP2 values (bytes, ints, lists, None); a Redis error reply raises
redis-py's ResponseError, and a lost connection fails every command in flight with
redis-py's ConnectionError (faults.py says what is retried).

Nothing waits forever on a connection: a multiplexed command gets its reply within the
command timeout (``?socket_timeout=S``, default 5 s) or its connection is dropped and
every command in flight fails with TimeoutError; a blocking read within its BLOCK time
plus a margin. A frozen network path or a half-open socket thus costs one timeout, and
the next command reconnects.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import redis.exceptions as rexc
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .connection import DEFAULT_COMMAND_TIMEOUT, is_cluster
from .errors import SessionqError
from .faults import suggests_failover
from .sentinel import PrimaryWatch, is_sentinel_client

_hiredis_pack: Callable[..., bytes] | None
try:  # hiredis' C command packer: byte for byte what redis-py's Python one writes, ~6x faster
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # hiredis not installed, or older than 2.1
    _hiredis_pack = None

OVERDUE_GRACE = 0.05
"""After finding a reply overdue, how long the watchdog lets the reader catch up first."""
BLOCK_MARGIN = 2.0
"""Seconds a blocking read may overrun its BLOCK time before its connection counts as dead."""
RELEARN_INTERVAL = 0.25
"""Least seconds between two relearnings of a cluster's slot map after failures."""

Command = Sequence[Any]
ConnectionFactory = Callable[[], AbstractConnection]


class _SlotMapLoads:
    """The slot-map loads of one cluster client, one at a time (see `Wire.relearn_slots`)."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.begun = 0  # loads begun so far (numbered from 1)
        self.done = 0  # the number of the last one that completed


_slot_map_loads: weakref.WeakKeyDictionary[Any, _SlotMapLoads] = weakref.WeakKeyDictionary()
"""Per cluster client object (every Wire built on the same client shares its entry)."""


class Multiplexer:
    """Concurrent commands over one connection, written at once and answered in order.

    Each command is packed before anything is queued (a command that cannot be packed
    fails alone), then written into the transport's buffer in the same step as its reply
    future is queued, so replies can never shift to the wrong caller. A caller cancelled
    while waiting (even for a full send buffer) leaves the connection whole: its bytes are
    already buffered and its late reply is read and dropped. A watchdog fails every
    command in flight and drops the connection when the oldest one has waited `timeout`
    seconds: a frozen path or half-open socket costs one timeout, never a hang.
    """

    def __init__(self, make_connection: ConnectionFactory, timeout: float) -> None:
        self._make_connection = make_connection
        self._timeout = timeout
        self._conn: AbstractConnection | None = None
        self._connecting: asyncio.Task[AbstractConnection] | None = None
        self._replies: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._reader: asyncio.Task[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._overdue_since: float | None = None  # the deadline found overdue once (see _check_overdue)
        self._drain: asyncio.Future[None] | None = None
        self._high_water = 65536
        self._buffered: Callable[[], int] = lambda: 0
        self._closed = False

    async def execute(self, *args: Any, timeout: float | None = None) -> Any:
        """Send one command and return its reply. `timeout`, when shorter than the
        connection's, bounds this call alone (a heartbeat must not wait for the watchdog)."""
        (future,) = await self.send((args,))
        if timeout is None or timeout >= self._timeout:
            return await future
        conn = self._conn  # the connection it went out on (a later one is not to blame)
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            self._broken(conn, rexc.TimeoutError(f"Redis did not answer within {timeout:g}s"))
            raise rexc.TimeoutError(f"Redis did not answer {_name(args)} within {timeout:g}s") from None

    async def send(self, commands: Sequence[Command]) -> list[asyncio.Future[Any]]:
        """Write `commands` in one go and return futures for their replies, in order.

        The futures fail with ConnectionError if the connection drops before they are
        answered, or TimeoutError if it stays silent (the commands may or may not have run)."""
        conn = self._conn
        if conn is None or not conn.is_connected:
            conn = await self._connect()
        packed = pack(conn, commands)  # may raise: then nothing was queued or written
        writer = writer_of(conn)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        futures = [loop.create_future() for _ in commands]
        self._replies.extend((future, deadline) for future in futures)
        try:  # into the transport's buffer, at once: no await between queueing and writing
            writer.writelines((packed,) if isinstance(packed, bytes) else packed)
        except Exception as exc:  # the transport is gone: these fail with every other in flight
            self._broken(conn, exc)
            for future in futures:
                future.exception()  # retrieved here: the caller gets the exception raised below
            raise rexc.ConnectionError(f"Redis connection lost while writing: {exc!r}") from exc
        if self._watchdog is None:
            self._watchdog = loop.call_at(deadline, self._check_overdue)
        if self._buffered() > self._high_water:
            await self._drained(writer)
        return futures

    async def _drained(self, writer: asyncio.StreamWriter) -> None:
        """Wait until the send buffer drains (flow control). One shared drain per
        connection, shielded: a cancelled caller must not cut the write short."""
        drain = self._drain
        if drain is None or drain.done():
            drain = self._drain = asyncio.ensure_future(writer.drain())
            drain.add_done_callback(_swallow)
        with contextlib.suppress(Exception):  # a lost connection fails the futures instead
            await asyncio.shield(drain)

    def _check_overdue(self) -> None:
        """The watchdog: the oldest command in flight waited too long, so the connection is dead."""
        self._watchdog = None
        replies = self._replies  # the head counts even if its caller stopped waiting: all wait on it
        if not replies:
            return
        loop = asyncio.get_running_loop()
        deadline = replies[0][1]
        now = loop.time()
        if deadline > now:
            self._watchdog = loop.call_at(deadline, self._check_overdue)
        elif self._overdue_since is None or self._overdue_since != deadline:
            # Overdue by our clock, but after a stall of this process the reply may sit unread
            # in the socket: let the reader run before calling the connection dead.
            self._overdue_since = deadline
            self._watchdog = loop.call_at(now + OVERDUE_GRACE, self._check_overdue)
        else:
            self._broken(
                self._conn,
                rexc.TimeoutError(f"Redis sent no reply for {self._timeout:g}s; the connection was dropped"),
            )

    async def _connect(self) -> AbstractConnection:
        if self._closed:  # not a ConnectionError: retrying would wait for Redis in vain
            raise SessionqError("this Client (or Worker) was closed; create a new one to talk to Redis")
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._open())
        return await asyncio.shield(self._connecting)

    async def _open(self) -> AbstractConnection:
        conn = self._make_connection()
        conn.socket_timeout = self._timeout  # bounds the handshake (AUTH, SELECT...)
        await conn.connect()
        conn.socket_timeout = None  # the reader waits for replies while idle: the watchdog bounds it
        self._conn = conn
        transport = writer_of(conn).transport
        limits = getattr(transport, "get_write_buffer_limits", None)  # absent on fakeredis' fake sockets
        self._high_water = limits()[1] if limits is not None else -1  # -1: always wait for the drain
        self._buffered = getattr(transport, "get_write_buffer_size", lambda: 0)
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
            future = replies.popleft()[0]
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
            future = self._replies.popleft()[0]
            if not future.done():
                future.set_exception(error)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        reader = self._reader
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        self._reader = None
        task = asyncio.ensure_future(conn.disconnect(nowait=True))
        task.add_done_callback(_swallow)

    def drop_unless_to(self, address: tuple[str, int]) -> None:
        """Drop the connection if it is not to `address` (a new primary was named); the
        commands in flight fail with ConnectionError and their callers retry."""
        conn = self._conn
        if conn is not None and not _is_to(conn, address):
            self._broken(conn, rexc.ConnectionError(f"Redis' primary is now {address[0]}:{address[1]}"))

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
    """A connection of its own for one blocking read at a time (XREAD BLOCK, XREADGROUP).

    Its replies are due within the read's BLOCK time plus a margin (`read_timeout`): one
    that does not come by then means a frozen path or half-open socket, so the connection
    is aborted (a late reply must not answer the next command), the read fails with
    TimeoutError, and the next call reconnects. A watchdog that looks every eighth of it
    does it: neither a timer per read nor redis-py's socket timeout, which costs a timeout
    context per reply read."""

    def __init__(self, make_connection: ConnectionFactory, read_timeout: float) -> None:
        self._make_connection = make_connection
        self._read_timeout = read_timeout
        self._conn: AbstractConnection | None = None
        self._reading_since: float | None = None  # loop time the read under way began
        self._overdue = False
        self._watchdog: asyncio.TimerHandle | None = None

    def _watch(self) -> None:
        self._watchdog = None
        since = self._reading_since
        if since is None:
            return  # idle: re-armed by the next read
        loop = asyncio.get_running_loop()
        if loop.time() - since > self._read_timeout:
            self._overdue = True
            transport = getattr(getattr(self._conn, "_writer", None), "transport", None)
            if transport is not None:
                transport.abort()
            return
        self._watchdog = loop.call_later(self._read_timeout / 8, self._watch)

    async def execute_many(self, commands: Sequence[Command]) -> list[Any]:
        """Send the commands in one write and read every reply; raises the first error reply
        once all are read. A cancelled, failed or overdue read closes the connection."""
        conn = self._conn
        if conn is None:
            conn = self._conn = self._make_connection()
        if not conn.is_connected:
            conn.socket_timeout = self._read_timeout  # bounds the handshake (AUTH, SELECT...)
            await conn.connect()
            conn.socket_timeout = None  # the watchdog bounds the reads
        packed = pack(conn, commands)
        writer = writer_of(conn)
        loop = asyncio.get_running_loop()
        self._reading_since, self._overdue = loop.time(), False
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._read_timeout / 8, self._watch)
        try:
            # Straight into the transport (redis-py's send wraps each write in a task to time it).
            writer.writelines((packed,) if isinstance(packed, bytes) else packed)
            await writer.drain()
            replies: list[Any] = []
            error: rexc.ResponseError | None = None
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except rexc.ResponseError as exc:
                    error = error or exc
                    replies.append(exc)
        except BaseException as exc:
            await conn.disconnect(nowait=True)
            if self._overdue and isinstance(exc, Exception):
                raise rexc.TimeoutError(
                    f"Redis sent no reply within {self._read_timeout:g}s; the connection was dropped"
                ) from exc
            raise
        finally:
            self._reading_since = None
        if error is not None:
            raise error
        return replies

    def drop_unless_to(self, address: tuple[str, int]) -> None:
        """Abort the connection if it is not to `address`: a read under way fails (its caller
        retries) and the next one connects to the new primary."""
        conn = self._conn
        if conn is not None and conn.is_connected and not _is_to(conn, address):
            transport = getattr(getattr(conn, "_writer", None), "transport", None)
            if transport is not None:
                transport.abort()

    async def aclose(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.disconnect(nowait=True)
            self._conn = None


class Wire:
    """The hot-path connections of one Client or Worker, to one server or a cluster."""

    def __init__(self, redis: Any, timeout: float | None = None) -> None:
        """`timeout` overrides the command timeout of the client's settings (the heartbeat's
        own connections use its interval: a beat must not wait longer than that)."""
        self.redis = redis
        self.cluster = is_cluster(redis)
        self._muxes: dict[str, Multiplexer] = {}
        self._blocking: set[BlockingConnection] = set()
        settings = redis.connection_kwargs if self.cluster else redis.connection_pool.connection_kwargs
        self.timeout: float = timeout or settings.get("socket_timeout") or DEFAULT_COMMAND_TIMEOUT
        self._single: Multiplexer | None = (
            None if self.cluster else Multiplexer(redis.connection_pool.make_connection, self.timeout)
        )
        self._slots_known = False
        self._relearnt_at = -RELEARN_INTERVAL
        self._watch = PrimaryWatch(redis, self.primary_is) if is_sentinel_client(redis) else None

    async def execute(self, key: Any, *args: Any, timeout: float | None = None) -> Any:
        """Run a command on the server that holds `key`; returns the raw reply. `timeout`
        may shorten the wait for this one reply (default: the connection's command timeout)."""
        if self._single is not None:
            if self._watch is not None:
                self._watch.start()
            return await self._single.execute(*args, timeout=timeout)
        try:
            return await (await self._mux_for(key)).execute(*args, timeout=timeout)
        except rexc.AskError as exc:  # MOVED or ASK (a MovedError is an AskError)
            return await self._redirected(key, exc, args)
        except Exception as exc:
            await self.after_failure(exc)
            raise

    async def after_failure(self, exc: BaseException) -> None:
        """A cluster command failed the way a failover would make it fail (its master
        unreachable or silent, demoted to a replica, or its cluster down): learn the slot
        map again, at most every RELEARN_INTERVAL seconds, so that the caller's retry goes
        to whichever master holds the slot now. Raises nothing: the caller raises `exc`."""
        if not self.cluster or not suggests_failover(exc):
            return
        loop = asyncio.get_running_loop()
        if loop.time() - self._relearnt_at < RELEARN_INTERVAL:
            return
        self._relearnt_at = loop.time()
        with contextlib.suppress(Exception):  # no node answers yet: the next failure tries again
            await asyncio.wait_for(self.relearn_slots(), self.timeout)

    async def execute_many(
        self, key: Any, commands: Sequence[Command], *, return_exceptions: bool = False
    ) -> list[Any]:
        """Run several commands on keys of `key`'s slot, written at once; their replies in order.

        Raises the first error reply, after every command has been answered (or, with
        `return_exceptions`, returns each command's error in its place). On a cluster a
        command redirected elsewhere (MOVED, ASK) runs again where the reply points."""
        if self._single is not None:
            if self._watch is not None:
                self._watch.start()
            replies = await asyncio.gather(*await self._single.send(commands), return_exceptions=True)
        else:
            try:
                futures = await (await self._mux_for(key)).send(commands)
            except Exception as exc:
                await self.after_failure(exc)
                raise
            replies = await asyncio.gather(*futures, return_exceptions=True)
            for index, reply in enumerate(replies):
                if isinstance(reply, rexc.AskError):
                    try:
                        replies[index] = await self._redirected(key, reply, commands[index])
                    except Exception as exc:
                        replies[index] = exc
            failed = next((r for r in replies if isinstance(r, Exception) and suggests_failover(r)), None)
            if failed is not None:
                await self.after_failure(failed)
        if not return_exceptions:
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

    def primary_is(self, address: tuple[str, int]) -> None:
        """The sentinels name `address` the primary: drop every connection to another server."""
        if self._single is not None:
            self._single.drop_unless_to(address)
        for conn in list(self._blocking):
            conn.drop_unless_to(address)

    async def relearn_slots(self) -> None:
        """Ask the cluster which master holds which slot (after a MOVED: resharding, failover).

        One load at a time per cluster client: redis-py before 6.1 (5.0.8 is supported)
        iterates its startup nodes across awaits in ``NodesManager.initialize`` and replaces
        them when done, so two loads at once (commands redirected or failing together) could
        fail with "RuntimeError: dictionary changed size during iteration" (redis-py issue
        3565). A caller that waited while a load begun after its request ran uses that map."""
        await self._load_slots(self.redis.nodes_manager.initialize)

    async def _load_slots(self, load: Callable[[], Any], *, reuse: bool = True) -> None:
        loads = _slot_map_loads.get(self.redis)
        if loads is None:
            loads = _slot_map_loads[self.redis] = _SlotMapLoads()
        asked = loads.begun
        async with loads.lock:
            if not (reuse and loads.done > asked):  # else one begun after we asked completed
                loads.begun += 1
                number = loads.begun
                await load()
                loads.done = number
        self._slots_known = True

    def blocking(self, key: Any, block: float) -> BlockingRead:
        """A dedicated connection for blocking reads of `key` that block up to `block`
        seconds (kept until aclose); a reply later than that plus a margin drops it."""
        return BlockingRead(self, key, block + BLOCK_MARGIN)

    def _new_blocking(self, make_connection: ConnectionFactory, read_timeout: float) -> BlockingConnection:
        conn = BlockingConnection(make_connection, read_timeout)
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
            mux = Multiplexer(_node_connection_factory(node), self.timeout)
            self._muxes[node.name] = mux
        return mux

    async def _node_for(self, key: Any) -> Any:
        if not self._slots_known:  # load the slot map before the first command
            await self._load_slots(self.redis.initialize, reuse=False)  # a no-op once loaded
        return self.redis.get_node_from_key(key)

    async def aclose(self) -> None:
        if self._watch is not None:
            await self._watch.aclose()
        muxes = [self._single] if self._single is not None else list(self._muxes.values())
        for mux in muxes:
            await mux.aclose()
        for conn in list(self._blocking):
            await conn.aclose()


class BlockingRead:
    """Blocking reads of one key over a dedicated connection (on a cluster: to the master
    that holds the key, followed to a new one after MOVED)."""

    def __init__(self, wire: Wire, key: Any, read_timeout: float) -> None:
        self.wire = wire
        self.key = key
        self.read_timeout = read_timeout
        self._conn: BlockingConnection | None = None
        self._node: str | None = None

    async def execute(self, *args: Any) -> Any:
        return (await self.execute_many((args,)))[-1]

    async def execute_many(self, commands: Sequence[Command]) -> list[Any]:
        """Write `commands` at once and return their replies (the last one may block)."""
        wire = self.wire
        if not wire.cluster:
            if wire._watch is not None:
                wire._watch.start()
            if self._conn is None:
                pool = wire.redis.connection_pool
                self._conn = wire._new_blocking(pool.make_connection, self.read_timeout)
            return await self._conn.execute_many(commands)
        try:
            return await self._execute_on_owner(commands)
        except rexc.MovedError:
            await wire.relearn_slots()
        except rexc.AskError as exc:  # the key moves right now: the caller's loop retries soon
            raise rexc.TryAgainError(f"{self.key!r} is being migrated to {exc.host}:{exc.port}") from exc
        except Exception as exc:
            await wire.after_failure(exc)
            raise
        return await self._execute_on_owner(commands)

    async def aclose(self) -> None:
        """Close this reader's connection (the wire's aclose closes it otherwise)."""
        if self._conn is not None:
            await self.wire._drop_blocking(self._conn)
            self._conn = None

    async def _execute_on_owner(self, commands: Sequence[Command]) -> list[Any]:
        node = await self.wire._node_for(self.key)
        if self._conn is None or self._node != node.name:
            if self._conn is not None:
                await self.wire._drop_blocking(self._conn)
            self._conn = self.wire._new_blocking(_node_connection_factory(node), self.read_timeout)
            self._node = node.name
        return await self._conn.execute_many(commands)


def pack(conn: AbstractConnection, commands: Sequence[Command]) -> bytes | list[bytes]:
    """The wire form of `commands`: hiredis packs it when it can, redis-py otherwise (an
    argument type only redis-py's encoder knows, such as memoryview)."""
    if _hiredis_pack is not None:
        try:
            if len(commands) == 1:
                return _hiredis_pack(tuple(commands[0]))
            return b"".join([_hiredis_pack(tuple(command)) for command in commands])
        except TypeError:
            pass
    return conn.pack_command(*commands[0]) if len(commands) == 1 else conn.pack_commands(commands)


def writer_of(conn: AbstractConnection) -> asyncio.StreamWriter:
    """The stream a connected redis-py connection writes to (we write to it directly)."""
    writer: asyncio.StreamWriter | None = getattr(conn, "_writer", None)
    if writer is None:  # disconnected meanwhile
        raise rexc.ConnectionError("Redis connection closed")
    return writer


def _node_connection_factory(node: Any) -> ConnectionFactory:
    """New connections to a cluster node, with its client's settings and no hidden retries."""
    kwargs = {**node.connection_kwargs, "retry": Retry(NoBackoff(), 0)}
    return lambda: node.connection_class(**kwargs)


def _is_to(conn: AbstractConnection, address: tuple[str, int]) -> bool:
    return (getattr(conn, "host", None), getattr(conn, "port", None)) == address


def _name(args: Command) -> str:
    first = args[0] if args else b"?"
    return first.decode() if isinstance(first, bytes) else str(first)


def _swallow(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()
