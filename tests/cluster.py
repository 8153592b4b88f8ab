"""A throwaway local Redis Cluster (three masters, and replicas if asked) for the tests.

``scripts/test`` starts one in bash and exports SESSIONQ_TEST_CLUSTER_URL; when pytest runs
without it, conftest starts one with `LocalCluster` (if redis-server and redis-cli exist)
and stops it at the end of the run. Also the helpers that must see every master: probing
the cluster and deleting a test's keys (SCAN runs per node, DEL per key: keys of different
slots cannot go in one DEL).

    python -m tests.cluster      # start one, print its URL, stop it on Ctrl-C
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from redis.cluster import ClusterNode, RedisCluster

from sessionq.connection import split_cluster_url
from tests.helpers import stop_processes
from tests.ports import release, reserve_ports

MASTERS = 3
BUS_OFFSET = 10000
"""A node's cluster bus listens on its port plus this."""
START_TIMEOUT = 20.0


def cluster_tools() -> str | None:
    """None when redis-server and redis-cli are on PATH, else what is missing."""
    missing = [tool for tool in ("redis-server", "redis-cli") if shutil.which(tool) is None]
    return ", ".join(missing) + " not on PATH" if missing else None


def sync_cluster(url: str) -> RedisCluster:
    """A plain (sync) redis-py cluster client on a ``redis+cluster://`` URL."""
    single, nodes = split_cluster_url(url)
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in nodes],
        socket_connect_timeout=2,
        socket_timeout=5,
        **_plain_kwargs(single),
    )


async def async_cluster(url: str) -> Any:
    """A plain redis.asyncio RedisCluster on a ``redis+cluster://`` URL, slot map loaded."""
    from redis.asyncio.cluster import ClusterNode as AsyncNode
    from redis.asyncio.cluster import RedisCluster as AsyncCluster

    single, nodes = split_cluster_url(url)
    kwargs = _plain_kwargs(single)
    client = AsyncCluster(startup_nodes=[AsyncNode(host, port) for host, port in nodes], **kwargs)
    await client.initialize()  # before concurrent use: redis-py routes at random until then
    return client


