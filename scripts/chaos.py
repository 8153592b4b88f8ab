#!/usr/bin/env python3
"""sessionq chaos soak: real traffic on worker sessions while random faults hit Redis and workers.

    python scripts/chaos.py [--minutes N] [--seed S] [--json FILE] [--workers 3] [--callers 8]
                            [--verbose] [--keep-logs DIR] [--only-faults KIND,...]

Why a soak: the fault tests inject one fault into one code path at a time. Here several
callers and worker processes run for minutes while faults land at random moments, which
is how the interleavings nobody wrote a test for get found. Everything is private: its own
redis-server (persistent, so a restart can keep the data), a RESP-aware relay in front of
it (tests/faultkit.py) through which every client and worker talks, worker processes that
are children of this one (this file run with the hidden ``--_worker`` flag), and a unique
key prefix. Every port is picked at run time; nothing touches another Redis.

Callers (``--callers`` tasks, a Client each) loop: a plain activity, or a session of 1-5
activities. Every call is recorded with its outcome: ``ok``, the name of the SessionqError
subclass raised (a "clear error": the library said what happened), or "unclear" (any other
exception escaped the public API: a bug). A call still running 120 s after it started, or
still running 60 s after the soak stopped launching calls, is "never answered".

Faults, one every 4-8 s from a seeded RNG: SIGKILL a worker (restarted with the same
identity 0.5-3 s later), freeze every relayed connection (half-open), partition, drop one
reply to XREAD / XREADGROUP / EVALSHA / XADD, cut, restart Redis keeping its data, restart
it without its data.

At the end (faults healed, callers drained, clients closed, workers given up to 75 s to
settle), Redis is read directly, not through the relay. Figures that must be 0 (they decide
the exit code): unclear errors, never answered, sessions still OPEN, session slots in use,
activities running above a worker's max_concurrent_activities (from the activities' own
start/end log lines), and keys left without a TTL (the task stream, the queue index and the
dead-letter stream excepted). The report is printed as a table and written as JSON
(``chaos.json`` unless ``--json``); samples of each anomaly carry the faults around it and
the worker-side log lines of the call, so a failure can be reproduced.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # so that tests.faultkit (and this checkout's sessionq) import
    sys.path.insert(0, str(REPO))

import sessionq  # noqa: E402, I001 - after the sys.path line on purpose
from sessionq.cli.embedded import die_with_parent  # noqa: E402
from sessionq.keys import QueueKeys, queues_index  # noqa: E402

if TYPE_CHECKING:
    import redis.asyncio

    from tests.faultkit import PrivateRedis, Relay

SCRIPT = Path(__file__).resolve()
QUEUE = "chaos"
MAX_SESSIONS = 3
MAX_ACTIVITIES = 4
HEARTBEAT_TIMEOUT = 2.0
UNAVAILABLE_TIMEOUT = 5.0
CALL_WATCHDOG = 120.0
"""A call still running this long after it started is never answered (and abandoned)."""
DRAIN_TIMEOUT = 60.0
"""How long calls in flight may take to end once the soak stops launching new ones."""
CLOSE_TIMEOUT = 60.0
SETTLE_TIMEOUT = 75.0
"""How long the workers get to end sessions whose owners are gone (lease or execution timeout)."""
STOP_TIMEOUT = 30.0
READY_TIMEOUT = 60.0
FAULT_WEIGHTS: dict[str, float] = {
    "kill_worker": 3,
    "freeze": 2,
    "partition": 2,
    "drop_reply": 3,
    "cut": 2,
    "restart_keep_data": 1,
    "restart_wipe_data": 1,
}
"""Restarts are rarer: each one drops every connection at once, and a wipe loses all state."""
DROP_COMMANDS = ("XREAD", "XREADGROUP", "EVALSHA", "XADD")
RETRY = sessionq.RetryPolicy(maximum_attempts=3)
SESSION_OPTIONS = sessionq.SessionOptions(creation_timeout=10, execution_timeout=30)
SAMPLES = 20
NOT_ANSWERED = ("never", "cancelled")

log = logging.getLogger("chaos")
CHILDREN: set[int] = set()
"""Pids of live worker processes: the last-resort cleanup SIGKILLs whatever is left here."""


# --- the worker process ------------------------------------------------------------------

_activity_log: IO[str] | None = None


def _log_line(record: dict[str, Any]) -> None:
    """One JSON line per event, written at once (line buffered): a SIGKILL loses nothing written."""
    if _activity_log is not None:
        _activity_log.write(json.dumps(record, separators=(",", ":")) + "\n")


@sessionq.activity
async def step(call_id: str, ms: int) -> str:
    """Sleep `ms`, return the worker id; log a start and an end line so the soak can count
    completions per call and how many activities overlapped in this process."""
    info = sessionq.activity_info()
    base = {
        "w": info.worker_id,
        "pid": os.getpid(),
        "aid": info.activity_id,
        "call": call_id,
        "attempt": info.attempt,
        "sid": info.session.session_id if info.session is not None else None,
    }
    _log_line({**base, "ev": "start", "t": time.monotonic(), "wall": time.time()})
    status = "error"
    try:
        await asyncio.sleep(ms / 1000)
        status = "ok"
        return info.worker_id
    except asyncio.CancelledError:
        status = "cancelled"
        raise
    finally:
        _log_line({**base, "ev": "end", "status": status, "t": time.monotonic(), "wall": time.time()})


def _request_stop(worker: sessionq.Worker, background: set[Any]) -> None:
    """worker.stop() whether it is sync or (in a later version) a coroutine."""
    result: Any = worker.stop()
    if asyncio.iscoroutine(result):
        future = asyncio.ensure_future(result)
        background.add(future)
        future.add_done_callback(background.discard)


async def worker_main(args: argparse.Namespace) -> int:
    """Run one worker until SIGTERM or the soak process is gone.

    Start-up is retried for a while: a worker restarted 0.5 s after a SIGKILL finds its
    predecessor's heartbeat key still there (ConfigurationError: identity in use), and one
    started during a partition cannot reach Redis. Both are expected under chaos; the
    parent is told on stdout (RETRY lines) and counts them."""
    global _activity_log
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s.%(msecs)03d pid=%(process)d %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    path = Path(args.logdir) / f"{args.identity}-{os.getpid()}.jsonl"
    _activity_log = path.open("a", buffering=1)
    parent = os.getppid()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    background: set[Any] = set()
    give_up = time.monotonic() + READY_TIMEOUT
    while True:
        worker = sessionq.Worker(
            args.url,
            task_queue=QUEUE,
            activities=[step],
            enable_sessions=True,
            max_concurrent_sessions=MAX_SESSIONS,
            max_concurrent_activities=MAX_ACTIVITIES,
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            identity=args.identity,
            prefix=args.prefix,
        )
        started = False
        try:
            async with worker:
                started = True
                print("READY", worker.worker_id, flush=True)
                stopped = asyncio.ensure_future(worker.wait_stopped())
                asked = asyncio.ensure_future(stop.wait())
                try:
                    while os.getppid() == parent:
                        done, _ = await asyncio.wait(
                            {stopped, asked}, timeout=0.5, return_when=asyncio.FIRST_COMPLETED
                        )
                        if done:
                            break
                finally:
                    asked.cancel()
                if stopped.done():
                    print("STOPPED-BY-ITSELF", flush=True)
                    log.error("worker %s stopped by itself", args.identity)
                _request_stop(worker, background)
            return 0
        except Exception as exc:
            if started:
                log.exception("worker %s failed while running", args.identity)
                return 4
            if stop.is_set() or time.monotonic() > give_up or os.getppid() != parent:
                log.exception("worker %s could not start; giving up", args.identity)
                return 3
            print(f"RETRY {type(exc).__name__}: {' '.join(str(exc).split())[:300]}", flush=True)
            log.warning("worker %s start-up failed (%r); retrying", args.identity, exc)
            await asyncio.sleep(0.5)


# --- records -----------------------------------------------------------------------------


@dataclass
class Call:
    """One public API call a caller made, and how it ended."""

    call_id: str
    kind: str
    caller: int
    start: float
    end: float | None = None
    outcome: str | None = None
    """"ok", a SessionqError subclass name, "unclear", "never" or "cancelled" (soak aborted)."""
    error: str | None = None
    tb: str | None = None
    session_id: str | None = None
    worker: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    late: str | None = None
    """For a never-answered call that did end after all: how, and when."""

    @property
    def clear(self) -> bool:
        return self.outcome not in (None, "ok", "unclear", *NOT_ANSWERED)

    @property
    def seconds(self) -> float | None:
        return None if self.end is None else self.end - self.start


@dataclass
class Fault:
    """One injected fault: what, when (seconds since the soak started, and wall clock), details."""

    n: int
    kind: str
    start: float
    wall: str
    end: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Incarnation:
    """One worker process: a worker identity is served by a new one after each SIGKILL."""

    identity: str
    pid: int
    spawned: float
    ready: float | None = None
    ended: float | None = None
    rc: int | None = None
    killed_at: float | None = None
    retries: list[str] = field(default_factory=list)
    stopped_by_itself: bool = False


@dataclass
class WorkerSlot:
    """A worker identity (w0, w1...) and its current process."""

    index: int
    identity: str
    proc: asyncio.subprocess.Process | None = None
    current: Incarnation | None = None
    restart_delay: float | None = None
    """Set by a kill fault: restart after this many seconds (else the exit was unexpected)."""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


def library_fingerprint() -> dict[str, Any]:
    """Which library code ran: the library is edited while soaks run, and worker processes
    started later import whatever is on disk then. A digest at start and end tells."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted([*(REPO / "sessionq").rglob("*.py"), *(REPO / "sessionq").rglob("*.lua")]):
        with contextlib.suppress(OSError):
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())

    def git(*argv: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(REPO), *argv], capture_output=True, text=True, timeout=10
            ).stdout.rstrip("\n")  # not strip(): porcelain lines start with a space
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "sessionq", "cli").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD"), "digest": digest.hexdigest()[:16], "dirty": dirty}


