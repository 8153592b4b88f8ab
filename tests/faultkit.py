"""Fault-injection kit for tests: make Redis, or the network path to it, misbehave on cue.

Failure modes a worker must survive, and how this kit produces each:

- ``Relay``: a RESP-aware TCP relay between the code under test and one Redis server. It
  matches every reply to the command it answers (replies come back in command order on a
  connection, however many are pipelined and however late a blocking command answers),
  so a test can:

  - ``cut()``: connections reset, new ones refused (a crashed server, a dead link);
  - ``freeze()`` / ``partition()``: connections stay open but nothing moves, new ones
    connect and then hear nothing (a half-open connection, a black-holed network path),
    the failures only timeouts and heartbeats can detect;
  - ``drop_reply()``: Redis runs a command but the connection dies before the client
    reads the reply (the popped element or delivered entry is lost unless the code
    under test copes);
  - ``inject_error()``: Redis refuses chosen commands (NOPERM, READONLY, LOADING, OOM,
    ...) without it having to be put in that state, the rest of a pipeline untouched.

- ``PrivateRedis`` / ``PrivateFakeRedis``: a restartable server of one's own (redis-server
  child process, or fakeredis in a thread), restarted with or without its data on the same
  port, as a server restart or failover looks to a client.
- ``TemporaryAclUser``: a throw-away ACL user on a real Redis whose command rights a test
  can revoke while its connections stay open.

Everything is plain classes, no fixtures; the relay runs on the test's event loop, the
servers' methods are synchronous (they run between awaits).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
import redis

from tests.ports import release, reserve_port

log = logging.getLogger("tests.faultkit")

__all__ = [
    "DropRule",
    "ErrorRule",
    "Frame",
    "PrivateFakeRedis",
    "PrivateRedis",
    "ProtocolError",
    "Relay",
    "RelayConnection",
    "RespParser",
    "ServerStartError",
    "TemporaryAclUser",
    "free_port",
    "private_server",
    "wait_redis_up",
]


# --- RESP parsing ----------------------------------------------------------------------


class ProtocolError(ValueError):
    """Bytes that are not RESP (or, in command mode, not a RESP command)."""


class Frame(NamedTuple):
    """One complete top-level RESP frame found by ``RespParser.feed``."""

    end: int
    """Offset just past the frame in the ``consumed`` bytes returned alongside it."""
    kind: int
    """Its first byte: ``ord("*")`` for an array, ``ord("-")`` for an error, ..."""
    empty: bool
    """Null or empty: ``$-1``, ``*-1``, ``*0`` (and RESP3 ``_``, ``%0``, ``~0``)."""
    name: str | None
    """Command mode only: the upper-cased command name (first bulk string)."""


_BULK = frozenset(b"$!=")  # bulk string, RESP3 blob error, verbatim string
_AGGREGATE = frozenset(b"*~>")  # array, RESP3 set and push
_PAIRS = frozenset(b"%|")  # RESP3 map and attribute: two elements per entry
_LINE = frozenset(b"+-:_,#(")  # simple string, error, integer, RESP3 null/double/boolean/big number
_ARRAY = ord("*")
_PUSH = ord(">")
_NULL = ord("_")
_ATTRIBUTE = ord("|")
_ERRORS = frozenset(b"-!")
_CR, _LF = 13, 10
_NAME_CACHE: dict[bytes, str] = {}


def command_name(raw: bytes) -> str:
    """``b"xreadgroup"`` -> ``"XREADGROUP"``, cached: the same few names recur millions of times."""
    name = _NAME_CACHE.get(raw)
    if name is None:
        name = raw.decode("utf-8", "replace").upper()
        if len(_NAME_CACHE) < 4096:  # a client sending random names cannot grow it forever
            _NAME_CACHE[raw] = name
    return name


class RespParser:
    """Incremental RESP2/RESP3 frame scanner: finds where frames end, does not build values.

    Feed it bytes as they arrive; it returns the complete frames and keeps the partial
    tail, resuming where it stopped (a 5 MB bulk string or a long array arriving in many
    reads is scanned once, not once per read). Values are never materialised, so the cost
    is one ``find`` per element and nothing per payload byte.

    ``commands=True`` parses a client's stream: every frame must be an array, and its first
    bulk string becomes ``Frame.name``. RESP3 types are accepted in replies because redis-py
    8 speaks RESP3 unless told ``protocol=2``.

    Never raises on bad input: it sets ``error``, stops, and ``drain()`` returns what is
    left, for the caller to forward raw.
    """

    __slots__ = ("_buf", "_commands", "_empty", "_kind", "_name", "_pos", "_stack", "_want_name", "error")

    def __init__(self, *, commands: bool = False) -> None:
        self._commands = commands
        self._buf = bytearray()
        self._pos = 0  # where the next element (header) starts in _buf
        self._stack: list[int] = []  # elements still expected by each open aggregate
        self._kind = 0
        self._empty = False
        self._name: str | None = None
        self._want_name = False
        self.error: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes held back: the start of a frame not complete yet."""
        return len(self._buf)

    def feed(self, data: bytes) -> tuple[bytes, list[Frame]]:
        """Take ``data``; return (the bytes of the frames now complete, those frames)."""
        if self.error is not None:
            self._buf += data
            return b"", []
        if self._buf:
            self._buf += data
            buf: bytes | bytearray = self._buf
        else:
            buf = data  # common case: nothing held back, scan the read itself (no copy)
        frames = self._scan(buf)
        consumed = frames[-1].end if frames else 0
        self._pos -= consumed
        if buf is not data:
            chunk = bytes(self._buf[:consumed])
            del self._buf[:consumed]
            return chunk, frames
        if consumed == len(data):
            return data, frames
        self._buf = bytearray(data[consumed:])
        return data[:consumed], frames

    def drain(self) -> bytes:
        """Everything held back, emptied (after an ``error``: the bytes to forward raw)."""
        rest = bytes(self._buf)
        self._buf.clear()
        self._pos = 0
        self._stack.clear()
        return rest

    def _fail(self, reason: str, buf: bytes | bytearray, at: int) -> None:
        self.error = f"{reason} at byte {at}: {bytes(buf[at : at + 40])!r}"

    def _scan(self, buf: bytes | bytearray) -> list[Frame]:
        # The hot loop of the relay: locals only, bulk strings (most elements) tested first.
        frames: list[Frame] = []
        stack = self._stack
        pos = self._pos
        size_of = len(buf)
        find = buf.find
        commands = self._commands
        kind0, empty, name, want_name = self._kind, self._empty, self._name, self._want_name
        while pos < size_of:
            kind = buf[pos]
            eol = find(b"\r\n", pos + 1)
            if eol < 0:
                break
            top = not stack
            if top:
                if commands and kind != _ARRAY:
                    self._fail("not a RESP command array", buf, pos)
                    break
                kind0, empty, name = kind, False, None
            if kind in _BULK:
                try:
                    size = int(buf[pos + 1 : eol])
                except ValueError:
                    self._fail("bad bulk length", buf, pos)
                    break
                if size >= 0:
                    nxt = eol + 4 + size
                    if nxt > size_of:
                        break  # payload incomplete: resume at this header next time
                    if buf[nxt - 2] != _CR or buf[nxt - 1] != _LF:
                        self._fail("bulk string not followed by CRLF", buf, pos)
                        break
                    if want_name:
                        name = command_name(bytes(buf[eol + 2 : nxt - 2]))
                elif size == -1:
                    nxt = eol + 2
                    empty = empty or top
                else:
                    self._fail("bad bulk length", buf, pos)
                    break
            elif kind in _LINE:
                nxt = eol + 2
                if top and kind == _NULL:
                    empty = True
            elif kind in _AGGREGATE or kind in _PAIRS:
                try:
                    count = int(buf[pos + 1 : eol])
                except ValueError:
                    self._fail("bad aggregate length", buf, pos)
                    break
                if count > 0:
                    if kind in _PAIRS:
                        # An attribute (|) is followed by the value it describes: one more element.
                        count = 2 * count + (kind == _ATTRIBUTE)
                    stack.append(count)
                    want_name = top and commands
                    pos = eol + 2
                    continue
                if count < -1:
                    self._fail("bad aggregate length", buf, pos)
                    break
                nxt = eol + 2
                empty = empty or top
            else:
                self._fail("unknown RESP type", buf, pos)
                break
            want_name = False
            pos = nxt
            while stack:  # one element done: close every aggregate it completes
                stack[-1] -= 1
                if stack[-1]:
                    break
                stack.pop()
            if not stack:
                frames.append(Frame(pos, kind0, empty, name))
        self._pos = pos
        self._kind, self._empty, self._name, self._want_name = kind0, empty, name, want_name
        return frames


