"""What travels through Redis: activity tasks on streams, results and grants in inboxes.

The wire format, in one place (the keys themselves: keys.py). Values marked msgpack are
encoded with the task queue's Codec; everything else is plain Redis strings.

Task (msgpack map, the ``d`` field of a stream entry; encode_task / decode_task)::

    i  activity id (str)          n  activity name (str)        a  args (list)
    k  kwargs (map)               t  attempt (int >= 1)         c  client id (str: its inbox)
    s  session id (str | nil)     o  [start_to_close, schedule_to_close, schedule_to_start,
                                      heartbeat_timeout (seconds | nil), retry policy | nil]
    retry policy: [initial_interval, backoff_coefficient, maximum_interval | nil,
                   maximum_attempts, [non-retryable type names]]

Shared stream ``tasks`` entries: ``d`` = task. Read by the consumer group ``workers``.

A worker's own stream ``w:<worker>`` entries, by ``t``::

    a  a session activity         d = task
    o  a session opened here      s = session id, x = execution timeout ms, d = deadline
                                  (ms, Redis' clock), c = owner client id, l = owner_timeout ms
    c  a session ended            s = session id, r = complete | expire | fail | owner,
                                  m = the reason Redis recorded (absent from an earlier
                                  version's entry; empty for complete)
    x  cancel an activity         i = activity id
    h  the registration's first entry (the stream must exist: senders use NOMKSTREAM)

A client's inbox ``inbox:<client>`` entries (inbox.py), by their first field::

    r  results: one or more ``r`` fields, each a msgpack map
           {i: activity id, v: value}  or  {i: activity id, e: [kind, type, message,
           traceback, attempt, timeout_type, non_retryable]} (RemoteError)
    g  a grant: g = session id, w = worker, h = host, d = deadline ms, b = heartbeat ms
    x  a refusal: x = session id, m = reason, k = "lease" (the line dropped a silent
       waiter) or absent (the recreate target died)
    o  the marker open_inbox leaves when it makes the inbox (o = the opening's token)

The waiting line: ``waiters`` (sorted set of session ids, score = order of arrival),
``tickets`` (hash, field ``<sid>:<attribute>``: c client, x exec_ms, d wait deadline,
t target worker, o owner, l owner_ms) and ``deadlines`` (sorted set: ``s:<sid>`` at the
execution deadline of a session whose worker does not end it itself (a host's, an earlier
version's worker's: slots.lua open_session), ``t:<sid>`` at a ticket's wait deadline; the workers'
heartbeat deadlines are in ``beats``, lua/includes/reap.lua). A client's lease
``lease:<client>``: the time of its last renewal (ms, Redis' clock), with a TTL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .codec import Codec, default_codec
from .durations import seconds
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
    """Parse and check a task payload; raises ValueError (or KeyError/TypeError) on a
    malformed one, so a bad entry is moved aside before anything of it runs."""
    body = codec.loads(data)
    if not isinstance(body, dict):
        raise ValueError("task payload is not a map")
    options = body["o"]
    if not isinstance(options, list) or len(options) != 5:
        raise ValueError(f"task options have the wrong shape: {options!r}")
    stc, schtc, sts, hb, rp = options
    args, kwargs = body["a"], body["k"]
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ValueError("task args/kwargs have the wrong shape")
    attempt = body["t"]
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"task attempt must be an int >= 1, got {attempt!r}")
    session_id = body["s"]
    if session_id is not None and not isinstance(session_id, str):
        raise ValueError(f"task session id must be a str, got {session_id!r}")
    if rp is not None and not isinstance(rp, list):
        raise ValueError(f"task retry policy has the wrong shape: {rp!r}")
    return Task(
        activity_id=_text(body["i"], "activity id"),
        name=_text(body["n"], "activity name"),
        args=args,
        kwargs=kwargs,
        attempt=attempt,
        client_id=_text(body["c"], "client id"),
        session_id=session_id,
        start_to_close=seconds("start_to_close_timeout", stc),
        schedule_to_close=seconds("schedule_to_close_timeout", schtc),
        schedule_to_start=seconds("schedule_to_start_timeout", sts),
        heartbeat_timeout=seconds("heartbeat_timeout", hb),
        retry_policy=RetryPolicy.from_wire(rp) if rp else None,
        enqueued_ms=int(stream_id.split(b"-")[0]),
    )


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"task {what} must be a non-empty str, got {value!r}")
    return value


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
    non_retryable: bool = False


def encode_result(codec: Codec, activity_id: str, value: Any, name: str) -> bytes:
    """A success message for an inbox; a result that cannot be encoded, or would not decode
    again (a dict with tuple keys comes back with list keys, which Python cannot hash),
    becomes an error message."""
    return encode_outcome(codec, activity_id, value, name)[0]


def encode_outcome(codec: Codec, activity_id: str, value: Any, name: str) -> tuple[bytes, RemoteError | None]:
    """encode_result, and the error its message carries when the result could not be sent
    (None when it went as it is)."""
    what = f"the result of activity {name!r}"
    try:
        data = codec.dumps({"i": activity_id, "v": value}, what=what)
        codec.loads(data)
    except SerializationError as exc:
        error = RemoteError("SerializationError", "SerializationError", str(exc))
    except Exception as exc:
        error = RemoteError(
            "SerializationError",
            "SerializationError",
            f"{what} encodes but does not decode back ({exc!r}); return plain lists and dicts with "
            "str/int keys, or teach the Codec the type",
        )
    else:
        return data, None
    return encode_error(codec, activity_id, error), error


MAX_ERROR_TEXT = 64 * 1024
"""Longest error message, and traceback, sent to a caller (the rest is cut, and says so)."""


def clean_text(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    """Text that always encodes: lone surrogates replaced, cut to `limit` characters."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8", "replace")
    if len(text) > limit:
        text = f"{text[:limit]}... [{len(text) - limit:,} more characters cut]"
    return text


def encode_error(codec: Codec, activity_id: str, error: RemoteError) -> bytes:
    """An error message for an inbox. Never raises: whatever the activity's exception held,
    its caller is answered (texts cleaned and cut; a codec that still fails gets a minimal
    message naming the problem)."""
    e = error
    body = [
        e.kind, clean_text(e.type, 1000), clean_text(e.message), clean_text(e.traceback), e.attempt,
        e.timeout_type, e.non_retryable,
    ]  # fmt: skip
    try:
        return codec.dumps({"i": activity_id, "e": body}, what="an error report")
    except Exception as exc:  # a custom codec that cannot take even plain strings
        text = f"the error could not be encoded: {exc!r}"
        fallback = [e.kind, "SerializationError", clean_text(text), "", e.attempt, "", True]
        return default_codec.dumps({"i": activity_id, "e": fallback})


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
    """A waiting caller lost its place: its recreate target died, or (kind "lease") the
    line dropped its ticket because its client had stopped renewing its lease."""

    session_id: str
    reason: str
    kind: str = ""


@dataclass(frozen=True)
class Result:
    activity_id: str
    value: Any = None
    error: RemoteError | None = None


def decode_result(codec: Codec, data: bytes) -> Result:
    """Parse one result message (as encode_result / encode_error made it)."""
    body = codec.loads(data)
    if "e" in body:
        k, t, m, tb, att, tt, *rest = body["e"]
        return Result(body["i"], error=RemoteError(k, t, m, tb, att, tt, bool(rest and rest[0])))
    return Result(body["i"], value=body["v"])
