"""The host lists of multi-node URLs (``redis+cluster://``, ``redis+sentinel://``)."""

from __future__ import annotations

from urllib.parse import urlsplit

from .errors import ConfigurationError


def host_list(
    url: str, hosts: str, scheme: str, default_port: int, form: str, noun: str = "node"
) -> list[tuple[str, int]]:
    """``h1:1,h2`` -> [(h1, 1), (h2, default_port)]; a clear error naming `url` (its
    password hidden) and the expected `form` for anything else."""
    nodes: list[tuple[str, int]] = []
    for part in hosts.split(","):
        if not part.strip():
            continue
        parsed = urlsplit(f"{scheme}://{part.strip()}")
        try:
            port = parsed.port or default_port
        except ValueError as exc:
            raise ConfigurationError("redis", f"{shown(url)}: bad port in {part!r}") from exc
        if not parsed.hostname:
            raise ConfigurationError("redis", f"{shown(url)}: no host in {part!r}")
        nodes.append((parsed.hostname, port))
    if not nodes:
        raise ConfigurationError("redis", f"{shown(url)} names no {noun}; use {form}")
    return nodes


def shown(url: str) -> str:
    """`url` quoted for a message, its password hidden."""
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    return repr(url if password is None else url.replace(f":{password}@", ":***@", 1))