# --- the relay ---------------------------------------------------------------------------


_SCRIPT_CALLS = frozenset({"EVALSHA", "EVAL"})


def _first_argument(frame: memoryview) -> str:
    """The first argument of a RESP command frame (the script's SHA of an EVALSHA), or ""."""
    raw = bytes(frame)
    try:
        header = raw.index(b"\r\n")  # *<n>
        name_len_end = raw.index(b"\r\n", header + 2)  # $<len> of the name
        name_len = int(raw[header + 3 : name_len_end])
        arg_at = name_len_end + 2 + name_len + 2
        arg_len_end = raw.index(b"\r\n", arg_at)
        arg_len = int(raw[arg_at + 1 : arg_len_end])
        return raw[arg_len_end + 2 : arg_len_end + 2 + arg_len].decode("utf-8", "replace")
    except ValueError:
        return ""


def _name_set(commands: Iterable[str] | str) -> frozenset[str]:
    """Upper-cased command names; a lone string is one name, not a set of letters."""
    if isinstance(commands, str):
        commands = (commands,)
    names = frozenset(name.upper() for name in commands)
    if not names:
        raise ValueError("no command names given")
    return names


class DropRule:
    """``Relay.drop_reply``: swallow the next ``count`` matching replies, killing their connections."""

    def __init__(self, commands: frozenset[str], nonempty: bool, count: int) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        self.commands = commands
        self.nonempty = nonempty
        self.count = count
        self.dropped: list[bytes] = []
        """The raw replies swallowed so far (the data the client never got)."""
        self.fired = asyncio.Event()
        """Set once ``count`` replies have been dropped."""
        self.cancelled = False

    @property
    def active(self) -> bool:
        return not self.cancelled and len(self.dropped) < self.count

    def cancel(self) -> None:
        self.cancelled = True

    def matches(self, name: str, kind: int, empty: bool) -> bool:
        """`name` is a command name, or "EVALSHA <sha>" for a script call (a rule may name
        either the command or that one script)."""
        if not self.active or (name not in self.commands and name.split(" ", 1)[0] not in self.commands):
            return False
        # A null/empty reply carried nothing to lose, and an error means nothing ran.
        return not self.nonempty or not (empty or kind in _ERRORS)

    def record(self, reply: bytes) -> None:
        self.dropped.append(reply)
        if len(self.dropped) >= self.count:
            self.fired.set()

    def __repr__(self) -> str:
        return f"DropRule({sorted(self.commands)}, dropped={len(self.dropped)}/{self.count})"


class ErrorRule:
    """``Relay.inject_error``: answer matching commands with an error instead of forwarding them."""

    def __init__(
        self, commands: frozenset[str], error: str, count: int | None, seconds: float | None
    ) -> None:
        if count is not None and count < 1:
            raise ValueError("count must be at least 1")
        self.commands = commands
        # A CR or LF would end the error line early and desynchronise the client.
        self.error = " ".join(error.replace("\r", " ").replace("\n", " ").split())
        self.reply = b"-" + self.error.encode() + b"\r\n"
        self.count = count
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.hits = 0
        """Commands answered with the error so far."""
        self.fired = asyncio.Event()
        """Set on the first injected error."""
        self.cancelled = False

    @property
    def active(self) -> bool:
        if self.cancelled or (self.count is not None and self.hits >= self.count):
            return False
        return self.deadline is None or time.monotonic() < self.deadline

    def cancel(self) -> None:
        self.cancelled = True

    def take(self, name: str) -> bytes | None:
        """The error reply if this rule answers command ``name`` now (counted as a hit)."""
        if name not in self.commands or not self.active:
            return None
        self.hits += 1
        self.fired.set()
        return self.reply

    def __repr__(self) -> str:
        return f"ErrorRule({sorted(self.commands)}, {self.error!r}, hits={self.hits})"


