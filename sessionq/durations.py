"""Durations: every option takes float seconds or a timedelta."""

from __future__ import annotations

from datetime import timedelta

from .errors import ConfigurationError

Duration = float | int | timedelta

MAX_DURATION = 10 * 365 * 24 * 3600.0
"""Ten years: every duration travels to Redis in milliseconds, and Lua prints numbers past
1e14 in exponent form, which would break the scripts that read them back."""


def seconds(field: str, value: Duration | None, *, optional: bool = True) -> float | None:
    """Return `value` in seconds, or raise ConfigurationError naming `field`."""
    if value is None:
        if optional:
            return None
        raise ConfigurationError(field, "is required")
    if isinstance(value, timedelta):
        result = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(field, f"must be seconds (float) or a timedelta, got {value!r}")
    else:
        result = float(value)
    if not result > 0 or result != result or result == float("inf"):
        raise ConfigurationError(field, f"must be a positive, finite duration, got {value!r}")
    if result > MAX_DURATION:
        raise ConfigurationError(field, f"must be at most {MAX_DURATION:,.0f} s (ten years), got {value!r}")
    return result


def to_ms(value: float | None) -> int:
    """Seconds to whole milliseconds for Redis; 0 means 'no limit'."""
    return 0 if value is None else max(1, int(value * 1000))
