"""`sessionq worker ... --processes N`: N worker processes of one host, under one supervisor.

The conventions of gunicorn's arbiter and celery's prefork pool: the supervisor runs no
activity itself; it starts N `sessionq worker` processes that share one host id (so they
share one session limit, and the host's sessions outlive any one of them), starts another
when one dies, and on SIGTERM or Ctrl-C stops them all gracefully (each lets its running
activities finish within --shutdown-grace). A second Ctrl-C kills them at once. If the
supervisor itself is killed, its processes notice and stop gracefully.

A process stopped gracefully by someone else (`kill -TERM`, a rolling restart) is
replaced at once; with --burst one that finished its work is not. A process that exits
with a usage or configuration error (exit code 2, say the host's
other processes run with another session limit) is not started again: the supervisor
stops the others and exits with that code. One that keeps dying soon after it started is
started again after a growing pause (up to MAX_RESTART_DELAY), so a crash loop does not
spin.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType

log = logging.getLogger("sessionq.cli")

POLL_INTERVAL = 0.1
MIN_RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
STABLE_AFTER = 10.0
"""A process that ran this long before it died is restarted at once (not a crash loop)."""
USAGE_ERROR = 2


@dataclass
class Child:
    """One worker process slot: what runs in it now, and its restart pacing."""

    number: int
    generation: int = 0
    """How many processes this slot started (a restarted one gets a new identity)."""
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    delay: float = MIN_RESTART_DELAY
    restart_at: float | None = None


class Supervisor:
    """Keeps `count` worker processes running (argv from `argv_for(number)`) until a signal."""

    def __init__(
        self,
        count: int,
        argv_for: Callable[[int, int], Sequence[str]],
        shutdown_grace: float,
        burst: bool = False,
    ) -> None:
        self.children = [Child(number) for number in range(1, count + 1)]
        self.argv_for = argv_for
        """(slot number, generation) -> the process's argv."""
        self.shutdown_grace = shutdown_grace
        self.burst = burst
        self.stopping = False
        self.interrupts = 0
        self.exit_code = 0

    # -- signals ------------------------------------------------------------------------
    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
        if self.stopping:
            if signum == signal.SIGINT and self.interrupts >= 2:
                print("second interrupt: killing the worker processes", file=sys.stderr, flush=True)
                self._signal_all(signal.SIGKILL)
                os._exit(130)
            return
        self.stopping = True
        log.warning(
            "%s: stopping %d worker process(es) gracefully (running activities get up to %gs)%s",
            signal.Signals(signum).name,
            len(self.children),
            self.shutdown_grace,
            "; press Ctrl-C again to kill them" if signum == signal.SIGINT else "",
        )
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, signum: int) -> None:
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signum)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> int:
        """Start the processes and keep them running; returns the exit code."""
        for child in self.children:
            self._start(child)
        while True:
            if self._step():
                return self.exit_code
            time.sleep(POLL_INTERVAL)

    def _step(self) -> bool:
        """One look at the processes; True once all are gone for good."""
        now = time.monotonic()
        for child in self.children:
            process = child.process
            if process is not None and process.poll() is not None:
                self._exited(child, process.returncode, now)
            if child.restart_at is not None and not self.stopping and now >= child.restart_at:
                self._start(child)
        return all(c.process is None and (c.restart_at is None or self.stopping) for c in self.children)

    def _exited(self, child: Child, code: int, now: float) -> None:
        pid = child.process.pid if child.process is not None else 0
        child.process = None
        if self.stopping:
            if code not in (0, -signal.SIGTERM):
                self.exit_code = self.exit_code or (code if code > 0 else 1)
            return
        if code == USAGE_ERROR:
            log.error(
                "worker process %d (pid %d) refused to start (exit code 2: see its error above); "
                "stopping the others",
                child.number,
                pid,
            )
            self.exit_code = USAGE_ERROR
            self.stopping = True
            self._signal_all(signal.SIGTERM)
            return
        if code == 0 and self.burst:  # it finished its work: nothing to restart
            log.info("worker process %d (pid %d) finished", child.number, pid)
            return
        if code == 0:  # stopped gracefully by someone else (a rolling restart): replace it
            log.info("worker process %d (pid %d) stopped; starting another", child.number, pid)
            child.delay = MIN_RESTART_DELAY
            child.restart_at = now
            return
        ran = now - child.started_at
        child.delay = MIN_RESTART_DELAY if ran >= STABLE_AFTER else min(child.delay * 2, MAX_RESTART_DELAY)
        wait = 0.0 if ran >= STABLE_AFTER else child.delay
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        log.warning(
            "worker process %d (pid %d) %s after %.1fs; starting another%s",
            child.number,
            pid,
            how,
            ran,
            f" in {wait:.1f}s" if wait else "",
        )
        child.restart_at = now + wait

    def _start(self, child: Child) -> None:
        # A session of its own: a Ctrl-C at the terminal reaches only the supervisor, which
        # stops the processes gracefully (SIGTERM); a second one kills them.
        child.generation += 1
        child.process = subprocess.Popen(
            list(self.argv_for(child.number, child.generation)),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        child.started_at = time.monotonic()
        child.restart_at = None
        log.info("started worker process %d (pid %d)", child.number, child.process.pid)
        if self.stopping:  # a signal came while it started: it stops with the others
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