_QUEUED = ""
"""FIFO entry of a command sent inside MULTI (its reply is +QUEUED): never matched by a rule."""
_SWITCH = object()
"""FIFO entry after which replies cannot be matched any more (pub/sub, MONITOR, unparseable
client bytes): from there on the server's bytes are forwarded raw."""
_UNTRACKABLE = frozenset({"SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "MONITOR"})


class _Endpoint(asyncio.Protocol):
    """asyncio protocol of one socket of a relayed connection (the client's or Redis's)."""

    def __init__(self, relay: Relay, conn: RelayConnection | None, client_side: bool) -> None:
        self.relay = relay
        self.conn = conn
        self.client_side = client_side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self.client_side:
            self.conn = self.relay._accepted(transport)
        elif self.conn is not None:
            self.conn._upstream_made(transport)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is None or conn.closed:
            return
        try:
            if self.client_side:
                conn._from_client(data)
            else:
                conn._from_server(data)
        except Exception:  # the relay must never take a test down with it
            log.exception("relay connection %s: internal error, aborting it", conn.id)
            conn.abort()

    def eof_received(self) -> bool:
        if self.conn is not None:
            self.conn._eof(self.client_side)
        return False  # asyncio closes this transport; _eof closed the other one

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.conn._lost(self.client_side, exc)

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn._write_blocked(self.client_side, True)

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn._write_blocked(self.client_side, False)


WRITE_BUFFER_HIGH = 32 * 1024 * 1024
"""Bytes a relayed connection buffers for a slow reader before it stops reading the other side.

Generous on purpose: fakeredis' TCP server writes to a non-blocking socket and hangs up with
``-ERR 11`` (EAGAIN) as soon as the socket buffer is full, so the relay must keep reading
Redis even while a client is slow to take a multi-megabyte reply."""


class RelayConnection:
    """One client connection relayed to Redis, with its command FIFO and fault state."""

    def __init__(self, relay: Relay, conn_id: int, client: asyncio.Transport, frozen: bool) -> None:
        self.relay = relay
        self.id = conn_id
        self.client_address: Any = client.get_extra_info("peername")
        self.commands: list[str] = []
        """Name of every command the client sent on it, in order (including ones the relay answered)."""
        self.names: set[str] = set()
        """The distinct names in ``commands`` (what ``Relay.freeze`` selects on)."""
        self.frozen = frozen
        self.closed = False
        self.bytes_from_client = 0
        self.bytes_from_server = 0
        self._client = client
        self._server: asyncio.Transport | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._to_server: list[bytes] = []  # only while the upstream connection is being made
        self._pending: deque[Any] = deque()  # str: awaiting Redis's reply; bytes: injected reply
        self._specials = 0  # injected replies and _SWITCH entries in _pending
        self._tracking = True  # False once replies cannot be matched (pub/sub...)
        self._in_multi = False
        self._commands_in = RespParser(commands=True)
        self._replies_in = RespParser()
        self._client_raw = False
        self._server_raw = False
        self._blocked: set[bool] = set()  # sides whose write buffer is full
        client.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        client.pause_reading()  # until the upstream connection exists

    def __repr__(self) -> str:
        state = "closed" if self.closed else "frozen" if self.frozen else "live"
        return f"<RelayConnection {self.id} {state} from {self.client_address}>"

    # -- controls ----------------------------------------------------------------------

    def freeze(self) -> None:
        """Stop relaying both ways; the sockets stay open and arriving bytes wait in the kernel."""
        if not self.closed:
            self.frozen = True
            self._sync_reading()

    def unfreeze(self) -> None:
        """Resume relaying: whatever arrived meanwhile is delivered in order."""
        if self.closed or not self.frozen:
            return
        self.frozen = False
        if self._server is None and self._connecting is None:
            self._connect_upstream()  # accepted during a partition: connect now
        self._sync_reading()

    def abort(self) -> None:
        """Reset both sides at once (no flush, RST-like)."""
        self._client.abort()
        if self._server is not None:
            self._server.abort()
        self._finish()

    # -- plumbing ----------------------------------------------------------------------

    def _connect_upstream(self) -> None:
        self._connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        host, port = self.relay.target
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: _Endpoint(self.relay, self, False), host, port)
        except OSError as exc:
            log.info(
                "relay connection %s: cannot reach %s:%s (%s); dropping the client", self.id, host, port, exc
            )
            self.abort()

    def _upstream_made(self, transport: asyncio.Transport) -> None:
        if self.closed:
            transport.abort()
            return
        self._server = transport
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        if self._to_server:
            transport.write(b"".join(self._to_server))
            self._to_server.clear()
        self._sync_reading()

    def _sync_reading(self) -> None:
        """Read a side only when not frozen and the other side can take more bytes."""
        client_ok = not self.frozen and self._server is not None and False not in self._blocked
        server_ok = not self.frozen and True not in self._blocked
        for transport, ok in ((self._client, client_ok), (self._server, server_ok)):
            if transport is None or transport.is_closing():
                continue
            if ok and not transport.is_reading():
                transport.resume_reading()
            elif not ok and transport.is_reading():
                transport.pause_reading()

    def _write_blocked(self, client_side: bool, blocked: bool) -> None:
        if blocked:
            self._blocked.add(client_side)
        else:
            self._blocked.discard(client_side)
        self._sync_reading()

    def _write_server(self, data: bytes) -> None:
        if self._server is None:
            self._to_server.append(data)
        else:
            self._server.write(data)

    def _eof(self, client_side: bool) -> None:
        """One side closed: close the other once what is buffered for it is written.

        A full close, not a half-close: Redis drops a client whose input ends anyway, and a
        client would otherwise sit on a connection whose server is gone until it next writes.
        """
        other = self._server if client_side else self._client
        if other is not None:
            other.close()

    def _lost(self, client_side: bool, exc: Exception | None) -> None:
        """One socket is gone: close the other (reset it if this one was reset)."""
        other = self._server if client_side else self._client
        if other is not None:
            if exc is None:
                other.close()  # flushes what is buffered first
            else:
                other.abort()
        self._finish()

    def _finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.frozen = False
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        self._pending.clear()
        self._to_server.clear()
        self.relay._forget(self)

    # -- client -> Redis -----------------------------------------------------------------

    def _from_client(self, data: bytes) -> None:
        self.bytes_from_client += len(data)
        if self._client_raw:
            self._write_server(data)
            return
        chunk, frames = self._commands_in.feed(data)
        if frames:
            if self.relay._errors and self._tracking:
                self._commands_with_rules(chunk, frames)
            else:
                counts = self.relay._counts
                scripts_matter = bool(self.relay._drops)  # a drop rule may name one script
                start = 0
                for frame in frames:
                    name = frame.name or "?"
                    self.commands.append(name)
                    self.names.add(name)
                    counts[name] += 1
                    if self._tracking:
                        if scripts_matter and name in _SCRIPT_CALLS:
                            self._track(
                                f"{name} {_first_argument(memoryview(chunk)[start : frame.end]).upper()}"
                            )
                        else:
                            self._track(name)
                    start = frame.end
                self._write_server(chunk)
        if self._commands_in.error is not None:
            log.warning(
                "relay connection %s: client sent bytes that are not RESP commands (%s); "
                "forwarding the rest raw, replies no longer matched",
                self.id,
                self._commands_in.error,
            )
            self._client_raw = True
            if self._tracking:
                self._tracking = False
                self._pending.append(_SWITCH)
                self._specials += 1
            rest = self._commands_in.drain()
            if rest:
                self._write_server(rest)

    def _track(self, name: str) -> None:
        """Queue the FIFO entry the reply to this forwarded command will be matched with."""
        pending = self._pending
        if self._in_multi:
            if name == "EXEC" or name == "DISCARD":
                self._in_multi = False
                pending.append(name)
            else:
                pending.append(_QUEUED)
        elif name in _UNTRACKABLE:
            self._tracking = False
            pending.append(_SWITCH)
            self._specials += 1
        else:
            if name == "MULTI":
                self._in_multi = True
            pending.append(name)

    def _commands_with_rules(self, chunk: bytes, frames: list[Frame]) -> None:
        """Forward the commands no error rule catches; queue the relay's answer to the others in order."""
        relay = self.relay
        counts = relay._counts
        view = memoryview(chunk)
        to_server: list[memoryview] = []
        start = run_start = 0
        for frame in frames:
            name = frame.name or "?"
            self.commands.append(name)
            self.names.add(name)
            reply = None if self._in_multi or not self._tracking else relay._injected(name)
            if reply is None:
                counts[name] += 1
                if self._tracking:
                    if name in _SCRIPT_CALLS and relay._drops:  # drop rules may name one script
                        self._track(f"{name} {_first_argument(view[start : frame.end]).upper()}")
                    else:
                        self._track(name)
            else:
                if start > run_start:
                    to_server.append(view[run_start:start])
                run_start = frame.end
                if self._pending:  # answer it after the replies to the commands before it
                    self._pending.append(reply)
                    self._specials += 1
                else:
                    self._client.write(reply)
            start = frame.end
        if start > run_start:
            to_server.append(view[run_start:start])
        if to_server:
            self._write_server(b"".join(to_server))

    # -- Redis -> client -----------------------------------------------------------------

    def _from_server(self, data: bytes) -> None:
        self.bytes_from_server += len(data)
        if self._server_raw:
            self._client.write(data)
            return
        chunk, frames = self._replies_in.feed(data)
        if frames:
            if self.relay._drops or self._specials:
                if not self._replies_with_rules(chunk, frames):
                    return  # the connection was dropped
            else:
                pending = self._pending
                for frame in frames:
                    if frame.kind != _PUSH and pending:
                        pending.popleft()
                self._client.write(chunk)
        if self._replies_in.error is not None and not self._server_raw:
            log.warning(
                "relay connection %s: Redis sent bytes that are not RESP (%s); forwarding the rest raw",
                self.id,
                self._replies_in.error,
            )
            self._go_raw([])

    def _go_raw(self, out: list[bytes | memoryview]) -> None:
        """Stop matching replies: forward what is held back, and any queued injected replies."""
        self._server_raw = True
        out.append(self._replies_in.drain())
        out.extend(entry for entry in self._pending if isinstance(entry, bytes))
        self._pending.clear()
        self._specials = 0
        self._client.write(b"".join(out))

    def _replies_with_rules(self, chunk: bytes, frames: list[Frame]) -> bool:
        """Match each reply with its command; drop or interleave as the rules say. False if dropped."""
        relay = self.relay
        pending = self._pending
        view = memoryview(chunk)
        out: list[bytes | memoryview] = []
        start = 0
        for frame in frames:
            raw = view[start : frame.end]
            if frame.kind == _PUSH:  # out of band: answers no command
                out.append(raw)
                start = frame.end
                continue
            self._release_injected(out)
            if pending and pending[0] is _SWITCH:
                out.append(view[start:])
                self._go_raw(out)
                return True
            name = pending.popleft() if pending else None
            if name and relay._drops:
                rule = relay._drop_rule(name, frame.kind, frame.empty)
                if rule is not None:
                    rule.record(bytes(raw))
                    log.info("relay connection %s: dropped the reply to %s and the connection", self.id, name)
                    self._drop(out)
                    return False
            out.append(raw)
            start = frame.end
        self._release_injected(out)
        if pending and pending[0] is _SWITCH and self._replies_in.buffered:
            self._go_raw(out)
            return True
        if out:
            self._client.write(b"".join(out))
        return True

    def _release_injected(self, out: list[bytes | memoryview]) -> None:
        """Injected replies whose turn has come (every command before them answered)."""
        pending = self._pending
        while pending and isinstance(pending[0], bytes):
            out.append(pending.popleft())
            self._specials -= 1

    def _drop(self, out: list[bytes | memoryview]) -> None:
        """Kill the connection as if it broke after Redis ran the command, before the reply was read."""
        if out:
            self._client.write(b"".join(out))
        if self._server is not None:
            self._server.abort()
        if self._client.get_write_buffer_size():
            self._client.close()  # let the replies before the dropped one go out first
        else:
            self._client.abort()
        self._finish()


class Relay:
    """A RESP-aware TCP relay to one Redis server, with faults a test switches on and off.

    Transparent until told otherwise. Each accepted client connection gets its own
    connection to the target; commands and replies are parsed (not rebuilt: bytes go out
    as they came), counted, and matched in FIFO order, which is what lets a fault hit the
    reply of one particular command. Pub/sub and MONITOR connections are relayed but,
    their replies not matching commands one to one, are exempt from reply rules.
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError(f"Relay supports redis:// URLs only, not {parts.scheme}://")
        self.target: tuple[str, int] = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self._parts = parts
        self._server: asyncio.base_events.Server | None = None
        self._port = 0  # reserved while listening (tests/ports.py)
        self._conns: dict[int, RelayConnection] = {}
        self._ids = itertools.count(1)
        self._counts: Counter[str] = Counter()
        self._drops: list[DropRule] = []
        self._errors: list[ErrorRule] = []
        self._cut = False
        self._partitioned = False
        self.accepted = 0
        """Client connections accepted and relayed (including those frozen by a partition)."""
        self.refused = 0
        """Client connections aborted on arrival because the relay was cut."""

    async def start(self) -> Relay:
        """Listen on a free loopback port."""
        if self._server is None:
            loop = asyncio.get_running_loop()
            self._port = reserve_port()  # not port 0: the kernel may offer a killed server's reserved one
            endpoint = lambda: _Endpoint(self, None, True)  # noqa: E731
            self._server = await loop.create_server(endpoint, "127.0.0.1", self._port)
        return self

    async def close(self) -> None:
        """Stop listening and abort every relayed connection."""
        server, self._server = self._server, None
        if server is not None:
            release(self._port)
        for conn in list(self._conns.values()):
            conn.abort()
        if server is not None:
            server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)

    async def __aenter__(self) -> Relay:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the relay is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        """The target URL pointing at the relay instead (credentials, path and query kept)."""
        parts = self._parts
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    @property
    def connections(self) -> list[RelayConnection]:
        """The live relayed connections, oldest first."""
        return list(self._conns.values())

    def count(self, name: str) -> int:
        """How many commands ``name`` were forwarded to Redis (not those the relay answered)."""
        return self._counts[name.upper()]

    def reset_counts(self) -> None:
        self._counts.clear()

    # -- faults --------------------------------------------------------------------------

    def cut(self) -> None:
        """Reset every relayed connection and refuse new ones until ``heal()``."""
        self._cut = True
        for conn in list(self._conns.values()):
            conn.abort()

    def heal(self) -> None:
        """Undo ``cut()`` and ``partition()``; frozen connections deliver what they held, in order."""
        self._cut = False
        self._partitioned = False
        for conn in list(self._conns.values()):
            conn.unfreeze()

    resume = heal  # tests.proxy.RedisProxy's name, for migrating its users

    def freeze(self, commands: Iterable[str] | str | None = None) -> list[RelayConnection]:
        """Half-open the selected live connections: nothing moves, nothing closes.

        ``commands=None`` selects every live connection, else those that have carried one of
        these commands. New connections are not affected. Returns the frozen connections.
        """
        names = None if commands is None else _name_set(commands)
        selected = [c for c in self._conns.values() if names is None or not names.isdisjoint(c.names)]
        for conn in selected:
            conn.freeze()
        return selected

    def partition(self) -> None:
        """Black-hole the path: live connections freeze, new ones connect but hear nothing."""
        self._partitioned = True
        self.freeze()

    def drop_reply(self, commands: Iterable[str] | str, *, nonempty: bool = True, count: int = 1) -> DropRule:
        """Swallow the next ``count`` replies to ``commands`` and abort their connections.

        With ``nonempty`` only replies carrying data count: not null (``$-1``, ``*-1``, RESP3
        ``_``), not empty (``*0``), and not errors (nothing ran, nothing to lose). A command may
        be ``"EVALSHA <sha>"``: the reply to that one script only.
        """
        rule = DropRule(_name_set(commands), nonempty, count)
        self._drops.append(rule)
        return rule

    def inject_error(
        self,
        commands: Iterable[str] | str,
        error: str,
        *,
        count: int | None = None,
        seconds: float | None = None,
    ) -> ErrorRule:
        """Answer ``commands`` with ``-<error>`` instead of forwarding them.

        For the next ``count`` of them, or for ``seconds`` from now (both: whichever ends
        first), or until ``rule.cancel()``. Replies keep their order in a pipeline. Commands
        queued inside MULTI and on pub/sub connections are not affected.
        """
        rule = ErrorRule(_name_set(commands), error, count, seconds)
        self._errors.append(rule)
        return rule

    def clear_rules(self) -> None:
        """Cancel every drop and error rule."""
        for rule in [*self._drops, *self._errors]:
            rule.cancel()
        self._drops.clear()
        self._errors.clear()

    # -- internals -------------------------------------------------------------------------

    def _accepted(self, transport: asyncio.Transport) -> RelayConnection | None:
        if self._cut or self._server is None:
            self.refused += 1
            transport.abort()
            return None
        self.accepted += 1
        conn = RelayConnection(self, next(self._ids), transport, frozen=self._partitioned)
        self._conns[conn.id] = conn
        if not conn.frozen:
            conn._connect_upstream()
        return conn

    def _forget(self, conn: RelayConnection) -> None:
        self._conns.pop(conn.id, None)

    def _injected(self, name: str) -> bytes | None:
        for rule in self._errors:
            reply = rule.take(name)
            if reply is not None:
                self._prune()
                return reply
        self._prune()
        return None

    def _drop_rule(self, name: str, kind: int, empty: bool) -> DropRule | None:
        found = next((rule for rule in self._drops if rule.matches(name, kind, empty)), None)
        self._prune()
        return found

    def _prune(self) -> None:
        if not all(rule.active for rule in self._errors):
            self._errors = [rule for rule in self._errors if rule.active]
        if not all(rule.active for rule in self._drops):
            self._drops = [rule for rule in self._drops if rule.active]


# --- private servers ---------------------------------------------------------------------


class ServerStartError(RuntimeError):
    """A private server did not come up (or down) in time."""


START_TIMEOUT = 10.0


def free_port() -> int:
    """A loopback port nobody listens on, reserved from the other test processes until
    released (tests/ports.py: a killed server's port must not go to another test's server)."""
    return reserve_port()


def _pong(port: int, timeout: float = 0.5) -> bool:
    """PING over a raw socket: True only for +PONG (not -LOADING, not a refused connection)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _server_pid(port: int) -> int | None:
    """``process_id`` from INFO server: whether the server answering is the one we started."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
            data = b""
            while b"process_id:" not in data or not data.endswith(b"\r\n"):
                more = sock.recv(65536)
                if not more:
                    break
                data += more
    except OSError:
        return None
    for line in data.split(b"\r\n"):
        if line.startswith(b"process_id:"):
            return int(line.partition(b":")[2])
    return None


async def wait_redis_up(url: str, timeout: float = START_TIMEOUT) -> None:
    """Wait until ``url`` answers PING (credentials and all); TimeoutError with the last failure."""
    import redis.asyncio
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = "no attempt"
    while True:
        client = redis.asyncio.Redis.from_url(
            url, socket_connect_timeout=1, socket_timeout=1, retry=Retry(NoBackoff(), 0)
        )
        try:
            if await client.ping():
                return
        except (redis.RedisError, OSError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        finally:
            await client.aclose()
        if loop.time() >= deadline:
            raise TimeoutError(f"{url} did not answer PING within {timeout:g} s ({last})")
        await asyncio.sleep(0.05)


class PrivateRedis:
    """A redis-server child process of one's own, restartable on the same port.

    ``persistent=True`` runs it with ``appendonly yes`` and ``appendfsync always``, so even
    ``kill()`` (SIGKILL) loses no acknowledged write. Without it the server keeps nothing
    across a crash; ``restart(keep_data=True)`` then goes through ``SHUTDOWN SAVE`` and an
    RDB file, deleted once loaded (a later ``kill()`` + ``start()`` comes back empty).
    """

    def __init__(self, persistent: bool = False, *, binary: str | None = None) -> None:
        self.persistent = persistent
        found = binary or shutil.which("redis-server")
        if found is None:
            raise FileNotFoundError("no redis-server binary on PATH")
        self.binary = found
        self.port: int | None = None
        self.dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._stopped = False

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server was never started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> PrivateRedis:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> str:
        """Start (again) on this server's port, the first time on a free one; wait for PING."""
        if self._stopped:
            raise RuntimeError("the server was stopped for good")
        if self.running:
            raise RuntimeError("the server is already running")
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="sqt-faultkit-redis-"))
            self._log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - lives as long as the server
        first = self.port is None
        if first:
            self.port = free_port()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            process = self._spawn()
            while process.poll() is None and time.monotonic() < deadline:
                if _pong(self.port) and _server_pid(self.port) == process.pid:
                    self._process = process
                    if not self.persistent:
                        self._wipe()  # loaded: a later crash must not resurrect this RDB
                    return self.url
                time.sleep(0.02)
            if process.poll() is None:
                _terminate(process)
                raise ServerStartError(
                    f"redis-server on port {self.port} did not answer PING within {START_TIMEOUT:g} s\n"
                    + self.log_tail()
                )
            tail = self.log_tail()
            if "already in use" in tail and time.monotonic() < deadline:
                # Taken: on the first start someone beat us to it, take another; on a restart
                # (same port promised) wait for it to come free.
                log.info("port %s busy, %s", self.port, "trying another" if first else "retrying")
                if first:
                    release(self.port)
                    self.port = free_port()
                time.sleep(0.1)
                self._truncate_log()
                continue
            raise ServerStartError(f"redis-server exited with code {process.returncode}\n{tail}")

    def _spawn(self) -> subprocess.Popen[bytes]:
        from sessionq.cli.embedded import die_with_parent

        assert self.dir is not None and self.port is not None
        argv = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                "--dir", str(self.dir), "--protected-mode", "yes", "--loglevel", "warning",
                "--dbfilename", "dump.rdb", "--logfile", ""]  # fmt: skip
        if self.persistent:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--appendonly", "no"]
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )

    def restart(self, keep_data: bool) -> str:
        """Stop and start on the same port; every client connection drops.

        ``keep_data=True``: back with every key (SHUTDOWN SAVE, then the RDB/AOF is loaded).
        ``keep_data=False``: back empty (SIGKILL, data files deleted).
        """
        if keep_data:
            if self.running:
                self._shutdown_save()
        else:
            self.kill()
            self._wipe()
        return self.start()

    def snapshot(self) -> None:
        """Keep the data as it is now (SAVE), for `restart_from_snapshot`."""
        assert self.dir is not None and self.port is not None
        with redis.Redis(port=self.port, socket_timeout=10) as conn:
            conn.save()
        shutil.copyfile(self.dir / "dump.rdb", self.dir / "snapshot.rdb")

    def restart_from_snapshot(self) -> str:
        """SIGKILL, then come back with the data of the last `snapshot()`: what was written
        since is lost, as after a failover to a replica that lagged behind."""
        assert self.dir is not None
        self.kill()
        shutil.copyfile(self.dir / "snapshot.rdb", self.dir / "dump.rdb")
        return self.start()

    def kill(self) -> None:
        """SIGKILL, as a crash: a persistent server keeps what its AOF has, another loses all."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        if not self.persistent:
            self._wipe()

    def stop(self) -> None:
        """Stop for good and remove its directory. Idempotent."""
        self._stopped = True
        if self._process is not None:
            _terminate(self._process)
        if self.port is not None:
            release(self.port)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def log_tail(self, size: int = 2000) -> str:
        if self.dir is None:
            return ""
        try:
            return (self.dir / "redis.log").read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return ""

    def _truncate_log(self) -> None:
        if self._log is not None:
            self._log.truncate(0)

    def _shutdown_save(self) -> None:
        assert self._process is not None and self.port is not None
        reply = b""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                sock.sendall(b"*2\r\n$8\r\nSHUTDOWN\r\n$4\r\nSAVE\r\n")
                reply = sock.recv(512)  # nothing (closed) when it worked
        except OSError:
            pass
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
            raise ServerStartError(f"redis-server did not shut down: {reply!r}\n{self.log_tail()}") from None
        if reply.startswith(b"-"):
            raise ServerStartError(f"SHUTDOWN SAVE failed: {reply!r}\n{self.log_tail()}")

    def _wipe(self) -> None:
        if self.dir is None:
            return
        with contextlib.suppress(FileNotFoundError):
            (self.dir / "dump.rdb").unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.dir / "appendonly.aof").unlink()  # Redis < 7
        shutil.rmtree(self.dir / "appendonlydir", ignore_errors=True)  # Redis 7+


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class PrivateFakeRedis:
    """A fakeredis TCP server of one's own, in a thread of this process, restartable on its port.

    fakeredis has no persistence; "keeping the data" means the new TCP server serves the
    same ``FakeServer`` state object. ``persistent=True`` makes ``kill()`` keep it too.
    Stopping it drops every client connection, unblocks the commands they had waiting (a
    blocked BLPOP of a dropped client must not pop a later push into the void), and waits
    for their threads, so nothing of the old incarnation acts on the state afterwards.
    """

    def __init__(self, persistent: bool = False) -> None:
        self.persistent = persistent
        self.port: int | None = None
        self._state: Any = None  # fakeredis FakeServer
        self._tcp: Any = None  # fakeredis TcpFakeServer
        self._thread: threading.Thread | None = None
        self._handlers: set[Any] = set()
        self._lock = threading.Lock()
        self._stopped = False
        self._snapshot: dict[Any, tuple[Any, int]] = {}

    pid: int | None = None
    """Same process as the tests: no pid of its own."""

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server was never started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._tcp is not None

    @property
    def state(self) -> Any:
        """The fakeredis ``FakeServer`` holding the data."""
        return self._state

    def __enter__(self) -> PrivateFakeRedis:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> str:
        """Serve (again) on this server's port, the first time on a free one; wait for PING."""
        from fakeredis import TcpFakeServer

        if self._stopped:
            raise RuntimeError("the server was stopped for good")
        if self.running:
            raise RuntimeError("the server is already running")
        deadline = time.monotonic() + START_TIMEOUT
        first = self.port is None
        if self.port is None:
            self.port = free_port()  # reserved: while killed, no other test's server takes it
        while True:
            try:
                tcp = TcpFakeServer(("127.0.0.1", self.port), server_type="redis")
                break
            except OSError as exc:
                if time.monotonic() >= deadline:
                    raise ServerStartError(f"fakeredis cannot listen on port {self.port}: {exc}") from exc
                if first:  # taken meanwhile by a listener that does not reserve: take another
                    release(self.port)
                    self.port = free_port()
                time.sleep(0.05)
        if self._state is None:
            self._state = tcp.fake_server
        else:
            tcp.fake_server = self._state
        tcp.RequestHandlerClass = self._handler_class()
        tcp.daemon_threads = True
        tcp.handle_error = self._quiet_error
        self.port = int(tcp.server_address[1])
        self._tcp = tcp
        self._thread = threading.Thread(
            target=tcp.serve_forever, kwargs={"poll_interval": 0.05}, name=f"faultkit-fakeredis-{self.port}",
            daemon=True,
        )  # fmt: skip
        self._thread.start()
        while not _pong(self.port):
            if time.monotonic() >= deadline:
                raise ServerStartError(f"fakeredis on port {self.port} did not answer PING")
            time.sleep(0.01)
        return self.url

    def restart(self, keep_data: bool) -> str:
        """Stop serving (dropping every connection) and serve again on the same port."""
        self._halt()
        if not keep_data:
            self._state = None
        return self.start()

    def snapshot(self) -> None:
        """Keep the data as it is now (every key DUMPed with its TTL), for `restart_from_snapshot`."""
        with redis.Redis(port=self.port, socket_timeout=10) as conn:
            self._snapshot = {key: (conn.dump(key), conn.pttl(key)) for key in conn.scan_iter(count=1000)}

    def restart_from_snapshot(self) -> str:
        """Stop serving, then serve the data of the last `snapshot()`: what was written since
        is lost, as after a failover to a replica that lagged behind."""
        import fakeredis

        self._halt()
        state = fakeredis.FakeServer()
        restore = fakeredis.FakeRedis(server=state)
        for key, (dumped, ttl) in self._snapshot.items():
            restore.restore(key, max(ttl, 0), dumped, replace=True)
        self._state = state
        return self.start()

    def kill(self) -> None:
        """Stop serving and drop every connection; the data survives only if ``persistent``."""
        self._halt()
        if not self.persistent:
            self._state = None

    def stop(self) -> None:
        """Stop for good. Idempotent."""
        self._stopped = True
        self._halt()
        self._state = None
        if self.port is not None:
            release(self.port)

    def _halt(self) -> None:
        tcp, self._tcp = self._tcp, None
        if tcp is None:
            return
        tcp.shutdown()  # serve_forever returns; handler loops see the shutdown event
        tcp.server_close()
        with self._lock:
            handlers = list(self._handlers)
        for handler in handlers:
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)
        # Unblock again until every handler thread is gone: one may have been just about to
        # block when we looked.
        deadline = time.monotonic() + START_TIMEOUT
        while handlers and time.monotonic() < deadline:
            self._unblock(handlers)
            for handler in handlers:
                handler.faultkit_thread.join(timeout=0.02)
            handlers = [h for h in handlers if h.faultkit_thread.is_alive()]
        if handlers:
            log.warning("%d fakeredis handler threads still alive after the restart", len(handlers))
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _unblock(self, handlers: list[Any]) -> None:
        """Wake the dropped clients' blocking commands (as CLIENT UNBLOCK ... TIMEOUT does)."""
        state = self._state
        if state is None:
            return
        with state.lock:
            for handler in handlers:
                try:
                    sock = handler.current_client._sock
                    if sock is not None and sock._blocked:
                        sock._unblock_reason = b"timeout"
                        sock._db.wake_all()
                except AttributeError:  # fakeredis internals moved: the blocked call times out alone
                    log.warning("cannot unblock a fakeredis client on restart (fakeredis changed?)")

    def _quiet_error(self, request: Any, client_address: Any) -> None:
        log.debug("fakeredis client %s ended with an error", client_address, exc_info=True)

    def _handler_class(self) -> type:
        from fakeredis._clients._tcp_server import TCPFakeRequestHandler
        from sessionq.cli.embedded import error_tolerant_handler

        base = error_tolerant_handler() or TCPFakeRequestHandler
        owner = self

        class Handler(base):  # type: ignore[misc, valid-type]
            """Registers its connection, so a restart can drop it."""

            def setup(self) -> None:
                self.faultkit_thread = threading.current_thread()
                with owner._lock:
                    owner._handlers.add(self)
                super().setup()

            def finish(self) -> None:
                try:
                    super().finish()
                finally:
                    with owner._lock:
                        owner._handlers.discard(self)

        return Handler