def wall() -> str:
    return time.strftime("%H:%M:%S", time.localtime()) + f".{int(time.time() * 1000) % 1000:03d}"


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of a sorted, non-empty sequence."""
    rank = math.ceil(q / 100 * len(sorted_values))
    return sorted_values[min(len(sorted_values), max(1, rank)) - 1]


def one_line(text: str, limit: int = 400) -> str:
    return " ".join(text.split())[:limit]


# --- the soak ------------------------------------------------------------------------------


class Soak:
    """Owns the relay, worker processes, callers and fault scheduler of one run."""

    def __init__(self, args: argparse.Namespace, server: PrivateRedis, workdir: Path) -> None:
        self.args = args
        self.server = server
        self.workdir = workdir
        self.logdir = workdir / "activities"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.prefix = f"chaos-{uuid.uuid4().hex[:10]}"
        self.keys = QueueKeys(self.prefix, QUEUE)
        self.seed: int = args.seed
        self.t0 = time.monotonic()
        self.relay: Relay | None = None
        self.slots = [WorkerSlot(i, f"w{i}") for i in range(args.workers)]
        self.incarnations: list[Incarnation] = []
        self.supervisors: list[asyncio.Task[None]] = []
        self.stopping_workers = False
        self.clients: list[sessionq.Client] = []
        self.closed_clients: set[int] = set()
        self.calls: list[Call] = []
        self.inflight: dict[str, Call] = {}
        self.abandon: dict[int, asyncio.Event] = {}
        self.units: dict[int, asyncio.Future[Any]] = {}
        self.orphans: set[asyncio.Future[Any]] = set()
        self.seq = Counter[int]()
        self.faults: list[Fault] = []
        self.events: list[dict[str, Any]] = []
        self.wrong_worker: list[dict[str, Any]] = []
        self.stop_faults = asyncio.Event()
        self.stop_launch = asyncio.Event()
        self.stop_early = asyncio.Event()
        self.tasks: list[asyncio.Task[Any]] = []
        self.main_task: asyncio.Task[Any] | None = None
        self.phase = "setup"
        self.timeline: dict[str, float] = {}
        self.aborting = False
        self.library_start = library_fingerprint()

    def enter(self, phase: str) -> None:
        """Move to the next end-of-run phase, unless a second Ctrl-C asked to abort (a cancel
        can be swallowed by a wait_for or a Redis call that completes at the same moment)."""
        if self.aborting:
            raise asyncio.CancelledError
        self.phase = phase

    # -- small helpers ----------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self.t0

    def say(self, message: str) -> None:
        print(f"[chaos {self.now():7.1f}s] {message}", file=sys.stderr, flush=True)

    def event(self, kind: str, **detail: Any) -> None:
        self.events.append({"t": round(self.now(), 3), "wall": wall(), "kind": kind, **detail})
        if self.args.verbose or kind in ("worker_exited", "worker_not_ready", "server_restart_failed"):
            self.say(f"{kind}: {detail}")

    # -- worker processes ----------------------------------------------------------------

    async def spawn(self, slot: WorkerSlot) -> Incarnation:
        """Start a worker process for `slot` (stdout: READY/RETRY lines; stderr: its log file)."""
        assert self.relay is not None
        cmd = [
            sys.executable, str(SCRIPT), "--_worker", "--url", self.relay.url, "--prefix", self.prefix,
            "--identity", slot.identity, "--logdir", str(self.logdir),
        ]  # fmt: skip
        with (self.workdir / f"worker-{slot.identity}.log").open("ab") as stderr:
            stderr.write(f"--- {wall()} (t={self.now():.1f}s) starting {slot.identity}\n".encode())
            stderr.flush()
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                preexec_fn=die_with_parent,  # SIGTERM if this process dies without cleaning up
                start_new_session=True,  # a Ctrl-C in the terminal is for this process only
            )
        CHILDREN.add(proc.pid)
        inc = Incarnation(slot.identity, proc.pid, self.now())
        self.incarnations.append(inc)
        slot.proc, slot.current = proc, inc
        reader = asyncio.create_task(self._read_stdout(proc, inc), name=f"stdout-{slot.identity}")
        self.tasks.append(reader)
        return inc

    async def _read_stdout(self, proc: asyncio.subprocess.Process, inc: Incarnation) -> None:
        assert proc.stdout is not None
        while True:
            line = (await proc.stdout.readline()).decode(errors="replace").strip()
            if not line:
                return
            if line.startswith("READY"):
                inc.ready = self.now()
                if self.args.verbose:
                    self.say(f"worker {inc.identity} pid {inc.pid} ready")
            elif line.startswith("RETRY"):
                inc.retries.append(line[6:])
                self.event("worker_start_retry", identity=inc.identity, pid=inc.pid, reason=line[6:])
            elif line.startswith("STOPPED-BY-ITSELF"):
                inc.stopped_by_itself = True

    async def supervise(self, slot: WorkerSlot) -> None:
        """Keep a process running for `slot`: restart it after a kill fault's delay, or 1 s
        after an exit nobody asked for (which is recorded: a worker must not exit alone)."""
        while not self.stopping_workers:
            try:
                inc = await self.spawn(slot)
            except Exception as exc:
                self.event("worker_spawn_failed", identity=slot.identity, error=repr(exc))
                await asyncio.sleep(1.0)
                continue
            assert slot.proc is not None
            if self.stopping_workers:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(signal.SIGTERM)
            rc = await slot.proc.wait()
            inc.ended, inc.rc = self.now(), rc
            CHILDREN.discard(inc.pid)
            if self.stopping_workers:
                return
            if slot.restart_delay is not None:
                delay, slot.restart_delay = slot.restart_delay, None
            else:
                self.event(
                    "worker_exited",
                    identity=slot.identity,
                    pid=inc.pid,
                    rc=rc,
                    stopped_by_itself=inc.stopped_by_itself,
                    log_tail=self.worker_log_tail(slot.identity),
                )
                delay = 1.0
            await asyncio.sleep(delay)

    def worker_log_tail(self, identity: str, lines: int = 15) -> list[str]:
        try:
            text = (self.workdir / f"worker-{identity}.log").read_text(errors="replace")
        except OSError:
            return []
        return text.splitlines()[-lines:]

    async def wait_workers_ready(self, timeout: float) -> list[str]:
        """Identities whose current process is not ready after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            missing = [
                s.identity for s in self.slots if not (s.alive and s.current and s.current.ready is not None)
            ]
            if not missing or time.monotonic() > deadline:
                return missing
            await asyncio.sleep(0.1)

    async def stop_workers(self) -> list[str]:
        """SIGTERM every worker (graceful stop), wait up to STOP_TIMEOUT, SIGKILL stragglers."""
        self.stopping_workers = True
        for slot in self.slots:
            if slot.alive:
                assert slot.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(signal.SIGTERM)
        if self.supervisors:
            await asyncio.wait(self.supervisors, timeout=STOP_TIMEOUT)
        stragglers = []
        for slot in self.slots:
            if slot.alive:
                assert slot.proc is not None and slot.current is not None
                stragglers.append(f"{slot.identity} (pid {slot.current.pid})")
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.kill()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(slot.proc.wait(), 5)
        await cancel_all(self.supervisors)
        return stragglers

    # -- faults ---------------------------------------------------------------------------

    async def pause(self, seconds: float) -> bool:
        """Sleep, or return True early once faults are to stop."""
        try:
            await asyncio.wait_for(self.stop_faults.wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    async def fault_scheduler(self) -> None:
        rng = random.Random(self.seed)
        kinds = [k for k in FAULT_WEIGHTS if not self.args.only_faults or k in self.args.only_faults]
        weights = [FAULT_WEIGHTS[k] for k in kinds]
        while not self.stop_faults.is_set():
            if await self.pause(rng.uniform(4, 8)):
                return
            kind = rng.choices(kinds, weights)[0]
            fault = Fault(len(self.faults) + 1, kind, round(self.now(), 3), wall())
            self.faults.append(fault)
            try:
                await getattr(self, f"fault_{kind}")(rng, fault)
            except Exception as exc:
                fault.detail["error"] = repr(exc)
                self.event("fault_failed", fault=fault.n, kind=kind, error=repr(exc))
            finally:
                fault.end = round(self.now(), 3)
                self.say(f"fault #{fault.n} {kind} {fault.detail} ({fault.end - fault.start:.1f}s)")

    async def _hold(self, seconds: float, fault: Fault) -> None:
        fault.detail["seconds"] = round(seconds, 2)
        await self.pause(seconds)

    async def fault_kill_worker(self, rng: random.Random, fault: Fault) -> None:
        delay = rng.uniform(0.5, 3.0)
        first = rng.randrange(len(self.slots))
        order = self.slots[first:] + self.slots[:first]
        slot = next((s for s in order if s.alive and s.restart_delay is None), None)
        if slot is None:
            fault.detail["skipped"] = "no live worker"
            return
        assert slot.proc is not None and slot.current is not None
        slot.restart_delay = delay
        slot.current.killed_at = self.now()
        fault.detail.update(identity=slot.identity, pid=slot.current.pid, restart_after=round(delay, 2))
        with contextlib.suppress(ProcessLookupError):
            slot.proc.kill()

    async def fault_freeze(self, rng: random.Random, fault: Fault) -> None:
        assert self.relay is not None
        seconds = rng.uniform(1, 4)
        fault.detail["frozen_connections"] = len(self.relay.freeze())
        try:
            await self._hold(seconds, fault)
        finally:
            self.relay.heal()

    async def fault_partition(self, rng: random.Random, fault: Fault) -> None:
        assert self.relay is not None
        seconds = rng.uniform(1, 6)
        self.relay.partition()
        try:
            await self._hold(seconds, fault)
        finally:
            self.relay.heal()

    async def fault_cut(self, rng: random.Random, fault: Fault) -> None:
        assert self.relay is not None
        seconds = rng.uniform(0.5, 3)
        self.relay.cut()
        try:
            await self._hold(seconds, fault)
        finally:
            self.relay.heal()

    async def fault_drop_reply(self, rng: random.Random, fault: Fault) -> None:
        """Arm a one-shot rule; wait (up to 10 s) for it to fire, then disarm it if it did not."""
        assert self.relay is not None
        command = rng.choice(DROP_COMMANDS)
        fault.detail["command"] = command
        started = time.monotonic()
        rule = self.relay.drop_reply({command}, nonempty=True)
        fired = False
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(rule.fired.wait(), 10)
            fired = True
        if fired:
            fault.detail["fired_after"] = round(time.monotonic() - started, 3)
            fault.detail["dropped_bytes"] = sum(len(r) for r in rule.dropped)
        else:
            rule.cancel()
            fault.detail["fired"] = False

    async def fault_restart_keep_data(self, rng: random.Random, fault: Fault) -> None:
        await self._restart(fault, keep=True)

    async def fault_restart_wipe_data(self, rng: random.Random, fault: Fault) -> None:
        await self._restart(fault, keep=False)

    async def _restart(self, fault: Fault, keep: bool) -> None:
        """In a thread: the relay runs on this loop and must keep going meanwhile."""
        started = time.monotonic()
        try:
            await asyncio.to_thread(self.server.restart, keep)
        except Exception as exc:
            self.event("server_restart_failed", error=repr(exc), log=self.server.log_tail()[-1000:])
            if not self.server.running:
                await asyncio.to_thread(self.server.start)
            raise
        finally:
            fault.detail["restart_seconds"] = round(time.monotonic() - started, 2)

    # -- callers --------------------------------------------------------------------------

    def begin(self, kind: str, caller: int, **detail: Any) -> Call:
        self.seq[caller] += 1
        call = Call(f"{caller}.{self.seq[caller]}", kind, caller, self.now(), detail=detail)
        self.calls.append(call)
        self.inflight[call.call_id] = call
        return call

    def finish(self, call: Call, exc: BaseException | None) -> None:
        """Classify how a call ended: ok, a clear SessionqError, or unclear (a bug)."""
        self.inflight.pop(call.call_id, None)
        now = self.now()
        if call.outcome is not None:  # declared never answered (or aborted) already
            how = "ok" if exc is None else type(exc).__name__
            call.late = f"{how} at t={now:.1f}s"
            return
        call.end = now
        if exc is None:
            call.outcome = "ok"
        elif isinstance(exc, sessionq.SessionqError):
            call.outcome = type(exc).__name__
            call.error = one_line(str(exc), 600)
        else:
            call.outcome = "unclear"
            call.error = repr(exc)[:600]
            call.tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-6000:]
            self.say(f"UNCLEAR error in {call.kind} call {call.call_id}: {call.error}")

    async def timed(self, call: Call, awaitable: Awaitable[Any]) -> tuple[bool, Any]:
        try:
            value = await awaitable
        except asyncio.CancelledError:
            if call.outcome is None:
                call.outcome = "cancelled"
                call.end = self.now()
            self.inflight.pop(call.call_id, None)
            raise
        except Exception as exc:
            self.finish(call, exc)
            return False, exc
        self.finish(call, None)
        return True, value

    async def caller(self, idx: int) -> None:
        """Run units of work (a plain call, or one session) until told to stop launching.

        Each unit runs as a task of its own, so the watchdog can abandon it (a call that
        never answers must not stop the caller)."""
        rng = random.Random(f"{self.seed}-caller-{idx}")
        client = self.clients[idx]
        while not self.stop_launch.is_set():
            flow = self.plain_flow if rng.random() < 0.5 else self.session_flow
            unit = asyncio.ensure_future(flow(idx, client, rng))
            self.units[idx] = unit
            abandon = self.abandon[idx] = asyncio.Event()
            waiter = asyncio.ensure_future(abandon.wait())
            try:
                await asyncio.wait({unit, waiter}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                unit.cancel()
                raise
            finally:
                waiter.cancel()
            if not unit.done():  # the watchdog gave up on it: leave it behind
                unit.cancel()
                self.orphans.add(unit)
                unit.add_done_callback(self.orphans.discard)
                ok = False
            elif unit.cancelled():
                ok = False
            elif unit.exception() is not None:  # a bug in this script: say so, keep the caller going
                exc = unit.exception()
                assert exc is not None
                lines = traceback.format_exception(exc)[-8:]
                self.event("script_error", caller=idx, error=repr(exc), tb=lines)
                self.say(f"script error in caller {idx}: {exc!r}")
                ok = False
            else:
                ok = unit.result()
            await asyncio.sleep(rng.uniform(0, 0.05) if ok else rng.uniform(0.2, 0.5))

    async def plain_flow(self, idx: int, client: sessionq.Client, rng: random.Random) -> bool:
        ms = rng.randint(0, 200)
        stc = rng.choice([None, 5.0])
        call = self.begin("plain", idx, ms=ms, start_to_close=stc)
        ok, value = await self.timed(
            call,
            client.execute_activity(
                "step", call.call_id, ms, task_queue=QUEUE, start_to_close_timeout=stc, retry_policy=RETRY
            ),
        )
        if ok:
            call.worker = value
        return ok

    async def session_activities(
        self, idx: int, session: sessionq.Session, count: int, rng: random.Random
    ) -> bool:
        for _ in range(count):
            if self.stop_launch.is_set():
                return True
            ms = rng.randint(0, 200)
            call = self.begin("session_activity", idx, ms=ms)
            call.session_id = session.session_id
            ok, value = await self.timed(call, session.execute_activity("step", call.call_id, ms))
            if not ok:
                return False
            call.worker = value
            if value != session.info.worker_id:
                self.wrong_worker.append(
                    {"call": call.call_id, "session": session.session_id, "session_worker":
                     session.info.worker_id, "ran_on": value, "t": round(call.start, 3)}
                )  # fmt: skip
        return True

    async def session_flow(self, idx: int, client: sessionq.Client, rng: random.Random) -> bool:
        """A session of 1-5 activities, then complete; a third of them through `async with`."""
        count = rng.randint(1, 5)
        if rng.random() < 1 / 3:
            return await self.session_with_block(idx, client, count, rng)
        create = self.begin("session_create", idx, via="await")
        ok, session = await self.timed(create, client.create_session(QUEUE, SESSION_OPTIONS))
        if not ok:
            return False
        create.session_id, create.worker = session.session_id, session.info.worker_id
        went_well = await self.session_activities(idx, session, count, rng)
        complete = self.begin("session_complete", idx, via="await")
        complete.session_id = session.session_id
        ok, _ = await self.timed(complete, session.complete())
        return ok and went_well

    async def session_with_block(
        self, idx: int, client: sessionq.Client, count: int, rng: random.Random
    ) -> bool:
        create = self.begin("session_create", idx, via="async with")
        complete: Call | None = None
        went_well = True
        try:
            async with client.create_session(QUEUE, SESSION_OPTIONS) as session:
                create.session_id, create.worker = session.session_id, session.info.worker_id
                self.finish(create, None)
                went_well = await self.session_activities(idx, session, count, rng)
                complete = self.begin("session_complete", idx, via="async with")
                complete.session_id = session.session_id
        except asyncio.CancelledError:
            for call in (create, complete):
                if call is not None and call.outcome is None:
                    call.outcome, call.end = "cancelled", self.now()
                    self.inflight.pop(call.call_id, None)
            raise
        except Exception as exc:
            target = complete if complete is not None else create
            if target.outcome is None or target.outcome in NOT_ANSWERED:
                self.finish(target, exc)
            else:  # cannot happen unless this script is wrong; keep it visible anyway
                self.event("script_error", error=repr(exc), call=target.call_id)
            return False
        assert complete is not None
        self.finish(complete, None)
        return went_well

    # -- watchdog and progress -------------------------------------------------------------

    def declare_never(self, call: Call, reason: str) -> None:
        call.outcome = "never"
        call.detail["never_reason"] = reason
        call.detail["in_flight_s"] = round(self.now() - call.start, 1)
        self.inflight.pop(call.call_id, None)
        self.say(f"NEVER ANSWERED: {call.kind} call {call.call_id} ({reason})")

    async def watchdog(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for call in list(self.inflight.values()):
                if call.outcome is None and self.now() - call.start > CALL_WATCHDOG:
                    self.declare_never(call, f"still running {CALL_WATCHDOG:g}s after it started")
                    event = self.abandon.get(call.caller)
                    if event is not None and call.kind != "client_close":
                        event.set()

    async def progress(self) -> None:
        while True:
            await asyncio.sleep(15.0)
            outcomes = Counter(c.outcome for c in self.calls)
            clear = sum(n for o, n in outcomes.items() if o not in (None, "ok", "unclear", *NOT_ANSWERED))
            self.say(
                f"{self.phase}: calls {len(self.calls)}, ok {outcomes['ok']}, clear errors {clear}, "
                f"unclear {outcomes['unclear']}, never {outcomes['never']}, in flight {len(self.inflight)}, "
                f"faults {len(self.faults)}"
            )

    # -- the run ---------------------------------------------------------------------------

    def install_signals(self) -> None:
        """First Ctrl-C (or SIGTERM): end the soak early, with the full end-of-run and report.
        Second: abort (cleanup still runs)."""
        loop = asyncio.get_running_loop()

        def handler() -> None:
            if not self.stop_early.is_set():
                self.say("interrupted: ending the soak early (again to abort)")
                self.stop_early.set()
            else:
                self.say("interrupted again: aborting (cleaning up)")
                self.aborting = True
                if self.main_task is not None:
                    self.main_task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, handler)

    async def run(self) -> dict[str, Any]:
        from tests.faultkit import Relay

        self.main_task = asyncio.current_task()
        self.install_signals()
        self.t0 = time.monotonic()
        self.relay = await Relay(self.server.url).start()
        try:
            return await self._run()
        finally:
            await self._cleanup()

    async def _run(self) -> dict[str, Any]:
        args = self.args
        self.say(
            f"redis-server pid {self.server.pid} on {self.server.url}, "
            f"relay {self.relay.url if self.relay else ''}, prefix {self.prefix}, seed {self.seed}, "
            f"work dir {self.workdir}"
        )
        self.supervisors = [
            asyncio.create_task(self.supervise(s), name=f"sup-{s.identity}") for s in self.slots
        ]
        missing = await self.wait_workers_ready(READY_TIMEOUT)
        if missing:
            raise RuntimeError(f"workers not ready after {READY_TIMEOUT:g}s: {missing}")
        assert self.relay is not None
        self.clients = [
            sessionq.Client(self.relay.url, prefix=self.prefix, unavailable_timeout=UNAVAILABLE_TIMEOUT)
            for _ in range(args.callers)
        ]
        self.phase = "soak"
        self.timeline["soak_start"] = round(self.now(), 3)
        callers = [asyncio.create_task(self.caller(i), name=f"caller-{i}") for i in range(args.callers)]
        self.tasks += [
            asyncio.create_task(self.watchdog(), name="watchdog"),
            asyncio.create_task(self.progress(), name="progress"),
        ]
        scheduler = asyncio.create_task(self.fault_scheduler(), name="faults")
        self.tasks.append(scheduler)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stop_early.wait(), args.minutes * 60)

        # 1. stop injecting, heal everything (an in-progress fault heals itself first)
        self.enter("healing")
        self.timeline["faults_stop"] = round(self.now(), 3)
        self.stop_faults.set()
        done, _ = await asyncio.wait({scheduler}, timeout=30)
        if not done:
            scheduler.cancel()
            self.event("fault_scheduler_stuck")
        self.relay.clear_rules()
        self.relay.heal()
        if not self.server.running:
            await asyncio.to_thread(self.server.start)
        missing = await self.wait_workers_ready(15)
        if missing:
            self.event("worker_not_ready", identities=missing)

        # 2. stop launching, 3. wait (bounded) for calls in flight
        self.enter("draining")
        self.stop_launch.set()
        self.timeline["launch_stop"] = round(self.now(), 3)
        await asyncio.wait(callers, timeout=DRAIN_TIMEOUT)
        for call in list(self.inflight.values()):
            if call.kind != "client_close":
                self.declare_never(call, f"still running {DRAIN_TIMEOUT:g}s after the soak stopped launching")
        await cancel_all([*callers, *self.units.values(), *self.orphans])
        self.timeline["drained"] = round(self.now(), 3)

        # 4. close every client
        self.enter("closing")
        await self.close_clients()
        self.timeline["clients_closed"] = round(self.now(), 3)

        # 5. let the workers settle, then measure from Redis directly
        self.enter("settling")
        import redis.asyncio

        direct = redis.asyncio.Redis.from_url(self.server.url)
        try:
            settled_after = await self.settle(direct)
            self.timeline["settled"] = round(self.now(), 3)
            open_sessions = await find_open_sessions(direct, self.prefix)
            slots_total, worker_rows = await slots_in_use(direct, self.keys)
            self.say(f"settled: {len(open_sessions)} session(s) OPEN, {slots_total} slot(s) in use")
            # 6. stop the workers gracefully
            self.enter("stopping workers")
            stragglers = await self.stop_workers()
            self.timeline["workers_stopped"] = round(self.now(), 3)
            # 7. keys left behind
            leftovers = await keys_without_ttl(direct, self.prefix, self.keys)
        finally:
            await direct.aclose()
        self.enter("report")
        return {
            "settled_after_s": settled_after,
            "open_sessions": open_sessions,
            "slots_in_use": slots_total,
            "workers_at_end": worker_rows,
            "stragglers": stragglers,
            "leftover_keys": leftovers,
        }

    async def close_clients(self) -> None:
        """Close every client, each call bounded and recorded like any other call."""

        async def close(idx: int, client: sessionq.Client) -> None:
            call = self.begin("client_close", idx)
            task = asyncio.ensure_future(self.timed(call, client.close()))
            done, _ = await asyncio.wait({task}, timeout=CLOSE_TIMEOUT)
            if not done:
                self.declare_never(call, f"Client.close() still running after {CLOSE_TIMEOUT:g}s")
                task.cancel()
            self.closed_clients.add(idx)

        await asyncio.gather(*(close(i, c) for i, c in enumerate(self.clients)))

    async def settle(self, direct: redis.asyncio.Redis) -> float | None:
        """Poll (do not sleep blindly) until no session is OPEN and no slot is held; seconds taken."""
        started = time.monotonic()
        while True:
            sessions = await find_open_sessions(direct, self.prefix)
            slots, _ = await slots_in_use(direct, self.keys)
            if not sessions and not slots:
                return round(time.monotonic() - started, 2)
            if time.monotonic() - started > SETTLE_TIMEOUT:
                return None
            await asyncio.sleep(0.5)

    async def _cleanup(self) -> None:
        """Whatever happened: no task, worker or client left behind (the server is stopped by main)."""
        self.stop_faults.set()
        self.stop_launch.set()
        await cancel_all([*self.tasks, *self.units.values(), *self.orphans])
        if any(s.alive for s in self.slots) or any(not t.done() for t in self.supervisors):
            self.stopping_workers = True
            for slot in self.slots:
                if slot.alive:
                    assert slot.proc is not None
                    with contextlib.suppress(ProcessLookupError):
                        slot.proc.kill()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(slot.proc.wait(), 5)
            await cancel_all(self.supervisors)
        for idx, client in enumerate(self.clients):
            if idx not in self.closed_clients:
                with contextlib.suppress(Exception, asyncio.TimeoutError):
                    await asyncio.wait_for(client.close(), 5)
        if self.relay is not None:
            with contextlib.suppress(Exception):
                await self.relay.close()


