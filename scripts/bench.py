#!/usr/bin/env python3
"""sessionq benchmark: throughput, latency, Redis cost and memory of the core paths.

    python scripts/bench.py [--redis-url URL] [--quick] [--json FILE]
                            [--only drain,roundtrip,...] [--uvloop] [--profile DIR]

Scenarios (each starts its own worker processes, all under one unique key prefix that is
deleted at the end; without --redis-url a private redis-server runs on a free port):

1. drain       N no-op async activities queued on the shared stream, then one worker process
               started: activities/s from the first result reaching the caller to the last.
2. roundtrip   one caller, one session, sequential no-op activities: p50/p90/p99 ms.
3. churn       create session + one activity + complete, sequential: p50/p99 ms.
2h, 3h.       host_roundtrip, host_churn: the same on a host session (two worker processes
               of one host, Worker(host_id=...)), next to the plain ones in the same run.
3r. resources  create + complete over 100 registered workers offering three resource types,
               a session asking for all three interleaved with one asking for none.
4. commands    Redis commands per activity from INFO commandstats deltas (commands run
               inside Lua scripts count), on a private redis-server so no other client's
               traffic is counted; the idle background rate (heartbeats, poll timeouts) is
               measured separately and subtracted.
5. capacity    10,000 open sessions on one worker: worker RSS growth (VmRSS) and Redis
               used_memory growth.
6. concurrency 50 callers, each with its own session, over 4 worker processes:
               activities/s and p99.

Every timed scenario also reports CPU time per activity for the caller process, the
workers and redis-server (and the share spent in the kernel), which shows where the floor
is and stays meaningful when other processes compete for the CPU (the load average is
recorded; latency figures taken on a busy machine are pessimistic). `--quick` finishes in
well under 2 minutes. `--profile DIR` runs the caller and every worker under cProfile.
The worker processes are this same file run with the hidden `--_worker` flag.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import platform
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

import sessionq
from sessionq.scripts import source as script_source

REPO = Path(__file__).resolve().parent.parent
TASK_QUEUE = "bench"
READY_TIMEOUT = 30.0
ENQUEUE_IN_FLIGHT = 64
"""Concurrent calls when queueing many activities (stays under the client's connection pool)."""
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the activity the workers run --------------------------------------------------------


@sessionq.activity
async def noop() -> None:
    """Does nothing: every microsecond measured is sessionq's (and Redis')."""
    return None


# --- sizes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How much work each scenario does; --quick shrinks all but capacity."""

    drain: int
    roundtrip: int
    churn: int
    commands: int
    capacity: int
    concurrency_s: float
    warmup: int


FULL = Sizes(
    drain=50_000,
    roundtrip=5_000,
    churn=2_000,
    commands=1_000,
    capacity=10_000,
    concurrency_s=15.0,
    warmup=300,
)
QUICK = Sizes(
    drain=10_000, roundtrip=1_000, churn=300, commands=300, capacity=10_000, concurrency_s=4.0, warmup=100
)

TARGETS: dict[str, tuple[str, float]] = {
    "drain.activities_per_s": (">=", 10_000),
    "roundtrip.p50_ms": ("<=", 0.5),
    "roundtrip.p99_ms": ("<=", 1.5),
    "churn.p50_ms": ("<=", 1.5),
    "commands.session_activity": ("<=", 6),
    "capacity.worker_rss_growth_mb": ("<=", 50),
}


# --- small utilities ----------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty sequence."""
    rank = math.ceil(q / 100 * len(sorted_values))
    return sorted_values[min(len(sorted_values), max(1, rank)) - 1]


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean in milliseconds."""
    ms = sorted(s * 1000 for s in seconds)
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 4),
        "p90_ms": round(percentile(ms, 90), 4),
        "p99_ms": round(percentile(ms, 99), 4),
        "max_ms": round(ms[-1], 4),
        "mean_ms": round(sum(ms) / len(ms), 4),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_cpu_s(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_rss_kb(pid: int) -> int:
    """VmRSS of a process in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def self_cpu_s() -> tuple[float, float]:
    """(user, system) CPU seconds of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def redis_cpu_s(sync: redis.Redis) -> tuple[float, float]:
    """(user, system) CPU seconds of the redis-server (all of its clients' work)."""
    cpu = sync.info("cpu")
    return float(cpu["used_cpu_user"]), float(cpu["used_cpu_sys"])


# --- processes ---------------------------------------------------------------------------


class RedisServer:
    """A throwaway redis-server on a free loopback port, no persistence."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="sessionq-bench-redis-")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--logfile",
                os.path.join(self.dir, "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis(port=self.port, socket_connect_timeout=0.2) as probe:
                    probe.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class WorkerProcess:
    """One worker subprocess (this file with --_worker)."""

    proc: subprocess.Popen[bytes]
    worker_id: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM (graceful), then SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Bench:
    """Shared settings of one benchmark run."""

    url: str
    prefix: str
    sizes: Sizes
    uvloop: bool
    workdir: Path
    profile_dir: Path | None = None
    workers: list[WorkerProcess] = field(default_factory=list)

    def spawn_worker(self, identity: str, url: str | None = None, **options: Any) -> WorkerProcess:
        """Start a worker process and wait for its READY line."""
        profile = (
            []
            if self.profile_dir is None
            else ["-m", "cProfile", "-o", str(self.profile_dir / f"worker-{identity}.prof")]
        )
        cmd = [
            sys.executable,
            *profile,
            str(Path(__file__).resolve()),
            "--_worker",
            "--redis-url",
            url or self.url,
            "--prefix",
            self.prefix,
            "--identity",
            identity,
        ]
        for key, value in options.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        if self.uvloop:
            cmd.append("--uvloop")
        log = self.workdir / f"worker-{identity}.log"
        with log.open("wb") as stderr:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr)
        worker = WorkerProcess(proc, identity, log)
        self.workers.append(worker)
        assert proc.stdout is not None
        readable, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT)
        line = proc.stdout.readline().decode() if readable else ""
        if not line.startswith("READY"):
            worker.stop()
            raise RuntimeError(f"worker {identity} did not start: {line!r}\n{log.read_text()[-2000:]}")
        return worker

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers.clear()

    def client(self, url: str | None = None) -> sessionq.Client:
        return sessionq.Client(url or self.url, prefix=self.prefix)


@contextlib.contextmanager
def workers_of(bench: Bench, *identities: str, **options: Any) -> Iterator[list[WorkerProcess]]:
    """Worker processes for one scenario, stopped when it ends."""
    started = [bench.spawn_worker(identity, **options) for identity in identities]
    try:
        yield started
    finally:
        for worker in started:
            worker.stop()
            bench.workers.remove(worker)


class CpuMeter:
    """CPU seconds spent by the caller (this process), workers and redis-server between two points."""

    def __init__(self, sync: redis.Redis, workers: Sequence[WorkerProcess]) -> None:
        self.sync, self.pids = sync, [w.pid for w in workers]
        self.start = self._sample()

    def _sample(self) -> list[tuple[float, float]]:
        workers = [proc_cpu_s(p) for p in self.pids]
        return [
            self_cpu_s(),
            (sum(w[0] for w in workers), sum(w[1] for w in workers)),
            redis_cpu_s(self.sync),
        ]

    def per_activity_us(self, count: int) -> dict[str, float]:
        """CPU µs per activity of each party, and the share of it spent in the kernel (syscalls)."""
        end = self._sample()
        out: dict[str, float] = {}
        for name, (u0, s0), (u1, s1) in zip(("caller", "workers", "redis"), self.start, end, strict=True):
            total = (u1 - u0) + (s1 - s0)
            out[f"cpu_us_{name}"] = round(total / count * 1e6, 1)
            out[f"sys_pct_{name}"] = round(100 * (s1 - s0) / total) if total > 0 else 0
        return out


# --- scenarios ---------------------------------------------------------------------------


async def gather_bounded(factories: Sequence[Callable[[], Awaitable[Any]]], limit: int) -> list[Any]:
    """Run coroutine factories with at most `limit` in flight, keeping order."""
    results: list[Any] = [None] * len(factories)
    semaphore = asyncio.Semaphore(limit)

    async def one(i: int) -> None:
        async with semaphore:
            results[i] = await factories[i]()

    await asyncio.gather(*(one(i) for i in range(len(factories))))
    return results


async def warm_session(client: sessionq.Client, count: int) -> None:
    async with client.create_session(TASK_QUEUE) as session:
        for _ in range(count):
            await session.execute_activity("noop")


async def results_of(handles: Sequence[sessionq.ActivityHandle], stall: float = 30.0) -> list[float]:
    """Await every handle in order; the arrival time of each. Fails (rather than hanging) when no
    result arrives for `stall` seconds, naming how many are missing."""
    arrivals: list[float] = []
    for handle in handles:
        try:
            await asyncio.wait_for(handle.result(), stall)
        except asyncio.TimeoutError:
            raise RuntimeError(
                f"{len(handles) - len(arrivals)} of {len(handles)} activities never finished "
                f"(no result for {stall:g}s): lost by the worker?"
            ) from None
        arrivals.append(time.perf_counter())
    return arrivals


async def wait_for_drained(sync: redis.Redis, tasks: str, n: int, stall: float = 30.0) -> tuple[float, float]:
    """Poll XLEN of the task stream, which the worker empties (XACK + XDEL in the same write
    as the results): (time the first of n was gone, time all n were)."""
    first = None
    seen, last_change = n, time.perf_counter()
    while True:
        left = sync.xlen(tasks)
        now = time.perf_counter()
        if left < n and first is None:
            first = now
        if left == 0:
            assert first is not None
            return first, now
        if left != seen:
            seen, last_change = left, now
        elif now - last_change > stall:
            raise RuntimeError(f"{left} of {n} activities never finished: lost by the worker?")
        await asyncio.sleep(0.002)


async def scenario_drain(bench: Bench, sync: redis.Redis) -> dict[str, Any]:
    """Queue N plain activities, then start one worker process: activities/s from the first
    result to the last, counted in the caller's inbox list (so neither the worker's start-up
    nor the caller's reading of results is counted: this is the worker's pace)."""
    n = bench.sizes.drain
    client = bench.client()
    inbox = client.keys(TASK_QUEUE).inbox(client.client_id)
    t0 = time.perf_counter()
    try:
        handles: list[sessionq.ActivityHandle] = await gather_bounded(
            [lambda: client.start_activity("noop", task_queue=TASK_QUEUE)] * n, ENQUEUE_IN_FLIGHT
        )
        enqueue_s = time.perf_counter() - t0
    finally:
        await client.close()  # stop reading the inbox (close deletes it)
    for handle in handles:  # settle the futures the close failed, so nothing logs about them
        with contextlib.suppress(sessionq.SessionqError):
            await handle.result()
    # The inbox again, unread: the results pile up there, as for a caller that reads them later.
    sync.eval(script_source("open_inbox"), 1, inbox, 600_000, "bench")
    with workers_of(bench, "drain", task_queue=TASK_QUEUE) as workers:
        meter = CpuMeter(sync, workers)
        first, last = await wait_for_drained(sync, client.keys(TASK_QUEUE).tasks, n)
        cpu = meter.per_activity_us(n)
    entry = sync.xrevrange(inbox, count=1)
    assert entry and b"r" in entry[0][1], f"unexpected inbox entry {entry!r}"
    return {
        "n": n,
        "activities_per_s": round((n - 1) / (last - first)),
        "seconds": round(last - first, 3),
        "enqueue_per_s": round(n / enqueue_s),
        **cpu,
    }


def session_workers(
    bench: Bench, name: str, host: bool
) -> contextlib.AbstractContextManager[list[WorkerProcess]]:
    """One worker process; or, for a host session, the two processes of one host."""
    if host:
        return workers_of(bench, f"{name}-a", f"{name}-b", task_queue=TASK_QUEUE, host_id=f"{name}-host")
    return workers_of(bench, name, task_queue=TASK_QUEUE)


async def scenario_roundtrip(bench: Bench, sync: redis.Redis, host: bool = False) -> dict[str, Any]:
    """One caller, one session, sequential no-op activities."""
    n = bench.sizes.roundtrip
    with session_workers(bench, "rt", host) as workers:
        client = bench.client()
        try:
            async with client.create_session(TASK_QUEUE) as session:
                for _ in range(bench.sizes.warmup):
                    await session.execute_activity("noop")
                samples: list[float] = []
                meter = CpuMeter(sync, workers)
                for _ in range(n):
                    t = time.perf_counter()
                    await session.execute_activity("noop")
                    samples.append(time.perf_counter() - t)
                cpu = meter.per_activity_us(n)
        finally:
            await client.close()
    summary = latency_summary(samples)
    return {**summary, "activities_per_s": round(n / sum(samples)), **cpu}


async def scenario_churn(bench: Bench, sync: redis.Redis, host: bool = False) -> dict[str, Any]:
    """create_session + one activity + complete, sequential."""
    n = bench.sizes.churn
    with session_workers(bench, "churn", host) as workers:
        client = bench.client()
        try:
            for _ in range(max(20, bench.sizes.warmup // 5)):
                await warm_session(client, 1)
            samples: list[float] = []
            meter = CpuMeter(sync, workers)
            for _ in range(n):
                t = time.perf_counter()
                async with client.create_session(TASK_QUEUE) as session:
                    await session.execute_activity("noop")
                samples.append(time.perf_counter() - t)
            cpu = meter.per_activity_us(n)
        finally:
            await client.close()
    return {**latency_summary(samples), "sessions_per_s": round(n / sum(samples)), **cpu}


RESOURCE_FLEET = 4, 25
"""Worker processes x Worker objects each for the resources scenario: 100 registered workers."""
OFFERED = "gpu=4,scratch_gb=1000,licence=2"
ASKED = {"gpu": 1, "scratch_gb": 100, "licence": 1}


async def scenario_resources(bench: Bench, sync: redis.Redis) -> dict[str, Any]:
    """create_session + complete over 100 registered workers that offer three resource types:
    a session asking for all three next to one asking for none, interleaved in one run."""
    n = bench.sizes.churn
    processes, per_process = RESOURCE_FLEET
    names = [f"fleet{i}" for i in range(processes)]
    with workers_of(bench, *names, task_queue=TASK_QUEUE, fleet=per_process, resources=OFFERED) as workers:
        client = bench.client()
        asked = sessionq.SessionOptions(resources=ASKED)
        try:
            for _ in range(max(20, bench.sizes.warmup // 5)):
                await (await client.create_session(TASK_QUEUE)).complete()
                await (await client.create_session(TASK_QUEUE, asked)).complete()
            plain: list[float] = []
            with_resources: list[float] = []
            meter = CpuMeter(sync, workers)
            for _ in range(n):
                t = time.perf_counter()
                await (await client.create_session(TASK_QUEUE)).complete()
                plain.append(time.perf_counter() - t)
                t = time.perf_counter()
                await (await client.create_session(TASK_QUEUE, asked)).complete()
                with_resources.append(time.perf_counter() - t)
            cpu = meter.per_activity_us(2 * n)
        finally:
            await client.close()
    a, b = latency_summary(plain), latency_summary(with_resources)
    return {
        "workers": processes * per_process,
        "plain_p50_ms": a["p50_ms"],
        "plain_p99_ms": a["p99_ms"],
        "resources_p50_ms": b["p50_ms"],
        "resources_p99_ms": b["p99_ms"],
        **cpu,
    }


def commandstats(sync: redis.Redis) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT, without our own INFO/CONFIG."""
    stats = sync.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    return {k: v for k, v in calls.items() if k.split("|")[0] not in ("info", "config")}


async def count_commands(
    sync: redis.Redis, run: Callable[[], Awaitable[int]], idle_rate: float
) -> dict[str, Any]:
    """Commands per activity while `run` executes (it returns how many activities it ran)."""
    sync.config_resetstat()
    t = time.perf_counter()
    count = await run()
    elapsed = time.perf_counter() - t
    calls = commandstats(sync)
    total = sum(calls.values())
    background = idle_rate * elapsed
    return {
        "per_activity": round((total - background) / count, 2),
        "raw_per_activity": round(total / count, 2),
        "background_subtracted": round(background, 1),
        "breakdown": {k: round(v / count, 3) for k, v in sorted(calls.items(), key=lambda kv: -kv[1])},
    }


async def scenario_commands(bench: Bench, _sync: redis.Redis) -> dict[str, Any]:
    """Redis commands per session activity and per plain activity, on a private server."""
    n = bench.sizes.commands
    server = RedisServer()
    sync = redis.Redis.from_url(server.url)
    try:
        with workers_of(bench, "cmd", url=server.url, task_queue=TASK_QUEUE):
            client = bench.client(server.url)
            try:
                async with client.create_session(TASK_QUEUE) as session:
                    for _ in range(bench.sizes.warmup):
                        await session.execute_activity("noop")
                    for _ in range(bench.sizes.warmup):
                        await client.execute_activity("noop", task_queue=TASK_QUEUE)
                    idle_s = 4.0 if bench.sizes is FULL else 2.5
                    sync.config_resetstat()
                    await asyncio.sleep(idle_s)
                    idle_calls = commandstats(sync)
                    idle_rate = sum(idle_calls.values()) / idle_s

                    async def session_run() -> int:
                        for _ in range(n):
                            await session.execute_activity("noop")
                        return n

                    async def plain_run() -> int:
                        for _ in range(n):
                            await client.execute_activity("noop", task_queue=TASK_QUEUE)
                        return n

                    async def plain_batch_run() -> int:
                        start = client.start_activity
                        handles = await gather_bounded(
                            [lambda: start("noop", task_queue=TASK_QUEUE)] * n, ENQUEUE_IN_FLIGHT
                        )
                        await results_of(handles)
                        return n

                    results = {
                        "session_activity": await count_commands(sync, session_run, idle_rate),
                        "plain_activity": await count_commands(sync, plain_run, idle_rate),
                        "plain_activity_batch": await count_commands(sync, plain_batch_run, idle_rate),
                    }

                async def churn_run() -> int:
                    for _ in range(n // 3):
                        await warm_session(client, 1)
                    return n // 3

                results["session_churn"] = await count_commands(sync, churn_run, idle_rate)
            finally:
                await client.close()
    finally:
        sync.close()
        server.stop()
    return {
        "session_activity": results["session_activity"]["per_activity"],
        "plain_activity": results["plain_activity"]["per_activity"],
        "plain_activity_batch": results["plain_activity_batch"]["per_activity"],
        "session_churn": results["session_churn"]["per_activity"],
        "idle_commands_per_s": round(idle_rate, 2),
        "idle_breakdown_per_s": {k: round(v / idle_s, 2) for k, v in idle_calls.items()},
        "detail": results,
    }


async def scenario_capacity(bench: Bench, sync: redis.Redis) -> dict[str, Any]:
    """Hold N open sessions on one worker; worker RSS and Redis memory growth."""
    n = bench.sizes.capacity
    with workers_of(bench, "cap", task_queue=TASK_QUEUE) as (worker,):
        client = bench.client()
        try:
            await warm_session(client, bench.sizes.warmup)
            rss0 = proc_rss_kb(worker.pid)
            mem0 = int(sync.info("memory")["used_memory"])
            t = time.perf_counter()
            opener = client.create_session
            sessions = await gather_bounded([lambda: opener(TASK_QUEUE)] * n, ENQUEUE_IN_FLIGHT)
            await sessions[-1].execute_activity("noop")  # the worker has now read every 'open'
            open_s = time.perf_counter() - t
            rss1 = proc_rss_kb(worker.pid)
            mem1 = int(sync.info("memory")["used_memory"])
            t = time.perf_counter()
            await gather_bounded([s.complete for s in sessions], ENQUEUE_IN_FLIGHT)
            await warm_session(client, 1)  # the worker has now read every 'end'
            close_s = time.perf_counter() - t
            rss2 = proc_rss_kb(worker.pid)
            mem2 = int(sync.info("memory")["used_memory"])
        finally:
            await client.close()
    return {
        "sessions": n,
        "worker_rss_base_mb": round(rss0 / 1024, 1),
        "worker_rss_growth_mb": round((rss1 - rss0) / 1024, 1),
        "worker_bytes_per_session": round((rss1 - rss0) * 1024 / n),
        "worker_rss_after_complete_mb": round(rss2 / 1024, 1),
        "redis_growth_mb": round((mem1 - mem0) / 2**20, 1),
        "redis_bytes_per_session": round((mem1 - mem0) / n),
        "redis_retained_after_complete_mb": round((mem2 - mem0) / 2**20, 1),
        "open_per_s": round(n / open_s),
        "complete_per_s": round(n / close_s),
    }


async def scenario_concurrency(bench: Bench, sync: redis.Redis, callers: int = 50) -> dict[str, Any]:
    """`callers` callers, each with its own session, over 4 worker processes, for a fixed time."""
    ids = [f"c{i}" for i in range(4)]
    with workers_of(bench, *ids, task_queue=TASK_QUEUE) as workers:
        client = bench.client()
        try:
            sessions = [await client.create_session(TASK_QUEUE) for _ in range(callers)]
            spread = {w: sum(1 for s in sessions if s.info.worker_id == w) for w in ids}
            samples: list[list[float]] = [[] for _ in range(callers)]
            phase = {"record": False, "stop": False}

            async def caller(session: sessionq.Session, out: list[float]) -> None:
                while not phase["stop"]:
                    t = time.perf_counter()
                    await session.execute_activity("noop")
                    if phase["record"]:
                        out.append(time.perf_counter() - t)

            tasks = [asyncio.create_task(caller(s, o)) for s, o in zip(sessions, samples, strict=True)]
            await asyncio.sleep(1.0)  # warm-up
            meter = CpuMeter(sync, workers)
            phase["record"] = True
            t = time.perf_counter()
            await asyncio.sleep(bench.sizes.concurrency_s)
            phase["record"] = False
            elapsed = time.perf_counter() - t
            flat = [x for out in samples for x in out]
            cpu = meter.per_activity_us(len(flat))
            phase["stop"] = True
            await asyncio.gather(*tasks)
            await asyncio.gather(*(s.complete() for s in sessions))
        finally:
            await client.close()
    return {
        "callers": callers,
        "workers": len(ids),
        "activities_per_s": round(len(flat) / elapsed),
        **latency_summary(flat),
        "sessions_per_worker": spread,
        **cpu,
    }


SCENARIOS: dict[str, Callable[[Bench, redis.Redis], Awaitable[dict[str, Any]]]] = {
    "drain": scenario_drain,
    "roundtrip": scenario_roundtrip,
    "churn": scenario_churn,
    "host_roundtrip": functools.partial(scenario_roundtrip, host=True),
    "host_churn": functools.partial(scenario_churn, host=True),
    "resources": scenario_resources,
    "commands": scenario_commands,
    "capacity": scenario_capacity,
    "concurrency": scenario_concurrency,
}


# --- reporting ---------------------------------------------------------------------------

ROWS: list[tuple[str, str, str]] = [
    ("drain", "activities_per_s", "1. drain, 1 worker process (activities/s)"),
    ("roundtrip", "p50_ms", "2. session round trip p50 (ms)"),
    ("roundtrip", "p90_ms", "2. session round trip p90 (ms)"),
    ("roundtrip", "p99_ms", "2. session round trip p99 (ms)"),
    ("churn", "p50_ms", "3. session churn p50 (ms)"),
    ("churn", "p99_ms", "3. session churn p99 (ms)"),
    ("host_roundtrip", "p50_ms", "2h. host session round trip p50 (ms)"),
    ("host_roundtrip", "p99_ms", "2h. host session round trip p99 (ms)"),
    ("host_churn", "p50_ms", "3h. host session churn p50 (ms)"),
    ("host_churn", "p99_ms", "3h. host session churn p99 (ms)"),
    ("resources", "plain_p50_ms", "3r. create + complete, 100 workers, no resources p50 (ms)"),
    ("resources", "plain_p99_ms", "3r. create + complete, 100 workers, no resources p99 (ms)"),
    ("resources", "resources_p50_ms", "3r. create + complete, 100 workers, 3 resource types p50 (ms)"),
    ("resources", "resources_p99_ms", "3r. create + complete, 100 workers, 3 resource types p99 (ms)"),
    ("commands", "session_activity", "4. Redis commands per session activity"),
    ("commands", "plain_activity", "4. Redis commands per plain activity (sequential)"),
    ("commands", "plain_activity_batch", "4. Redis commands per plain activity (batch)"),
    ("commands", "session_churn", "4. Redis commands per session churn"),
    ("capacity", "worker_rss_growth_mb", "5. worker RSS growth, 10k open sessions (MB)"),
    ("capacity", "redis_growth_mb", "5. Redis used_memory growth, 10k sessions (MB)"),
    ("concurrency", "activities_per_s", "6. 50 callers / 4 workers (activities/s)"),
    ("concurrency", "p99_ms", "6. 50 callers / 4 workers p99 (ms)"),
]


def verdict(key: str, value: float) -> str:
    target = TARGETS.get(key)
    if target is None:
        return ""
    op, bound = target
    ok = value >= bound if op == ">=" else value <= bound
    return f"{op} {bound:g}  {'ok' if ok else 'MISS'}"


def print_table(results: dict[str, dict[str, Any]]) -> None:
    width = max(len(label) for _, _, label in ROWS)
    print(f"\n{'figure':<{width}}  {'value':>10}  target")
    print("-" * (width + 32))
    for scenario, metric, label in ROWS:
        if scenario not in results:
            continue
        value = results[scenario].get(metric)
        shown = f"{value:,.3f}" if isinstance(value, float) and value < 100 else f"{value:,}"
        print(f"{label:<{width}}  {shown:>10}  {verdict(f'{scenario}.{metric}', value)}")
    cpu_rows = [(name, r) for name, r in results.items() if "cpu_us_caller" in r]
    if cpu_rows:
        print("\nCPU per activity, µs (% in kernel): caller / workers / redis-server")
        for name, r in cpu_rows:
            parts = [
                f"{r[f'cpu_us_{p}']:>7} ({r[f'sys_pct_{p}']:>2}%)" for p in ("caller", "workers", "redis")
            ]
            print(f"  {name:<12} {' / '.join(parts)}")


def machine(url: str, sync: redis.Redis, uvloop: bool) -> dict[str, Any]:
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpu": cpu_model,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "redis_server": sync.info("server")["redis_version"],
        "redis_py": redis.__version__,
        "hiredis": bool(redis.utils.HIREDIS_AVAILABLE),
        "uvloop": uvloop,
        "sessionq": sessionq.__version__,
        "commit": commit,
        "redis_url": url.split("@")[-1],
        "loadavg_1m_at_start": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# --- main --------------------------------------------------------------------------------


def delete_prefix(url: str, prefix: str) -> int:
    """Delete every key under `prefix:` (SCAN + DEL; never FLUSH a possibly shared server)."""
    with redis.Redis.from_url(url) as sync:
        keys = list(sync.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            sync.delete(*keys[start : start + 500])
    return len(keys)


async def run_all(bench: Bench, names: Sequence[str]) -> dict[str, Any]:
    sync = redis.Redis.from_url(bench.url)
    results: dict[str, Any] = {
        "machine": machine(bench.url, sync, bench.uvloop),
        "quick": bench.sizes is QUICK,
        "results": {},
    }
    try:
        for name in names:
            t = time.perf_counter()
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            outcome = await SCENARIOS[name](bench, sync)
            outcome["wall_s"] = round(time.perf_counter() - t, 1)
            results["results"][name] = outcome
    finally:
        sync.close()
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis-url", help="Redis to use (default: a private redis-server)")
    parser.add_argument("--quick", action="store_true", help="smaller runs, under 2 minutes")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON here")
    parser.add_argument("--only", help=f"comma list of scenarios ({','.join(SCENARIOS)})")
    parser.add_argument("--uvloop", action="store_true", help="run callers and workers on uvloop")
    parser.add_argument(
        "--profile", metavar="DIR", help="run the caller and every worker under cProfile; .prof files here"
    )
    worker = parser.add_argument_group("worker process (internal)")
    worker.add_argument("--_worker", action="store_true", dest="worker", help=argparse.SUPPRESS)
    worker.add_argument("--prefix", help=argparse.SUPPRESS)
    worker.add_argument("--identity", help=argparse.SUPPRESS)
    worker.add_argument("--task-queue", default=TASK_QUEUE, help=argparse.SUPPRESS)
    worker.add_argument("--heartbeat-timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    worker.add_argument("--concurrency", type=int, default=100, help=argparse.SUPPRESS)
    worker.add_argument("--host-id", default=None, help=argparse.SUPPRESS)
    worker.add_argument("--fleet", type=int, default=1, help=argparse.SUPPRESS)
    worker.add_argument("--resources", default="", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def use_uvloop(wanted: bool) -> None:
    if wanted:
        import uvloop  # type: ignore[import-not-found]

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def worker_main(args: argparse.Namespace) -> None:
    """Run one worker (or --fleet N of them, each its own identity) until SIGTERM, or until
    the benchmark process is gone."""
    parent = os.getppid()
    offered = {k: int(v) for k, _, v in (p.partition("=") for p in args.resources.split(",") if p)}
    workers = [
        sessionq.Worker(
            args.redis_url,
            task_queue=args.task_queue,
            activities=[noop],
            enable_sessions=True,
            max_concurrent_activities=args.concurrency,
            identity=args.identity if args.fleet == 1 else f"{args.identity}-{k}",
            heartbeat_timeout=args.heartbeat_timeout,
            prefix=args.prefix,
            host_id=args.host_id,
            session_resources=offered or None,
        )
        for k in range(args.fleet)
    ]
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: [w.stop() for w in workers])
    async with contextlib.AsyncExitStack() as stack:
        for worker in workers:
            await stack.enter_async_context(worker)
        print("READY", args.identity, flush=True)
        watchers = [asyncio.create_task(watch_parent(w, parent)) for w in workers]
        await asyncio.gather(*(w.wait_stopped() for w in workers))
        for watcher in watchers:
            watcher.cancel()


async def watch_parent(worker: sessionq.Worker, parent: int) -> None:
    """Stop the worker once the benchmark process is gone, so no worker outlives it."""
    while os.getppid() == parent:
        await asyncio.sleep(0.5)
    worker.stop()


def run_profiled(bench: Bench, names: Sequence[str]) -> dict[str, Any]:
    """Run the scenarios; with --profile, under cProfile (the workers are profiled too)."""
    if bench.profile_dir is None:
        return asyncio.run(run_all(bench, names))
    import cProfile

    bench.profile_dir.mkdir(parents=True, exist_ok=True)
    with cProfile.Profile() as profiler:
        report = asyncio.run(run_all(bench, names))
    profiler.dump_stats(bench.profile_dir / "caller.prof")
    print(f"[bench] cProfile output in {bench.profile_dir} (python -m pstats FILE)", file=sys.stderr)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    use_uvloop(args.uvloop)
    if args.worker:
        asyncio.run(worker_main(args))
        return 0
    names = [n.strip() for n in (args.only or ",".join(SCENARIOS)).split(",") if n.strip()]
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    server = None if args.redis_url else RedisServer()
    url = args.redis_url or server.url  # type: ignore[union-attr]
    prefix = f"sqbench-{uuid.uuid4().hex[:12]}"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sessionq-bench-") as workdir:
        bench = Bench(
            url=url,
            prefix=prefix,
            sizes=QUICK if args.quick else FULL,
            uvloop=args.uvloop,
            workdir=Path(workdir),
            profile_dir=Path(args.profile).resolve() if args.profile else None,
        )
        try:
            report = run_profiled(bench, names)
        finally:
            bench.stop_workers()
            try:
                deleted = delete_prefix(url, prefix)
                print(f"[bench] deleted {deleted} keys under {prefix}:", file=sys.stderr)
            finally:
                if server is not None:
                    server.stop()
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report["machine"]["loadavg_1m_at_end"] = os.getloadavg()[0]
    print_table(report["results"])
    m = report["machine"]
    print(
        f"\n{m['cpu']} x{m['cores']}, Python {m['python']}, Redis {m['redis_server']}, "
        f"hiredis {'on' if m['hiredis'] else 'off'}, uvloop {'on' if m['uvloop'] else 'off'}; "
        f"total {report['wall_s']} s"
    )
    busy = m["loadavg_1m_at_start"]
    if busy > 2.5:
        print(
            f"warning: load average {busy:.1f} on {m['cores']} cores before the run: other processes "
            "competed for the CPU, so latency and throughput figures are pessimistic (CPU per "
            "activity is less affected)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
