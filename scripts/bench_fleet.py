#!/usr/bin/env python3
"""sessionq fleet-scale benchmark: what a large fleet of idle workers costs Redis, how fast a
dead worker is noticed among them, and how sessions and waiting callers behave by the
hundred thousand.

    python scripts/bench_fleet.py [--quick] [--only idle,death,sessions,waiters,hosts] [--json PATH|-]
                                  [--processes P] [--per-process W] [--heartbeat-timeout S]
                                  [--host-size K]
                                  [--window S] [--settle S] [--sessions N] [--creates N]
                                  [--openers N] [--waiters N]

Scenarios (each on a private redis-server of its own, started on a free loopback port and
torn down at the end, so its memory and command counts hold nothing else's):

idle      P processes x W Worker objects (default 10 x 100 = 1,000 workers, each its own
          identity, enable_sessions=True, heartbeat_timeout 10 s) on one task queue. Once all
          are registered and alive, and a settling period (1.5 x heartbeat_timeout) passed:
          Redis commands/s over a window (default 10 s) from INFO commandstats (the sum of
          `calls` over every command, Lua's inner commands included, less our own INFO), in
          total and per worker, and redis-server's CPU from /proc/<pid>/stat as a share of
          one core over the same window. Targets: <= 3 commands/s per worker (x 10/hb at
          another heartbeat_timeout), < 10% of a core.
death     On the same fleet: a victim process (W workers) is started first, alone, and made
          to hold a session whose activity a caller awaits and a plain activity, both
          recording their start (pid, worker, attempt, time) in a Redis stream and sleeping.
          Then the rest of the fleet starts, settles, and the victim is SIGKILLed. Measured:
          kill -> the caller's SessionFailedError (target <= heartbeat_timeout + 1 s) and
          kill -> the plain activity's start on another worker (target <= 2 x heartbeat_timeout).
          When idle runs too, its window is taken before the kill, with that caller waiting
          (its liveness checks, about one command a second, are counted).
sessions  10 workers with no session limit: one process with a single worker (it ends up with
          a tenth of the sessions, 10,000 at full size) and three processes of three. Opener
          processes open N sessions (default 100,000; bounded concurrency) and keep them
          open. Measured: Redis used_memory before and after (MB, bytes a session, MB per
          100k: target < 40), the single worker's RSS growth (target < 50 MB per 10,000
          sessions), commands/s with all of them open and idle, then create_session latency
          over sequential creates (each completed, untimed) made by a fresh client while the
          N stay open: p50/p99/max (target p99 < 2 ms).
waiters   One worker with max_concurrent_sessions=1, its slot taken by a holder session.
          N create_session calls (default 10,000, creation_timeout 1 h) join the line one by
          one (each is in the waiters sorted set before the next starts). Redis commands/s,
          no slot freeing, with nobody waiting, with one waiting (the line's fixed cost: the
          client renews its lease every second while any call waits) and with all N waiting.
          Target: no extra cost per waiter; passes when all-N minus one-waiting is <= 3
          commands/s in all (the windows' noise; 10,000 x even 0.001/s would be 10). Then the
          holder is completed, again and again: the time from complete() to the next waiter's
          create_session returning, p50/p99/max (target p99 < 5 ms), and the order the N got
          their slots in, against the order they joined and the sorted set's (violations
          must be 0).

hosts     The idle fleet as hosts: the same P x W Worker objects, every K of them (default 10)
          the processes of one host (`host_id`, as `sessionq worker --processes K` makes);
          Redis commands/s per host process over the window, redis-server's CPU. Target:
          as a plain worker's, <= 3 commands/s per process (x 10/hb at another hb).

--quick: 2 x 20 workers, heartbeat_timeout 2 s, 5 s windows, 2,000 sessions, 200 waiters
(under a minute). Its heartbeat_timeout is a fifth of the default, so the workers'
periodic work, and the idle rate per worker, run about five times as often as at full size.
Figures whose target is set for the full size (Redis MB per 100k sessions, RSS per 10,000)
are projected from the per-session cost when fewer are opened. Every child process is
SIGKILLed at the end (also on error, Ctrl-C or SIGTERM; workers and openers also die with
this process through PR_SET_PDEATHSIG). Worker and opener processes are this file run with
the hidden --_worker / --_opener flags. Shares its helpers with scripts/bench.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # scripts/bench.py: RedisServer, proc stats, percentiles, machine()

import sessionq
from sessionq.keys import QueueKeys

QUEUE = "fleet"
STARTS = "fleetbench:starts"
"""Stream (under the run's prefix) where `hold` records each start: kind, pid, worker, attempt, t."""
LONG = 24 * 3600.0
"""How long a held activity sleeps and its timeouts: longer than any run."""
SCENARIOS = ("idle", "death", "sessions", "waiters", "hosts")
START_BATCH = 10
"""Workers of one process started at a time: all 100 at once, on a busy 2-core machine, could
run past Worker.wait_started's 30 s."""


# --- what the workers run ----------------------------------------------------------------


@sessionq.activity
async def noop() -> None:
    """Lets a caller know a worker has read everything queued before it on its stream."""
    return None


_record: dict[str, Any] = {}
"""Set by worker_main: where `hold` records its starts (url, key) and its connection."""


@sessionq.activity
async def hold(kind: str) -> None:
    """Records that it started (so the benchmark sees where and when, also for a retry on
    another worker), then sleeps for longer than the run."""
    info = sessionq.activity_info()
    if "redis" not in _record:
        _record["redis"] = aioredis.Redis.from_url(_record["url"])
    await _record["redis"].xadd(
        _record["key"],
        {
            "kind": kind,
            "pid": os.getpid(),
            "worker": info.worker_id,
            "attempt": info.attempt,
            "t": repr(time.time()),
        },
    )
    await asyncio.sleep(LONG)


# --- sizes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is; --quick and the size flags replace parts of FULL."""

    processes: int
    per_process: int
    heartbeat_timeout: float
    window_s: float
    settle_s: float | None
    """Wait after every worker is alive, before measuring; None: 1.5 x heartbeat_timeout."""
    sessions: int
    openers: int
    opener_concurrency: int
    creates: int
    waiters: int
    host_size: int
    """hosts: Worker objects per host (the processes of one host)."""

    @property
    def settle(self) -> float:
        return self.settle_s if self.settle_s is not None else 1.5 * self.heartbeat_timeout


FULL = Sizes(
    processes=10,
    per_process=100,
    heartbeat_timeout=10.0,
    window_s=10.0,
    settle_s=None,
    sessions=100_000,
    openers=4,
    opener_concurrency=64,
    creates=2_000,
    waiters=10_000,
    host_size=10,
)
QUICK = Sizes(
    processes=2,
    per_process=20,
    heartbeat_timeout=2.0,
    window_s=5.0,
    settle_s=None,
    sessions=2_000,
    openers=2,
    opener_concurrency=64,
    creates=500,
    waiters=200,
    host_size=10,
)
SESSION_FLEET = [("solo", 1), ("s1", 3), ("s2", 3), ("s3", 3)]
"""The sessions scenario's worker processes (name, Worker objects): 10 workers, one alone in
its process so that process's RSS is that of one worker holding a tenth of the sessions."""


# --- child processes ---------------------------------------------------------------------


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this child when the benchmark dies, even by SIGKILL, so no
    worker or opener outlives a run."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


class Children:
    """Every child process and redis-server of the run, so all of them go at the end, however
    the run ends (normal exit, exception, Ctrl-C, SIGTERM)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.servers: list[bench.RedisServer] = []

    def start_server(self) -> bench.RedisServer:
        """bench.RedisServer, with Ctrl-C and SIGTERM put off until it is on our list: one
        arriving while it starts would otherwise leave it running, unowned. (Deferred by a
        handler of our own, not blocked: redis-server would inherit a blocked mask.)"""
        arrived: list[int] = []
        previous = {
            s: signal.signal(s, lambda n, _f: arrived.append(n)) for s in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            server = bench.RedisServer()
            self.servers.append(server)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        for signum in arrived[:1]:
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            else:
                raise KeyboardInterrupt(f"signal {signum}")
        return server

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL and reap: the private Redis is thrown away, so no graceful stop is needed."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc in self.procs:
            self.procs.remove(proc)

    def kill_all(self) -> None:
        for proc in list(self.procs):
            self.kill(proc)
        for server in list(self.servers):
            server.stop()
            self.servers.remove(server)


async def wait_lines(procs: Sequence[bench.WorkerProcess], word: str, timeout: float) -> dict[str, str]:
    """`read_lines` in a thread, so our event loop (leases, waiting calls) keeps running; a
    cancelled wait (Ctrl-C) lets the thread go at once instead of holding asyncio.run's exit."""
    stop = threading.Event()
    try:
        return await asyncio.to_thread(read_lines, procs, word, timeout, stop)
    finally:
        stop.set()


def read_lines(
    procs: Sequence[bench.WorkerProcess], word: str, timeout: float, stop: threading.Event
) -> dict[str, str]:
    """Block until each process printed a line starting with `word` (what follows, by name);
    fail with the log tail of one that exited or said something else."""
    waiting = {w.proc.stdout.fileno(): w for w in procs if w.proc.stdout is not None}
    got: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while waiting and not stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            names = ", ".join(w.worker_id for w in list(waiting.values())[:5])
            raise RuntimeError(f"{len(waiting)} process(es) said no {word} within {timeout:g}s: {names}")
        readable, _, _ = select.select(list(waiting), [], [], min(left, 0.2))
        for fd in readable:
            w = waiting.pop(fd)
            line = w.proc.stdout.readline().decode() if w.proc.stdout else ""
            if not line.startswith(word):
                raise RuntimeError(f"{w.worker_id}: expected {word}, got {line!r}\n{tail(w.log)}")
            got[w.worker_id] = line[len(word) :].strip()
        for w in waiting.values():
            if w.proc.poll() is not None:
                raise RuntimeError(f"{w.worker_id} exited ({w.proc.returncode})\n{tail(w.log)}")
    return got


def tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


@dataclass
class Stage:
    """One scenario's private redis-server, its clients and the processes it started."""

    server: bench.RedisServer
    children: Children
    workdir: Path
    prefix: str
    sync: redis.Redis
    ar: aioredis.Redis
    keys: QueueKeys
    procs: list[bench.WorkerProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    def launch(self, name: str, mode: str, *extra: str) -> bench.WorkerProcess:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            mode,
            "--redis-url",
            self.url,
            "--prefix",
            self.prefix,
            "--identity",
            name,
            "--parent",
            str(os.getpid()),
            *extra,
        ]
        log = self.workdir / f"{self.prefix}-{name}.log"
        with log.open("wb") as stderr:
            # Own session: a Ctrl-C in the terminal reaches only us, and we kill them in order.
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
        self.children.procs.append(proc)
        child = bench.WorkerProcess(proc, name, log)
        self.procs.append(child)
        return child

    async def spawn_workers(
        self,
        names: Sequence[str],
        per_process: int,
        heartbeat_timeout: float,
        max_sessions: int = 0,
        host_size: int = 0,
    ) -> list[bench.WorkerProcess]:
        """Start worker processes of `per_process` Workers each (identities <name>-<k>; with
        `host_size`, every that many of them one host's processes), all at once, and wait
        until every one printed READY (all its Workers registered)."""
        started = [
            self.launch(
                name,
                "--_worker",
                "--fleet",
                str(per_process),
                "--heartbeat-timeout",
                str(heartbeat_timeout),
                "--max-sessions",
                str(max_sessions),
                "--host-size",
                str(host_size),
            )
            for name in names
        ]
        timeout = 60 + 0.2 * per_process * len(names)
        await wait_lines(started, "READY", timeout)
        return started

    def kill(self, child: bench.WorkerProcess) -> None:
        self.children.kill(child.proc)


@contextlib.asynccontextmanager
async def stage(children: Children, workdir: Path) -> AsyncIterator[Stage]:
    """A fresh private redis-server for one scenario; everything it started is killed after."""
    server = children.start_server()
    prefix = f"fleet-{uuid.uuid4().hex[:8]}"
    sync = redis.Redis.from_url(server.url)
    ar = aioredis.Redis.from_url(server.url)
    st = Stage(server, children, workdir, prefix, sync, ar, QueueKeys(prefix, QUEUE))
    try:
        yield st
    finally:
        for child in st.procs:
            st.kill(child)
        with contextlib.suppress(Exception):
            await ar.aclose()
        sync.close()
        server.stop()
        children.servers.remove(server)


# --- measuring ---------------------------------------------------------------------------


def all_calls(sync: redis.Redis) -> dict[str, int]:
    """Calls per command so far, every command included. Unlike bench.commandstats this keeps
    INFO and CONFIG (a library change might use them); the caller subtracts its own INFO."""
    stats = sync.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


@dataclass
class Sample:
    """Counters at one instant: Redis' command calls, redis-server's and the workers' CPU."""

    t: float
    calls: dict[str, int]
    redis_cpu: float
    workers_cpu: float

    @classmethod
    def take(cls, st: Stage, pids: Sequence[int]) -> Sample:
        calls = all_calls(st.sync)
        return cls(
            time.perf_counter(),
            calls,
            sum(bench.proc_cpu_s(st.server.proc.pid)),
            sum(sum(bench.proc_cpu_s(p)) for p in pids),
        )


def rates(a: Sample, b: Sample, workers: int) -> dict[str, Any]:
    """Commands/s (total, per worker, the busiest commands) and CPU shares between two samples.
    Our own INFO between them (the one that took `a`) is not counted."""
    elapsed = b.t - a.t
    delta = {k: v - a.calls.get(k, 0) for k, v in b.calls.items()}
    delta["info"] = delta.get("info", 0) - 1
    delta = {k: v for k, v in delta.items() if v > 0}
    total = sum(delta.values())
    return {
        "window_s": round(elapsed, 2),
        "commands": total,
        "commands_per_s": round(total / elapsed, 1),
        "commands_per_s_per_worker": round(total / elapsed / workers, 3) if workers else None,
        "redis_cpu_pct": round(100 * (b.redis_cpu - a.redis_cpu) / elapsed, 2),
        "workers_cpu_pct": round(100 * (b.workers_cpu - a.workers_cpu) / elapsed, 2),
        "by_command_per_s": {
            k: round(v / elapsed, 2) for k, v in sorted(delta.items(), key=lambda kv: -kv[1])
        },
    }


async def window(st: Stage, seconds: float, workers: int) -> dict[str, Any]:
    """Rates over `seconds` during which this process sends Redis nothing itself."""
    pids = [p.pid for p in st.procs if p.proc.poll() is None]
    a = Sample.take(st, pids)
    await asyncio.sleep(seconds)
    return rates(a, Sample.take(st, pids), workers)


async def wait_registered(st: Stage, n: int, timeout: float) -> float:
    """Wait until `n` workers are registered and each has its heartbeat key; seconds waited."""
    t = time.perf_counter()
    deadline = time.monotonic() + timeout
    while True:
        ids = [i.decode() for i in await st.ar.smembers(st.keys.workers)]
        if len(ids) >= n:
            pipe = st.ar.pipeline(transaction=False)
            for worker_id in ids:
                pipe.exists(st.keys.alive(worker_id))
            if all(await pipe.execute()):
                return time.perf_counter() - t
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(ids)} of {n} workers registered within {timeout:g}s")
        await asyncio.sleep(0.2)