async def cancel_all(tasks: Sequence[asyncio.Future[Any]], grace: float = 5.0) -> None:
    """Cancel and wait, bounded: a task stuck in a call that swallows cancellation is left behind."""
    pending = [t for t in tasks if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=grace)
    for task in tasks:  # retrieve outcomes so asyncio does not log "exception never retrieved"
        if task.done() and not task.cancelled():
            task.exception()


# --- reading Redis directly ------------------------------------------------------------------


def _text(value: Any) -> Any:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


async def find_open_sessions(direct: redis.asyncio.Redis, prefix: str) -> list[dict[str, Any]]:
    """Every session hash whose state is OPEN, with its fields and TTL."""
    found = []
    async for key in direct.scan_iter(match=f"{prefix}:*:session:*", count=1000):
        if await direct.type(key) != b"hash":
            continue
        record = await direct.hgetall(key)
        if record.get(b"state") == b"OPEN":
            row = {_text(k): _text(v) for k, v in record.items()}
            found.append({"key": _text(key), "pttl_ms": await direct.pttl(key), **row})
    return found


async def slots_in_use(direct: redis.asyncio.Redis, keys: QueueKeys) -> tuple[int, list[dict[str, Any]]]:
    """Sum of the `open` field over registered workers, and each worker's row."""
    total, rows = 0, []
    for member in sorted(await direct.smembers(keys.workers)):
        w = _text(member)
        record = {_text(k): _text(v) for k, v in (await direct.hgetall(keys.worker(w))).items()}
        held = int(record.get("open") or 0)
        total += held
        rows.append({
            "worker": w,
            "open": held,
            "alive": bool(await direct.exists(keys.alive(w))),
            "wsessions": await direct.scard(keys.worker_sessions(w)),
            "pid": record.get("pid"),
            "max_sessions": record.get("max_sessions"),
        })  # fmt: skip
    return total, rows


