"""Loads the Lua scripts (one file per atomic operation) and calls them by name.

A script file may pull in a shared fragment with a line ``-- @include NAME``
(from ``lua/includes/NAME.lua``). Scripts run by SHA over the hot-path connections
(wire.py); a server that does not know a script yet (NOSCRIPT: first use, a restart, another
cluster node) gets it through one EVAL, which also caches it there.
"""

from __future__ import annotations

import hashlib
import re
from functools import cache
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

from .wire import Wire

_INCLUDE = re.compile(r"^-- @include (\w+)\s*$", re.MULTILINE)


@cache
def source(name: str) -> str:
    """The full text of script `name` (e.g. "create_session"), includes expanded."""
    folder = resources.files("sessionq") / "lua"
    matches = [p for p in folder.iterdir() if p.name.startswith(name + "-") and p.name.endswith(".lua")]
    if len(matches) != 1:
        raise LookupError(f"no single Lua script named {name!r} in sessionq/lua")
    text = matches[0].read_text()
    return _INCLUDE.sub(lambda m: (folder / "includes" / f"{m.group(1)}.lua").read_text(), text)


class Scripts:
    """The scripts, run by name over one Client's or Worker's Wire."""

    NAMES = (
        "create_session",
        "cancel_wait",
        "end_session",
        "register_worker",
        "heartbeat",
        "reap_worker",
        "claim_orphans",
        "open_inbox",
    )

    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self._sources = {name: source(name) for name in self.NAMES}
        self._shas = {name: hashlib.sha1(text.encode()).hexdigest() for name, text in self._sources.items()}

    async def run(self, name: str, keys: list[str], args: list[Any], *, timeout: float | None = None) -> Any:
        """Run script `name`: EVALSHA, or EVAL when the server does not have it yet.
        `timeout` may shorten the wait for the reply (see Wire.execute)."""
        wire = self.wire
        try:
            return await wire.execute(
                keys[0], "EVALSHA", self._shas[name], len(keys), *keys, *args, timeout=timeout
            )
        except ResponseError as exc:
            if not isinstance(exc, NoScriptError) and not str(exc).startswith("NOSCRIPT"):
                raise
        return await wire.execute(
            keys[0], "EVAL", self._sources[name], len(keys), *keys, *args, timeout=timeout
        )

    async def open_inbox(self, inbox: str, ttl_ms: int) -> bool:
        """Make `inbox` if missing and renew its TTL; True when it was made now."""
        return bool(await self.run("open_inbox", [inbox], [ttl_ms]))
