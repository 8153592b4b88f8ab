"""What a worker owes Redis: results for its callers' inboxes, and acks of the entries it
finished (of the shared stream, or of its host's), written in batches (one round trip per
batch).

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

Ack = tuple[str, bytes]
"""An entry to acknowledge: (stream, entry id)."""


class Outbox:
    """Results and acks waiting to be written, and the flush that writes them.

    An entry of the shared stream is acknowledged only once its result is written: acks
    travel in the batch after the one that carried their results, so a result Redis
    refused (OOM, READONLY...) never leaves its entry acknowledged and deleted while the
    result exists only in this process.
    """

    def __init__(
        self,
        wire: Wire,
        keys: QueueKeys,
        worker_id: str,
        on_acked: Callable[[str, Iterable[bytes]], None],
    ) -> None:
        self.wire = wire
        self.keys = keys
        self.worker_id = worker_id
        self.on_acked = on_acked
        self._replies: list[tuple[str, bytes, Ack | None]] = []  # (inbox, message, ack after it)
        self._acks: list[Ack] = []  # acks whose result is written (or that need none)
        self._ready = asyncio.Event()

    @property
    def empty(self) -> bool:
        return not self._replies and not self._acks

    def reply(
        self, client_id: str, message: bytes, ack: bytes | None = None, stream: str | None = None
    ) -> None:
        """Queue `message` for the inbox of `client_id`; `ack` (an entry of `stream`, by
        default the shared stream) is acknowledged once the message is written."""
        self._replies.append(
            (self.keys.inbox(client_id), message, None if ack is None else (stream or self.keys.tasks, ack))
        )
        self._ready.set()

    def ack(self, entry_id: bytes, stream: str | None = None) -> None:
        """Queue the ack of an entry that needs no reply (its caller was answered already)."""
        self._acks.append((stream or self.keys.tasks, entry_id))
        self._ready.set()

    async def flush(self) -> None:
        """Wait for something to write, write it; raise to have the loop back off and retry."""
        await self._ready.wait()
        self._ready.clear()
        replies, acks = self._replies, self._acks
        if not replies and not acks:
            return
        self._replies, self._acks = [], []
        by_inbox: dict[str, list[tuple[bytes, tuple[str, bytes] | None]]] = {}
        for inbox, message, ack in replies:
            by_inbox.setdefault(inbox, []).append((message, ack))
        commands: list[tuple[Any, ...]] = []
        for inbox, batch in by_inbox.items():
            fields: list[bytes] = []
            for message, _ in batch:
                fields += (b"r", message)
            commands.append(("XADD", inbox, "NOMKSTREAM", "*", *fields))
        by_stream: dict[str, list[bytes]] = {}
        for stream, entry_id in acks:
            by_stream.setdefault(stream, []).append(entry_id)
        for stream, ids in by_stream.items():
            commands.append(("XACK", stream, CONSUMER_GROUP, *ids))
            commands.append(("XDEL", stream, *ids))
        try:
            outcomes = await self.wire.execute_many(self.keys.tasks, commands, return_exceptions=True)
        except BaseException:
            self._replies[:0] = replies  # nothing is known to have been written: keep it all
            self._acks[:0] = acks
            self._ready.set()
            raise
        retry: BaseException | None = None
        for (inbox, batch), outcome in zip(by_inbox.items(), outcomes, strict=False):
            if isinstance(outcome, BaseException) and is_transient(outcome):
                self._replies[:0] = [(inbox, message, ack) for message, ack in batch]
                retry = outcome
                continue
            if isinstance(outcome, BaseException):
                log.error(
                    "worker %s: Redis refused %d result(s) for inbox %s (%s); they are dropped",
                    self.worker_id, len(batch), inbox, describe(outcome),
                )  # fmt: skip
            self._acks += [ack for _, ack in batch if ack is not None]  # written (or refused for good)
        if self._acks:
            self._ready.set()  # their acks go in the next batch
        retry, lost = self._settle_acks(acks, outcomes[len(by_inbox) :], retry)
        if retry is not None:
            self._ready.set()
            raise retry  # the loop backs off, then this runs again
        if lost is not None:
            raise lost  # the loop re-creates the group

    def _settle_acks(
        self, acks: list[Ack], outcomes: list[Any], retry: BaseException | None
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
            by_stream: dict[str, list[bytes]] = {}
            for stream, entry_id in acks:
                by_stream.setdefault(stream, []).append(entry_id)
            for stream, ids in by_stream.items():
                self.on_acked(stream, ids)
        return retry, lost
