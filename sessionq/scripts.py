"""Loads the Lua scripts (one file per atomic operation) and calls them by name.

A script file may pull in a shared fragment with a line ``-- @include NAME``
(from ``lua/includes/NAME.lua``). Scripts are sent once and then run by SHA; redis-py
reloads a script the server has forgotten (NOSCRIPT) by itself.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import Any

from redis.commands.core import AsyncScript

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
    """The scripts bound to one Redis client; attribute access by script name."""

    NAMES = (
        "create_session",
        "cancel_wait",
        "end_session",
        "register_worker",
        "heartbeat",
        "reap_worker",
        "claim_orphans",
    )

    def __init__(self, redis: Any) -> None:
        self._scripts: dict[str, AsyncScript] = {
            name: redis.register_script(source(name)) for name in self.NAMES
        }

    async def run(self, name: str, keys: list[str], args: list[Any], client: Any = None) -> Any:
        """Run script `name` (EVALSHA, loading it on NOSCRIPT)."""
        return await self._scripts[name](keys=keys, args=args, client=client)
