"""`sessionq inspect`: what the workers, sessions and queues of a prefix are doing, read-only.

JSON schema (``--json``), version 1. Every document is one JSON object::

    {
      "schema": 1,                 # bumped only on incompatible changes
      "prefix": "sq",              # the key prefix inspected
      "now_ms": 1718000000000,     # Redis' clock (TIME) when the snapshot was taken
      "queues":   [Queue, ...],    # views: (none), queues
      "workers":  [Worker, ...],   # views: (none), workers
      "hosts":    [Host, ...],     # views: (none), workers, hosts
      "sessions": [Session, ...],  # views: (none), sessions
      "session":  Session | null   # view: session ID (null: no such session; exit code 1)
      "healthy":  bool,            # view: health (false: exit code 1)
      "problems": [str, ...]       # view: health, why it is not healthy (with queues, workers)
    }

Only the keys of the requested view are present. With ``--watch`` one such object is
printed per refresh, one per line (JSON Lines). Durations are seconds (float), instants
are Redis-clock milliseconds since the epoch (int); ``null`` means unknown or unlimited.

Queue::

    task_queue          str   the task queue's name
    length              int   plain activities in the shared stream (queued + being run)
    pending             int   of those, read by a worker and not yet acknowledged
    consumers           int   workers (alive or dead) that have read from the shared stream
    oldest_age_s        float|null  age of the oldest entry still in the shared stream
    waiting_sessions    int   callers waiting for a session slot (create/recreate_session)
    workers             int   registered worker processes
    workers_alive       int   of those, with a live heartbeat
    hosts               int   hosts (worker processes sharing a host_id) registered
    open_sessions       int   sessions open on the queue's workers
    free_session_slots  int|null  free slots on live session workers (null = unlimited)
    dead_letters        int   malformed entries moved aside to the dead stream
    activities_differ   bool  its live workers do not all register the same activities

Worker::

    task_queue, identity  str
    kind                "worker"
    host_id             str|null  the host it is a process of (null: it is its own host)
    host                str|null  the machine's name
    pid                 int|null
    state               "alive" | "stopping" (takes nothing new) | "dead" (not yet reaped)
    alive               bool  its heartbeat key exists (false: dead, not yet reaped)
    heartbeat_ttl_ms    int|null  time left on the heartbeat key
    last_heartbeat_age_s  float|null  since its last heartbeat
    heartbeat_timeout_s float|null  silent this long = declared dead
    sessions_enabled    bool
    open_sessions       int
    max_sessions        int|null  null = unlimited (or sessions disabled)
    running_activities  int   activities running at the last heartbeat
    waiting_activities  int   activities inside it waiting for one of its concurrency slots
    concurrency         int|null  most activities at once
    activities_done     int   activities finished since it started
    pending             int   plain activities it read and has not acknowledged
    queued              int   session activities waiting in its own stream
    registered_age_s    float|null  since it registered
    activities          [str] activity names it runs
    resources           {name: {"used": int, "total": int}}  session resources it offers

Host (worker processes of one task queue sharing a host_id: one session limit, and sessions
that outlive any one process)::

    task_queue, host_id  str
    kind                "host"
    identity            str   "host=<host_id>", the `worker` its sessions name
    host                str|null  the machine's name
    alive               bool  a process lives, or the host is in its restart grace
    in_grace            bool  no process lives: its sessions wait for one to come back
    no_live_process_s   float|null  in the grace: for how long no process has lived
    restart_grace_s     float  how long its sessions wait for a process to come back
    processes           [{"identity": str, "alive": bool}]
    processes_alive     int
    open_sessions, max_sessions, heartbeat_timeout_s, last_heartbeat_age_s, registered_age_s
                        as for a worker (the host's heartbeat is its processes')
    pending             int   session activities its processes read and have not finished
    queued              int   session activities in its stream (queued, or being run)

Session::

    task_queue, session_id  str
    state               "OPEN" | "COMPLETED" | "FAILED" | "WAITING" (a caller waiting for a slot)
    worker              str|null  the worker holding it (WAITING: the recreate target, or null)
    host                str|null
    worker_alive        bool|null  false on an OPEN session = stuck until its worker is reaped
    owner               str|null  the caller that created it (pid@host)
    owner_client        str|null  its client's id (the key of its lease)
    owner_timeout_s     float|null  the owner lease (null: none): silent this long = session fails
    owner_silent_s      float|null  since its client last renewed the lease (null: no lease, or
                              the lease key is gone: its client is gone)
    created_ms          int|null
    age_s               float|null
    deadline_ms         int|null  execution deadline (WAITING: when the caller gives up)
    deadline_in_s       float|null  negative once passed
    execution_timeout_s float|null
    ended_ms            int|null
    reason              str|null  why it failed
    activities_run      int|null  null: not recorded by this version of the worker
    resources           {name: int}  session resources it holds (WAITING: asks for)
    queued              int   its activities waiting in the worker's own stream (0 once ended)
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
from rich import box
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
    sync_client,
)
from .snapshot import AmbiguousSession, collect, queue_problem

VIEWS = ("workers", "hosts", "sessions", "queues", "session", "health")


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


def make_table(title: str, rows: list[dict[str, Any]], columns: list[tuple[str, str, Any]]) -> Table:
    """A compact table: (header, justify, cell function) per column; a 'queue' column only
    when the rows span several task queues (else the queue is named in the title)."""
    queues = sorted({row["task_queue"] for row in rows})
    if len(queues) == 1:
        title = f"{title} of task queue {queues[0]!r}"
    else:
        columns = [("queue", "left", lambda row: row["task_queue"]), *columns]
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for header, justify, _ in columns:
        table.add_column(header, justify=justify, no_wrap=True)
    for row in rows:
        table.add_row(*(cell(row) for _, _, cell in columns))
    return table


def queue_note(q: dict[str, Any]) -> str:
    notes = []
    if problem := queue_problem(q):
        notes.append(f"[bold red]{problem}[/]")
    if q.get("activities_differ"):
        notes.append("[yellow]workers register different activities[/] (inspect workers --json)")
    return "; ".join(notes)


def queues_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="queues", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    columns: list[tuple[str, Any]] = [
        ("queue", lambda q: q["task_queue"]),
        ("length", lambda q: str(q["length"])),
        ("pending", lambda q: str(q["pending"])),
        ("consumers", lambda q: str(q["consumers"])),
        ("oldest", lambda q: fmt_age(q["oldest_age_s"])),
        ("waiting", lambda q: str(q["waiting_sessions"])),
        ("workers", lambda q: f"{q['workers_alive']}/{q['workers']}"),
        ("sessions", lambda q: str(q["open_sessions"])),
        ("free", lambda q: "∞" if q["free_session_slots"] is None else str(q["free_session_slots"])),
        ("dead", lambda q: str(q["dead_letters"])),
        ("note", queue_note),
    ]
    for header, _ in columns:
        table.add_column(header, justify="left" if header == "queue" else "right", no_wrap=True)
    for q in rows:
        table.add_row(*(cell(q) for _, cell in columns))
    return table


def offered(res: dict[str, dict[str, int]]) -> str:
    """Session resources as used/total, e.g. "gpu 1/2, scratch_gb 100/500"."""
    return ", ".join(f"{name} {v['used']}/{v['total']}" for name, v in res.items()) or "-"


def worker_sessions(w: dict[str, Any]) -> str:
    if w.get("kind") == "worker" and w.get("host_id"):
        return f"host {w['host_id']}"
    if not w["sessions_enabled"]:
        return "off"
    return f"{w['open_sessions']}/{'∞' if w['max_sessions'] is None else w['max_sessions']}"


def running(w: dict[str, Any]) -> str:
    """Activities running / the worker's concurrency, and those waiting inside it for a slot."""
    text = f"{w['running_activities']}/{fmt(w['concurrency'])}"
    return text + f" [yellow]+{w['waiting_activities']} waiting[/]" if w.get("waiting_activities") else text