async def keys_without_ttl(direct: redis.asyncio.Redis, prefix: str, keys: QueueKeys) -> list[dict[str, Any]]:
    """Keys under the prefix with no TTL, except the queue itself (task stream, index, dead letters)."""
    allowed = {keys.tasks, queues_index(prefix), keys.dead}
    found = []
    async for raw in direct.scan_iter(match=f"{prefix}:*", count=1000):
        key = _text(raw)
        if key in allowed or await direct.pttl(raw) != -1:
            continue
        kind = _text(await direct.type(raw))
        row: dict[str, Any] = {"key": key, "type": kind}
        if kind == "hash":
            row["fields"] = {_text(k): _text(v) for k, v in list((await direct.hgetall(raw)).items())[:20]}
        elif kind == "stream":
            row["length"] = await direct.xlen(raw)
            last = await direct.xrevrange(raw, count=1)
            row["last_entry"] = repr(last)[:300]
        elif kind == "set":
            row["members"] = [_text(m) for m in list(await direct.smembers(raw))[:20]]
        elif kind == "zset":
            row["members"] = [[_text(m), s] for m, s in await direct.zrange(raw, 0, 19, withscores=True)]
        elif kind == "list":
            row["items"] = [_text(x) for x in await direct.lrange(raw, 0, 9)]
        else:
            row["value"] = repr(await direct.get(raw))[:200]
        found.append(row)
    return sorted(found, key=lambda r: r["key"])


