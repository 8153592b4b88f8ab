"""tests/ports.py: a port one test process reserved is never handed to another, until
released, so a server a test killed cannot be replaced on its port by another test's
empty server while clients still dial it (the CI failure of 2026-12-07: a failover test's
client read "its record is gone" from a stranger on the dead master's port)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests import ports
from tests.ports import release, reserve_port, reserve_ports

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux's")

REPO_ROOT = Path(__file__).resolve().parent.parent


def taken_by_another_process(*ports: int) -> list[bool]:
    """For each port: could a second test process NOT reserve it right now?"""
    code = (
        "import sys\nfrom tests.ports import _lock\n"
        "print(' '.join('0' if _lock(int(p)) else '1' for p in sys.argv[1:]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, ports)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return [flag == "1" for flag in done.stdout.split()]


def test_a_reserved_port_is_refused_to_other_processes_until_released() -> None:
    port = reserve_port()
    try:
        assert taken_by_another_process(port) == [True]
    finally:
        release(port)
    assert taken_by_another_process(port) == [False]


def test_cluster_ports_reserve_their_bus_ports_too() -> None:
    ports = reserve_ports(3, bus_offset=10000)
    try:
        assert len(set(ports)) == 3
        assert taken_by_another_process(*ports, *(p + 10000 for p in ports)) == [True] * 6
    finally:
        release(*ports, bus_offset=10000)
    assert taken_by_another_process(*ports, *(p + 10000 for p in ports)) == [False] * 6


def test_a_port_held_elsewhere_is_never_handed_out_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process holds a port and the kernel offers it here: it is passed over."""
    held = reserve_port()
    release(held)
    code = (
        "import sys, time\nfrom tests.ports import _lock\n"
        "assert _lock(int(sys.argv[1]))\nprint('held', flush=True)\ntime.sleep(60)"
    )
    other = subprocess.Popen(
        [sys.executable, "-c", code, str(held)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "held"
        offers = iter([held, held])  # the kernel offers the held port twice, then any
        real_pick = ports._kernel_pick
        monkeypatch.setattr(ports, "_kernel_pick", lambda: next(offers, None) or real_pick())
        got = reserve_port()
        release(got)
        assert got != held
    finally:
        other.kill()
        other.wait(timeout=10)
