"""A client's lease: one sign of life per client and task queue, not one per session.

While a client waits for a session slot, or holds sessions with an owner_timeout, it
renews ``lease:<client>`` on that task queue (the time of the renewal, on Redis' clock).
Redis reads it in two places:

- granting a slot (slots.lua): a ticket whose client has been silent for WAITER_WINDOW is
  dropped, never granted: a crashed caller must not be handed a session nobody completes;
- the session's worker (worker.py, end_session's 'owner' mode): a session whose owner has
  been silent for its owner_timeout fails ("its owner went away") and its slot frees.

The key's TTL covers the longest owner_timeout in use, so a client that vanishes leaves a
key that expires by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import TYPE_CHECKING

from .faults import describe

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("sessionq")

WAITER_WINDOW_MS = 5_000
"""A waiting caller silent this long loses its place (mirrors slots.lua WAITER_WINDOW_MS):
short, so that a crashed caller's tickets are skipped soon, never granted."""
RENEW_WHILE_WAITING = 1.0
MARGIN_MS = 5_000


class LeaseKeeper:
    """Renews the client's lease on every task queue that needs it, in one background task."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._waiting: Counter[str] = Counter()
        self._owned: dict[str, Counter[int]] = {}
        self._used: set[str] = set()  # queues whose lease key may exist (deleted on close)
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()  # a queue's needs changed: look at the interval again

    def ttl_ms(self, task_queue: str, owner_ms: int = 0) -> int:
        """The lease key's TTL on `task_queue` if a session with `owner_ms` joins it."""
        held = self._owned.get(task_queue) or Counter()
        return max(WAITER_WINDOW_MS, owner_ms, *held) + MARGIN_MS

    def waiting(self, task_queue: str, delta: int) -> None:
        """A creator starts (+1) or stops (-1) waiting for a slot on `task_queue`."""
        self._waiting[task_queue] += delta
        if self._waiting[task_queue] <= 0:
            del self._waiting[task_queue]
        self._used.add(task_queue)
        self._ensure_running()
        self._changed.set()

    def own(self, task_queue: str, owner_ms: int) -> None:
        if owner_ms > 0:
            running = self._task is not None and not self._task.done()
            before = self._interval()
            self._owned.setdefault(task_queue, Counter())[owner_ms] += 1
            self._used.add(task_queue)
            self._ensure_running()
            if running and self._interval() < before:  # the keeper sleeps too long for this one now
                self._changed.set()

    def disown(self, task_queue: str, owner_ms: int) -> None:
        held = self._owned.get(task_queue)
        if owner_ms > 0 and held is not None:
            held[owner_ms] -= 1
            if held[owner_ms] <= 0:
                del held[owner_ms]
            if not held:
                del self._owned[task_queue]

    def _needed(self) -> set[str]:
        return set(self._waiting) | set(self._owned)

    def _interval(self) -> float:
        """Renew well within the shortest window in use: a quarter of it."""
        shortest = [RENEW_WHILE_WAITING] if self._waiting else []
        for held in self._owned.values():
            shortest.append(min(held) / 4000)
        return max(0.05, min(shortest, default=RENEW_WHILE_WAITING))

    def _ensure_running(self) -> None:
        if self._needed() and (self._task is None or self._task.done()) and not self.client.closing:
            self._task = asyncio.create_task(self._run(), name="sessionq-lease")

    async def _run(self) -> None:
        while self._needed():
            self._changed.clear()
            # Sleep an interval, but wake when needs change: a shorter owner_timeout joined, or
            # a creator began to wait (renewed at once: the line must see it alive).
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self._interval())
            queues = self._needed()
            outcomes = await asyncio.gather(
                *(self.client.scripts.renew_lease(self.client.keys(q), self.client.client_id, self.ttl_ms(q))
                  for q in queues),
                return_exceptions=True,
            )  # fmt: skip
            for queue, outcome in zip(queues, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    log.warning("could not renew this client's lease on %r (%s)", queue, describe(outcome))

    async def close(self) -> None:
        """Stop renewing and delete the lease keys (they expire by themselves otherwise)."""
        self._waiting.clear()
        self._owned.clear()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for queue in self._used:
            key = self.client.keys(queue).lease(self.client.client_id)
            with contextlib.suppress(Exception):
                await self.client.wire.execute(key, "DEL", key)
