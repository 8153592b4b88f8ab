#!/usr/bin/env python3
"""sessionq on Redis Cluster: task queues spread over the masters, throughput per master count.

    python scripts/bench_cluster.py [--cluster-url redis+cluster://h:p[,h:p]] [--activities N]
                                    [--quick] [--json FILE]

Without a URL (nor SESSIONQ_CLUSTER_URL / SESSIONQ_TEST_CLUSTER_URL) it starts a private
three-master cluster on free loopback ports (needs redis-server and redis-cli) and stops it
at the end. Each task queue's keys carry the hash tag ``{queue}``, so a queue lives on one
master; the script picks queue names whose slots fall on different masters and prints where
each one lives.

Scenario `spread`: N no-op activities per queue over 1, 2 and 3 queues, each queue on its own
master and drained by its own worker process. All activities are queued at once; the clock
runs from the first XADD to the last result pushed, and Redis' commands processed per master
show where the load went. A control round runs 3 queues whose slots share ONE master: when it
is as fast as 3 masters, the workers (Python CPU), not Redis, were the limit on this machine.
The worker processes are this file run with the hidden ``--_worker`` flag.

On a small machine the worker processes' Python is the limit long before Redis, so more
masters cannot show more throughput there (the control round proves which was the limit).
`--redis-cpu-quota PCT` emulates the case the cluster is for, Redis as the bottleneck: each
master of the private cluster runs in a CPU cgroup of its own capped at PCT% of one core
(Linux, root, cgroup v1 `cpu` or v2 `cpu.max`). Only a cluster this script started is capped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.cluster starts the private cluster

import redis  # noqa: E402

import sessionq  # noqa: E402
from sessionq.keys import QueueKeys  # noqa: E402
from tests.cluster import LocalCluster, cluster_tools, probe_cluster, sync_cluster  # noqa: E402

READY_TIMEOUT = 30.0
DRAIN_TIMEOUT = 120.0
ENQUEUE_CHUNK = 500


@sessionq.activity
async def noop() -> None:
    """The benchmarked activity: no work, so the queue machinery is what is measured."""


# --- where queues live -----------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    queue: str
    master: str  # host:port of the master holding the queue's slot
    slot: int


def place(client: Any, prefix: str, name: str) -> Placement:
    key = QueueKeys(prefix, name).tasks
    node = client.get_node_from_key(key)
    return Placement(name, f"{node.host}:{node.port}", client.keyslot(key))


def queues_on_masters(url: str, prefix: str, masters: int) -> list[Placement]:
    """One queue name per master, the first `masters` masters in port order."""
    with sync_cluster(url) as client:
        wanted = sorted(f"{n.host}:{n.port}" for n in client.get_primaries())[:masters]
        chosen: dict[str, Placement] = {}
        for i in range(10_000):
            spot = place(client, prefix, f"bench{i}")
            if spot.master in wanted and spot.master not in chosen:
                chosen[spot.master] = spot
            if len(chosen) == len(wanted):
                return [chosen[m] for m in wanted]
    raise RuntimeError(f"could not find queue names for {masters} masters")


def queues_on_one_master(url: str, prefix: str, count: int, master: str) -> list[Placement]:
    """`count` queue names (different slots) that all live on `master`."""
    with sync_cluster(url) as client:
        found: list[Placement] = []
        for i in range(10_000):
            spot = place(client, prefix, f"same{i}")
            if spot.master == master and spot.slot not in {p.slot for p in found}:
                found.append(spot)
            if len(found) == count:
                return found
    raise RuntimeError(f"could not find {count} queue names on {master}")


def master_counters(url: str) -> dict[str, tuple[int, float]]:
    """Per master: (commands processed, CPU seconds used) so far."""
    out = {}
    with sync_cluster(url) as client:
        for n in client.get_primaries():
            info = client.info(target_nodes=n)
            cpu = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
            out[f"{n.host}:{n.port}"] = (int(info["total_commands_processed"]), cpu)
    return out


# --- emulating a Redis-bound deployment ------------------------------------------------------


class CpuQuota:
    """Caps processes at a share of one core with a cgroup of their own each (v2 or v1)."""

    V2 = Path("/sys/fs/cgroup/unified")
    V1 = Path("/sys/fs/cgroup/cpu")
    PERIOD_US = 100_000

    def __init__(self, percent: float) -> None:
        self.quota_us = max(1000, int(self.PERIOD_US * percent / 100))
        self.groups: list[Path] = []

    def cap(self, pid: int, name: str) -> None:
        if (self.V2 / "cgroup.controllers").exists() and "cpu" in (
            self.V2 / "cgroup.controllers"
        ).read_text():
            group = self.V2 / name
            group.mkdir(exist_ok=True)
            (group / "cpu.max").write_text(f"{self.quota_us} {self.PERIOD_US}")
        elif (self.V1 / "cpu.cfs_quota_us").exists():
            group = self.V1 / name
            group.mkdir(exist_ok=True)
            (group / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(self.quota_us))
        else:
            raise RuntimeError("no writable cgroup cpu controller (needs Linux and root)")
        self.groups.append(group)
        (group / "cgroup.procs").write_text(str(pid))

    def release(self) -> None:
        """Move the capped processes back to the root group and remove the groups."""
        for group in self.groups:
            root = group.parent / "cgroup.procs"
            for pid in (group / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    root.write_text(pid)
            with contextlib.suppress(OSError):
                group.rmdir()
        self.groups.clear()


def cap_masters(url: str, quota: CpuQuota) -> None:
    with sync_cluster(url) as client:
        for node in client.get_primaries():
            pid = int(client.info("server", target_nodes=node)["process_id"])
            quota.cap(pid, f"sessionq-bench-{node.port}")
            print(
                f"  master {node.host}:{node.port} (pid {pid}) capped at {quota.quota_us / 1000:g}% of a core"
            )


# --- worker processes ------------------------------------------------------------------


def start_worker(url: str, prefix: str, queue: str, identity: str) -> subprocess.Popen[str]:
    argv = [sys.executable, __file__, "--_worker", "--cluster-url", url, "--prefix", prefix]
    argv += ["--queue", queue, "--identity", identity]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)


def wait_ready(processes: Sequence[subprocess.Popen[str]]) -> None:
    for process in processes:
        assert process.stdout is not None
        line = process.stdout.readline()  # the worker prints READY once registered
        if not line.startswith("READY"):
            raise RuntimeError(f"worker did not start (exit code {process.poll()})")


def stop_workers(processes: Sequence[subprocess.Popen[str]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def worker_main(args: argparse.Namespace) -> None:
    worker = sessionq.Worker(
        args.cluster_url,
        task_queue=args.queue,
        activities=[noop],
        identity=args.identity,
        prefix=args.prefix,
        max_concurrent_activities=200,
        heartbeat_timeout=10,
    )
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, worker.stop)
    async with worker:
        print("READY", flush=True)
        await worker.wait_stopped()


# --- the scenario ----------------------------------------------------------------------


async def drain_round(
    url: str, prefix: str, placements: Sequence[Placement], per_queue: int
) -> dict[str, Any]:
    """Queue `per_queue` no-ops on each queue at once; time until every result is back."""
    workers = [start_worker(url, prefix, p.queue, f"w-{p.queue}") for p in placements]
    client = sessionq.Client(url, prefix=prefix)
    try:
        await asyncio.to_thread(wait_ready, workers)
        payloads = {p.queue: encode(client, p.queue, per_queue) for p in placements}
        before = master_counters(url)
        started = time.perf_counter()
        await asyncio.gather(*(enqueue(client, p.queue, payloads[p.queue]) for p in placements))
        await asyncio.gather(*(wait_results(client, p.queue, per_queue) for p in placements))
        elapsed = time.perf_counter() - started
        after = master_counters(url)
    finally:
        await client.close()
        stop_workers(workers)
    total = per_queue * len(placements)
    cpu = {m: after[m][1] - before[m][1] for m in sorted(after)}
    on_master = {m: per_queue * sum(p.master == m for p in placements) for m in cpu}
    return {
        "queues": [p.queue for p in placements],
        "masters": sorted({p.master for p in placements}),
        "activities": total,
        "seconds": round(elapsed, 3),
        "activities_per_s": round(total / elapsed),
        "commands_per_master": {m: after[m][0] - before[m][0] for m in sorted(after)},
        "redis_cpu_s_per_master": {m: round(c, 3) for m, c in cpu.items()},
        # What the masters could carry if the workers were not the limit: each master's
        # activities per Redis CPU second, summed over the masters in use.
        "redis_ceiling_per_s": round(sum(on_master[m] / cpu[m] for m in cpu if on_master[m] and cpu[m] > 0)),
    }


def encode(client: sessionq.Client, queue: str, count: int) -> list[bytes]:
    options = client.resolve_options(None, {})
    return [client.prepare(noop, (), None, options, queue, None)[2] for _ in range(count)]


async def enqueue(client: sessionq.Client, queue: str, payloads: Sequence[bytes]) -> None:
    tasks = client.keys(queue).tasks
    for start in range(0, len(payloads), ENQUEUE_CHUNK):
        async with client.redis.pipeline(transaction=False) as pipe:
            for payload in payloads[start : start + ENQUEUE_CHUNK]:
                pipe.xadd(tasks, {"d": payload})
            await pipe.execute()


async def wait_results(client: sessionq.Client, queue: str, count: int) -> None:
    """Results land in this client's inbox list on the queue's master; count them."""
    inbox = client.keys(queue).inbox(client.client_id)
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while await client.redis.llen(inbox) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"queue {queue}: results still missing after {DRAIN_TIMEOUT:g}s")
        await asyncio.sleep(0.005)


async def scenario_spread(url: str, per_queue: int) -> dict[str, Any]:
    """1, 2, 3 queues on 1, 2, 3 masters (one worker process each), plus the 3-on-1 control."""
    prefix = "sqbench" + uuid.uuid4().hex[:8]
    try:
        spread = queues_on_masters(url, prefix, 3)
        print("task queues and the master holding each one's slot:")
        for p in spread:
            print(f"  {{{p.queue}}}  slot {p.slot:5d}  ->  master {p.master}")
        rounds = {}
        for k in (1, 2, 3):
            rounds[f"{k} queue(s) on {k} master(s)"] = await drain_round(url, prefix, spread[:k], per_queue)
            report(f"{k} queue(s) on {k} master(s)", rounds[f"{k} queue(s) on {k} master(s)"])
        same = queues_on_one_master(url, prefix, 3, spread[0].master)
        rounds["control: 3 queues on 1 master"] = await drain_round(url, prefix, same, per_queue)
        report("control: 3 queues on 1 master", rounds["control: 3 queues on 1 master"])
        explain(rounds)
        return {"per_queue": per_queue, "placements": [p.__dict__ for p in spread], "rounds": rounds}
    finally:
        delete_prefix(url, prefix)


def report(name: str, row: dict[str, Any]) -> None:
    load = ", ".join(
        f"{m} {n} cmds/{row['redis_cpu_s_per_master'][m]:.2f}s cpu"
        for m, n in row["commands_per_master"].items()
    )
    print(f"  {name:31s} {row['activities']:6d} in {row['seconds']:5.2f}s = {row['activities_per_s']:6d}/s"
          f"  Redis ceiling {row['redis_ceiling_per_s']:7d}/s  [{load}]", flush=True)  # fmt: skip


def explain(rounds: dict[str, dict[str, Any]]) -> None:
    one, three = rounds["1 queue(s) on 1 master(s)"], rounds["3 queue(s) on 3 master(s)"]
    control = rounds["control: 3 queues on 1 master"]
    print(f"measured: 3 masters {three['activities_per_s'] / one['activities_per_s']:.2f}x one master, "
          f"{three['activities_per_s'] / control['activities_per_s']:.2f}x the same 3 queues on one master; "
          f"Redis ceiling {three['redis_ceiling_per_s'] / control['redis_ceiling_per_s']:.2f}x")  # fmt: skip
    cpus = os.cpu_count() or 1
    if control["activities_per_s"] * 1.5 < three["activities_per_s"]:
        print("Redis was the limit: spreading the queues over the masters raised the measured rate")
    elif cpus < 4:
        print(f"note: {cpus} CPU(s) here run 3 worker processes, the caller and 3 redis-servers, so the "
              "measured rate is CPU-bound; the Redis ceiling (activities per Redis CPU second, summed over "
              "the masters in use) is what grows with the masters")  # fmt: skip


def delete_prefix(url: str, prefix: str) -> None:
    with sync_cluster(url) as client:
        for node in client.get_primaries():
            with redis.Redis(host=node.host, port=node.port) as conn:
                for key in conn.scan_iter(match=f"{prefix}:*", count=1000):
                    conn.unlink(key)


# --- entry point -------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cluster-url", default=None, help="redis+cluster://host:port[,host:port...]")
    parser.add_argument("--activities", type=int, default=None, help="activities per queue (default 4000)")
    parser.add_argument("--quick", action="store_true", help="1500 activities per queue")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument(
        "--redis-cpu-quota",
        type=float,
        default=None,
        metavar="PCT",
        help="cap each master of the private cluster at PCT%% of one core (emulates Redis as the limit)",
    )
    parser.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--queue", help=argparse.SUPPRESS)
    parser.add_argument("--identity", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        asyncio.run(worker_main(args))
        return 0
    url = (
        args.cluster_url
        or os.environ.get("SESSIONQ_CLUSTER_URL")
        or os.environ.get("SESSIONQ_TEST_CLUSTER_URL")
    )
    cluster = None
    quota = CpuQuota(args.redis_cpu_quota) if args.redis_cpu_quota else None
    if quota is not None and url:
        print("--redis-cpu-quota caps only a cluster this script starts; drop --cluster-url", file=sys.stderr)
        return 2
    if not url:
        missing = cluster_tools()
        if missing:
            print(f"no Redis Cluster given and none can be started ({missing})", file=sys.stderr)
            return 2
        cluster = LocalCluster()
        url = cluster.start()
        print(f"started a private 3-master cluster at {url}")
    try:
        ok, detail = probe_cluster(url)
        if not ok:
            print(f"no Redis Cluster at {url}: {detail}", file=sys.stderr)
            return 2
        print(f"{detail} at {url}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        per_queue = args.activities or (1500 if args.quick else 4000)
        if quota is not None:
            cap_masters(url, quota)
        results = asyncio.run(scenario_spread(url, per_queue))
        results["redis_cpu_quota_percent"] = args.redis_cpu_quota
    finally:
        if quota is not None:
            quota.release()
        if cluster is not None:
            cluster.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