# --- the activities' own logs -----------------------------------------------------------------


def read_activity_logs(logdir: Path, t0: float) -> list[dict[str, Any]]:
    """Every line the worker processes wrote (a half-written last line of a killed one is skipped)."""
    lines = []
    for path in sorted(logdir.glob("*.jsonl")):
        for raw in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            record["t"] = record["t"] - t0  # full precision: a rounded start and end can coincide
            lines.append(record)
    lines.sort(key=lambda r: r["t"])
    return lines


def analyse_activity_logs(lines: list[dict[str, Any]], incarnations: list[Incarnation]) -> dict[str, Any]:
    """Duplicate completions, overlap above the limit per process, session/process agreement."""
    ended_at = {inc.pid: inc.killed_at if inc.killed_at is not None else inc.ended for inc in incarnations}
    last_seen: dict[int, float] = {}
    open_starts: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    intervals: dict[int, list[tuple[float, float, str, str]]] = defaultdict(list)
    completions: Counter[str] = Counter()
    session_pids: dict[str, set[int]] = defaultdict(set)
    by_call: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in lines:
        pid = rec["pid"]
        last_seen[pid] = max(last_seen.get(pid, rec["t"]), rec["t"])
        by_call[rec["call"]].append(rec)
        key = (pid, rec["aid"], rec["attempt"], rec["call"])
        if rec["ev"] == "start":
            open_starts[key].append(rec)
            if rec.get("sid"):
                session_pids[rec["sid"]].add(pid)
        else:
            starts = open_starts.get(key)
            start = starts.pop(0)["t"] if starts else rec["t"]
            intervals[pid].append((start, rec["t"], rec["aid"], rec["call"]))
            if rec.get("status") == "ok":
                completions[rec["call"]] += 1
    unterminated = 0
    for (pid, aid, _attempt, call), starts in open_starts.items():
        for start in starts:  # the process died mid-activity: it ran until the process ended
            unterminated += 1
            end = ended_at.get(pid) or last_seen.get(pid, start["t"])
            intervals[pid].append((start["t"], max(end, start["t"]), aid, call))
    over_moments: list[dict[str, Any]] = []
    max_overlap: dict[str, int] = {}
    for pid, spans in intervals.items():
        # At the same instant an end goes before a start: back-to-back activities do not overlap.
        # An activity that took no measurable time cannot overlap anything: it is left out (its
        # end would sort before its own start).
        spans = [span for span in spans if span[1] > span[0]]
        starts = [(s, 1, i) for i, (s, _, _, _) in enumerate(spans)]
        points = sorted(starts + [(e, -1, i) for i, (_, e, _, _) in enumerate(spans)])
        running: set[int] = set()
        peak = 0
        for t, delta, i in points:
            if delta < 0:
                running.discard(i)
                continue
            running.add(i)
            peak = max(peak, len(running))
            if len(running) == MAX_ACTIVITIES + 1:  # a moment it went above the limit
                over_moments.append({
                    "pid": pid, "t": t, "running": len(running),
                    "activities": sorted(f"{spans[j][3]}:{spans[j][2][:8]}" for j in running),
                })  # fmt: skip
        identity = next((inc.identity for inc in incarnations if inc.pid == pid), "?")
        max_overlap[f"{identity}/{pid}"] = peak
    duplicates = {call: n for call, n in completions.items() if n > 1}
    return {
        "lines": len(lines),
        "completions": completions,
        "duplicates": duplicates,
        "over_limit_moments": over_moments,
        "max_overlap_per_process": dict(sorted(max_overlap.items())),
        "unterminated_starts": unterminated,
        "sessions_on_several_processes": {s: sorted(p) for s, p in session_pids.items() if len(p) > 1},
        "by_call": by_call,
    }


