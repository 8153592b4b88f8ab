"""A throwaway local Sentinel set-up: one primary, one replica, three sentinels, on free
loopback ports in a temp dir, for the Sentinel failover tests.

The sentinels declare a primary down after `down_after_ms` of silence (1 s by default, so a
failover completes within a few seconds); `kill_primary` SIGKILLs it and `failover` asks
for a coordinated failover (SENTINEL FAILOVER, the old primary is demoted, not killed).

    python -m tests.sentinel      # start one, print its URL, stop it on Ctrl-C
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from tests.helpers import stop_processes
from tests.ports import release, reserve_port

SERVICE = "mymaster"
START_TIMEOUT = 20.0


class LocalSentinel:
    def __init__(self, down_after_ms: int = 1000, sentinels: int = 3) -> None:
        self.primary_port = reserve_port()
        self.replica_port = reserve_port()
        self.sentinel_ports = [reserve_port() for _ in range(sentinels)]
        self.down_after_ms = down_after_ms
        self.dir = Path(tempfile.mkdtemp(prefix="sessionq-sentinel."))
        self.by_port: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", p) for p in self.sentinel_ports]

    def start(self) -> str:
        try:
            self._data_node(self.primary_port)
            self._data_node(self.replica_port, "--replicaof", "127.0.0.1", str(self.primary_port))
            self._wait(
                lambda: _info(self.replica_port).get("master_link_status") == "up", "the replica to sync"
            )
            # Back to Redis' default for what follows: a node demoted by a failover resyncs after
            # the usual 5 s (resyncing at once from a promoted node whose promotion not every
            # sentinel knows yet let a flip-flop lose writes, seen with redis-py 5.0.8's client).
            for port in (self.primary_port, self.replica_port):
                with redis.Redis(port=port, socket_timeout=5) as conn:
                    conn.config_set("repl-diskless-sync-delay", 5)
            # Each sentinel is told its own id and the others' (and the replica) up front, so
            # the set-up is whole at once instead of after rounds of hello messages (seconds).
            ids = {port: f"{port:040x}" for port in self.sentinel_ports}
            for port in self.sentinel_ports:
                conf = self.dir / f"sentinel-{port}.conf"
                known = "".join(
                    f"sentinel known-sentinel {SERVICE} 127.0.0.1 {other} {ids[other]}\n"
                    for other in self.sentinel_ports
                    if other != port
                )
                conf.write_text(
                    f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                    f"sentinel myid {ids[port]}\n"
                    f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary_port} 2\n"
                    f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                    f"sentinel failover-timeout {SERVICE} 5000\n"
                    f"sentinel parallel-syncs {SERVICE} 1\n"
                    f"sentinel known-replica {SERVICE} 127.0.0.1 {self.replica_port}\n" + known
                )
                self._spawn(
                    port, [str(conf), "--sentinel", "--logfile", str(self.dir / f"sentinel-{port}.log")]
                )
            for port in self.sentinel_ports:
                self._wait(lambda p=port: self._sees_everyone(p), f"sentinel {port} to see the set-up")
        except BaseException:
            self.stop()
            raise
        return self.url

    def _sees_everyone(self, port: int) -> bool:
        """Whether sentinel `port` is in touch with the replica (its link up) and with every
        other sentinel: entries known from the configuration count only once contacted."""
        try:
            replicas = _entries(port, "REPLICAS")
            others = _entries(port, "SENTINELS")
        except redis.RedisError:
            return False
        in_touch = [r for r in replicas if r.get("flags") == "slave" and r.get("master-link-status") == "ok"]
        heard = [
            o for o in others if o.get("flags") == "sentinel" and int(o.get("last-hello-message", -1)) >= 0
        ]
        return len(in_touch) >= 1 and len(heard) >= len(self.sentinel_ports) - 1

    def _data_node(self, port: int, *extra: str) -> None:
        self._spawn(
            port,
            [
                "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--repl-diskless-sync-delay", "0",  # the first sync at once, not after 5 s (see start)
                "--dir", str(self.dir), "--logfile", str(self.dir / f"redis-{port}.log"), *extra,
            ],
        )  # fmt: skip
        self._wait(lambda: _ping(port), f"redis-server on port {port}")

    def _spawn(self, port: int, args: list[str]) -> None:
        self.by_port[port] = subprocess.Popen(
            ["redis-server", *args], stdin=subprocess.DEVNULL, start_new_session=True
        )

    def primary(self) -> int:
        """The port of the primary, as the first live sentinel sees it."""
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError), redis.Redis(port=port, socket_timeout=2) as conn:
                _, primary = conn.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
                return int(primary)
        raise AssertionError("no sentinel answers")

    def kill_primary(self) -> int:
        """SIGKILL the primary; returns its port."""
        port = self.primary()
        process = self.by_port[port]
        process.kill()
        process.wait(timeout=5)
        return port

    def failover(self) -> None:
        """A coordinated failover: the replica is promoted and the primary demoted."""
        with redis.Redis(port=self.sentinel_ports[0], socket_timeout=5) as conn:
            conn.execute_command("SENTINEL", "FAILOVER", SERVICE)

    def wait_new_primary(self, old: int, timeout: float = 15.0) -> int:
        """Until the sentinels name a primary other than `old` and it answers as one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                port = self.primary()
                if port != old and _info(port).get("role") == "master":
                    return port
            time.sleep(0.05)
        raise AssertionError(f"no new primary within {timeout:g}s; logs in {self.dir}")

    def wait_demoted(self, old: int, timeout: float = 15.0) -> None:
        """Until the old primary, if it lives, serves as a replica (the failover is over:
        until then it still takes writes, which are lost when it resyncs)."""
        deadline = time.monotonic() + timeout
        while self.by_port[old].poll() is None and _info(old).get("role") != "slave":
            if time.monotonic() > deadline:
                raise AssertionError(f"the old primary was not demoted within {timeout:g}s")
            time.sleep(0.05)

    def _wait(self, ready: object, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():  # type: ignore[operator]
            dead = [p.args for p in self.by_port.values() if p.poll() is not None]
            if dead:
                raise RuntimeError(
                    f"a redis-server of the sentinel set-up exited: {dead[0]}; logs in {self.dir}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready within {START_TIMEOUT:g}s; logs in {self.dir}")
            time.sleep(0.05)

    def stop(self) -> None:
        stop_processes(list(self.by_port.values()))
        self.by_port.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
        release(self.primary_port, self.replica_port, *self.sentinel_ports)


def _entries(port: int, what: str) -> list[dict[str, str]]:
    """SENTINEL REPLICAS|SENTINELS as dicts, read raw (redis-py versions parse them apart)."""
    connection = redis.Connection(port=port, socket_timeout=2)
    try:
        connection.send_command("SENTINEL", what, SERVICE)
        reply = connection.read_response()
    finally:
        connection.disconnect()
    out = []
    for entry in reply:  # a map (RESP3) or a flat field, value list (RESP2)
        pairs = entry.items() if isinstance(entry, dict) else zip(entry[::2], entry[1::2], strict=False)
        out.append({_text(k): _text(v) for k, v in pairs})
    return out


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _ping(port: int) -> bool:
    try:
        with redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1) as conn:
            return bool(conn.ping())
    except redis.RedisError:
        return False


def _info(port: int) -> dict[str, object]:
    try:
        with redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=1) as conn:
            return dict(conn.info("replication"))
    except redis.RedisError:
        return {}


def main() -> None:
    setup = LocalSentinel()
    print(setup.start(), flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        while all(p.poll() is None for p in setup.by_port.values()):
            time.sleep(0.5)
    setup.stop()


if __name__ == "__main__":
    main()
