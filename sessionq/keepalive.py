"""The worker's heartbeat, from a thread of its own, and a watch on its event loop.

A worker is declared dead when its heartbeat key expires. If the heartbeat ran on the
worker's event loop, one async activity that blocks the loop (``time.sleep`` instead of
``await asyncio.sleep``, CPU-bound work) for longer than heartbeat_timeout would get a
live worker declared dead: its sessions failed, its plain activities handed to another
worker, which the same activity then blocks in turn. So the heartbeat runs in a thread,
on an event loop and Redis connections of its own, and keeps beating while the process
lives.

The thread also watches the worker's loop (it posts a tick every LOOP_TICK seconds) and,
when the loop was blocked for STALL_LOG seconds or more, logs once, when it is free
again, which activity blocked it and for how long. A loop blocked for good makes the
worker useless while it looks alive: after `stall_limit` seconds of it the thread stops
beating, so the worker is declared dead and its callers learn it (SessionFailedError).
Until then, while the loop is blocked its timers cannot end the sessions whose execution
deadline passes (they have no deadline entry for the sweep: held.py): the thread ends them
itself, so a session still ends at its deadline, within a third of heartbeat_timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .connection import connect
from .faults import describe
from .keys import QueueKeys
from .scripts import Scripts
from .wire import Wire

log = logging.getLogger("sessionq")

LOOP_TICK = 0.1
STALL_LOG = 1.0
RETRY_BEAT = 0.05


class Heartbeat:
    """Beats for one worker from a daemon thread; call `start()` once it is registered."""

    def __init__(
        self,
        target: Any,
        keys: QueueKeys,
        worker_id: str,
        heartbeat_timeout: float,
        loop: asyncio.AbstractEventLoop,
        *,
        counts: Callable[[], tuple[int, int, int]],
        redis_now_ms: Callable[[], float],
        on_lost: Callable[[], None],
        blame: Callable[[], str],
        stall_limit: float,
        host_id: str = "",
        grace_ms: int = 0,
        overdue: Callable[[float], list[str]] | None = None,
        retention_ms: int = 0,
    ) -> None:
        self.host_id = host_id
        self.grace_ms = grace_ms
        self.overdue = overdue
        """The held sessions whose deadline passed by Redis' time given (HeldSessions.overdue)."""
        self.retention_ms = retention_ms
        self._expired: set[str] = set()  # ended from here during the current stall
        self.stopping = False
        """Set when a host's process stops gracefully: it beats on, but takes no new session."""
        self.target = target
        self.keys = keys
        self.worker_id = worker_id
        self.interval = heartbeat_timeout / 3
        self.hb_ms = int(heartbeat_timeout * 1000)
        self.loop = loop
        self.counts = counts
        self.redis_now_ms = redis_now_ms
        self._sent_counts: tuple[int, int, int] | None = None  # what the last beat that got through wrote
        self.on_lost = on_lost
        self.blame = blame
        self.stall_limit = stall_limit
        self.beats = 0
        self.failed_at = -1e9  # monotonic time of the last failed beat
        self.last_ok: float | None = None
        """Monotonic time of the last beat that got through (for the metrics)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_tick = time.monotonic()
        self._stall_blame = ""

    async def start(self) -> None:
        """Start the thread and wait (a little) for its first beat: the worker is not ready
        before its heartbeat runs."""
        name = f"sessionq-heartbeat:{self.worker_id}"
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.interval * 3
        while self.beats == 0 and time.monotonic() < deadline and self._thread.is_alive():
            await asyncio.sleep(0.005)

    def stop(self) -> None:
        """Stop beating (graceful stop: the worker deregisters right after)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _tick(self) -> None:  # runs on the worker's loop
        self._last_tick = time.monotonic()

    def _main(self) -> None:
        asyncio.run(self._beat())

    async def _beat(self) -> None:
        redis = connect(self.target)
        scripts = Scripts(Wire(redis, timeout=self.interval))
        next_beat = 0.0
        stalled_since: float | None = None
        failing = False
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                with contextlib.suppress(RuntimeError):  # the worker's loop is closed: we stop soon
                    self.loop.call_soon_threadsafe(self._tick)
                lag = now - self._last_tick
                if lag >= STALL_LOG + LOOP_TICK:
                    if stalled_since is None:
                        stalled_since = self._last_tick
                        self._stall_blame = self.blame()
                elif stalled_since is not None:
                    self._expired.clear()
                    log.warning(
                        "worker %s: %s blocked the event loop for %.1f s; async activities must await, "
                        "not block (run blocking code in a def activity, which runs in a thread)",
                        self.worker_id, self._stall_blame, self._last_tick - stalled_since,
                    )  # fmt: skip
                    stalled_since = None
                if now >= next_beat:
                    next_beat = now + self.interval
                    if stalled_since is not None and now - stalled_since > self.stall_limit:
                        if self.beats >= 0:
                            log.error(
                                "worker %s: its event loop has been blocked for %.0f s by %s; it stops "
                                "heartbeating, so it is declared dead and its callers are told",
                                self.worker_id, now - stalled_since, self._stall_blame,
                            )  # fmt: skip
                            self.beats = -1
                    else:
                        failing = await self._beat_once(scripts, failing)
                        if failing:  # beat again soon: the key must not lapse over a short blip
                            next_beat = time.monotonic() + RETRY_BEAT
                        elif stalled_since is not None:
                            await self._expire_overdue(scripts)
                await asyncio.sleep(LOOP_TICK if not failing else min(LOOP_TICK, RETRY_BEAT))
        finally:
            with contextlib.suppress(Exception):
                await scripts.wire.aclose()
                await redis.aclose()

    async def _expire_overdue(self, scripts: Scripts) -> None:
        """The worker's loop is blocked: end the sessions it holds whose execution deadline
        passed (end_session; Redis' clock decides). The worker hears of it from its own
        stream once its loop runs again, and cancels what still runs for them."""
        if self.overdue is None:
            return
        for sid in self.overdue(self.redis_now_ms()):
            if sid in self._expired:
                continue
            try:
                ended = await scripts.end_session(
                    self.keys, sid, "expire", "execution timeout passed", self.retention_ms
                )
            except Exception as exc:  # the next beat tries again
                log.warning("worker %s: could not expire session %s (%s)", self.worker_id, sid, describe(exc))
                return
            if ended.state != "OPEN":
                self._expired.add(sid)
                log.warning(
                    "worker %s: session %s passed its execution timeout while the event loop was "
                    "blocked by %s; it was ended from the heartbeat thread",
                    self.worker_id, sid, self._stall_blame,
                )  # fmt: skip

    async def _beat_once(self, scripts: Scripts, failing: bool) -> bool:
        """One heartbeat; True while they fail (so a long outage logs once, not every beat)."""
        counts = self.counts()
        try:
            registered = await scripts.heartbeat(
                self.keys,
                self.worker_id,
                hb_ms=self.hb_ms,
                counts=None if counts == self._sent_counts else counts,
                now_ms=self.redis_now_ms(),
                timeout=self.interval,
                host_id=self.host_id,
                grace_ms=self.grace_ms,
                stopping=self.stopping,
            )
        except Exception as exc:
            if not failing:
                log.warning("worker %s: heartbeat failed (%s); retrying", self.worker_id, describe(exc))
            self.failed_at = time.monotonic()
            self._sent_counts = None  # it may or may not have written them
            return True
        self._sent_counts = counts if registered else None
        self.beats = max(self.beats, 0) + 1
        self.last_ok = time.monotonic()
        if failing:
            log.warning("worker %s: heartbeat is back", self.worker_id)
        if not registered:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.on_lost)
        return False