# --- the report ----------------------------------------------------------------------------


def faults_near(faults: list[Fault], start: float, end: float | None, before: float = 10.0) -> list[str]:
    """The faults that were active during [start - before, end]: what probably caused an anomaly."""
    stop = end if end is not None else math.inf
    return [
        f"#{f.n} {f.kind} t={f.start:.1f}-{(f.end if f.end is not None else f.start):.1f}s {f.detail}"
        for f in faults
        if f.start <= stop and (f.end if f.end is not None else f.start) >= start - before
    ]


def call_sample(call: Call, soak: Soak, logs: dict[str, Any], with_tb: bool = False) -> dict[str, Any]:
    row: dict[str, Any] = {
        "call_id": call.call_id,
        "kind": call.kind,
        "start_s": round(call.start, 3),
        "end_s": None if call.end is None else round(call.end, 3),
        "took_s": None if call.end is None else round(call.end - call.start, 3),
        "outcome": call.outcome,
        "session_id": call.session_id,
        "worker": call.worker,
        "detail": call.detail,
        "faults_near": faults_near(soak.faults, call.start, call.end),
        "activity_log": [
            {k: v for k, v in r.items() if k != "call"} for r in logs["by_call"].get(call.call_id, [])
        ][:12],
    }
    if call.error:
        row["error"] = call.error
    if with_tb and call.tb:
        row["traceback"] = call.tb
    if call.late:
        row["late"] = call.late
    return row


