"""What a session is, as callers and activities see it; the recreate token format."""

from __future__ import annotations

import enum
from contextvars import ContextVar
from dataclasses import dataclass, field

import msgpack

from .errors import ConfigurationError
from .keys import host_worker_id
from .resources import validate as validate_resources


class SessionState(str, enum.Enum):
    """Lifecycle of a session: OPEN until its caller completes it or it fails; either end is
    final. A str, so ``state == "OPEN"`` holds, as in ``sessionq inspect --json``."""

    OPEN = "OPEN"
    """Holding its slot: activities sent through it run on its worker."""
    COMPLETED = "COMPLETED"
    """Ended by its caller (``complete()``, leaving its ``with`` block, ``Client.close()``):
    the slot is free again, activities still running there were cancelled."""
    FAILED = "FAILED"
    """Ended without its caller: its worker died or stopped, its execution timeout passed,
    its owner went away, or Redis lost its record; ``SessionInfo.failure`` says which."""


_TOKEN_VERSION = 2
"""2 adds the session's resources; tokens of version 1 (none) are still read."""


@dataclass
class SessionInfo:
    """A session's identity and where it runs: ``session.info`` for its caller,
    ``sessionq.get_session_info()`` inside its activities (the Go SDK's SessionInfo)."""

    session_id: str
    """Unique id of the session."""
    hostname: str
    """Host name of the worker that runs the session."""
    worker_id: str
    """Id of the worker process that runs the session. Inside an activity of a host
    session: the process running that activity; to the caller of a host session: the
    host's placement id, ``host=<host_id>``."""
    task_queue: str
    """Task queue the session was created on."""
    state: SessionState = SessionState.OPEN
    """OPEN, COMPLETED or FAILED; updated as the caller learns of changes."""
    failure: str | None = field(default=None, repr=False)
    """Why the session failed, when it did (e.g. "execution timeout passed"); else None."""
    prefix: str = field(default="sq", repr=False)
    """The key prefix of the client and workers it lives under; the recreate token carries
    it, so a client of another prefix refuses the token."""
    host_id: str | None = None
    """The host the session is placed on, for a worker started with `host_id` (its
    activities run on any live process of that host), else None."""
    resources: dict[str, int] = field(default_factory=dict)
    """The session resources it holds on its worker, e.g. {"gpu": 1} ({}: none)."""

    @property
    def recreate_token(self) -> bytes:
        """Opaque bytes that let `recreate_session` open a new session on the same worker
        (for a host session: on the same host, whichever of its processes live)."""
        target = self.worker_id if self.host_id is None else host_worker_id(self.host_id)
        return encode_token(self.prefix, self.task_queue, target, self.hostname, self.resources)

    def get_recreate_token(self) -> bytes:
        """Alias of `recreate_token`, named as in the Go SDK."""
        return self.recreate_token


@dataclass(frozen=True)
class RecreateToken:
    prefix: str
    task_queue: str
    worker_id: str
    hostname: str
    resources: dict[str, int] = field(default_factory=dict)


def encode_token(
    prefix: str, task_queue: str, worker_id: str, hostname: str, resources: dict[str, int] | None = None
) -> bytes:
    if not resources:  # version 1, which releases before session resources read too
        return bytes(msgpack.packb([1, prefix, task_queue, worker_id, hostname]))
    return bytes(msgpack.packb([_TOKEN_VERSION, prefix, task_queue, worker_id, hostname, dict(resources)]))


def decode_token(token: bytes) -> RecreateToken:
    """Parse a recreate token, or raise ConfigurationError saying what to pass instead."""
    try:
        data = msgpack.unpackb(bytes(token), raw=False)
        version, prefix, task_queue, worker_id, hostname, *rest = data
        if version not in (1, _TOKEN_VERSION) or len(rest) != version - 1:
            raise ValueError(f"token version {version}")
        held = validate_resources("recreate_token", rest[0] if rest else {})
    except Exception:
        raise ConfigurationError(
            "recreate_token",
            "is not a sessionq recreate token; pass session.info.recreate_token unchanged",
        ) from None
    return RecreateToken(prefix, task_queue, worker_id, hostname, held)


#: The caller-side session of the current context (set inside `async with session`).
current_session: ContextVar[SessionInfo | None] = ContextVar("sessionq_session", default=None)
