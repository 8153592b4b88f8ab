"""The caller's watch on the workers of its busy sessions, so a dead worker surfaces as
SessionFailedError within its heartbeat timeout plus a fraction, never a hang."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from .faults import describe
from .keys import QueueKeys

if TYPE_CHECKING:
    from .client import Client
    from .session import Session

log = logging.getLogger("sessionq")


def check_interval(hb_ms: int) -> float:
    """How often a waiting caller looks at its worker's heartbeat key."""
    return min(1.0, max(0.05, hb_ms / 1000 / 5)) if hb_ms else 1.0


async def reap(client: Client, keys: QueueKeys, worker_id: str, hb_ms: int) -> bool:
    """Declare a worker dead (the script does nothing if its heartbeat came back)."""
    reason = (
        f"worker {worker_id} died (no heartbeat for {hb_ms / 1000:g}s)"
        if hb_ms
        else f"worker {worker_id} died (heartbeat expired)"
    )
    reaped = await client.scripts.reap_worker(
        keys, worker_id, reason, force=False, retention_ms=client.retention_ms
    )
    return reaped > 0


class LivenessMonitor:
    """One task per client that watches the workers of its busy sessions.

    Every `check_interval` it asks Redis, in one round trip, whether each worker holding
    a session with outstanding activities still has its heartbeat key. A dead one is
    reaped (once, by whoever notices first) and its sessions' callers get
    SessionFailedError; a session past its execution deadline is expired. Idle sessions
    cost nothing.
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self.sessions: set[Session] = set()
        self._task: asyncio.Task[None] | None = None

    def watch(self, session: Session) -> None:
        self.sessions.add(session)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="sessionq-liveness")

    async def close(self) -> None:
        """Stop watching (the client is closing): leave no task behind on the loop."""
        self.sessions.clear()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            self.sessions = {s for s in self.sessions if s.busy}
            if not self.sessions:
                return
            await asyncio.sleep(min(check_interval(s.hb_ms) for s in self.sessions))
            try:
                await self._check()
            except Exception as exc:  # keep watching through Redis hiccups
                log.warning("liveness check failed: %s", describe(exc))

    async def _check(self) -> None:
        by_worker: dict[tuple[QueueKeys, str], list[Session]] = {}
        for session in self.sessions:
            if session.busy:
                by_worker.setdefault((session.keys, session.info.worker_id), []).append(session)
        if not by_worker:
            return

        # The session's own state too: a worker killed and restarted under the same identity
        # within one check has a live heartbeat again, but its start-up failed our session.
        async def check_worker(keys: QueueKeys, worker_id: str, sessions: list[Session]) -> None:
            alive, *states = await self.client.wire.execute_many(
                keys.tasks,
                [
                    ("EXISTS", keys.alive(worker_id)),
                    *(("HGET", keys.session(s.session_id), "state") for s in sessions),
                ],
            )
            for session, state in zip(sessions, states, strict=True):
                if not alive or state != b"OPEN" or session.past_deadline:
                    await session.refresh()

        await asyncio.gather(*(check_worker(k, w, s) for (k, w), s in by_worker.items()))