def _plain_kwargs(single: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(redis.connection.parse_url(single))
    for key in ("host", "port", "db", "connection_class"):
        kwargs.pop(key, None)
    return kwargs


def probe_cluster(url: str) -> tuple[bool, str]:
    """(usable, "Redis Cluster <version>, N masters" or why not)."""
    try:
        with sync_cluster(url) as client:
            state = client.cluster_info(target_nodes=RedisCluster.RANDOM).get("cluster_state")
            masters = client.get_primaries()
            version = client.info("server", target_nodes=masters[0]).get("redis_version", "?")
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    if state != "ok":
        return False, f"cluster_state is {state!r}"
    return True, f"Redis Cluster {version}, {len(masters)} masters"


def delete_cluster_keys(url: str, pattern: str) -> int:
    """Delete the keys matching ``pattern`` on every master (SCAN + UNLINK, never FLUSH*)."""
    deleted = 0
    with sync_cluster(url) as client:
        for node in client.get_primaries():
            with redis.Redis(host=node.host, port=node.port, **_auth(url)) as conn:
                keys = list(conn.scan_iter(match=pattern, count=1000))
                for start in range(0, len(keys), 500):
                    pipe = conn.pipeline(transaction=False)
                    for key in keys[start : start + 500]:
                        pipe.unlink(key)  # one key per command: a node holds many slots
                    deleted += sum(pipe.execute())
    return deleted


def _auth(url: str) -> dict[str, str]:
    single, _ = split_cluster_url(url)
    parsed = redis.connection.parse_url(single)
    return {k: v for k, v in parsed.items() if k in ("username", "password")}  # type: ignore[misc]


def master_of(url: str, key: str) -> str:
    """``host:port`` of the master holding `key`'s slot."""
    with sync_cluster(url) as client:
        node = client.get_node_from_key(key)
        return f"{node.host}:{node.port}"


class LocalCluster:
    """redis-server masters (three by default), each with `replicas` replicas, on free
    loopback ports, in a temp dir; `stop()` ends only them. `node_timeout_ms` is the
    cluster-node-timeout: how long a silent master takes to be failed over."""

    def __init__(self, masters: int = MASTERS, replicas: int = 0, node_timeout_ms: int = 15000) -> None:
        self.ports = reserve_ports(masters * (1 + replicas), bus_offset=BUS_OFFSET)
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.dir = Path(tempfile.mkdtemp(prefix="sessionq-cluster."))
        self.processes: list[subprocess.Popen[bytes]] = []
        self.by_port: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def start(self) -> str:
        """Start the servers, join them into a cluster, wait for cluster_state:ok; returns the URL."""
        try:
            for port in self.ports:
                self.processes.append(self._server(port))
                self.by_port[port] = self.processes[-1]
            for port in self.ports:
                self._wait(lambda p=port: self._cli(p, "ping") == "PONG", f"redis-server on port {port}")
            create = ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports)]
            subprocess.run(
                [*create, "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=START_TIMEOUT,
            )
            for port in self.ports:
                self._wait(lambda p=port: "cluster_state:ok" in self._cli(p, "cluster", "info"), "cluster")
            for port in self.ports:  # every replica has its master's data before a test kills one
                self._wait(lambda p=port: self._synced(p), f"replica on port {port}")
        except BaseException:
            self.stop()
            raise
        return self.url

    def _server(self, port: int) -> subprocess.Popen[bytes]:
        argv = [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1",
            "--cluster-enabled", "yes", "--cluster-config-file", str(self.dir / f"nodes-{port}.conf"),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--repl-diskless-sync-delay", "0",
            "--dir", str(self.dir), "--logfile", str(self.dir / f"redis-{port}.log"),
        ]  # fmt: skip
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)

    def _synced(self, port: int) -> bool:
        info = self._cli(port, "info", "replication")
        return "role:master" in info or "master_link_status:up" in info

    def kill_master_of(self, key: str) -> int:
        """SIGKILL the master that holds `key`'s slot; returns its port."""
        with sync_cluster(self.url) as client:
            port = int(client.get_node_from_key(key).port)
        process = self.by_port[port]
        process.kill()
        process.wait(timeout=5)
        return port

    def master_port_of(self, key: str) -> int | None:
        """The port of the live master that serves `key`'s slot by its own account, else None
        (between a master's death and its replica's promotion)."""
        live = [p for p in self.ports if self.by_port[p].poll() is None]
        slot = int(self._cli(live[0], "cluster", "keyslot", key) or -1)
        for port in live:
            myself = next((n for n in self._cli(port, "cluster", "nodes").splitlines() if "myself" in n), "")
            fields = myself.split()
            if len(fields) < 9 or "master" not in fields[2].split(","):
                continue
            for part in fields[8:]:
                low, _, high = part.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return port
        return None

    @staticmethod
    def _cli(port: int, *args: str) -> str:
        try:
            done = subprocess.run(
                ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
                capture_output=True,
                text=True,
                timeout=5,
            )
        except subprocess.TimeoutExpired:
            return ""
        return done.stdout.strip()

    def _wait(self, ready: object, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():  # type: ignore[operator]
            dead = [p.args for p in self.processes if p.poll() is not None]
            if dead:
                raise RuntimeError(
                    f"a redis-server of the test cluster exited: {dead[0]}; logs in {self.dir}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready within {START_TIMEOUT:g}s; logs in {self.dir}")
            time.sleep(0.05)

    def stop(self) -> None:
        stop_processes(self.processes)
        self.processes.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
        release(*self.ports, bus_offset=BUS_OFFSET)


def main() -> None:
    cluster = LocalCluster()
    print(cluster.start(), flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        while all(p.poll() is None for p in cluster.processes):
            time.sleep(0.5)
    cluster.stop()


if __name__ == "__main__":
    main()


def move_slot(url: str, slot: int, target: str, *, finish: bool = True, only: list[str] | None = None) -> str:
    """Move `slot` and its keys to master `target` ("host:port") the way resharding does
    (IMPORTING / MIGRATING, MIGRATE, SETSLOT NODE on every master); returns the old owner.
    With finish=False it stops before SETSLOT NODE: the keys are on the target while the old
    owner still holds the slot and answers ASK (call again with finish=True to end it).
    `only` (with finish=False) moves just those keys: the slot is caught with some of its
    keys moved and the others not yet."""
    with sync_cluster(url) as client:
        masters = {f"{n.host}:{n.port}": n for n in client.get_primaries()}
        owner = client.nodes_manager.slots_cache[slot][0]
        source = f"{owner.host}:{owner.port}"
    conns = {name: redis.Redis(host=n.host, port=n.port) for name, n in masters.items()}
    try:
        ids = {name: conn.execute_command("CLUSTER", "MYID").decode() for name, conn in conns.items()}
        src, dst = conns[source], conns[target]
        if source != target:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
            host, port = target.rsplit(":", 1)
            if only is not None and not finish:
                src.execute_command("MIGRATE", host, port, "", 0, 5000, "KEYS", *only)
                return source
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                src.execute_command("MIGRATE", host, port, "", 0, 5000, "KEYS", *keys)
        if not finish:
            return source
        for conn in (dst, *conns.values()):
            conn.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
    finally:
        for conn in conns.values():
            conn.close()
    return source