def used_memory(st: Stage) -> int:
    return int(st.sync.info("memory")["used_memory"])


def ms_summary(seconds: Sequence[float], prefix: str) -> dict[str, float]:
    """bench.latency_summary's p50/p99/max/mean, keyed `<prefix>_p50_ms` and so on."""
    s = bench.latency_summary(seconds)
    return {f"{prefix}_{k}": s[k] for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms")}


# --- idle and death ----------------------------------------------------------------------


async def wait_start(
    st: Stage, match: Any, timeout: float, since: bytes = b"0-0"
) -> tuple[bytes, dict[str, str]] | None:
    """The first start recorded after `since` for which `match(fields)` holds, or None. Blocks
    in XREAD (one command per half second or per entry), so it adds little to the counts."""
    key = f"{st.prefix}:{STARTS}"
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        reply = await st.ar.xread({key: since}, block=max(1, int(min(left, 0.5) * 1000)))
        for _stream, entries in reply or []:
            for eid, raw in entries:
                since = eid
                fields = {k.decode(): v.decode() for k, v in raw.items()}
                if match(fields):
                    return eid, fields
    return None


async def await_session_activity(session: sessionq.Session) -> tuple[str, float, str]:
    """Await the session's long activity: how it ended (exception type), when, and why."""
    try:
        await session.execute_activity("hold", "session", start_to_close_timeout=LONG)
    except sessionq.SessionqError as exc:
        return type(exc).__name__, time.perf_counter(), str(exc)[:300]
    return "returned", time.perf_counter(), ""


async def scenario_fleet(st: Stage, sizes: Sizes, do_idle: bool, do_death: bool) -> dict[str, Any]:
    """P x W idle workers: Redis' cost of the idle fleet, then (death) SIGKILL of one process."""
    p, w, hb = sizes.processes, sizes.per_process, sizes.heartbeat_timeout
    n = p * w
    out: dict[str, Any] = {}
    with contextlib.suppress(redis.RedisError):  # a worker holds about 4 connections
        st.sync.config_set("maxclients", max(10_000, 8 * n + 1_000))
    client = sessionq.Client(st.url, prefix=st.prefix)
    waiter: asyncio.Task[tuple[str, float, str]] | None = None
    plain: sessionq.ActivityHandle | None = None
    try:
        t = time.perf_counter()
        if do_death:
            # The victim first and alone: the session and the plain activity can only land there.
            (victim,) = await st.spawn_workers(["victim"], w, hb)
            session = await client.create_session(QUEUE, sessionq.SessionOptions(creation_timeout=60))
            waiter = asyncio.create_task(await_session_activity(session))
            plain = await client.start_activity(
                "hold",
                "plain",
                task_queue=QUEUE,
                start_to_close_timeout=LONG,
                retry_policy=sessionq.RetryPolicy(maximum_attempts=0),
            )
            first: dict[str, dict[str, str]] = {}
            for kind in ("session", "plain"):
                got = await wait_start(st, lambda f, kind=kind: f["kind"] == kind, 30)
                if got is None:
                    raise RuntimeError(f"the {kind} activity never started on the victim")
                first[kind] = got[1]
                if int(got[1]["pid"]) != victim.pid:
                    raise RuntimeError(f"the {kind} activity started outside the victim: {got[1]}")
            rest = [f"p{i}" for i in range(1, p)]
        else:
            rest = [f"p{i}" for i in range(p)]
        if rest:
            await st.spawn_workers(rest, w, hb)
        started_s = time.perf_counter() - t
        registered_s = await wait_registered(st, n, 120 + n * 0.1)
        out["fleet"] = {
            "processes": p,
            "workers_per_process": w,
            "workers": n,
            "heartbeat_timeout_s": hb,
            "start_s": round(started_s + registered_s, 1),
            "settle_s": sizes.settle,
            "redis_connections": int(st.sync.info("clients")["connected_clients"]),
        }
        await asyncio.sleep(sizes.settle)
        if do_idle:
            idle = await window(st, sizes.window_s, n)
            idle["workers"] = n
            idle["caller_waiting_during_window"] = do_death
            idle["redis_used_memory_mb"] = round(used_memory(st) / 2**20, 1)
            out["idle"] = idle
        if do_death:
            assert waiter is not None and plain is not None
            out["death"] = await kill_victim(st, sizes, victim, waiter, first)
            out["death"]["workers"] = n
    finally:
        if plain is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(plain.cancel(), 5)
        if waiter is not None:
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 10)
    return out