def dump_records(soak: Soak) -> None:
    """Every call and fault, one JSON line each, next to the logs (kept with --keep-logs)."""
    with (soak.workdir / "calls.jsonl").open("w") as out:
        for call in soak.calls:
            out.write(json.dumps(asdict(call), default=str) + "\n")
    (soak.workdir / "faults.json").write_text(json.dumps([asdict(f) for f in soak.faults], indent=1))


def build_report(soak: Soak, end: dict[str, Any], minutes: float) -> dict[str, Any]:
    dump_records(soak)
    logs = analyse_activity_logs(read_activity_logs(soak.logdir, soak.t0), soak.incarnations)
    calls = soak.calls
    ok = [c for c in calls if c.outcome == "ok"]
    clear = [c for c in calls if c.clear]
    unclear = [c for c in calls if c.outcome == "unclear"]
    never = [c for c in calls if c.outcome == "never"]
    by_class = Counter(c.outcome for c in clear)
    latency: dict[str, Any] = {}
    for kind in sorted({c.kind for c in calls}):
        ms = sorted(c.seconds * 1000 for c in ok if c.kind == kind and c.seconds is not None)
        if ms:
            latency[kind] = {
                "n": len(ms), "p50_ms": round(percentile(ms, 50), 1), "p99_ms": round(percentile(ms, 99), 1),
                "max_ms": round(ms[-1], 1),
            }  # fmt: skip
    longest = max(clear, key=lambda c: c.seconds or 0.0, default=None)
    clear_samples: dict[str, list[dict[str, Any]]] = {}
    for call in clear:
        bucket = clear_samples.setdefault(call.outcome or "?", [])
        if len(bucket) < 3:
            bucket.append(call_sample(call, soak, logs))
    kind_of_call = {c.call_id: c.kind for c in calls}
    ok_ids = {c.call_id for c in ok if c.kind in ("plain", "session_activity")}
    duplicates = logs["duplicates"]
    dup_by_kind = Counter(kind_of_call.get(call, "?") for call in duplicates)
    phantom = sorted(ok_ids - set(logs["completions"]))
    never_samples = [call_sample(c, soak, logs) for c in never[:SAMPLES]]
    open_sessions = end["open_sessions"]
    leftovers = end["leftover_keys"]
    over = logs["over_limit_moments"]
    figures = {
        "unclear_errors": len(unclear),
        "never_answered": len(never),
        "open_sessions_after": len(open_sessions),
        "slots_in_use_after": end["slots_in_use"],
        "activities_over_limit": len(over),
        "keys_without_ttl": len(leftovers),
    }
    faults_by_kind = Counter(f.kind for f in soak.faults)
    library_end = library_fingerprint()
    library = {
        "commit": soak.library_start["commit"],
        "digest_at_start": soak.library_start["digest"],
        "digest_at_end": library_end["digest"],
        "changed_during_run": soak.library_start["digest"] != library_end["digest"],
        "uncommitted_files": soak.library_start["dirty"],
    }
    return {
        "minutes": minutes,
        "seed": soak.seed,
        "faults": {k: faults_by_kind.get(k, 0) for k in FAULT_WEIGHTS},
        "calls_made": len(calls),
        "results": len(ok),
        "clear_errors": {"total": len(clear), "by_class": dict(by_class.most_common())},
        "unclear_errors": {
            "count": len(unclear),
            "samples": [call_sample(c, soak, logs, with_tb=True) for c in unclear[:SAMPLES]],
        },
        "never_answered": {"count": len(never), "samples": never_samples},
        "duplicate_completions": len(duplicates),
        "open_sessions_after": len(open_sessions),
        "slots_in_use_after": end["slots_in_use"],
        "activities_over_limit": len(over),
        "keys_without_ttl": {"count": len(leftovers), "names": [r["key"] for r in leftovers]},
        "latency_ok_ms": latency,
        "longest_clear_error": None
        if longest is None
        else {
            "seconds": round(longest.seconds or 0.0, 3),
            "call_id": longest.call_id,
            "kind": longest.kind,
            "error_class": longest.outcome,
            "error": longest.error,
            "faults_near": faults_near(soak.faults, longest.start, longest.end),
        },
        "must_be_zero": figures,
        "passed": not any(figures.values()),
        "detail": {
            "prefix": soak.prefix,
            "interrupted": soak.stop_early.is_set(),
            "library": library,
            "workers": len(soak.slots),
            "callers": len(soak.clients),
            "soak_seconds": round(soak.timeline.get("faults_stop", 0) - soak.timeline.get("soak_start", 0)),
            "timeline_s": soak.timeline,
            "calls_by_kind": dict(Counter(c.kind for c in calls)),
            "outcomes_by_kind": {
                kind: dict(Counter(c.outcome for c in calls if c.kind == kind))
                for kind in sorted({c.kind for c in calls})
            },
            "clear_error_samples": clear_samples,
            "duplicate_completions_by_kind": dict(dup_by_kind),
            "duplicate_completion_samples": [
                {
                    "call_id": call,
                    "kind": kind_of_call.get(call),
                    "completions": n,
                    "activity_log": [
                        {k: v for k, v in r.items() if k != "call"} for r in logs["by_call"][call]
                    ][:12],
                }
                for call, n in list(duplicates.items())[:SAMPLES]
            ],
            "ok_without_completion_in_logs": phantom[:SAMPLES],
            "ok_without_completion_count": len(phantom),
            "session_activity_on_other_worker": soak.wrong_worker[:SAMPLES],
            "sessions_on_several_processes": logs["sessions_on_several_processes"],
            "max_overlap_per_process": logs["max_overlap_per_process"],
            "over_limit_moments": over[:SAMPLES],
            "unterminated_activity_starts": logs["unterminated_starts"],
            "activity_log_lines": logs["lines"],
            "open_sessions": open_sessions[:SAMPLES],
            "workers_at_end": end["workers_at_end"],
            "settled_after_s": end["settled_after_s"],
            "workers_killed_at_stop": end["stragglers"],
            "leftover_keys": leftovers[:SAMPLES],
            "worker_processes": [asdict(inc) for inc in soak.incarnations],
            "events": soak.events,
            "fault_log": [asdict(f) for f in soak.faults],
        },
    }


