"""`sessionq worker MODULE:ATTR`: run a worker process, like `celery -A app worker` or `arq`."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Coroutine
from typing import Any

import click
from redis.exceptions import RedisError

import sessionq
from sessionq import resources as sessionq_resources
from sessionq.errors import ConfigurationError

from .common import (
    CliError,
    configure_logging,
    logging_options,
    one_line,
    prefix_option,
    redact,
    redis_url_from,
    redis_url_option,
    require_redis,
)
from .supervisor import Supervisor

log = logging.getLogger("sessionq.cli")

PARENT_POLL_INTERVAL = 0.5


IMPORT_FRAMES = 3
"""How many of the last frames of a failed import are shown."""


def where_raised(exc: BaseException) -> str:
    """The last frames of the user's code that raised `exc` while importing (file, line,
    function, source line), under the error line; importlib's own frames are left out."""
    frames = [
        frame for frame in traceback.extract_tb(exc.__traceback__)
        if "importlib" not in frame.filename and frame.filename != __file__
    ]  # fmt: skip
    lines = []
    for frame in frames[-IMPORT_FRAMES:]:
        lines.append(f"\n  {frame.filename}:{frame.lineno}, in {frame.name}")
        if frame.line:
            lines.append(f"\n    {frame.line}")
    if isinstance(exc, SyntaxError) and exc.filename:
        lines.append(f"\n  {exc.filename}:{exc.lineno}" + (f"\n    {exc.text.strip()}" if exc.text else ""))
    return "".join(lines)


def load_target(spec: str) -> Any:
    """Import MODULE:ATTR with the current directory importable; one-line errors (exit 2)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"expected MODULE:ATTR (e.g. myapp.worker:worker), got {spec!r}", 2)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise CliError(
                f"cannot import {module_name!r}: no module named {exc.name!r} "
                f"(searched the current directory {os.getcwd()} and sys.path)",
                2,
            ) from None
        raise CliError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {one_line(exc)}{where_raised(exc)}", 2
        ) from None
    except Exception as exc:
        raise CliError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {one_line(exc)}{where_raised(exc)}", 2
        ) from None
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise CliError(f"module {module_name!r} has no attribute {attr!r}", 2) from None
    return target


def as_activities(target: Any, spec: str) -> list[Any]:
    """A list of activities from ATTR (a list, tuple or set of functions)."""
    if isinstance(target, (list, tuple, set, frozenset)):
        items = list(target)
        if items and all(callable(item) for item in items):
            return items
    raise CliError(
        f"{spec} is a {type(target).__name__}; expected a sessionq.Worker or a list of activities", 2
    )


def build_worker(target: Any, spec: str, overrides: dict[str, Any]) -> sessionq.Worker:
    """The Worker to run: ATTR itself when no flag changes it, else one rebuilt with the flags.

    `overrides` holds only the flags the user gave (Worker keyword names). A Worker from
    MODULE:ATTR keeps all its own settings (activities, codec, grace...) except those.
    """
    if isinstance(target, sessionq.Worker):
        if not overrides:
            return target
        settings = settings_of(target)
    else:
        settings = {"activities": as_activities(target, spec), "enable_sessions": True}
        if "task_queue" not in overrides:
            raise CliError(f"{spec} is a list of activities: --task-queue is required", 2)
    settings.update(overrides)
    try:
        return sessionq.Worker(settings.pop("redis", None), **settings)
    except ConfigurationError as exc:
        raise CliError(f"invalid worker option {exc}", 2) from None


def settings_of(worker: sessionq.Worker) -> dict[str, Any]:
    """The constructor arguments a Worker was built with (it keeps them as attributes)."""
    return {
        "redis": worker._redis_target,
        "task_queue": worker.task_queue,
        "activities": [d.fn for d in worker.registry.values()],
        "enable_sessions": worker.enable_sessions,
        "max_concurrent_sessions": worker.max_concurrent_sessions,
        "max_concurrent_activities": worker.max_concurrent_activities,
        "identity": worker.worker_id,
        "heartbeat_timeout": worker.heartbeat_timeout,
        "shutdown_grace": worker.shutdown_grace,
        "prefix": worker.prefix,
        "codec": worker.codec,
        "retention": worker.retention_ms / 1000,
        "host_id": worker.host_id,
        "restart_grace": worker.restart_grace,
        "session_resources": worker.session_resources,
        "metrics_registry": worker.metrics_registry,
    }


def overrides_from(
    *,
    redis_url: str | None,
    task_queue: str | None,
    max_sessions: int | None,
    concurrency: int | None,
    identity: str | None,
    heartbeat_timeout: float | None,
    shutdown_grace: float | None,
    sessions: bool | None,
    prefix: str | None,
    host_id: str | None = None,
    restart_grace: float | None = None,
    session_resources: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Worker keyword arguments for the flags that were given (None = not given)."""
    given: dict[str, Any] = {
        "session_resources": session_resources,
        "host_id": host_id,
        "restart_grace": restart_grace,
        "redis": redis_url,
        "task_queue": task_queue,
        "max_concurrent_activities": concurrency,
        "identity": identity,
        "heartbeat_timeout": heartbeat_timeout,
        "shutdown_grace": shutdown_grace,
        "enable_sessions": sessions,
        "prefix": prefix,
    }
    out = {key: value for key, value in given.items() if value is not None}
    if host_id is not None or session_resources:
        out.setdefault("enable_sessions", True)
    if max_sessions is not None:
        out["max_concurrent_sessions"] = max_sessions or None  # 0 = unlimited
        out.setdefault("enable_sessions", True)
    return out


