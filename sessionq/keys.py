"""Every Redis key sessionq uses, built in one place.

All keys of one task queue share the hash tag ``{<queue>}``, so a task queue lives in
one Redis Cluster slot and a Lua script may touch all of its keys; different task
queues spread over the cluster. Scripts that must reach a per-worker or per-session
key they cannot know in advance receive the queue's ``base`` (which carries the hash
tag) and append the same suffixes defined here, so those keys stay in the slot. Those
scripts also declare `guard`, a key that never exists: while the slot is being migrated
Redis then refuses to start them (TRYAGAIN), so none can fail halfway on a key that has
already moved.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass

from .errors import ConfigurationError

DEFAULT_PREFIX = "sq"


def default_prefix() -> str:
    """The key prefix when none is given: $SESSIONQ_PREFIX, else "sq" (as the CLI's --prefix)."""
    return os.environ.get("SESSIONQ_PREFIX") or DEFAULT_PREFIX


CONSUMER_GROUP = "workers"
HOST_MARK = "host="
"""How a host's placement id begins (`host_worker_id`); no worker identity may."""


def host_worker_id(host_id: str) -> str:
    """The id under which a host is placed, counted and watched like one worker: its
    record, heartbeat key, stream and session set are those of this id."""
    return HOST_MARK + host_id


def host_of(worker_id: str) -> str | None:
    """The host id of a host's placement id; None for a worker process's id."""
    return worker_id[len(HOST_MARK) :] if worker_id.startswith(HOST_MARK) else None


def validate_name(kind: str, value: str) -> str:
    """Reject names that would break the key layout (braces, colons, blanks)."""
    if not isinstance(value, str) or not value:
        raise ConfigurationError(kind, f"must be a non-empty string, got {value!r}")
    bad = set(value) & set("{}: \t\r\n")
    if bad:
        raise ConfigurationError(
            kind, f"{value!r} contains {''.join(sorted(bad))!r}; use letters, digits, '-', '_', '.', '@'"
        )
    return value


@dataclass(frozen=True)
class QueueKeys:
    """The keys of one task queue."""

    prefix: str
    task_queue: str

    @property
    def base(self) -> str:
        return f"{self.prefix}:{{{self.task_queue}}}:"

    # -- queue-wide keys ------------------------------------------------------------
    @property
    def tasks(self) -> str:
        """Stream: the shared queue of plain activities (consumer group ``workers``)."""
        return self.base + "tasks"

    @property
    def guard(self) -> str:
        """Never written. Every script that builds keys from `base` declares it among its
        KEYS: while the queue's slot is being migrated (resharding) a declared key that does
        not exist makes Redis refuse to start the script (ASK, then TRYAGAIN, which callers
        retry), so a script never fails halfway on a key that already moved, with some of
        its writes done."""
        return self.base + "guard"

    @property
    def dead(self) -> str:
        """Stream: malformed entries moved aside, for an operator to inspect."""
        return self.base + "dead"

    @property
    def workers(self) -> str:
        """Set: ids of the registered workers of this queue."""
        return self.base + "workers"

    @property
    def free(self) -> str:
        """Sorted set: session workers with a free slot, scored by open sessions."""
        return self.base + "free"

    @property
    def waiters(self) -> str:
        """Sorted set: session ids of callers waiting for a slot, in order of arrival."""
        return self.base + "waiters"

    @property
    def tickets(self) -> str:
        """Hash: the waiting tickets' attributes, one field each, named ``<sid>:<attribute>``
        (c client, x exec_ms, d wait deadline, t target worker, o owner, l owner_ms)."""
        return self.base + "tickets"

    @property
    def deadlines(self) -> str:
        """Sorted set: what is due when, on Redis' clock: ``s:<sid>`` the execution deadline of
        a session its worker does not end itself (a host's; an earlier version's worker's),
        ``t:<sid>`` a ticket's wait deadline (the sweep script acts on them). A worker whose
        record says ``expiry=own`` ends its sessions on its own timer (held.py)."""
        return self.base + "deadlines"

    @property
    def beats(self) -> str:
        """Sorted set, on Redis' clock: ``w:<worker>`` when a worker's heartbeat key expires
        (each beat moves it), ``o:<worker>`` a takeover mark (a reaped worker left entries
        of the shared stream pending), ``scan`` the queue's next audit, ``d`` the earliest
        moment in `deadlines` (so an idle sweep does not look there). The sweep acts on
        what is due (lua/includes/reap.lua)."""
        return self.base + "beats"

    # -- per-worker keys --------------------------------------------------------------
    def worker(self, worker_id: str) -> str:
        """Hash: a worker's registration (host, pid, capacity, open sessions...)."""
        return self.base + "worker:" + worker_id

    def alive(self, worker_id: str) -> str:
        """String with a TTL: present while the worker heartbeats; gone = dead."""
        return self.base + "alive:" + worker_id

    def stream(self, worker_id: str) -> str:
        """Stream: the worker's own queue (session activities, control messages). A host's
        stream holds its sessions' activities only, read through the consumer group
        ``workers`` by the host's processes; their control messages go to each process's."""
        return self.base + "w:" + worker_id

    def worker_sessions(self, worker_id: str) -> str:
        """Set: ids of the open sessions the worker holds."""
        return self.base + "wsessions:" + worker_id

    def host_procs(self, host_id: str) -> str:
        """Set: ids of the worker processes registered as part of host `host_id`."""
        return self.base + "hprocs:" + host_id

    def host_up(self, host_id: str) -> str:
        """String with a TTL: present while some process of the host heartbeats. The host's
        own heartbeat key (`alive` of its placement id) outlives it by restart_grace."""
        return self.base + "up:" + host_id

    def resource_index(self, name: str) -> str:
        """Set: the workers (and hosts) that may take sessions and offer session resource
        `name` (placement with resources looks at these only)."""
        return self.base + "res:" + name

    def host_marks(self, host_id: str) -> str:
        """Set: processes of host `host_id` that were reaped with entries of the host's
        stream pending (takeover marks, read by the host's processes only)."""
        return self.base + "hmarks:" + host_id

    def worker_tickets(self, worker_id: str) -> str:
        """Set: session ids of tickets waiting for this very worker (recreate_session)."""
        return self.base + "wtickets:" + worker_id

    # -- per-session and per-caller keys ---------------------------------------------
    def session(self, session_id: str) -> str:
        """Hash: a session's record (worker, state, deadline, counters)."""
        return self.base + "session:" + session_id

    def inbox(self, client_id: str) -> str:
        """Stream: results and session grants for one client, read by id (inbox.py)."""
        return self.base + "inbox:" + client_id

    def lease(self, client_id: str) -> str:
        """String with a TTL: when the client last showed it was alive (ms, Redis' clock)."""
        return self.base + "lease:" + client_id


def new_id() -> str:
    """A random id for a session, client or activity: 80 bits in 16 characters of [a-z2-7].
    Short because a session's id is stored three times per open session (its record's key,
    its worker's set, the deadline index); unique enough among the ids of a queue's lifetime."""
    return base64.b32encode(os.urandom(10)).decode().lower()


def queues_index(prefix: str) -> str:
    """Set of task-queue names ever served, so `inspect` can list them (outside any tag)."""
    return f"{prefix}:queues"
