"""`sessionq inspect`: what the workers, sessions and queues of a prefix are doing, read-only.

JSON schema (``--json``), version 1. Every document is one JSON object::

    {
      "schema": 1,                 # bumped only on incompatible changes
      "prefix": "sq",              # the key prefix inspected
      "now_ms": 1718000000000,     # Redis' clock (TIME) when the snapshot was taken
      "queues":   [Queue, ...],    # views: (none), queues
      "workers":  [Worker, ...],   # views: (none), workers
      "sessions": [Session, ...],  # views: (none), sessions
      "session":  Session | null   # view: session ID (null: no such session; exit code 1)
    }

Only the keys of the requested view are present. With ``--watch`` one such object is
printed per refresh, one per line (JSON Lines). Durations are seconds (float), instants
are Redis-clock milliseconds since the epoch (int); ``null`` means unknown or unlimited.

Queue::

    task_queue          str   the task queue's name
    length              int   plain activities in the shared stream (queued + being run)
    pending             int   of those, read by a worker and not yet acknowledged
    consumers           int   consumers (workers, alive or dead) of the shared stream
    oldest_age_s        float|null  age of the oldest entry still in the shared stream
    waiting_sessions    int   callers waiting for a session slot (create/recreate_session)
    workers             int   registered workers
    workers_alive       int   of those, with a live heartbeat
    open_sessions       int   sessions open on the queue's workers
    free_session_slots  int|null  free slots on live session workers (null = unlimited)
    dead_letters        int   malformed entries moved aside to the dead stream

Worker::

    task_queue, identity  str
    host                str|null
    pid                 int|null
    alive               bool  its heartbeat key exists (false: dead, not yet reaped)
    heartbeat_ttl_ms    int|null  time left on the heartbeat key
    last_heartbeat_age_s  float|null  since its last heartbeat
    heartbeat_timeout_s float|null  silent this long = declared dead
    sessions_enabled    bool
    open_sessions       int
    max_sessions        int|null  null = unlimited (or sessions disabled)
    running_activities  int   activities running at the last heartbeat
    concurrency         int|null  most activities at once
    activities_done     int   activities finished since it started
    pending             int   plain activities it read and has not acknowledged
    queued              int   session activities waiting in its own stream
    registered_age_s    float|null  since it registered
    activities          [str] activity names it runs

Session::

    task_queue, session_id  str
    state               "OPEN" | "COMPLETED" | "FAILED" | "WAITING" (a caller waiting for a slot)
    worker              str|null  the worker holding it (WAITING: the recreate target, or null)
    host                str|null
    worker_alive        bool|null  false on an OPEN session = stuck until its worker is reaped
    owner               str|null  the caller that created it (pid@host)
    created_ms          int|null
    age_s               float|null
    deadline_ms         int|null  execution deadline (WAITING: when the caller gives up)
    deadline_in_s       float|null  negative once passed
    execution_timeout_s float|null
    ended_ms            int|null
    reason              str|null  why it failed
    activities_run      int|null  null: not recorded by this version of the worker
    queued              int   its activities waiting in the worker's own stream
    queued_activities   [{"activity_id": str, "name": str, "attempt": int, "age_s": float}]

The ``queued`` counts read the worker's own stream, which the worker trims every third of
its heartbeat timeout; an activity read since the last trim still counts as queued.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click
from rich.console import Console, Group
from rich.table import Table

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
from .snapshot import collect

VIEWS = ("workers", "sessions", "queues", "session")


def fmt_age(seconds: float | None) -> str:
    """1.2s, 3m04s, 2h05m; '-' when unknown."""
    if seconds is None:
        return "-"
    sign, s = ("-" if seconds < 0 else ""), abs(seconds)
    if s < 60:
        return f"{sign}{s:.1f}s"
    if s < 3600:
        return f"{sign}{int(s // 60)}m{int(s % 60):02d}s"
    return f"{sign}{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def fmt(value: Any) -> str:
    return "-" if value is None else str(value)


def short(session_id: str) -> str:
    return session_id[:12]


def queues_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="queues", title_justify="left")
    for name in (
        "queue",
        "length",
        "pending",
        "consumers",
        "oldest",
        "waiting",
        "workers",
        "sessions",
        "free",
    ):
        table.add_column(name, justify="left" if name == "queue" else "right")
    for q in rows:
        table.add_row(
            q["task_queue"],
            str(q["length"]),
            str(q["pending"]),
            str(q["consumers"]),
            fmt_age(q["oldest_age_s"]),
            str(q["waiting_sessions"]),
            f"{q['workers_alive']}/{q['workers']}",
            str(q["open_sessions"]),
            "unlimited" if q["free_session_slots"] is None else str(q["free_session_slots"]),
        )
    return table


def workers_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="workers", title_justify="left")
    for name in (
        "worker",
        "queue",
        "host",
        "pid",
        "sessions",
        "running",
        "pending",
        "queued",
        "heartbeat",
        "alive",
    ):
        table.add_column(name, justify="right" if name in ("pid", "running", "pending", "queued") else "left")
    for w in rows:
        if not w["sessions_enabled"]:
            sessions = "off"
        else:
            sessions = f"{w['open_sessions']}/{'∞' if w['max_sessions'] is None else w['max_sessions']}"
        table.add_row(
            w["identity"],
            w["task_queue"],
            fmt(w["host"]),
            fmt(w["pid"]),
            sessions,
            f"{w['running_activities']}/{fmt(w['concurrency'])}",
            str(w["pending"]),
            str(w["queued"]),
            fmt_age(w["last_heartbeat_age_s"]) + " ago",
            "[green]yes[/]" if w["alive"] else "[bold red]DEAD[/]",
        )
    return table


def sessions_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="sessions", title_justify="left")
    for name in ("session", "queue", "worker", "state", "age", "deadline in", "run", "queued", "note"):
        table.add_column(name, justify="right" if name in ("run", "queued", "age", "deadline in") else "left")
    for s in rows:
        state = s["state"]
        style = {"OPEN": "green", "FAILED": "red", "WAITING": "yellow"}.get(state, "")
        note = s["reason"] or ""
        if state == "OPEN" and s["worker_alive"] is False:
            note = "worker is dead: fails when reaped"
        table.add_row(
            short(s["session_id"]),
            s["task_queue"],
            fmt(s["worker"]),
            f"[{style}]{state}[/]" if style else state,
            fmt_age(s["age_s"]),
            fmt_age(s["deadline_in_s"]),
            fmt(s["activities_run"]),
            str(s["queued"]),
            note,
        )
    return table


def session_table(s: dict[str, Any]) -> Table:
    table = Table(title=f"session {s['session_id']}", title_justify="left", show_header=False)
    table.add_column("field")
    table.add_column("value")
    for key, value in s.items():
        if key == "queued_activities":
            continue
        table.add_row(key, fmt(value))
    for item in s["queued_activities"]:
        table.add_row(
            "queued activity",
            f"{item['name']} ({item['activity_id']}, attempt {item['attempt']}, "
            f"waiting {fmt_age(item['age_s'])})",
        )
    return table


def render(doc: dict[str, Any]) -> Group:
    parts: list[Any] = []
    if "queues" in doc:
        parts.append(
            queues_table(doc["queues"]) if doc["queues"] else f"no task queues under prefix {doc['prefix']!r}"
        )
    if "workers" in doc:
        parts.append(workers_table(doc["workers"]) if doc["workers"] else "no workers registered")
    if "sessions" in doc:
        parts.append(sessions_table(doc["sessions"]) if doc["sessions"] else "no open or waiting sessions")
    if "session" in doc and doc["session"] is not None:
        parts.append(session_table(doc["session"]))
    return Group(*parts)


def snapshot(
    url: str, prefix: str, view: str, task_queue: str | None, session_id: str | None, include_ended: bool
) -> dict[str, Any]:
    import redis

    try:
        with redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10) as client:
            return collect(client, prefix, view, task_queue, session_id, include_ended)
    except redis.exceptions.ConnectionError as exc:
        raise CliError(f"cannot reach Redis at {redact(url)}: {one_line(exc)}", 1) from None


def show_once(console: Console, doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(doc, sort_keys=True), flush=True)
    else:
        console.print(render(doc))


def watch(console: Console, fetch: Any, as_json: bool, interval: float) -> None:
    """Refresh until Ctrl-C: a live screen on a terminal, else one snapshot per interval."""
    from rich.live import Live

    try:
        if as_json or not console.is_terminal:
            while True:
                show_once(console, fetch(), as_json)
                time.sleep(interval)
        with Live(render(fetch()), console=console, screen=False, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(render(fetch()), refresh=True)
    except KeyboardInterrupt:
        return


@click.command("inspect")
@click.argument(
    "view", required=False, type=click.Choice(VIEWS), metavar="[workers|sessions|queues|session ID]"
)
@click.argument("session_id", required=False, metavar="")
@redis_url_option
@click.option("-Q", "--task-queue", metavar="Q", default=None, help="Only this task queue [default: all].")
@prefix_option("sq")
@click.option(
    "--json", "as_json", is_flag=True, help="Print JSON (schema in `sessionq inspect --help-json`)."
)
@click.option(
    "--all",
    "include_ended",
    is_flag=True,
    help="sessions: also list ended sessions (kept for the retention period, 1 h by default).",
)
@click.option("-w", "--watch", "watching", is_flag=True, help="Refresh until Ctrl-C.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="Refresh interval of --watch.",
)
@click.option("--help-json", is_flag=True, help="Show the JSON schema and exit.")
@logging_options("WARNING")
def inspect_command(
    view: str | None,
    session_id: str | None,
    redis_url: str | None,
    task_queue: str | None,
    prefix: str,
    as_json: bool,
    include_ended: bool,
    watching: bool,
    interval: float,
    help_json: bool,
    log_level: str | None,
    verbose: int,
    quiet: int,
) -> None:
    """Show workers, sessions and queues, read from Redis (inspect never changes anything).

    \b
    sessionq inspect                 queues, workers and open/waiting sessions
    sessionq inspect workers         identity, host, pid, sessions open/max, running, heartbeat, alive
    sessionq inspect sessions        id, worker, state, age, deadline, queued activities
    sessionq inspect queues          length, pending, consumers, oldest entry, waiting creators
    sessionq inspect session ID      one session's record and its queued activities

    A DEAD worker (heartbeat gone, not yet reaped) and its OPEN sessions are what is stuck:
    a live worker of the queue, or the session's caller, reaps it within seconds.
    """
    if help_json:
        click.echo(sys.modules[__name__].__doc__)
        return
    configure_logging(log_level, verbose, quiet, default="WARNING")
    if view == "session" and not session_id:
        raise CliError("inspect session needs a session ID (see `sessionq inspect sessions`)", 2)
    if view != "session" and session_id:
        raise CliError(f"unexpected argument {session_id!r}", 2)
    url = redis_url_from(redis_url)
    require_redis(url)
    console = Console()
    chosen = view or "overview"

    def fetch() -> dict[str, Any]:
        return snapshot(url, prefix, chosen, task_queue, session_id, include_ended)

    if watching:
        watch(console, fetch, as_json, interval)
        return
    doc = fetch()
    show_once(console, doc, as_json)
    if chosen == "session" and doc["session"] is None:
        raise CliError(
            f"no session {session_id!r} under prefix {prefix!r} (ended sessions are kept for the retention "
            "period only)",
            1,
        )