class Stopper:
    """Signal handling: first SIGTERM/SIGINT stops gracefully, a second SIGINT exits at once."""

    def __init__(self, worker: sessionq.Worker) -> None:
        self.worker = worker
        self.requested = False

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGTERM, self.on_signal, signal.SIGTERM)
        loop.add_signal_handler(signal.SIGINT, self.on_signal, signal.SIGINT)

    def on_signal(self, signum: int) -> None:
        if self.requested:
            if signum == signal.SIGINT:
                print("second interrupt: exiting at once", file=sys.stderr, flush=True)
                os._exit(130)
            return
        self.requested = True
        name = signal.Signals(signum).name
        log.warning(
            "%s: stopping worker %s gracefully (running activities, session ones too, get up to "
            "%gs to finish and nothing new is taken; then %s)%s",
            name,
            self.worker.worker_id,
            self.worker.shutdown_grace,
            "the sessions it holds fail"
            if self.worker.host_id is None
            else f"host {self.worker.host_id}'s sessions stay open for its other processes",
            "; press Ctrl-C again to exit at once" if signum == signal.SIGINT else "",
        )
        self.worker.stop()


async def wait_registered(worker: sessionq.Worker, runner: asyncio.Task[None]) -> None:
    """Return once the worker runs (re-raising a start-up error from `runner`)."""
    started = asyncio.create_task(worker.wait_started(timeout=60))
    try:
        await asyncio.wait({runner, started}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        started.cancel()
    if runner.done():
        runner.result()


async def watch_parent(worker: sessionq.Worker, parent_pid: int) -> None:
    """Stop when the process that started us is gone (used by `sessionq demo`)."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(PARENT_POLL_INTERVAL)
    log.warning("parent process %d is gone; stopping", parent_pid)
    worker.stop()


async def serve(worker: sessionq.Worker, burst: bool, stop_with_parent: bool) -> None:
    """Run the worker until a signal, or (burst) until there is nothing left to do."""
    stopper = Stopper(worker)
    stopper.install(asyncio.get_running_loop())
    parent = os.getppid()
    runner = asyncio.create_task(worker.run(burst=burst), name="sessionq-worker")
    await wait_registered(worker, runner)
    if stopper.requested:  # a signal that came before run() could take it
        worker.stop()
    watcher = asyncio.create_task(watch_parent(worker, parent)) if stop_with_parent else None
    try:
        await runner
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


def describe(worker: sessionq.Worker, loop_name: str = "asyncio") -> str:
    target = worker._redis_target
    where = redact(target) if isinstance(target, str) else type(target).__name__
    return (
        f"sessionq worker {worker.worker_id} on task queue {worker.task_queue!r} "
        f"(redis {where}, prefix {worker.prefix!r}, {loop_name} event loop); "
        f"activities: {', '.join(sorted(worker.registry))}"
    )


Runner = Callable[[Coroutine[Any, Any, None]], None]


def event_loop(choice: str) -> tuple[str, Runner]:
    """The event loop to run the worker on: uvloop (about 15% less CPU per activity) when
    it is installed or asked for, else asyncio's own."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise CliError(
                    "--loop uvloop needs uvloop, which is not installed: pip install 'sessionq[fast]'", 2
                ) from None
        else:
            return "uvloop", uvloop.run
    return "asyncio", asyncio.run


def prometheus_registry() -> Any:
    """prometheus_client's default registry, or a one-line error saying what to install."""
    try:
        import prometheus_client
    except ImportError:
        raise CliError("--metrics-port needs prometheus-client: pip install 'sessionq[metrics]'", 2) from None
    return prometheus_client.REGISTRY


