"""A private Redis for `sessionq demo` when the user has none: redis-server, else fakeredis.

redis-server runs as a child process on a free loopback port, with no persistence, in
a temporary directory removed afterwards. Without the binary, fakeredis (with its Lua
engine) serves the Redis protocol from a thread of this process, so worker processes
can reach it over TCP just the same.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

BACKENDS = ("redis-server", "fakeredis")


class EmbeddedError(RuntimeError):
    """The embedded server could not start."""


@dataclass
class Embedded:
    """A running embedded server: where it listens, what it is, and how to stop it."""

    url: str
    description: str
    stop: Callable[[], None]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(url: str, timeout: float = 0.5) -> bool:
    import redis

    try:
        with redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout) as client:
            return bool(client.ping())
    except Exception:
        return False


def die_with_parent() -> None:
    """In the child before exec (Linux): get SIGTERM if the demo dies without cleaning up."""
    with contextlib.suppress(Exception):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_redis_server(binary: str, attempts: int = 3, answer_within: float = 10.0) -> Embedded:
    """redis-server on a free loopback port; retried on another port if that one was taken."""
    last = ""
    for _ in range(attempts):
        folder = tempfile.mkdtemp(prefix="sessionq-demo-redis-")
        port = free_port()
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", folder, "--loglevel", "warning", "--protected-mode", "yes"]  # fmt: skip
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + answer_within
        while time.monotonic() < deadline and process.poll() is None and not answers(url):
            time.sleep(0.05)
        if process.poll() is None and answers(url):
            stop = functools.partial(stop_process, process, folder)
            return Embedded(url, f"embedded redis-server on 127.0.0.1:{port}", stop)
        silent = process.poll() is None
        terminate(process)  # running but not answering: stop it, then read what it said
        output = process.stdout.read().decode(errors="replace") if process.stdout else ""
        stop_process(process, folder)
        last = (
            f"it ran but did not answer on 127.0.0.1:{port} within {answer_within:g} s (is the loopback "
            "interface up?)"
            if silent
            else " ".join(output.split())[-300:] or f"exit code {process.returncode}"
        )
    raise EmbeddedError(f"redis-server did not start: {last}")


def terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 5 s; returns once it exited."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def stop_process(process: subprocess.Popen[bytes], folder: str) -> None:
    terminate(process)
    if process.stdout is not None:
        process.stdout.close()
    shutil.rmtree(folder, ignore_errors=True)


def error_tolerant_handler() -> type | None:
    """fakeredis' TCP handler, minus its habit of closing the connection after an error reply.

    fakeredis 2.40's TcpFakeServer hangs up after any error reply (NOSCRIPT, BUSYGROUP...;
    cunla/fakeredis-py#432), which breaks redis-py's script loading on the next command.
    A real server keeps the connection: send the error and carry on. (Same as the tests'.)
    """
    try:
        import redis
        from fakeredis._clients._tcp_server import TCPFakeRequestHandler
    except ImportError:
        return None

    class Handler(TCPFakeRequestHandler):  # type: ignore[misc, valid-type]
        def setup(self) -> None:
            super().setup()
            read = self.current_client.read_response

            def read_response(**kwargs: object) -> object:
                try:
                    return read(**kwargs)
                except redis.ResponseError as exc:  # a reply to send, not a reason to hang up
                    return exc

            self.current_client.read_response = read_response

    return Handler


def start_fakeredis() -> Embedded:
    """A fakeredis TCP server (Lua included) in a daemon thread of this process."""
    try:
        from fakeredis import TcpFakeServer
    except ImportError as exc:  # pragma: no cover - fakeredis is a dependency
        raise EmbeddedError(f"fakeredis is not installed ({exc}); pip install 'fakeredis[lua]'") from exc
    server = TcpFakeServer(("127.0.0.1", 0), server_type="redis")
    handler = error_tolerant_handler()
    if handler is not None:
        server.RequestHandlerClass = handler
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="sessionq-demo-fakeredis", daemon=True)
    thread.start()
    port = server.server_address[1]

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return Embedded(
        f"redis://127.0.0.1:{port}/0", f"embedded fakeredis on 127.0.0.1:{port} (in-process)", stop
    )


def start_embedded(backend: str | None = None) -> Embedded:
    """Start the chosen backend, or redis-server when its binary exists, else fakeredis."""
    binary = shutil.which("redis-server")
    if backend == "redis-server" and binary is None:
        raise EmbeddedError("no redis-server binary on PATH; use --embedded-backend fakeredis")
    if backend == "redis-server" or (backend is None and binary is not None):
        assert binary is not None
        return start_redis_server(binary)
    return start_fakeredis()