def private_server(backend: str, *, persistent: bool = False) -> PrivateRedis | PrivateFakeRedis:
    """A private, not yet started server for a conftest backend name ("fakeredis" or "redis")."""
    if backend == "fakeredis":
        return PrivateFakeRedis(persistent=persistent)
    if backend == "redis":
        if shutil.which("redis-server") is None:
            pytest.skip("no redis-server binary on PATH for a private server")
        return PrivateRedis(persistent=persistent)
    if backend == "cluster":
        pytest.skip("no private server for the cluster backend")
    raise ValueError(f"unknown backend {backend!r}")


# --- ACL users ---------------------------------------------------------------------------

FAKEREDIS_ACL_REASON = (
    "this server does not enforce ACL users the way Redis does: fakeredis 2.41 leaves a "
    "connection that authenticates with `HELLO 3 AUTH user pw` (redis-py 8's handshake) as "
    "the default user, and ignores `-command` rules of a user that has `+@all`"
)


class TemporaryAclUser:
    """A throw-away ACL user (all keys, channels and commands) whose rights a test can revoke.

    ``async with TemporaryAclUser(url) as user``: ``user.url`` connects as it; ``deny()`` and
    ``allow()`` change its rights, effective at once on its open connections (they get
    NOPERM errors, they are not closed). On exit the user is deleted, which also closes its
    connections. The ``default`` user is never touched. On a server that does not enforce
    ACLs (fakeredis) entering it calls ``pytest.skip``.
    """

    def __init__(self, url: str) -> None:
        self.admin_url = url
        self.name = f"sqt-{secrets.token_hex(6)}"
        self.password = secrets.token_hex(12)
        parts = urlsplit(url)
        netloc = (
            f"{quote(self.name, safe='')}:{quote(self.password, safe='')}@{parts.netloc.rpartition('@')[2]}"
        )
        self.url = urlunsplit(parts._replace(netloc=netloc))
        self._admin: Any = None

    async def __aenter__(self) -> TemporaryAclUser:
        import redis.asyncio

        self._admin = redis.asyncio.Redis.from_url(self.admin_url)
        await self._setuser("on", f">{self.password}", "~*", "&*", "+@all")
        try:
            reason = await self._probe()
        except BaseException:
            await self._delete()
            raise
        if reason is not None:
            await self._delete()
            pytest.skip(reason)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._delete()

    async def deny(self, *commands: str) -> None:
        """Revoke commands (``"xread"``, ``"@stream"``, ``"client|kill"``)."""
        await self._setuser(*(f"-{_acl_name(c)}" for c in commands))

    async def allow(self, *commands: str) -> None:
        """Grant them back."""
        await self._setuser(*(f"+{_acl_name(c)}" for c in commands))

    async def _setuser(self, *rules: str) -> None:
        assert self._admin is not None
        await self._admin.execute_command("ACL", "SETUSER", self.name, *rules)

    async def _probe(self) -> str | None:
        """None if the server enforces this user's rules, else why not (fakeredis does not)."""
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(self.url, single_connection_client=True)
        try:
            whoami = await client.execute_command("ACL", "WHOAMI")
            if (whoami.decode() if isinstance(whoami, bytes) else str(whoami)) != self.name:
                return f"{FAKEREDIS_ACL_REASON} (ACL WHOAMI said {whoami!r})"
            await self.deny("echo")
            try:
                await client.echo("probe")
            except redis.exceptions.NoPermissionError:
                return None
            finally:
                await self.allow("echo")
            return f"{FAKEREDIS_ACL_REASON} (a denied ECHO still ran)"
        finally:
            await client.aclose()

    async def _delete(self) -> None:
        admin, self._admin = self._admin, None
        if admin is None:
            return
        try:
            await admin.execute_command("ACL", "DELUSER", self.name)
        finally:
            await admin.aclose()


def _acl_name(command: str) -> str:
    name = command.strip().lstrip("+-").lower()
    if not name or name in {"default", "on", "off"} or " " in name:
        raise ValueError(f"not a command or category: {command!r}")
    return name


if os.environ.get("SESSIONQ_FAULTKIT_DEBUG"):  # pragma: no cover - manual debugging aid
    logging.basicConfig(level=logging.DEBUG)