async def scenario_hosts(st: Stage, sizes: Sizes) -> dict[str, Any]:
    """P x W idle Workers grouped in hosts of K processes: Redis' cost of the idle hosts."""
    p, w, hb, k = sizes.processes, sizes.per_process, sizes.heartbeat_timeout, sizes.host_size
    n = p * w
    with contextlib.suppress(redis.RedisError):
        st.sync.config_set("maxclients", max(10_000, 8 * n + 1_000))
    t = time.perf_counter()
    await st.spawn_workers([f"p{i}" for i in range(p)], w, hb, max_sessions=4, host_size=k)
    started_s = time.perf_counter() - t
    await asyncio.sleep(sizes.settle)
    idle = await window(st, sizes.window_s, n)
    hosts = p * -(-w // k)
    idle.update(
        processes=p, host_processes=n, host_size=k, hosts=hosts, start_s=round(started_s, 1),
        commands_per_s_per_host=round(idle["commands_per_s"] / hosts, 2) if hosts else None,
    )  # fmt: skip
    return idle


async def kill_victim(
    st: Stage,
    sizes: Sizes,
    victim: bench.WorkerProcess,
    waiter: asyncio.Task[tuple[str, float, str]],
    first: dict[str, dict[str, str]],
) -> dict[str, Any]:
    """SIGKILL the victim; time the caller's SessionFailedError and the plain activity's rerun."""
    hb = sizes.heartbeat_timeout
    last = (await st.ar.xrevrange(f"{st.prefix}:{STARTS}", count=1))[0][0]
    before = Sample.take(st, [])
    killed_wall, killed = time.time(), time.perf_counter()
    os.kill(victim.pid, signal.SIGKILL)
    victim.proc.wait()
    limit = 4 * hb + 15
    rerun = await wait_start(st, lambda f: f["kind"] == "plain", limit, since=last)
    try:
        kind, failed_at, reason = await asyncio.wait_for(asyncio.shield(waiter), max(1.0, limit))
    except asyncio.TimeoutError:
        kind, failed_at, reason = "no answer", float("nan"), f"nothing within {limit:g}s"
    after = Sample.take(st, [])
    recovery = rates(before, after, 0)
    session_s = failed_at - killed if kind == "SessionFailedError" else None
    rerun_s = float(rerun[1]["t"]) - killed_wall if rerun else None
    session_rerun = await wait_start(st, lambda f: f["kind"] == "session", 0.01, since=last)
    return {
        "victim_pid": victim.pid,
        "victim_workers": sizes.per_process,
        "session_worker": first["session"]["worker"],
        "plain_worker": first["plain"]["worker"],
        "session_outcome": kind,
        "session_reason": reason,
        "session_failed_s": round(session_s, 3) if session_s is not None else None,
        "session_failed_target_s": hb + 1,
        "plain_rerun_s": round(rerun_s, 3) if rerun_s is not None else None,
        "plain_rerun_target_s": 2 * hb,
        "plain_rerun_worker": rerun[1]["worker"] if rerun else None,
        "plain_rerun_pid": int(rerun[1]["pid"]) if rerun else None,
        "plain_rerun_attempt": int(rerun[1]["attempt"]) if rerun else None,
        "plain_rerun_elsewhere": bool(rerun and int(rerun[1]["pid"]) != victim.pid),
        "session_activity_ran_again": session_rerun is not None,
        "recovery_commands": recovery["commands"],
        "recovery_by_command_per_s": dict(list(recovery["by_command_per_s"].items())[:8]),
        "recovery_window_s": recovery["window_s"],
    }


# --- 100,000 open sessions -----------------------------------------------------------------


async def scenario_sessions(st: Stage, sizes: Sizes) -> dict[str, Any]:
    """N open sessions over 10 workers: Redis memory, one worker's RSS, create latency."""
    hb = sizes.heartbeat_timeout
    n_workers = sum(k for _, k in SESSION_FLEET)
    (solo,) = await st.spawn_workers([SESSION_FLEET[0][0]], SESSION_FLEET[0][1], hb)
    for name, k in SESSION_FLEET[1:]:
        await st.spawn_workers([name], k, hb)
    await wait_registered(st, n_workers, 60)
    client = sessionq.Client(st.url, prefix=st.prefix)
    options = sessionq.SessionOptions(creation_timeout=600, execution_timeout=30 * 24 * 3600)
    try:
        for _ in range(50):  # warm every worker's session paths, and our own
            async with client.create_session(QUEUE, options) as s:
                await s.execute_activity("noop")
        await asyncio.sleep(1.0)
        rss0, mem0 = bench.proc_rss_kb(solo.pid), used_memory(st)
        t = time.perf_counter()
        share, extra = divmod(sizes.sessions, sizes.openers)
        openers = [
            st.launch(
                f"opener{i}",
                "--_opener",
                "--count",
                str(share + (i < extra)),
                "--concurrency",
                str(sizes.opener_concurrency),
            )
            for i in range(sizes.openers)
        ]
        lines = await wait_lines(openers, "OPENED", 300 + sizes.sessions / 100)
        open_s = time.perf_counter() - t
        reports = [json.loads(v) for v in lines.values()]
        per_worker: Counter[str] = Counter()
        for r in reports:
            per_worker.update(r["per_worker"])
        opened = sum(per_worker.values())
        await asyncio.sleep(1.0)
        rss1, mem1 = bench.proc_rss_kb(solo.pid), used_memory(st)
        solo_sessions = sum(v for k, v in per_worker.items() if k.startswith(f"{SESSION_FLEET[0][0]}-"))
        idle = await window(st, sizes.window_s, n_workers)
        breakdown = await memory_breakdown(st, list(per_worker), opened)
        for _ in range(50):
            await (await client.create_session(QUEUE, options)).complete()
        creates: list[float] = []
        completes: list[float] = []
        for _ in range(sizes.creates):
            t0 = time.perf_counter()
            s = await client.create_session(QUEUE, options)
            t1 = time.perf_counter()
            await s.complete()
            completes.append(time.perf_counter() - t1)
            creates.append(t1 - t0)
        rss2, mem2 = bench.proc_rss_kb(solo.pid), used_memory(st)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 10)
    redis_growth = mem1 - mem0
    rss_growth = (rss1 - rss0) * 1024
    return {
        "sessions": opened,
        "workers": n_workers,
        "openers": sizes.openers,
        "opener_concurrency": sizes.opener_concurrency,
        "open_s": round(open_s, 1),
        "open_per_s": round(opened / open_s),
        "opener_create_p50_ms": round(sorted(r["p50_ms"] for r in reports)[len(reports) // 2], 3),
        "opener_create_p99_ms_worst": max(r["p99_ms"] for r in reports),
        "sessions_per_worker": dict(sorted(per_worker.items())),
        "redis_used_memory_before_mb": round(mem0 / 2**20, 1),
        "redis_used_memory_after_mb": round(mem1 / 2**20, 1),
        "redis_growth_mb": round(redis_growth / 2**20, 1),
        "redis_bytes_per_session": round(redis_growth / opened),
        "redis_mb_per_100k": round(redis_growth / opened * 100_000 / 2**20, 1),
        "redis_used_memory_after_creates_mb": round(mem2 / 2**20, 1),
        **breakdown,
        "solo_worker_sessions": solo_sessions,
        "solo_worker_rss_before_mb": round(rss0 / 1024, 1),
        "solo_worker_rss_after_mb": round(rss1 / 1024, 1),
        "worker_rss_growth_mb": round(rss_growth / 2**20, 1),
        "worker_bytes_per_session": round(rss_growth / solo_sessions) if solo_sessions else None,
        "worker_rss_mb_per_10k": round(rss_growth / solo_sessions * 10_000 / 2**20, 1)
        if solo_sessions
        else None,
        "solo_worker_rss_after_creates_mb": round(rss2 / 1024, 1),
        "open_idle_commands_per_s": idle["commands_per_s"],
        "open_idle_redis_cpu_pct": idle["redis_cpu_pct"],
        "open_idle_workers_cpu_pct": idle["workers_cpu_pct"],
        "open_idle_by_command_per_s": dict(list(idle["by_command_per_s"].items())[:10]),
        **ms_summary(creates, "create"),
        **ms_summary(completes, "complete"),
    }


async def memory_breakdown(
    st: Stage, worker_ids: Sequence[str], opened: int, sample: int = 200
) -> dict[str, Any]:
    """Where a session's Redis bytes go (MEMORY USAGE): its record, averaged over a sample, and
    its share of the queue-wide deadline index and the workers' session sets. Reads key names
    from sessionq.keys, which the library may change: an empty answer then, not a failure."""
    k = st.keys
    try:
        records: list[int] = []
        async for key in st.ar.scan_iter(match=k.session("*"), count=1000):
            records.append(int(await st.ar.memory_usage(key) or 0))
            if len(records) >= sample:
                break
        deadlines = int(await st.ar.memory_usage(k.deadlines, samples=0) or 0)
        sets = 0
        for worker_id in worker_ids:
            sets += int(await st.ar.memory_usage(k.worker_sessions(worker_id), samples=0) or 0)
    except (redis.RedisError, AttributeError) as exc:
        return {"redis_breakdown_error": repr(exc)}
    return {
        "redis_session_record_bytes": round(sum(records) / len(records)) if records else None,
        "redis_deadline_index_bytes_per_session": round(deadlines / opened),
        "redis_worker_sets_bytes_per_session": round(sets / opened),
    }


async def opener_main(args: argparse.Namespace) -> None:
    """Open `count` sessions and keep them open until killed; print what was opened where."""
    die_with_parent(args.parent)
    client = sessionq.Client(args.redis_url, prefix=args.prefix)
    options = sessionq.SessionOptions(creation_timeout=600, execution_timeout=30 * 24 * 3600)
    took: list[float] = []

    async def one() -> sessionq.Session:
        t = time.perf_counter()
        session = await client.create_session(args.task_queue, options)
        took.append(time.perf_counter() - t)
        return session

    sessions: list[sessionq.Session] = await bench.gather_bounded([one] * args.count, args.concurrency)
    last = {s.info.worker_id: s for s in sessions}
    # An activity on each worker's stream after our opens: once it ran, the worker has read them.
    await asyncio.gather(*(s.execute_activity("noop") for s in last.values()))
    summary = bench.latency_summary(took)
    per_worker = Counter(s.info.worker_id for s in sessions)
    report = {"opened": len(sessions), "per_worker": per_worker, **summary}
    print("OPENED " + json.dumps(report), flush=True)
    await asyncio.Event().wait()  # hold them open; the benchmark kills this process


# --- 10,000 waiters ----------------------------------------------------------------------


async def scenario_waiters(st: Stage, sizes: Sizes) -> dict[str, Any]:
    """N callers waiting for one slot: Redis' cost of the wait, hand-over latency, FCFS order."""
    n = sizes.waiters
    await st.spawn_workers(["gate"], 1, sizes.heartbeat_timeout, max_sessions=1)
    await wait_registered(st, 1, 60)
    client = sessionq.Client(st.url, prefix=st.prefix)
    options = sessionq.SessionOptions(creation_timeout=3600, execution_timeout=30 * 24 * 3600)
    granted: asyncio.Queue[tuple[int, sessionq.Session, float]] = asyncio.Queue()
    tasks: list[asyncio.Task[None]] = []

    async def wait_in_line(i: int) -> None:
        session = await client.create_session(QUEUE, options)
        granted.put_nowait((i, session, time.perf_counter()))

    try:
        for _ in range(20):  # warm-up
            await (await client.create_session(QUEUE, options)).complete()
        holder = await client.create_session(QUEUE, options)
        settle = min(2.0, sizes.heartbeat_timeout)
        await asyncio.sleep(settle)
        alone = await window(st, sizes.window_s, 1)
        join_s = 0.0
        one: dict[str, Any] = {}
        for i in range(n):
            t = time.perf_counter()
            tasks.append(asyncio.create_task(wait_in_line(i)))
            deadline = time.monotonic() + 10
            while await st.ar.zcard(st.keys.waiters) <= i:  # in line before the next one starts
                if time.monotonic() > deadline:
                    raise RuntimeError(f"waiter {i} did not join the line within 10 s")
            join_s += time.perf_counter() - t
            if i == 0:  # the line's fixed cost (the client's lease, renewed every second)
                await asyncio.sleep(settle)
                one = await window(st, sizes.window_s, 1)
        line = [m.decode() for m in await st.ar.zrange(st.keys.waiters, 0, -1)]
        await asyncio.sleep(settle)
        waiting = await window(st, sizes.window_s, 1)
        still = await st.ar.zcard(st.keys.waiters)
        handover: list[float] = []
        order: list[tuple[int, str]] = []
        current = holder
        for _ in range(n):
            t0 = time.perf_counter()
            await current.complete()
            try:
                i, current, arrived = await asyncio.wait_for(granted.get(), 30)
            except asyncio.TimeoutError:
                raise RuntimeError(
                    f"no waiter got the freed slot within 30 s ({len(order)} of {n} served)"
                ) from None
            handover.append(arrived - t0)
            order.append((i, current.session_id))
        await current.complete()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 10)
    by_join = sum(1 for k, (i, _) in enumerate(order) if i != k)
    by_line = sum(1 for k, (_, sid) in enumerate(order) if k >= len(line) or line[k] != sid)
    return {
        "waiters": n,
        "joined_in_line": len(line),
        "still_waiting_after_window": still,
        "join_s": round(join_s, 2),
        "join_per_s": round(n / join_s),
        "commands_per_s_no_waiters": alone["commands_per_s"],
        "commands_per_s_one_waiting": one["commands_per_s"],
        "commands_per_s_waiting": waiting["commands_per_s"],
        "extra_commands_per_s": round(waiting["commands_per_s"] - alone["commands_per_s"], 1),
        "extra_commands_per_s_beyond_one": round(waiting["commands_per_s"] - one["commands_per_s"], 1),
        "extra_commands_per_s_per_waiter": round(
            (waiting["commands_per_s"] - one["commands_per_s"]) / max(1, n - 1), 5
        ),
        "redis_cpu_pct_no_waiters": alone["redis_cpu_pct"],
        "redis_cpu_pct_one_waiting": one["redis_cpu_pct"],
        "redis_cpu_pct_waiting": waiting["redis_cpu_pct"],
        "by_command_per_s_no_waiters": alone["by_command_per_s"],
        "by_command_per_s_one_waiting": one["by_command_per_s"],
        "by_command_per_s_waiting": waiting["by_command_per_s"],
        **ms_summary(handover, "handover"),
        "fcfs_violations": max(by_join, by_line),
        "out_of_join_order": by_join,
        "out_of_line_order": by_line,
    }


# --- reporting ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    scenario: str
    metric: str
    label: str
    op: str = ""
    bound: float = 0.0


def rows(sizes: Sizes, quick: bool) -> list[Row]:
    hb = sizes.heartbeat_timeout
    projected = " (projected)" if sizes.sessions != 100_000 else ""
    # The target is for heartbeat_timeout 10 s; a worker's housekeeping and heartbeat run
    # every hb/3, so at another hb the same design costs about 10/hb times as much.
    idle_bound = 3 * 10 / hb
    at_hb = "" if hb == 10 else f" (hb {hb:g} s: 3 x 10/hb)"
    return [
        Row("idle", "workers", "idle: workers (processes x Workers)"),
        Row("idle", "commands_per_s", "idle: Redis commands/s, total"),
        Row("idle", "commands_per_s_per_worker", f"idle: commands/s per worker{at_hb}", "<=", idle_bound),
        Row("idle", "redis_cpu_pct", "idle: redis-server CPU, % of one core", "<", 10),
        Row("idle", "workers_cpu_pct", "idle: worker processes' CPU, % of one core"),
        Row("death", "session_failed_s", "death: SIGKILL -> SessionFailedError (s)", "<=", hb + 1),
        Row("death", "plain_rerun_s", "death: SIGKILL -> plain activity started elsewhere (s)", "<=", 2 * hb),
        Row("sessions", "sessions", "sessions: open sessions"),
        Row("sessions", "open_per_s", "sessions: opened per second (all openers)"),
        Row("sessions", "redis_growth_mb", "sessions: Redis used_memory growth (MB)"),
        Row("sessions", "redis_bytes_per_session", "sessions: Redis bytes per session"),
        Row("sessions", "redis_session_record_bytes", "sessions: of which the session's hash (bytes)"),
        Row("sessions", "redis_mb_per_100k", f"sessions: Redis MB per 100k sessions{projected}", "<", 40),
        Row("sessions", "solo_worker_sessions", "sessions: sessions on the single-worker process"),
        Row("sessions", "worker_rss_growth_mb", "sessions: that process's RSS growth (MB)"),
        Row(
            "sessions",
            "worker_rss_mb_per_10k",
            f"sessions: worker RSS MB per 10k sessions{projected}",
            "<",
            50,
        ),
        Row("sessions", "open_idle_commands_per_s", "sessions: Redis commands/s, all open and idle"),
        Row("sessions", "create_p50_ms", "sessions: create_session p50 (ms), all open"),
        Row("sessions", "create_p99_ms", "sessions: create_session p99 (ms), all open", "<", 2),
        Row("sessions", "create_max_ms", "sessions: create_session max (ms), all open"),
        Row("waiters", "waiters", "waiters: callers waiting for one slot"),
        Row("waiters", "join_per_s", "waiters: joined the line per second (one at a time)"),
        Row("waiters", "commands_per_s_no_waiters", "waiters: Redis commands/s, nobody waiting"),
        Row("waiters", "commands_per_s_one_waiting", "waiters: Redis commands/s, one waiting"),
        Row("waiters", "commands_per_s_waiting", "waiters: Redis commands/s, all waiting"),
        Row("waiters", "extra_commands_per_s", "waiters: all waiting minus nobody (commands/s)"),
        Row(
            "waiters",
            "extra_commands_per_s_beyond_one",
            "waiters: all waiting minus one (commands/s)",
            "<=",
            3,
        ),
        Row("waiters", "handover_p50_ms", "waiters: complete -> next waiter's slot p50 (ms)"),
        Row("waiters", "handover_p99_ms", "waiters: complete -> next waiter's slot p99 (ms)", "<", 5),
        Row("waiters", "handover_max_ms", "waiters: complete -> next waiter's slot max (ms)"),
        Row("waiters", "fcfs_violations", "waiters: first-come-first-served violations", "==", 0),
        Row("hosts", "host_processes", "hosts: host processes (Worker objects)"),
        Row("hosts", "hosts", "hosts: hosts (host_size processes each)"),
        Row("hosts", "commands_per_s", "hosts: Redis commands/s, total"),
        Row(
            "hosts",
            "commands_per_s_per_worker",
            f"hosts: cmd/s per host process{at_hb}",
            "<=",
            idle_bound,
        ),
        Row("hosts", "redis_cpu_pct", "hosts: redis-server CPU, % of one core", "<", 10),
    ]


def judge(row: Row, value: Any) -> str:
    if not row.op:
        return ""
    if value is None:
        return f"{row.op} {row.bound:g}  MISS (no value)"
    ok = {
        "<=": value <= row.bound,
        "<": value < row.bound,
        "==": value == row.bound,
        ">=": value >= row.bound,
    }[row.op]
    return f"{row.op} {row.bound:g}  {'PASS' if ok else 'FAIL'}"


def show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def table(report: dict[str, Any], sizes: Sizes, quick: bool) -> str:
    results = report["results"]
    all_rows = rows(sizes, quick)
    width = max(len(r.label) for r in all_rows)
    lines = [f"{'figure':<{width}}  {'value':>12}  target", "-" * (width + 34)]
    verdicts: dict[str, str] = {}
    for row in all_rows:
        if row.scenario not in results:
            continue
        value = results[row.scenario].get(row.metric)
        verdict = judge(row, value)
        if verdict:
            verdicts[f"{row.scenario}.{row.metric}"] = verdict.rsplit(" ", 1)[-1]
        lines.append(f"{row.label:<{width}}  {show(value):>12}  {verdict}")
    report["verdicts"] = verdicts
    for name in ("idle", "hosts"):
        if name in results:
            top = ", ".join(f"{k} {v:g}" for k, v in list(results[name]["by_command_per_s"].items())[:8])
            lines.append(f"\n{name}: busiest commands per second: {top}")
    death = results.get("death")
    if death:
        lines.append(
            f"death: session on {death['session_worker']} -> {death['session_outcome']}; plain activity "
            f"rerun as attempt {death['plain_rerun_attempt']} on {death['plain_rerun_worker']}"
        )
    m = report["machine"]
    lines.append(
        f"\n{m['cpu']} x{m['cores']}, Python {m['python']}, Redis {m['redis_server']}, "
        f"redis-py {m['redis_py']}, hiredis {'on' if m['hiredis'] else 'off'}; commit {m['commit']}"
        f"{' + uncommitted sessionq changes' if m['sessionq_uncommitted_changes'] else ''}; "
        f"sessionq from {m['sessionq_path']}; "
        f"load average {m['loadavg_1m_at_start']:.2f} at start; total {report.get('wall_s', 0)} s"
    )
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------


def library_source() -> dict[str, Any]:
    """Which sessionq ran: its directory, and whether it differs from the commit recorded
    (the library may be edited while the benchmark runs; the commit alone would not say)."""
    path = Path(sessionq.__file__).resolve().parent
    dirty = None
    if path.parent == bench.REPO:
        status = subprocess.run(
            ["git", "-C", str(bench.REPO), "status", "--porcelain", "--", "sessionq"],
            capture_output=True,
            text=True,
        )
        dirty = bool(status.stdout.strip())
    return {"sessionq_path": str(path), "sessionq_uncommitted_changes": dirty}


async def run_all(children: Children, workdir: Path, sizes: Sizes, names: Sequence[str]) -> dict[str, Any]:
    async with stage(children, workdir) as st:
        machine = bench.machine(st.url, st.sync, uvloop=False)
    machine.pop("redis_url", None)
    machine.update(library_source())
    report: dict[str, Any] = {"machine": machine, "sizes": asdict(sizes), "results": {}}
    results = report["results"]

    async def timed(label: str, run: Any) -> dict[str, Any]:
        print(f"[bench_fleet] {label} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        async with stage(children, workdir) as st:
            out: dict[str, Any] = await run(st)
        print(f"[bench_fleet] {label}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        return out

    do_idle, do_death = "idle" in names, "death" in names
    if do_idle or do_death:
        label = "+".join(x for x in ("idle", "death") if x in names)
        fleet = await timed(label, lambda st: scenario_fleet(st, sizes, do_idle, do_death))
        for name in ("idle", "death"):
            if name in fleet:
                results[name] = {**fleet[name], "fleet": fleet["fleet"]}
    if "sessions" in names:
        results["sessions"] = await timed("sessions", lambda st: scenario_sessions(st, sizes))
    if "waiters" in names:
        results["waiters"] = await timed("waiters", lambda st: scenario_waiters(st, sizes))
    if "hosts" in names:
        results["hosts"] = await timed("hosts", lambda st: scenario_hosts(st, sizes))
    return report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench_fleet.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute")
    parser.add_argument("--only", help=f"comma list of scenarios ({','.join(SCENARIOS)})")
    parser.add_argument("--json", metavar="PATH", help="write every figure as JSON here ('-': stdout)")
    size = parser.add_argument_group("sizes (override --quick / the full defaults)")
    size.add_argument("--processes", type=int, help="idle/death: worker processes (full 10)")
    size.add_argument("--per-process", type=int, help="idle/death: Worker objects per process (full 100)")
    size.add_argument("--heartbeat-timeout", type=float, help="workers' heartbeat_timeout, s (full 10)")
    size.add_argument("--window", type=float, dest="window_s", help="measuring window, s (full 10)")
    size.add_argument("--settle", type=float, dest="settle_s", help="wait before measuring, s (1.5 x hb)")
    size.add_argument("--sessions", type=int, help="sessions: sessions to open (full 100,000)")
    size.add_argument("--openers", type=int, help="sessions: opener processes (full 4)")
    size.add_argument("--creates", type=int, help="sessions: timed sequential creates (full 2,000)")
    size.add_argument("--waiters", type=int, help="waiters: callers waiting (full 10,000)")
    size.add_argument("--host-size", type=int, help="hosts: processes per host (10)")
    child = parser.add_argument_group("child process (internal)")
    child.add_argument("--_worker", action="store_true", dest="worker", help=argparse.SUPPRESS)
    child.add_argument("--_opener", action="store_true", dest="opener", help=argparse.SUPPRESS)
    child.add_argument("--redis-url", help=argparse.SUPPRESS)
    child.add_argument("--prefix", help=argparse.SUPPRESS)
    child.add_argument("--identity", help=argparse.SUPPRESS)
    child.add_argument("--parent", type=int, default=0, help=argparse.SUPPRESS)
    child.add_argument("--task-queue", default=QUEUE, help=argparse.SUPPRESS)
    child.add_argument("--fleet", type=int, default=1, help=argparse.SUPPRESS)
    child.add_argument("--max-sessions", type=int, default=0, help=argparse.SUPPRESS)
    child.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    child.add_argument("--concurrency", type=int, default=64, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


async def worker_main(args: argparse.Namespace) -> None:
    """--fleet N Workers in this process, each its own identity <identity>-<k>, until SIGTERM
    or the benchmark is gone. Differs from bench.py's worker mode in its activities (`hold`)
    and session limit."""
    die_with_parent(args.parent)
    _record.update(url=args.redis_url, key=f"{args.prefix}:{STARTS}")
    workers = [
        sessionq.Worker(
            args.redis_url,
            task_queue=args.task_queue,
            activities=[noop, hold],
            enable_sessions=True,
            max_concurrent_sessions=args.max_sessions or None,
            identity=f"{args.identity}-{k}",
            heartbeat_timeout=args.heartbeat_timeout,
            prefix=args.prefix,
            host_id=f"{args.identity}-h{k // args.host_size}" if args.host_size else None,  # --host-size
        )
        for k in range(args.fleet)
    ]
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: [w.stop() for w in workers])
    async with contextlib.AsyncExitStack() as stack:
        for first in range(0, len(workers), START_BATCH):
            batch = workers[first : first + START_BATCH]
            await asyncio.gather(*(stack.enter_async_context(w) for w in batch))
        print("READY", args.identity, flush=True)
        await asyncio.gather(*(w.wait_stopped() for w in workers))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        asyncio.run(worker_main(args))
        return 0
    if args.opener:
        asyncio.run(opener_main(args))
        return 0
    base = QUICK if args.quick else FULL
    overrides = {
        k: getattr(args, k)
        for k in (
            "processes",
            "per_process",
            "heartbeat_timeout",
            "window_s",
            "settle_s",
            "sessions",
            "openers",
            "creates",
            "waiters",
            "host_size",
        )
        if getattr(args, k) is not None
    }
    sizes = replace(base, **overrides)
    names = [n.strip() for n in (args.only or ",".join(SCENARIOS)).split(",") if n.strip()]
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}; known: {', '.join(SCENARIOS)}")

    def terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    children = Children()
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="sessionq-fleet-") as workdir:
            report = asyncio.run(run_all(children, Path(workdir), sizes, names))
    finally:
        children.kill_all()
    report["quick"] = args.quick
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report["machine"]["loadavg_1m_at_end"] = os.getloadavg()[0]
    text = table(report, sizes, args.quick)
    if args.json == "-":
        print(text, file=sys.stderr)
        print(json.dumps(report, indent=2))
    else:
        print(text)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
            print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
