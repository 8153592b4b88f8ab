"""Session resources: typed capacity a worker (or host) offers, and amounts a session asks for.

A worker offers, say, ``{"gpu": 2, "scratch_gb": 500}``; a session asks for
``{"gpu": 1}`` and is placed only where every amount fits, atomically with its slot
(the create_session script). Both travel to Redis as text, ``"gpu=1,scratch_gb=100"``,
names sorted: the form the Lua scripts parse (lua/includes/slots.lua).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .errors import ConfigurationError

NAME = re.compile(r"[a-z0-9_.-]+")

Resources = dict[str, int]


def validate(field: str, value: Any) -> Resources:
    """A checked copy of `value` ({} for None), or ConfigurationError naming `field`."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            field, f"must be a mapping of resource name to amount, e.g. {{'gpu': 1}}; got {value!r}"
        )
    out: Resources = {}
    for name, amount in value.items():
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ConfigurationError(
                field, f"resource name {name!r} must be non-empty and use only a-z, 0-9, '_', '.' and '-'"
            )
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 1:
            raise ConfigurationError(field, f"amount of {name!r} must be a positive int; got {amount!r}")
        out[name] = amount
    return dict(sorted(out.items()))


def encode(resources: Mapping[str, int]) -> str:
    """The text form the scripts read: "gpu=1,scratch_gb=100" ("" for none)."""
    return ",".join(f"{name}={amount}" for name, amount in sorted(resources.items()))


def decode(text: str | bytes | None) -> Resources:
    """The mapping of a text form (as stored in Redis); {} for none."""
    if isinstance(text, bytes):
        text = text.decode()
    out: Resources = {}
    for pair in (text or "").split(","):
        name, sep, amount = pair.partition("=")
        if sep and name and amount.isdigit():
            out[name] = int(amount)
    return out


def parse_flag(field: str, items: tuple[str, ...] | list[str]) -> Resources:
    """`--resource gpu=2 --resource scratch_gb=500` as a checked mapping."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, amount = item.partition("=")
        if not sep or not amount.strip().lstrip("-").isdigit():
            raise ConfigurationError(field, f"expected NAME=AMOUNT (e.g. gpu=2); got {item!r}")
        if name.strip() in out:
            raise ConfigurationError(field, f"{name.strip()!r} is given twice; give each resource once")
        out[name.strip()] = int(amount)
    return validate(field, out)