def worker_state(w: dict[str, Any]) -> str:
    if w["state"] == "dead":
        return "[bold red]DEAD[/]" + (": its sessions fail when reaped" if w["open_sessions"] else "")
    if w["state"] == "stopping":
        return "[yellow]stopping[/]: takes nothing new"
    return "[green]alive[/]"


def workers_table(rows: list[dict[str, Any]]) -> Table:
    return make_table(
        "workers",
        rows,
        [
            ("worker", "left", lambda w: w["identity"]),
            ("host", "left", lambda w: fmt(w["host"])),
            ("pid", "right", lambda w: fmt(w["pid"])),
            ("sessions", "right", worker_sessions),
            ("running", "right", running),
            ("resources", "left", lambda w: offered(w["resources"])),
            ("pending", "right", lambda w: str(w["pending"])),
            ("queued", "right", lambda w: str(w["queued"])),
            ("heartbeat", "right", lambda w: fmt_age(w["last_heartbeat_age_s"]) + " ago"),
            ("state", "left", worker_state),
        ],
    )


def host_state(h: dict[str, Any]) -> str:
    if not h["alive"]:
        return "[bold red]DEAD[/]: its sessions fail when reaped"
    if h["in_grace"]:
        return (
            f"[yellow]no live process for {fmt_age(h['no_live_process_s'])} of "
            f"{fmt_age(h['restart_grace_s'])}[/]"
        )
    return "[green]up[/]"


