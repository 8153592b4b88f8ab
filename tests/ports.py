"""Loopback ports for the servers the tests start, reserved across every test process on
this machine until the server is stopped for good.

Why: a test that SIGKILLs a server (a cluster master, a Sentinel primary, a Redis it will
restart) leaves clients that keep dialling that port for seconds. The kernel may hand the
freed port to another test process, whose fresh, empty redis-server then answers those
clients: every key reads as missing, and the test sees "Redis lost its data" that no
Redis lost. So a port is taken with a lock only test processes look at: an abstract Unix
socket named after it (Linux; the kernel drops it when the process dies, so nothing is
left behind). Elsewhere the reservation is a no-op and the old race stays.
"""

from __future__ import annotations

import socket
import sys
import threading

_LOCK_PREFIX = b"\0sessionq-test-port-"
_held: dict[int, socket.socket] = {}
_guard = threading.Lock()
_CAN_LOCK = sys.platform.startswith("linux")


def reserve_port() -> int:
    """A free loopback port, reserved until `release` (or this process ends)."""
    return reserve_ports(1)[0]


def reserve_ports(count: int, *, bus_offset: int | None = None) -> list[int]:
    """`count` distinct free loopback ports, reserved until released. With `bus_offset`
    (a Redis Cluster node's bus port is its port + 10000), port + offset is free and
    reserved too, and is released with its port."""
    ports: list[int] = []
    while len(ports) < count:
        port = _kernel_pick()
        if bus_offset is not None and (port + bus_offset > 65535 or not _bindable(port + bus_offset)):
            continue
        if port in ports or not _lock(port):
            continue
        if bus_offset is not None and not _lock(port + bus_offset):
            release(port)
            continue
        ports.append(port)
    return ports


def release(*ports: int, bus_offset: int | None = None) -> None:
    """Give the ports back (their servers are stopped for good). Idempotent."""
    with _guard:
        for port in ports:
            for held in (port, None if bus_offset is None else port + bus_offset):
                sock = _held.pop(held, None) if held is not None else None
                if sock is not None:
                    sock.close()


def _kernel_pick() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _lock(port: int) -> bool:
    """Take `port`'s lock; False when another test process (or this one) holds it."""
    if not _CAN_LOCK:
        return True
    with _guard:
        if port in _held:
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(_LOCK_PREFIX + str(port).encode())
        except OSError:
            sock.close()
            return False
        _held[port] = sock
        return True