def serve_metrics(port: int, addr: str) -> None:
    """/metrics on ADDR:PORT, from a thread of prometheus_client's; one line if it cannot listen."""
    import prometheus_client

    try:
        prometheus_client.start_http_server(port, addr)
    except OSError as exc:
        raise CliError(f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}", 1) from None
    log.info("metrics on http://%s:%d/metrics", addr, port)


def run_worker(
    worker: sessionq.Worker,
    burst: bool,
    stop_with_parent: bool,
    loop: str = "auto",
    wait_for_redis: float = 0.0,
) -> None:
    """Check Redis (waiting up to `wait_for_redis` s for it), run the worker, and turn
    start-up failures into one-line errors."""
    target = worker._redis_target
    if isinstance(target, str):
        require_redis(target, wait_for_redis)
    loop_name, run = event_loop(loop)
    log.info("%s", describe(worker, loop_name))
    try:
        run(serve(worker, burst, stop_with_parent))
    except ConfigurationError as exc:
        raise CliError(str(exc), 2) from None
    except (ConnectionError, OSError, RedisError, sessionq.RedisUnavailableError) as exc:
        raise CliError(f"Redis failed while the worker started: {one_line(exc)}", 1) from None


@click.command("worker")
@click.argument("target", metavar="MODULE:ATTR")
@redis_url_option
@click.option(
    "-Q",
    "--task-queue",
    metavar="Q",
    default=None,
    help="Task queue to serve (required when ATTR is a list of activities).",
)
@click.option(
    "--max-sessions",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="Most sessions open at once on this worker; 0 = unlimited. Implies --sessions.",
)
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Most activities running at once [default: the Worker's, else 100].",
)
@click.option(
    "-n",
    "--identity",
    metavar="ID",
    default=None,
    help="Worker id, unique per task queue [default: <pid>@<hostname>].",
)
@click.option(
    "--heartbeat-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Silent this long = declared dead; its sessions fail [default: 10].",
)
@click.option(
    "--shutdown-grace",
    type=click.FloatRange(min=0),
    default=None,
    metavar="SECONDS",
    help="On SIGTERM, how long running activities (session ones too) may take to finish; nothing "
    "new is taken meanwhile, then what still runs is cancelled and the worker's sessions fail "
    "[default: 30].",
)
@click.option(
    "--sessions/--no-sessions",
    default=None,
    help="Take worker sessions [default: on for a list of activities, else the Worker's].",
)
@click.option(
    "--host-id",
    metavar="ID",
    default=None,
    help="Join host ID: processes of a task queue with the same host id share one session limit "
    "(--max-sessions counts the host's sessions) and the host's sessions survive the death or "
    "restart of any of them [default: none; the machine's hostname with --processes]. Implies --sessions.",
)
@click.option(
    "--restart-grace",
    type=click.FloatRange(min=0),
    default=None,
    metavar="SECONDS",
    help="With --host-id: how long the host's sessions stay open once none of its processes "
    "lives, for one to come back [default: 30].",
)
@click.option(
    "--resource",
    "resource_flags",
    metavar="NAME=AMOUNT",
    multiple=True,
    help="Session resources this worker (or its host) offers, e.g. --resource gpu=2 --resource "
    "scratch_gb=500 (repeatable); sessions asking for them are placed where they fit. Implies --sessions.",
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Run N worker processes of one host (--host-id) under a supervisor that restarts one "
    "that dies and stops them all gracefully on SIGTERM/Ctrl-C.",
)
@click.option("--burst", is_flag=True, help="Exit once the queue is empty and no session is open.")
@click.option(
    "--loop",
    type=click.Choice(["auto", "asyncio", "uvloop"]),
    default="auto",
    show_default=True,
    help="Event loop: auto = uvloop when installed (pip install 'sessionq[fast]').",
)
@prefix_option(None)
@click.option(
    "--stop-with-parent",
    is_flag=True,
    hidden=True,
    help="Stop when the parent process exits (for `sessionq demo`).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=1, max=65535),
    default=None,
    metavar="N",
    help="Serve Prometheus metrics on http://ADDR:N/metrics (pip install 'sessionq[metrics]'); "
    "with --processes, process i serves on N+i-1.",
)
@click.option(
    "--metrics-addr",
    default="0.0.0.0",
    show_default=True,
    metavar="ADDR",
    help="Address the metrics server listens on.",
)
@click.option(
    "--wait-for-redis",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="Redis not up yet at start: try again with backoff for this long before giving up (0 = not at all).",
)
@logging_options("INFO")
def worker_command(
    target: str,
    redis_url: str | None,
    cluster: bool,
    task_queue: str | None,
    max_sessions: int | None,
    concurrency: int | None,
    identity: str | None,
    heartbeat_timeout: float | None,
    shutdown_grace: float | None,
    sessions: bool | None,
    host_id: str | None,
    restart_grace: float | None,
    resource_flags: tuple[str, ...],
    processes: int | None,
    burst: bool,
    loop: str,
    prefix: str | None,
    stop_with_parent: bool,
    metrics_port: int | None,
    metrics_addr: str,
    wait_for_redis: float,
    log_level: str | None,
    log_format: str,
    verbose: int,
    quiet: int,
) -> None:
    """Run a worker for MODULE:ATTR until SIGTERM or Ctrl-C.

    ATTR is a sessionq.Worker (its settings apply; flags given here override them) or a
    list of activities (then the flags build the worker, with sessions on). The current
    directory is importable, so `sessionq worker myapp:worker` finds ./myapp.py.

    \b
    SIGTERM / Ctrl-C: stop taking work, fail this worker's open sessions at once (their
    callers get SessionFailedError now, not after the heartbeat timeout), let running
    activities finish within --shutdown-grace, deregister, exit 0. A second Ctrl-C exits
    at once.

    \b
    With --host-id the sessions belong to the host, not this process: SIGTERM hands them
    to the host's other processes (or to the one that replaces this one within
    --restart-grace) instead of failing them.

    \b
    Examples:
      sessionq worker myapp.worker:worker
      sessionq worker myapp.activities:ALL -Q fileprocessing --max-sessions 4
      sessionq worker myapp.worker:worker --processes 4 --max-sessions 8
    """
    loaded = load_target(target)
    if cluster or (redis_url is None and not isinstance(loaded, sessionq.Worker)):
        redis_url = redis_url_from(redis_url, cluster)
    if processes is not None and host_id is None:
        host_id = socket.gethostname()
    try:
        offered = sessionq_resources.parse_flag("--resource", resource_flags) if resource_flags else None
    except ConfigurationError as exc:
        raise CliError(f"invalid worker option {exc}", 2) from None
    overrides = overrides_from(
        redis_url=redis_url,
        task_queue=task_queue,
        max_sessions=max_sessions,
        concurrency=concurrency,
        identity=identity,
        heartbeat_timeout=heartbeat_timeout,
        shutdown_grace=shutdown_grace,
        sessions=sessions,
        prefix=prefix,
        host_id=host_id,
        restart_grace=restart_grace,
        session_resources=offered,
    )
    if metrics_port is not None and processes is None:
        overrides["metrics_registry"] = prometheus_registry()
    worker = build_worker(loaded, target, overrides)  # checks the options before any process starts
    # Not before: the errors above stay one line.
    configure_logging(log_level, verbose, quiet, default="INFO", log_format=log_format)
    if processes is None:
        if metrics_port is not None:
            serve_metrics(metrics_port, metrics_addr)
        run_worker(worker, burst, stop_with_parent, loop, wait_for_redis)
        return
    if isinstance(worker._redis_target, str):
        require_redis(worker._redis_target, wait_for_redis)
    flags = {
        "--redis-url": redis_url,
        "--task-queue": task_queue,
        "--max-sessions": max_sessions,
        "--concurrency": concurrency,
        "--heartbeat-timeout": heartbeat_timeout,
        "--shutdown-grace": shutdown_grace,
        "--host-id": worker.host_id,
        "--restart-grace": restart_grace,
        "--loop": loop,
        "--prefix": prefix,
        "--log-level": log_level,
        "--log-format": log_format,
        "--wait-for-redis": wait_for_redis,
    }
    common = [target]
    for flag, value in flags.items():
        if value is not None:
            common += [flag, str(value)]
    if cluster:
        common.append("--cluster")
    for item in resource_flags:
        common += ["--resource", item]
    if sessions is not None:
        common.append("--sessions" if sessions else "--no-sessions")
    if burst:
        common.append("--burst")
    common += ["-v"] * verbose + ["-q"] * quiet + ["--stop-with-parent"]

    def argv_for(number: int, generation: int) -> list[str]:
        # A replacement gets an identity of its own: its predecessor's heartbeat key may
        # still be alive (a SIGKILLed process's lives on for its heartbeat_timeout).
        named = ["--identity", f"{identity}-{number}" + (f".{generation}" if generation > 1 else "")]
        metrics = [] if metrics_port is None else ["--metrics-port", str(metrics_port + number - 1),
                                                   "--metrics-addr", metrics_addr]  # fmt: skip
        own = [*(named if identity else []), *metrics]
        return [sys.executable, "-m", "sessionq.cli", "worker", *common, *own]

    log.info(
        "supervising %d worker processes of host %s on task queue %r",
        processes,
        worker.host_id,
        worker.task_queue,
    )
    supervisor = Supervisor(processes, argv_for, worker.shutdown_grace, burst=burst)
    supervisor.install()
    sys.exit(supervisor.run())