def hosts_table(rows: list[dict[str, Any]]) -> Table:
    return make_table(
        "hosts",
        rows,
        [
            ("host", "left", lambda h: h["host_id"]),
            ("machine", "left", lambda h: fmt(h["host"])),
            ("processes", "left", lambda h: ", ".join(
                p["identity"] + ("" if p["alive"] else " [red](dead)[/]") for p in h["processes"]
            ) or "-"),
            ("sessions", "right", worker_sessions),
            ("resources", "left", lambda h: offered(h["resources"])),
            ("pending", "right", lambda h: str(h["pending"])),
            ("queued", "right", lambda h: str(h["queued"])),
            ("grace", "right", lambda h: fmt_age(h["restart_grace_s"])),
            ("state", "left", host_state),
        ],
    )  # fmt: skip


def session_state(s: dict[str, Any]) -> str:
    style = {"OPEN": "green", "FAILED": "red", "WAITING": "yellow"}.get(s["state"], "")
    return f"[{style}]{s['state']}[/]" if style else s["state"]


def owner_lease(s: dict[str, Any]) -> str:
    """The owner lease, as a column: "-" without one, else how long its client has been silent."""
    if not s["owner_timeout_s"]:
        return "-"
    if s["owner_silent_s"] is None:
        return f"[red]gone[/]/{fmt_age(s['owner_timeout_s'])}" if s["state"] in ("OPEN", "WAITING") else "-"
    return f"{fmt_age(s['owner_silent_s'])}/{fmt_age(s['owner_timeout_s'])}"


def session_note(s: dict[str, Any]) -> str:
    if s["state"] == "OPEN" and s["worker_alive"] is False:
        return "[bold red]worker is dead[/]: fails when reaped"
    if (
        s["state"] == "OPEN"
        and s["owner_timeout_s"]
        and (s["owner_silent_s"] is None or s["owner_silent_s"] > s["owner_timeout_s"])
    ):
        return "[bold red]owner gone[/]: fails at its worker's next pass"
    if s["state"] == "WAITING":
        return "waiting for a free slot" + (f" on {s['worker']}" if s["worker"] else "")
    return s["reason"] or ""


def deadline(s: dict[str, Any]) -> str:
    """When an open session's execution timeout passes (a waiting caller's: when it gives
    up); nothing for an ended one."""
    if s["state"] not in ("OPEN", "WAITING") or s["deadline_in_s"] is None:
        return "-"
    left = s["deadline_in_s"]
    return f"in {fmt_age(left)}" if left >= 0 else f"[red]{fmt_age(-left)} ago[/]"


def sessions_table(rows: list[dict[str, Any]]) -> Table:
    return make_table(
        "sessions",
        rows,
        [
            ("session", "left", lambda s: short(s["session_id"])),
            ("worker", "left", lambda s: fmt(s["worker"])),
            ("state", "left", session_state),
            ("age", "right", lambda s: fmt_age(s["age_s"])),
            ("deadline", "right", deadline),
            ("run", "right", lambda s: fmt(s["activities_run"])),
            ("resources", "left", lambda s: ", ".join(f"{k}={v}" for k, v in s["resources"].items()) or "-"),
            ("queued", "right", lambda s: str(s["queued"])),
            ("owner lease", "right", owner_lease),
            ("note", "left", session_note),
        ],
    )


def when(ms: int | None, now_ms: int) -> str:
    """An instant as local time and how long ago (or in how long)."""
    if ms is None:
        return "-"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))
    delta = (ms - now_ms) / 1000
    return f"{stamp} ({'in ' + fmt_age(delta) if delta > 0 else fmt_age(-delta) + ' ago'})"


def human(key: str, value: Any, s: dict[str, Any], now_ms: int) -> str | None:
    """One field of a session as a person reads it; None to leave the field out."""
    ended = s["state"] not in ("OPEN", "WAITING")
    if key in ("deadline_in_s", "age_s", "owner_silent_s"):
        return None  # shown with the instant they are about
    if key == "deadline_ms" and ended:
        return None
    if key.endswith("_ms"):
        return when(value, now_ms)
    if key.endswith("_s"):
        return fmt_age(value)
    if isinstance(value, bool):
        return "yes" if value else "[bold red]no[/]"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    return fmt(value)


