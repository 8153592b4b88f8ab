"""Self-tests of tests/faultkit.py: the relay's parser and faults, the private servers, ACL users.

Plain redis-py clients only (nothing of sessionq), retries off so a fault surfaces as the
exception it is instead of being retried away. Run on fakeredis and on the real server.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest
import pytest_asyncio
import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.connection import Connection

from tests.faultkit import (
    Frame,
    PrivateFakeRedis,
    PrivateRedis,
    Relay,
    RespParser,
    TemporaryAclUser,
    private_server,
    wait_redis_up,
)
from tests.helpers import wait_for

HANG = 0.3
"""How long a command must stay unanswered to count as hanging."""


def connect(url: str, **kwargs: Any) -> redis.asyncio.Redis:
    """A client that does not retry: a dropped connection must show, not be papered over."""
    kwargs.setdefault("socket_connect_timeout", 5)
    return redis.asyncio.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **kwargs)


def pack(*args: str | bytes | int) -> bytes:
    """A command as redis-py (with hiredis when installed) puts it on the wire."""
    return b"".join(Connection().pack_command(*args))


async def hangs(awaitable: asyncio.Future[Any], seconds: float = HANG) -> bool:
    """True if ``awaitable`` is still pending after ``seconds`` (it is left running)."""
    try:
        await asyncio.wait_for(asyncio.shield(awaitable), seconds)
    except asyncio.TimeoutError:
        return True
    return False


async def read_replies(reader: asyncio.StreamReader, count: int, timeout: float = 5) -> list[bytes]:
    """Exactly ``count`` whole replies from a raw socket (split by the kit's own parser)."""
    parser = RespParser()
    replies: list[bytes] = []
    while len(replies) < count:
        data = await asyncio.wait_for(reader.read(65536), timeout)
        assert data, f"connection closed after {replies}"
        replies += [raw for raw, _ in parse(parser, [data])]
    assert len(replies) == count, f"more replies than commands: {replies}"
    return replies


@pytest.fixture(autouse=True)
def _one_server_backends_only(request: pytest.FixtureRequest) -> None:
    """SESSIONQ_TEST_CLUSTER_ALL=1 runs every test on the cluster too: the kit fronts one server."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "cluster":
        pytest.skip("faultkit relays to and runs single servers, not a cluster")


@pytest_asyncio.fixture
async def relay(redis_url: str) -> AsyncIterator[Relay]:
    async with Relay(redis_url) as relay:
        yield relay


@pytest_asyncio.fixture
async def direct(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A client straight to the backend, past the relay: what Redis really holds."""
    async with connect(redis_url) as client:
        yield client


# --- the parser --------------------------------------------------------------------------

REPLIES: list[tuple[bytes, str, bool]] = [
    (b"+OK\r\n", "+", False),
    (b"-ERR wrong number of arguments\r\n", "-", False),
    (b":-42\r\n", ":", False),
    (b"$5\r\nhello\r\n", "$", False),
    (b"$0\r\n\r\n", "$", False),
    (b"$6\r\na\r\n\r\nb\r\n", "$", False),  # CRLF inside a bulk string is data
    (b"$-1\r\n", "$", True),
    (b"*-1\r\n", "*", True),
    (b"*0\r\n", "*", True),
    (b"*3\r\n*2\r\n:1\r\n$-1\r\n*0\r\n*1\r\n*1\r\n+deep\r\n", "*", False),
    (b"*2\r\n$10\r\nstream-key\r\n*1\r\n*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\nf\r\n$1\r\nv\r\n", "*", False),
    (b"*1\r\n-ERR inside\r\n", "*", False),
    # RESP3, which redis-py 8 speaks by default
    (b"_\r\n", "_", True),
    (b"%2\r\n+a\r\n:1\r\n+b\r\n*1\r\n,3.5\r\n", "%", False),
    (b"~2\r\n#t\r\n(12345678901234567890\r\n", "~", False),
    (b"=8\r\ntxt:abcd\r\n", "=", False),
    (b"!9\r\nERR blob!\r\n", "!", False),
    (b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n", ">", False),
    (b"|1\r\n+ttl\r\n:3\r\n$1\r\nv\r\n", "|", False),  # an attribute and the value it annotates
    (b"%0\r\n", "%", True),
]


def parse(parser: RespParser, pieces: Iterable[bytes]) -> list[tuple[bytes, Frame]]:
    """Feed the pieces; return each complete frame's bytes and metadata."""
    found: list[tuple[bytes, Frame]] = []
    for piece in pieces:
        chunk, frames = parser.feed(piece)
        start = 0
        for frame in frames:
            found.append((chunk[start : frame.end], frame))
            start = frame.end
        assert start == len(chunk), "consumed bytes beyond the last frame"
        assert parser.error is None, parser.error
    return found


def splits(data: bytes, rng: random.Random, largest: int) -> list[bytes]:
    pieces = []
    at = 0
    while at < len(data):
        step = rng.randint(1, largest)
        pieces.append(data[at : at + step])
        at += step
    return pieces


@pytest.mark.parametrize("cut", ["whole", "bytes", "random"])
def test_parser_finds_every_reply_however_split(cut: str) -> None:
    stream = b"".join(raw for raw, _, _ in REPLIES)
    rng = random.Random(7)
    pieces = {"whole": [stream], "bytes": [stream[i : i + 1] for i in range(len(stream))]}.get(cut)
    for _ in range(1 if pieces is not None else 50):
        parser = RespParser()
        found = parse(parser, pieces or splits(stream, rng, 17))
        assert [(raw, chr(frame.kind), frame.empty) for raw, frame in found] == REPLIES
        assert parser.buffered == 0


def test_parser_large_bulk_strings() -> None:
    payload = bytes(random.Random(1).getrandbits(8) for _ in range(4096)) * 1280  # 5 MiB, CRLFs included
    big = b"$%d\r\n%s\r\n" % (len(payload), payload)
    stream = b"*3\r\n" + big + b":1\r\n" + big + b"+OK\r\n"
    expected = [stream[: -len(b"+OK\r\n")], b"+OK\r\n"]
    started = time.perf_counter()
    for pieces in (
        [stream],
        splits(stream, random.Random(3), 65536),
        [stream[i : i + 1024] for i in range(0, len(stream), 1024)],
        # every split point around the headers and trailers, byte by byte
        [stream[:3], stream[3:4], stream[4:9], stream[9:12], stream[12 : 12 + len(payload)]]
        + [stream[i : i + 1] for i in range(12 + len(payload), 12 + len(payload) + 30)]
        + [stream[12 + len(payload) + 30 : -3], stream[-3:-1], stream[-1:]],
    ):
        assert b"".join(pieces) == stream
        found = parse(RespParser(), pieces)
        assert [raw for raw, _ in found] == expected
    assert time.perf_counter() - started < 10, "the parser re-scans large frames"


def test_parser_reads_command_names() -> None:
    sha = "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"
    commands = [
        pack("set", "k", "v"),
        pack("XREADGROUP", "GROUP", "g", "c", "BLOCK", 5000, "STREAMS", "s", ">"),
        pack("EVALSHA", sha, 1, "k", "arg"),
        pack("eval", "return redis.call('get', KEYS[1])\r\n", 1, "k"),
        pack("BLMPOP", 5, 2, "a", "b", "LEFT", "COUNT", 1),
        pack("ping"),
        pack("SET", "big", b"x" * 100_000),
    ]
    stream = b"".join(commands)
    names = ["SET", "XREADGROUP", "EVALSHA", "EVAL", "BLMPOP", "PING", "SET"]
    tail = len(commands[-1])
    for pieces in ([stream], [stream[i : i + 1] for i in range(len(stream) - tail)] + [stream[-tail:]]):
        found = parse(RespParser(commands=True), pieces)
        assert [raw for raw, _ in found] == commands
        assert [frame.name for _, frame in found] == names


@pytest.mark.parametrize(
    ("commands", "garbage"),
    [
        (True, b"PING\r\n"),  # an inline command
        (True, b"+OK\r\n"),  # a reply is not a command
        (False, b"?what\r\n"),
        (False, b"$3\r\nabcde\r\n"),  # bulk longer than announced
        (False, b"*x\r\n"),
    ],
)
def test_parser_flags_garbage_and_gives_it_back(commands: bool, garbage: bytes) -> None:
    parser = RespParser(commands=commands)
    good = pack("PING") if commands else b":1\r\n"
    chunk, frames = parser.feed(good + garbage)
    assert chunk == good and len(frames) == 1
    assert parser.error is not None
    assert parser.drain() == garbage


# --- the relay -----------------------------------------------------------------------------


async def test_pipelined_replies_reach_the_right_commands(relay: Relay, key_prefix: str) -> None:
    rounds = 400
    async with connect(relay.url) as client:
        pipe = client.pipeline(transaction=False)
        for i in range(rounds):
            pipe.set(f"{key_prefix}:k{i}", i)
            pipe.incrby(f"{key_prefix}:n", i)
            pipe.get(f"{key_prefix}:k{i}")
            pipe.get(f"{key_prefix}:missing")
            pipe.lrange(f"{key_prefix}:missing", 0, -1)
        results = await pipe.execute()
    expected: list[Any] = []
    for i in range(rounds):
        expected += [True, i * (i + 1) // 2, str(i).encode(), None, []]
    assert results == expected
    assert (relay.count("SET"), relay.count("incrby"), relay.count("GET")) == (rounds, rounds, 2 * rounds)
    relay.reset_counts()
    assert relay.count("SET") == 0


async def test_big_values_and_many_commands_pass(relay: Relay, key_prefix: str, backend: str) -> None:
    # 5 MiB on Redis. fakeredis' TCP server hangs up when a reply does not fit in the socket
    # buffer at once (it sendall()s on a non-blocking socket), so it gets 512 KiB.
    chunks = 5 if backend == "redis" else 1
    big = (b"a" * (1 << 20 if chunks == 5 else 1 << 19) + b"\r\n$3\r\n") * chunks
    async with connect(relay.url) as client:
        assert await client.set(f"{key_prefix}:big", big)
        assert await client.get(f"{key_prefix}:big") == big
        started = time.perf_counter()
        pipe = client.pipeline(transaction=False)
        for _ in range(5000):
            pipe.execute_command("INCR", f"{key_prefix}:n")  # (redis-py's incr() sends INCRBY)
        assert (await pipe.execute())[-1] == 5000
        elapsed = time.perf_counter() - started
    assert relay.count("INCR") == 5000
    assert elapsed < 10, f"5000 pipelined commands took {elapsed:.1f} s through the relay"


async def test_commands_split_byte_by_byte(relay: Relay, key_prefix: str) -> None:
    key = f"{key_prefix}:k"
    request = pack("SET", key, "value") + pack("GET", key)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    try:
        await wait_for(lambda: relay.connections, message="connection not accepted")
        (conn,) = relay.connections
        for i in range(len(request)):
            writer.write(request[i : i + 1])
            await writer.drain()
            await wait_for(lambda i=i: conn.bytes_from_client == i + 1, interval=0.001, message="byte lost")
        replies = await read_replies(reader, 2)
        assert replies[0] == b"+OK\r\n"
        assert replies[1] in (b"$5\r\nvalue\r\n", b"+value\r\n")  # (fakeredis sends simple strings)
        assert conn.commands == ["SET", "GET"]
    finally:
        writer.close()


async def test_a_late_blocking_reply_is_matched_to_its_command(
    relay: Relay, direct: redis.asyncio.Redis, key_prefix: str
) -> None:
    """BLPOP answers late, GET queued behind it on the same connection: the rule must hit GET."""
    items, key = f"{key_prefix}:list", f"{key_prefix}:k"
    await direct.set(key, "value")
    rule = relay.drop_reply({"GET"})
    async with connect(relay.url, single_connection_client=True) as client:
        pipe = client.pipeline(transaction=False)
        pipe.blpop([items], timeout=10)
        pipe.get(key)
        execution = asyncio.ensure_future(pipe.execute())
        await wait_for(lambda: relay.count("GET") == 1, message="the pipeline never reached the relay")
        assert await hangs(execution), "BLPOP answered before anything was pushed"
        await direct.rpush(items, "x")
        with pytest.raises(redis.ConnectionError):
            await asyncio.wait_for(execution, 5)
    assert rule.dropped in ([b"$5\r\nvalue\r\n"], [b"+value\r\n"])  # (fakeredis sends simple strings)
    assert await direct.llen(items) == 0, "BLPOP did pop the element (its reply died with the connection)"


async def test_freeze_hangs_a_connection_and_heal_delivers(
    relay: Relay, direct: redis.asyncio.Redis, key_prefix: str
) -> None:
    items, key = f"{key_prefix}:list", f"{key_prefix}:k"
    async with (
        connect(relay.url, single_connection_client=True) as blocked,
        connect(relay.url, single_connection_client=True) as other,
    ):
        assert await other.set(key, "1")
        blpop = asyncio.ensure_future(blocked.blpop([items], timeout=10))
        await wait_for(lambda: relay.count("BLPOP") == 1, message="BLPOP never reached the relay")
        frozen = relay.freeze({"BLPOP", "XREADGROUP"})
        assert [conn.commands[-1] for conn in frozen] == ["BLPOP"]
        assert [conn.frozen for conn in relay.connections].count(True) == 1

        await direct.rpush(items, "x")  # Redis answers the BLPOP; the relay holds the reply

        async def popped() -> bool:
            return await direct.llen(items) == 0

        await wait_for(popped, message="BLPOP did not pop on the server")
        assert await hangs(blpop), "a frozen connection delivered a reply"
        assert await other.get(key) == b"1", "freeze({'BLPOP'}) stopped another connection"
        async with connect(relay.url) as newcomer:
            assert await newcomer.ping(), "a new connection was affected by the freeze"

        relay.heal()
        assert await asyncio.wait_for(blpop, 5) == (items.encode(), b"x")

        relay.freeze()  # every live connection, in both directions: the request waits too
        get = asyncio.ensure_future(other.get(key))
        assert await hangs(get)
        relay.heal()
        assert await asyncio.wait_for(get, 5) == b"1"


async def test_partition_hangs_new_connections_without_refusing_them(relay: Relay) -> None:
    async with connect(relay.url, single_connection_client=True) as old:
        assert await old.ping()
        relay.partition()
        accepted = relay.accepted
        async with connect(relay.url) as new:  # (connects on first use, not in __aenter__)
            first = asyncio.ensure_future(new.ping())  # connects, then its handshake hangs
            again = asyncio.ensure_future(old.ping())
            assert await hangs(first) and await hangs(again)
            assert relay.accepted == accepted + 1 and relay.refused == 0
            assert all(conn.frozen for conn in relay.connections)
            relay.heal()
            assert await asyncio.wait_for(first, 5) is True
            assert await asyncio.wait_for(again, 5) is True


async def test_cut_refuses_and_heal_restores(relay: Relay) -> None:
    async with connect(relay.url, single_connection_client=True) as client:
        assert await client.ping()
        relay.cut()
        assert relay.connections == []
        with pytest.raises(redis.ConnectionError):
            await client.ping()
        async with connect(relay.url) as newcomer:
            with pytest.raises(redis.ConnectionError):
                await newcomer.ping()
        assert relay.refused >= 1
        relay.heal()
        assert await client.ping()


@pytest.mark.parametrize("pop", ["BLPOP", "BLMPOP"])
async def test_drop_reply_loses_exactly_one_popped_element(
    relay: Relay, direct: redis.asyncio.Redis, key_prefix: str, pop: str
) -> None:
    items, nothing = f"{key_prefix}:list", f"{key_prefix}:empty"
    await direct.rpush(items, "a", "b")
    rule = relay.drop_reply({pop})
    async with connect(relay.url) as client:

        async def popping(key: str, timeout: float) -> Any:
            if pop == "BLPOP":
                return await client.blpop([key], timeout=timeout)
            return await client.blmpop(timeout, 1, key, direction="LEFT")

        assert await popping(nothing, 0.05) is None  # an empty reply is not dropped
        with pytest.raises(redis.ConnectionError):
            await popping(items, 5)
        await asyncio.wait_for(rule.fired.wait(), 5)
        assert len(rule.dropped) == 1 and b"a" in rule.dropped[0]
        assert await direct.lrange(items, 0, -1) == [b"b"], "the dropped element should be gone"
        assert await popping(items, 5) is not None, "count=1: the next reply passes"
    assert await direct.llen(items) == 0


async def test_drop_reply_to_xreadgroup_leaves_the_entry_pending(
    relay: Relay, direct: redis.asyncio.Redis, key_prefix: str
) -> None:
    stream = f"{key_prefix}:stream"
    await direct.xgroup_create(stream, "g", id="0", mkstream=True)
    entry = await direct.xadd(stream, {"f": "v"})
    rule = relay.drop_reply({"XREADGROUP", "XREAD"})
    async with connect(relay.url) as client:
        with pytest.raises(redis.ConnectionError):
            await client.xreadgroup("g", "c1", {stream: ">"}, count=10, block=2000)
        assert rule.fired.is_set() and entry in rule.dropped[0]
        pending = await direct.xpending(stream, "g")
        assert pending["pending"] == 1, "delivered to the consumer (in its PEL) though it never saw it"
        assert not await client.xreadgroup("g", "c1", {stream: ">"}, count=10, block=50)


async def test_inject_error_keeps_pipeline_order(
    relay: Relay, direct: redis.asyncio.Redis, key_prefix: str
) -> None:
    first, second, counter = f"{key_prefix}:a", f"{key_prefix}:b", f"{key_prefix}:n"
    rule = relay.inject_error({"incr"}, "READONLY You can't write against a read only replica.", count=1)
    async with connect(relay.url) as client:
        pipe = client.pipeline(transaction=False)
        pipe.set(first, "1").execute_command("INCR", counter).set(second, "2").get(first)
        results = await pipe.execute(raise_on_error=False)
        assert results[0] is True and results[2] is True and results[3] == b"1"
        assert isinstance(results[1], redis.ReadOnlyError)
        assert await direct.mget(first, second, counter) == [b"1", b"2", None], "A and C ran, B did not"
        assert (rule.hits, rule.fired.is_set(), relay.count("INCR")) == (1, True, 0)
        assert await client.execute_command("INCR", counter) == 1, "count=1 is spent: INCR goes through"
        assert relay.count("INCR") == 1


async def test_inject_error_waits_for_the_replies_before_it(relay: Relay, key_prefix: str) -> None:
    """Raw socket, one write: the error for INCR must come after BLPOP's late (timed-out) reply."""
    oom = "OOM command not allowed when used memory > 'maxmemory'."
    rule = relay.inject_error({"INCR"}, oom, count=2)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    try:
        writer.write(
            pack("BLPOP", f"{key_prefix}:empty", "0.3")
            + pack("INCR", f"{key_prefix}:n")
            + pack("ECHO", "hi")
            + pack("INCR", f"{key_prefix}:n")
        )
        started = time.perf_counter()
        replies = await read_replies(reader, 4)
        assert time.perf_counter() - started >= 0.25, "replies came before BLPOP timed out"
        assert replies[0] in (b"*-1\r\n", b"$-1\r\n"), "the first reply must be BLPOP's null"
        error = f"-{oom}\r\n".encode()
        assert replies[1::2] == [error, error]
        assert replies[2] in (b"$2\r\nhi\r\n", b"+hi\r\n")  # (fakeredis sends simple strings)
        assert rule.hits == 2 and relay.count("INCR") == 0
    finally:
        writer.close()


async def test_inject_error_for_a_while_or_until_cancelled(relay: Relay, key_prefix: str) -> None:
    key = f"{key_prefix}:k"
    async with connect(relay.url) as client:
        loading = relay.inject_error({"GET"}, "LOADING Redis is loading the dataset in memory", seconds=0.3)
        with pytest.raises(redis.BusyLoadingError):
            await client.get(key)

        async def get_works() -> bool:
            try:
                return await client.get(key) is None
            except redis.BusyLoadingError:
                return False

        await wait_for(get_works, timeout=5, message="the error outlived its seconds")
        assert loading.hits >= 1 and not loading.active

        noperm = relay.inject_error(
            {"get", "mget"}, "NOPERM this user has no permissions to run the 'get' command"
        )
        for _ in range(3):
            with pytest.raises(redis.exceptions.NoPermissionError):
                await client.get(key)
        assert noperm.hits == 3 and noperm.active
        noperm.cancel()
        assert await client.get(key) is None
        relay.inject_error({"GET"}, "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is no.")
        relay.clear_rules()
        assert await client.get(key) is None


async def test_commands_are_recorded_per_connection(relay: Relay, key_prefix: str) -> None:
    async with connect(relay.url, single_connection_client=True) as client:
        assert await client.eval("return 1", 0) == 1
        sha = await client.script_load("return 2")
        assert await client.evalsha(sha, 0) == 2
        await client.xread({f"{key_prefix}:s": "0"}, count=1, block=10)
        (conn,) = relay.connections
        assert conn.commands[-4:] == ["EVAL", "SCRIPT", "EVALSHA", "XREAD"]
        assert (relay.count("eval"), relay.count("EVALSHA"), relay.count("XREAD")) == (1, 1, 1)
        assert relay.freeze({"xreadgroup"}) == []
        assert relay.freeze({"xread"}) == [conn]
        relay.heal()
    await wait_for(lambda: relay.connections == [], message="a closed client left its relay connection")


async def test_resp3_pushes_do_not_answer_commands(
    backend: str, relay: Relay, direct: redis.asyncio.Redis, key_prefix: str
) -> None:
    """An invalidation push arriving while BLPOP waits must not be taken for BLPOP's reply."""
    if backend == "fakeredis":
        pytest.skip("fakeredis has no CLIENT TRACKING, so sends no RESP3 pushes")
    key, items = f"{key_prefix}:k", f"{key_prefix}:list"
    await direct.set(key, "v")
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    try:
        writer.write(pack("HELLO", "3") + pack("CLIENT", "TRACKING", "ON") + pack("GET", key))
        assert (await read_replies(reader, 3))[1:] == [b"+OK\r\n", b"$1\r\nv\r\n"]
        rule = relay.drop_reply({"BLPOP"}, nonempty=False)
        writer.write(pack("BLPOP", items, "5"))
        await wait_for(lambda: relay.count("BLPOP") == 1, message="BLPOP never reached the relay")
        await direct.set(key, "w")  # Redis pushes an invalidation to the tracking connection
        (push,) = await read_replies(reader, 1)
        assert push.startswith(b">") and key.encode() in push
        assert not rule.fired.is_set()
        await direct.rpush(items, "x")
        await asyncio.wait_for(rule.fired.wait(), 5)
        assert b"x" in rule.dropped[0]
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 5) == b"", "the connection should be gone"
    finally:
        writer.close()


async def test_odd_client_bytes_are_forwarded_raw(relay: Relay, redis_url: str) -> None:
    """An inline command: the relay stops parsing that connection but still relays it."""
    host, port = redis_url.split("//")[1].split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"PING\r\n")
    expected = await asyncio.wait_for(reader.readline(), 5)  # what the server itself says
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    try:
        writer.write(b"PING\r\n")
        assert await asyncio.wait_for(reader.readline(), 5) == expected
    finally:
        writer.close()
    async with connect(relay.url) as client:
        assert await client.ping()


# --- private servers --------------------------------------------------------------------


@pytest.mark.parametrize("persistent", [False, True], ids=["plain", "persistent"])
async def test_private_server_restarts_on_its_port(backend: str, persistent: bool) -> None:
    server = private_server(backend, persistent=persistent)
    try:
        url = server.start()
        port, pid = server.port, server.pid
        assert url == f"redis://127.0.0.1:{port}/0"
        async with (
            connect(url, single_connection_client=True) as client,
            connect(url, single_connection_client=True) as blocked,
        ):
            await client.set("k", "v")
            # A client blocked in BLPOP when the server goes: it must not outlive the restart
            # (a real restart kills it; fakeredis must unblock its thread).
            pipe = blocked.pipeline(transaction=False).set("marker", "1").blpop(["items"], timeout=0)
            popping = asyncio.ensure_future(pipe.execute())
            await wait_for(lambda: client.exists("marker"), message="the blocking pipeline did not run")
            started = time.perf_counter()
            server.restart(keep_data=True)
            assert time.perf_counter() - started < 3, "restart waited for the blocked client"
            assert (server.url, server.port) == (url, port)
            assert pid is None or server.pid != pid
            with pytest.raises(redis.ConnectionError):
                await asyncio.wait_for(popping, 5)
            with pytest.raises(redis.ConnectionError):
                await client.get("k")  # the restart dropped the connection
            assert await client.get("k") == b"v"  # reconnects: the data is back
            await client.rpush("items", "x")
            assert await client.lrange("items", 0, -1) == [b"x"], "a blocked pop of the old server took it"
            server.restart(keep_data=False)
            with pytest.raises(redis.ConnectionError):
                await client.get("k")
            assert await client.dbsize() == 0

            await client.set("k", "crash")
            server.kill()
            with pytest.raises(redis.ConnectionError):
                await client.get("k")
            server.start()
            await wait_redis_up(url, timeout=5)
            assert server.port == port
            assert await client.get("k") == (b"crash" if persistent else None)
    finally:
        server.stop()
        server.stop()  # idempotent
    with pytest.raises(RuntimeError):
        server.start()


async def test_private_server_comes_back_from_a_snapshot_without_later_writes(backend: str) -> None:
    """restart_from_snapshot: the keys as at snapshot() (TTLs and stream groups too), and
    nothing written after it."""
    with private_server(backend) as server:
        async with connect(server.url, single_connection_client=True) as client:
            await client.set("early", "1", px=60_000)
            await client.xadd("s", {"f": "1"})
            await client.xgroup_create("s", "g", id="0")
            server.snapshot()
            await client.set("late", "1")
            await client.xadd("s", {"f": "2"})
            server.restart_from_snapshot()
            await wait_redis_up(server.url, timeout=5)
            with pytest.raises(redis.ConnectionError):
                await client.get("early")  # the restart dropped the connection
            assert await client.get("early") == b"1" and 0 < await client.pttl("early") <= 60_000
            assert await client.get("late") is None
            assert [fields for _, fields in await client.xrange("s")] == [{b"f": b"1"}]
            assert [g["name"] for g in await client.xinfo_groups("s")] == [b"g"]


async def test_relay_in_front_of_a_restarting_server(backend: str) -> None:
    server = private_server(backend)
    with server:
        async with Relay(server.url) as relay, connect(relay.url, single_connection_client=True) as client:
            await client.set("k", "v")
            assert len(relay.connections) == 1
            server.restart(keep_data=True)
            await wait_for(lambda: relay.connections == [], message="the server's close was not relayed")
            with pytest.raises(redis.ConnectionError):
                await client.get("k")
            assert await client.get("k") == b"v"


def test_private_server_classes() -> None:
    assert isinstance(private_server("fakeredis"), PrivateFakeRedis)
    redis_server = private_server("redis")
    assert isinstance(redis_server, PrivateRedis) and not redis_server.persistent
    with pytest.raises(ValueError):
        private_server("memcached")


# --- ACL users ----------------------------------------------------------------------------


def as_str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def acl_users(client: redis.asyncio.Redis) -> list[str]:
    return [as_str(name) for name in await client.acl_users()]


async def test_acl_user_deny_and_allow(
    backend: str, redis_url: str, direct: redis.asyncio.Redis, key_prefix: str
) -> None:
    stream = f"{key_prefix}:s"
    default_before = await direct.acl_getuser("default")
    if backend == "fakeredis":
        # fakeredis 2.41 does not enforce per-user command rules over TCP: the helper skips.
        with pytest.raises(pytest.skip.Exception, match="does not enforce ACL"):
            async with TemporaryAclUser(redis_url):
                pass
        assert not [u for u in await acl_users(direct) if u.startswith("sqt-")], "probe user left behind"
        return
    try:
        async with TemporaryAclUser(redis_url) as user:
            await check_acl_user(user, direct, stream)
    except pytest.skip.Exception as skipped:
        pytest.fail(f"TemporaryAclUser skipped on a real Redis: {skipped}")
    assert user.name not in await acl_users(direct)
    assert await direct.acl_getuser("default") == default_before


async def check_acl_user(user: TemporaryAclUser, direct: redis.asyncio.Redis, stream: str) -> None:
    """Deny and allow act on an open connection of the user at once; it works through a relay."""
    await direct.xadd(stream, {"f": "v"})
    async with connect(user.url, single_connection_client=True) as client:
        assert as_str(await client.acl_whoami()) == user.name
        assert await client.xread({stream: "0"})
        await user.deny("xread")
        with pytest.raises(redis.exceptions.NoPermissionError):
            await client.xread({stream: "0"})
        assert await client.xlen(stream) == 1, "the connection itself keeps working"
        await user.allow("xread")
        assert await client.xread({stream: "0"})
    # through a relay too (credentials are kept in relay.url)
    async with Relay(user.url) as relay, connect(relay.url) as relayed:
        assert as_str(await relayed.acl_whoami()) == user.name