def print_table(report: dict[str, Any]) -> None:
    d = report["detail"]
    print(
        f"\nsessionq chaos soak: {report['minutes']:g} min (ran {d['soak_seconds']}s), "
        f"seed {report['seed']}, {d['workers']} workers, {d['callers']} callers"
    )
    print("faults: " + ", ".join(f"{k} {v}" for k, v in report["faults"].items()))
    lib = d["library"]
    print(
        f"library: commit {lib['commit']}, {len(lib['uncommitted_files'])} uncommitted file(s), "
        f"digest {lib['digest_at_start']}"
        + (f" -> {lib['digest_at_end']} (CHANGED DURING THE RUN)" if lib["changed_during_run"] else "")
    )
    zero = report["must_be_zero"]
    clear = report["clear_errors"]
    rows: list[tuple[str, Any, str | None]] = [
        ("calls made", report["calls_made"], None),
        ("results (ok)", report["results"], None),
        ("clear errors", clear["total"], None),
        ("unclear errors", report["unclear_errors"]["count"], "unclear_errors"),
        ("never answered", report["never_answered"]["count"], "never_answered"),
        ("duplicate completions", report["duplicate_completions"], None),
        ("sessions still OPEN after settling", report["open_sessions_after"], "open_sessions_after"),
        ("session slots in use after settling", report["slots_in_use_after"], "slots_in_use_after"),
        ("activities running above the limit", report["activities_over_limit"], "activities_over_limit"),
        ("keys without TTL left behind", report["keys_without_ttl"]["count"], "keys_without_ttl"),
    ]
    width = max(len(label) for label, _, _ in rows)
    print(f"\n{'figure':<{width}}  {'value':>8}  check")
    print("-" * (width + 28))
    for label, value, key in rows:
        check = "" if key is None else ("must be 0: ok" if zero[key] == 0 else "must be 0: FAIL")
        print(f"{label:<{width}}  {value:>8}  {check}")
    if clear["by_class"]:
        print("\nclear errors by class: " + ", ".join(f"{k} {v}" for k, v in clear["by_class"].items()))
    print("\nlatency of ok calls (ms):")
    for kind, lat in report["latency_ok_ms"].items():
        print(
            f"  {kind:<18} n={lat['n']:<6} p50 {lat['p50_ms']:>8.1f}  p99 {lat['p99_ms']:>8.1f}  "
            f"max {lat['max_ms']:>8.1f}"
        )
    longest = report["longest_clear_error"]
    if longest:
        print(
            f"longest time to a clear error: {longest['seconds']:.1f}s "
            f"({longest['error_class']}, {longest['kind']} call {longest['call_id']})"
        )
    if report["keys_without_ttl"]["names"]:
        print("keys without TTL: " + ", ".join(report["keys_without_ttl"]["names"]))
    extra = []
    if d["duplicate_completions_by_kind"]:
        extra.append(f"duplicate completions by kind: {d['duplicate_completions_by_kind']}")
    if d["ok_without_completion_count"]:
        extra.append(f"ok results with no completed run in worker logs: {d['ok_without_completion_count']}")
    if d["session_activity_on_other_worker"]:
        extra.append(f"session activities run elsewhere: {len(d['session_activity_on_other_worker'])}")
    if d["sessions_on_several_processes"]:
        extra.append(f"sessions run in several processes: {len(d['sessions_on_several_processes'])}")
    if d["workers_killed_at_stop"]:
        extra.append(f"workers SIGKILLed at the end (still up after SIGTERM): {d['workers_killed_at_stop']}")
    exits = [e for e in d["events"] if e["kind"] == "worker_exited"]
    if exits:
        extra.append(f"worker processes that exited by themselves: {len(exits)}")
    if extra:
        print("\nalso noticed:\n  " + "\n  ".join(extra))
    print(f"\nresult: {'PASS' if report['passed'] else 'FAIL'}")


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/chaos.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=3.0, help="how long faults are injected (default 3)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the fault schedule (default: random)")
    parser.add_argument("--json", metavar="FILE", default="chaos.json", help="report (default chaos.json)")
    parser.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    parser.add_argument("--callers", type=int, default=8, help="caller tasks, a Client each (default 8)")
    parser.add_argument("--verbose", action="store_true", help="sessionq's caller-side log on stderr too")
    parser.add_argument(
        "--keep-logs", metavar="DIR", help="keep worker and activity logs in DIR (default: temp dir, removed)"
    )
    parser.add_argument(
        "--only-faults",
        metavar="KINDS",
        type=lambda text: [k.strip() for k in text.split(",") if k.strip()],
        help=f"inject only these fault kinds, to reproduce a finding ({','.join(FAULT_WEIGHTS)})",
    )
    worker = parser.add_argument_group("worker process (internal)")
    worker.add_argument("--_worker", action="store_true", dest="worker", help=argparse.SUPPRESS)
    worker.add_argument("--url", help=argparse.SUPPRESS)
    worker.add_argument("--prefix", help=argparse.SUPPRESS)
    worker.add_argument("--identity", help=argparse.SUPPRESS)
    worker.add_argument("--logdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.worker:
        if args.minutes <= 0 or args.workers < 1 or args.callers < 1:
            parser.error("--minutes, --workers and --callers must be positive")
        unknown = set(args.only_faults or ()) - set(FAULT_WEIGHTS)
        if unknown:
            parser.error(f"unknown fault kind(s): {', '.join(sorted(unknown))}")
        if args.seed is None:
            args.seed = int.from_bytes(os.urandom(4), "big")
    return args


def setup_logging(workdir: Path, verbose: bool) -> None:
    """sessionq's caller-side log goes to a file in the work dir (and stderr with --verbose)."""
    handlers: list[logging.Handler] = [logging.FileHandler(workdir / "caller.log")]
    if verbose:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=handlers,
    )
    logging.getLogger("tests.faultkit").setLevel(logging.WARNING)


def kill_children() -> None:
    for pid in list(CHILDREN):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        CHILDREN.discard(pid)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return asyncio.run(worker_main(args))
    from tests.faultkit import PrivateRedis

    if args.keep_logs:
        workdir = Path(args.keep_logs).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="sessionq-chaos-"))
    setup_logging(workdir, args.verbose)
    server = PrivateRedis(persistent=True)
    report: dict[str, Any] | None = None
    try:
        server.start()
        soak = Soak(args, server, workdir)
        try:
            end = asyncio.run(soak.run())
        except (KeyboardInterrupt, asyncio.CancelledError):
            print("[chaos] aborted; cleaned up", file=sys.stderr)
            return 130
        report = build_report(soak, end, args.minutes)
    finally:
        kill_children()
        server.stop()
        logging.shutdown()
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(report)
    Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.json}" + (f"; logs kept in {args.keep_logs}" if args.keep_logs else ""))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
