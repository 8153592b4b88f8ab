"""What travels through Redis: activity tasks on streams, results and grants in inboxes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .codec import Codec
from .errors import SerializationError
from .options import ActivityOptions, RetryPolicy


@dataclass
class Task:
    """One activity execution request, as a worker reads it."""

    activity_id: str
    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    attempt: int
    client_id: str
    session_id: str | None
    start_to_close: float | None = None
    schedule_to_close: float | None = None
    schedule_to_start: float | None = None
    heartbeat_timeout: float | None = None
    retry_policy: RetryPolicy | None = None
    enqueued_ms: int = 0
    """When the task was queued, on Redis' clock (from the stream entry id)."""
    stream_id: bytes = b""
    delivery_count: int = field(default=1)


def encode_task(
    codec: Codec,
    *,
    activity_id: str,
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    client_id: str,
    session_id: str | None,
    options: ActivityOptions,
    attempt: int = 1,
) -> bytes:
    """The task payload; raises SerializationError before anything is sent."""
    rp = options.retry_policy
    body = {
        "i": activity_id,
        "n": name,
        "a": list(args),
        "k": kwargs,
        "t": attempt,
        "c": client_id,
        "s": session_id,
        "o": [
            options.start_to_close_timeout,
            options.schedule_to_close_timeout,
            options.schedule_to_start_timeout,
            options.heartbeat_timeout,
            rp.to_wire() if rp else None,
        ],
    }
    return codec.dumps(body, what=f"the arguments of activity {name!r}")


def decode_task(codec: Codec, data: bytes, stream_id: bytes) -> Task:
    """Parse a task payload; raises ValueError/KeyError/TypeError on a malformed one."""
    body = codec.loads(data)
    if not isinstance(body, dict):
        raise ValueError("task payload is not a map")
    stc, schtc, sts, hb, rp = body["o"]
    args, kwargs = body["a"], body["k"]
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ValueError("task args/kwargs have the wrong shape")
    return Task(
        activity_id=str(body["i"]),
        name=str(body["n"]),
        args=args,
        kwargs=kwargs,
        attempt=int(body["t"]),
        client_id=str(body["c"]),
        session_id=body["s"],
        start_to_close=stc,
        schedule_to_close=schtc,
        schedule_to_start=sts,
        heartbeat_timeout=hb,
        retry_policy=RetryPolicy.from_wire(rp) if rp else None,
        enqueued_ms=int(stream_id.split(b"-")[0]),
        stream_id=stream_id,
    )


@dataclass(frozen=True)
class RemoteError:
    """A failure as the worker reports it: which sessionq error, and the remote details."""

    kind: str
    """"ApplicationError" or the name of a sessionq error class (REMOTE_ERRORS)."""
    type: str
    message: str
    traceback: str = ""
    attempt: int = 1
    timeout_type: str = ""


def encode_result(codec: Codec, activity_id: str, value: Any, name: str) -> bytes:
    """A success message for an inbox; an unencodable result becomes an error message."""
    try:
        return codec.dumps({"i": activity_id, "v": value}, what=f"the result of activity {name!r}")
    except SerializationError as exc:
        return encode_error(
            codec, activity_id, RemoteError("SerializationError", "SerializationError", str(exc))
        )


def encode_error(codec: Codec, activity_id: str, error: RemoteError) -> bytes:
    e = error
    return codec.dumps(
        {"i": activity_id, "e": [e.kind, e.type, e.message, e.traceback, e.attempt, e.timeout_type]}
    )


@dataclass(frozen=True)
class Grant:
    """A waiting caller got a session slot (pushed by a Lua script)."""

    session_id: str
    worker_id: str
    hostname: str
    deadline_ms: int
    hb_ms: int


@dataclass(frozen=True)
class Refusal:
    """A waiting caller cannot get its slot (recreate target died)."""

    session_id: str
    reason: str


@dataclass(frozen=True)
class Result:
    activity_id: str
    value: Any = None
    error: RemoteError | None = None


def decode_result(codec: Codec, data: bytes) -> Result:
    """Parse one result message (as encode_result / encode_error made it)."""
    body = codec.loads(data)
    if "e" in body:
        k, t, m, tb, att, tt = body["e"]
        return Result(body["i"], error=RemoteError(k, t, m, tb, att, tt))
    return Result(body["i"], value=body["v"])
