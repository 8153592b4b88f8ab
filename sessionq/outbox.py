"""What a worker owes Redis: results for its callers' inboxes, and acks of the shared
stream's entries it finished, written in batches (one round trip per batch).

A reply is queued at once (`reply`) and written by the flush loop: one XADD per caller
inbox (NOMKSTREAM: an inbox whose client is gone takes nothing), plus XACK and XDEL of the
entries finished. Whatever Redis could not take for a transient reason (a lost connection,
READONLY, LOADING, OOM...) is kept and written again; only what it refused for good (say
WRONGTYPE on an inbox) is reported and dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from .faults import Kind, describe, is_transient, kind_of
from .keys import CONSUMER_GROUP, QueueKeys
from .wire import Wire

log = logging.getLogger("sessionq")


class Outbox:
    """Results and acks waiting to be written, and the flush that writes them."""

    def __init__(
        self, wire: Wire, keys: QueueKeys, worker_id: str, on_acked: Callable[[Iterable[bytes]], None]
    ) -> None:
        self.wire = wire
        self.keys = keys
        self.worker_id = worker_id
        self.on_acked = on_acked
        self._replies: list[tuple[str, bytes]] = []
        self._acks: list[bytes] = []
        self._ready = asyncio.Event()

    @property
    def empty(self) -> bool:
        return not self._replies and not self._acks

    def reply(self, client_id: str, message: bytes, ack: bytes | None = None) -> None:
        """Queue `message` for the inbox of `client_id`, and the ack of a shared-stream entry."""
        self._replies.append((self.keys.inbox(client_id), message))
        if ack is not None:
            self._acks.append(ack)
        self._ready.set()

    def ack(self, entry_id: bytes) -> None:
        """Queue the ack of an entry that needs no reply (its caller was answered already)."""
        self._acks.append(entry_id)
        self._ready.set()

    async def flush(self) -> None:
        """Wait for something to write, write it; raise to have the loop back off and retry."""
        await self._ready.wait()
        self._ready.clear()
        replies, acks = self._replies, self._acks
        if not replies and not acks:
            return
        self._replies, self._acks = [], []
        by_inbox: dict[str, list[bytes]] = {}
        for inbox, message in replies:
            by_inbox.setdefault(inbox, []).append(message)
        commands: list[tuple[Any, ...]] = []
        for inbox, messages in by_inbox.items():
            fields: list[bytes] = []
            for message in messages:
                fields += (b"r", message)
            commands.append(("XADD", inbox, "NOMKSTREAM", "*", *fields))
        if acks:
            commands.append(("XACK", self.keys.tasks, CONSUMER_GROUP, *acks))
            commands.append(("XDEL", self.keys.tasks, *acks))
        try:
            outcomes = await self.wire.execute_many(self.keys.tasks, commands, return_exceptions=True)
        except BaseException:
            self._replies[:0] = replies  # nothing is known to have been written: keep it all
            self._acks[:0] = acks
            self._ready.set()
            raise
        retry: BaseException | None = None
        for (inbox, messages), outcome in zip(by_inbox.items(), outcomes, strict=False):
            if not isinstance(outcome, BaseException):
                continue
            if is_transient(outcome):
                self._replies[:0] = [(inbox, m) for m in messages]
                retry = outcome
            else:
                log.error(
                    "worker %s: Redis refused %d result(s) for inbox %s (%s); they are dropped",
                    self.worker_id, len(messages), inbox, describe(outcome),
                )  # fmt: skip
        retry, lost = self._settle_acks(acks, outcomes[len(by_inbox) :], retry)
        if retry is not None:
            self._ready.set()
            raise retry  # the loop backs off, then this runs again
        if lost is not None:
            raise lost  # the loop re-creates the group

    def _settle_acks(
        self, acks: list[bytes], outcomes: list[Any], retry: BaseException | None
    ) -> tuple[BaseException | None, BaseException | None]:
        lost: BaseException | None = None
        acked = True
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                acked = False
                kind = kind_of(outcome)
                if kind is Kind.TRANSIENT:
                    retry = outcome
                elif kind is Kind.LOST:
                    lost = outcome  # the task stream vanished, and the entries with it
                else:
                    log.error("worker %s: Redis refused an ack (%s)", self.worker_id, describe(outcome))
        if acks and not acked and retry is not None:
            self._acks[:0] = acks  # XACK and XDEL are idempotent: send both again
        elif acks:
            self.on_acked(acks)
        return retry, lost
