"""Reading Redis' replies: every command sessionq sends goes through the wire (wire.py) and
comes back as a raw RESP2 value (bytes, int, list, None). These helpers turn the few
structured ones into Python shapes, so no caller indexes into nested lists by hand.
"""

from __future__ import annotations

from typing import Any

StreamEntry = tuple[bytes, dict[bytes, bytes]]


def stream_entries(reply: Any) -> list[StreamEntry]:
    """The entries of a one-stream XREAD/XREADGROUP reply, fields as a dict ({} for an entry
    deleted after it was delivered)."""
    return entries(raw_stream_entries(reply))


def raw_stream_entries(reply: Any) -> list[Any]:
    """The entries of a one-stream XREAD/XREADGROUP reply as sent: [id, [field, value...]]."""
    return reply[0][1] if reply else []


def entries(flat_entries: Any) -> list[StreamEntry]:
    """XRANGE-style entries ([id, [field, value, ...]] each), fields as a dict."""
    return [(entry_id, field_map(flat)) for entry_id, flat in flat_entries or ()]


def field_map(flat: Any) -> dict[bytes, Any]:
    """[field, value, field, value...] (HGETALL, a stream entry, an XINFO row) as a dict."""
    if not flat:
        return {}
    return dict(zip(flat[::2], flat[1::2], strict=True))


def time_ms(reply: Any) -> float:
    """TIME's [seconds, microseconds] in milliseconds."""
    seconds, micros = reply
    return int(seconds) * 1000 + int(micros) / 1000