def session_table(s: dict[str, Any], now_ms: int) -> Table:
    table = Table(title=f"session {s['session_id']}", title_justify="left", show_header=False)
    table.add_column("field")
    table.add_column("value")
    for key, value in s.items():
        if key == "queued_activities":
            continue
        shown = human(key, value, s, now_ms)
        if shown is not None:
            table.add_row(key.removesuffix("_ms").removesuffix("_s").replace("_", " "), shown)
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
    if doc.get("hosts"):
        parts.append(hosts_table(doc["hosts"]))
    if "sessions" in doc:
        parts.append(sessions_table(doc["sessions"]) if doc["sessions"] else "no open or waiting sessions")
    if "session" in doc and doc["session"] is not None:
        parts.append(session_table(doc["session"], doc["now_ms"]))
    return Group(*parts)


def make_console() -> Console:
    """A terminal's own width; 160 columns when writing to a file or pipe (nothing wraps there)."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


def snapshot(
    url: str,
    prefix: str,
    view: str,
    task_queue: str | None,
    session_id: str | None,
    include_ended: bool,
    max_age_s: float = 60.0,
) -> dict[str, Any]:
    import redis

    try:
        with sync_client(url) as client:
            return collect(client, prefix, view, task_queue, session_id, include_ended, max_age_s)
    except AmbiguousSession as exc:
        raise CliError(str(exc), 2) from None
    except (
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        redis.exceptions.RedisClusterException,
    ) as exc:
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


def report_health(doc: dict[str, Any], as_json: bool, task_queue: str | None) -> None:
    """One line (or the JSON document) on stdout; exit 1 when something is wrong."""
    if as_json:
        print(json.dumps(doc, sort_keys=True), flush=True)
    elif doc["healthy"]:
        alive = sum(1 for w in doc["workers"] if w["kind"] == "worker" and w["alive"])
        what = f"task queue {task_queue!r}" if task_queue else f"{len(doc['queues'])} task queue(s)"
        print(f"OK: {what}, {alive} live worker(s), nothing stuck", flush=True)
    else:
        extra = f" (and {len(doc['problems']) - 1} more)" if len(doc["problems"]) > 1 else ""
        print(f"UNHEALTHY: {doc['problems'][0]}{extra}", flush=True)
    if not doc["healthy"]:
        sys.exit(1)


@click.command("inspect")
@click.argument(
    "view",
    required=False,
    type=click.Choice(VIEWS),
    metavar="[workers|hosts|sessions|queues|session ID|health]",
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
@click.option(
    "--max-age",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="health: queued work this old with no live worker is unhealthy.",
)
@click.option("--help-json", is_flag=True, help="Show the JSON schema and exit.")
@logging_options("WARNING")
def inspect_command(
    view: str | None,
    session_id: str | None,
    redis_url: str | None,
    cluster: bool,
    task_queue: str | None,
    prefix: str,
    as_json: bool,
    include_ended: bool,
    watching: bool,
    interval: float,
    max_age: float,
    help_json: bool,
    log_level: str | None,
    log_format: str,
    verbose: int,
    quiet: int,
) -> None:
    """Show workers, sessions and queues, read from Redis (inspect never changes anything).

    \b
    sessionq inspect                 queues, workers and open/waiting sessions
    sessionq inspect workers         identity, host, pid, sessions open/max, running, heartbeat, alive
    sessionq inspect hosts           hosts (processes sharing --host-id): processes, sessions, grace
    sessionq inspect sessions        id, worker, state, age, deadline, queued activities
    sessionq inspect queues          length, pending, consumers, oldest entry, waiting creators
    sessionq inspect session ID      one session's record and its queued activities (ID: the whole
                                     id, or its start as the tables show it)
    sessionq inspect health          exit 0 when each queue has a live worker and nothing is stuck,
                                     else 1 and one line saying why (probes, cron checks)

    A DEAD worker (heartbeat gone, not yet reaped) and its OPEN sessions are what is stuck:
    a live worker of the queue, or the session's caller, reaps it within seconds.
    """
    if help_json:
        click.echo(sys.modules[__name__].__doc__)
        return
    configure_logging(log_level, verbose, quiet, default="WARNING", log_format=log_format)
    if view == "session" and not session_id:
        raise CliError("inspect session needs a session ID (see `sessionq inspect sessions`)", 2)
    if view != "session" and session_id:
        raise CliError(f"unexpected argument {session_id!r}", 2)
    url = redis_url_from(redis_url, cluster)
    require_redis(url)
    console = make_console()
    chosen = view or "overview"

    def fetch() -> dict[str, Any]:
        return snapshot(url, prefix, chosen, task_queue, session_id, include_ended, max_age)

    if chosen == "health":
        report_health(fetch(), as_json, task_queue)
        return
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
