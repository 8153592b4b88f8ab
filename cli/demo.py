"""`sessionq demo`: the specification's file-processing example, end to end, in ~20 seconds.

Three worker processes (`sessionq worker sessionq.cli.fileprocessing.worker:worker`, one
session slot each) and several files, each downloaded, processed and uploaded in its own
session. Mid-way one worker is SIGKILLed: the file it held fails with SessionFailedError
within the heartbeat timeout and starts over in a new session on another worker, while
the other files finish.

Then a host session: one more file on a worker started with --host-id. That process is
SIGKILLed mid-step and another process of the same host starts (as a supervisor or
systemd would): the session carries on, the step runs again on the new process and finds
the download on the host's disk, and the caller sees no error. Then everything is
stopped and cleaned up.

Redis: --redis-url / $SESSIONQ_REDIS_URL / $REDIS_URL when given; else the default
localhost:6379 if something answers there; else an embedded server (see embedded.py).
On a user's Redis all keys live under a fresh prefix, deleted at the end.

The pipeline is the packaged sessionq.cli.fileprocessing (examples/fileprocessing
re-exports it), so the demo runs from a plain wheel install, from any directory.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import sessionq

from . import fileprocessing
from .common import (
    CliError,
    configure_logging,
    logging_options,
    ping,
    redact,
    redis_url_from,
    require_redis,
    sync_client,
    url_configured,
)
from .embedded import BACKENDS, Embedded, EmbeddedError, start_embedded
from .fileprocessing import starter
from .fleet import Fleet

TASK_QUEUE = fileprocessing.TASK_QUEUE
HOST_QUEUE = TASK_QUEUE + "-host"
HOST_ID = "demo-box"
# An installed module, so the workers import it from site-packages whatever their cwd.
WORKER_TARGET = f"{fileprocessing.__name__}.worker:worker"
HEARTBEAT_TIMEOUT = 2.0


@dataclass
class Backend:
    url: str
    description: str
    embedded: Embedded | None = None
    users_redis: bool = False


def choose_backend(redis_url: str | None, embedded: bool, backend: str | None) -> Backend:
    """A configured URL, else a Redis on the default address, else an embedded server."""
    if not embedded and backend is None:
        if url_configured(redis_url):
            url = redis_url_from(redis_url)
            require_redis(url)
            return Backend(url, f"your Redis at {redact(url)}", users_redis=True)
        url = redis_url_from(None)
        if ping(url, timeout=0.5) is None:
            return Backend(url, f"the Redis answering at {redact(url)}", users_redis=True)
    try:
        server = start_embedded(backend)
    except EmbeddedError as exc:
        raise CliError(str(exc), 1) from None
    return Backend(server.url, server.description + " (private; stopped at exit)", embedded=server)


def delete_prefix(url: str, prefix: str) -> int:
    """Delete the demo's keys (SCAN + DEL under its own prefix only; never FLUSH)."""
    with sync_client(url, timeout=5) as client:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.delete(key)  # one key per command: fine on a cluster too
        return sum(pipe.execute()) if keys else 0


@dataclass
class Story:
    """What the demo saw, for the running commentary and the closing tables."""

    console: Console
    started: float = field(default_factory=time.monotonic)
    victim_file: str = ""
    victim_worker: str = ""
    killed_at: float | None = None
    failures: list[Any] = field(default_factory=list)
    steps_done: dict[tuple[str, int], int] = field(default_factory=dict)
    progress: Progress | None = None
    progress_task: Any = None

    def say(self, message: str) -> None:
        self.console.print(f"[dim]{time.monotonic() - self.started:6.2f}s[/]  {message}", highlight=False)


class Demo:
    """Runs the story: start workers, process files in sessions, kill one worker, clean up."""

    def __init__(self, console: Console, backend: Backend, sessions: int, work_seconds: float) -> None:
        self.console = console
        self.backend = backend
        self.sessions = sessions
        self.work_seconds = work_seconds
        self.prefix = "sqdemo" + uuid.uuid4().hex[:8]
        self.tmp = Path(tempfile.mkdtemp(prefix="sessionq-demo-"))
        self.starter = starter
        self.story = Story(console)
        self.fleet = Fleet(
            WORKER_TARGET,
            self.tmp,  # the workers' cwd: nothing there to shadow the installed package
            backend.url,
            self.prefix,
            TASK_QUEUE,
            self.tmp / "logs",
            env={
                "FILEPROCESSING_WORK_SECONDS": str(work_seconds),
                "FILEPROCESSING_SCRATCH": str(self.tmp / "disks"),
            },
        )
        self.host_fleet = Fleet(
            WORKER_TARGET,
            self.tmp,
            backend.url,
            self.prefix,
            HOST_QUEUE,
            self.tmp / "logs",
            env=self.fleet.env,
        )
        self.host_story: dict[str, Any] = {}
        self._kills: set[asyncio.Task[None]] = set()

    # -- the story ----------------------------------------------------------------------
    async def run(self) -> bool:
        self.intro()
        for n in (1, 2, 3):
            self.fleet.start(
                f"demo-w{n}",
                *(
                    "--max-sessions",
                    "1",
                    "--heartbeat-timeout",
                    str(HEARTBEAT_TIMEOUT),
                    "--shutdown-grace",
                    "5",
                ),
            )
        await self.fleet.wait_ready()
        pids = ", ".join(f"{identity} (pid {pid})" for identity, pid in self.fleet.describe())
        self.story.say(
            f"workers ready: {pids}; one session slot each, heartbeat timeout {HEARTBEAT_TIMEOUT:g}s"
        )
        urls = self.starter.make_inputs(self.tmp / "inputs", self.sessions)
        self.story.victim_file = Path(urls[0]).name
        self.console.print(
            f"\n[bold]Processing {self.sessions} files[/], each in its own session: "
            "download -> process -> upload, all three on the session's worker.\n"
        )
        outcomes = await self.process(urls)
        self.conclude(outcomes)
        return self.check(outcomes) and await self.host_scene()

    def intro(self) -> None:
        self.console.print("[bold]sessionq demo[/]: the file-processing example of the Worker Sessions spec")
        self.console.print(f"  redis:      {self.backend.description}")
        self.console.print(f"  keys:       prefix {self.prefix!r}, task queue {TASK_QUEUE!r}")
        where = Path(fileprocessing.__file__).parent
        self.console.print(f"  example:    {fileprocessing.__name__} ({where})")
        self.console.print(f"  inspect:    sessionq inspect --redis-url {redact(self.backend.url)} "
                           f"--prefix {self.prefix}   (while it runs)\n")  # fmt: skip

    async def process(self, urls: list[str]) -> list[Any]:
        client = sessionq.Client(self.backend.url, prefix=self.prefix)
        options = sessionq.SessionOptions(creation_timeout=60, execution_timeout=120)
        destination = str(self.tmp / "uploaded")

        async def one(index: int, url: str) -> Any:
            await asyncio.sleep(index * 0.02)  # ask in file order: slots go first come, first served
            return await self.starter.process_with_retry(
                client, url, destination, on_event=self.on_event, options=options
            )

        with self.progress_bar(len(urls) * 3):
            try:
                return list(await asyncio.gather(*(one(i, url) for i, url in enumerate(urls))))
            finally:
                await client.close()

    def progress_bar(self, total: int) -> Any:
        """A live bar on a terminal; nothing when output goes to a file or pipe."""
        import contextlib

        if not self.console.is_terminal:
            return contextlib.nullcontext()
        progress = Progress(
            TextColumn("steps"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=self.console, transient=True,
        )  # fmt: skip
        self.story.progress = progress
        self.story.progress_task = progress.add_task("steps", total=total)
        return progress

    # -- events from the example's caller side ----------------------------------------------
    def on_event(self, event: Any) -> None:
        story = self.story
        if event.kind == "session":
            story.say(f"{event.file:<11} session {str(event.detail)[:8]} on [cyan]{event.worker}[/]"
                      + (f" (attempt {event.attempt})" if event.attempt > 1 else ""))  # fmt: skip
        elif event.kind == "step" and event.step == "process" and event.file == story.victim_file:
            if event.attempt == 1 and story.killed_at is None:
                self.schedule_kill(event.worker, event.file)
        elif event.kind == "stepdone":
            story.say(f"{event.file:<11} {event.step:<8} done on [cyan]{event.worker}[/]")
            key = (event.file, event.attempt)
            story.steps_done[key] = story.steps_done.get(key, 0) + 1
            if story.progress is not None:
                story.progress.advance(story.progress_task)
        elif event.kind == "failed":
            self.on_failure(event)
        elif event.kind == "done":
            story.say(
                f"{event.file:<11} [green]uploaded[/] ({event.detail['bytes']} bytes) by {event.worker}"
            )

    def schedule_kill(self, worker: str, file: str) -> None:
        task = asyncio.create_task(self.kill_soon(worker, file))
        self._kills.add(task)
        task.add_done_callback(self._kills.discard)

    async def kill_soon(self, worker: str, file: str) -> None:
        await asyncio.sleep(self.work_seconds * 0.4)  # let the process step get going
        proc = self.fleet.kill(worker)
        self.story.victim_worker = worker
        self.story.killed_at = time.monotonic()
        self.story.say(f"[bold red]SIGKILL {worker}[/] (pid {proc.pid}) while it processes {file}: "
                       "no goodbye, only its heartbeat stops")  # fmt: skip

    def on_failure(self, event: Any) -> None:
        story = self.story
        story.failures.append(event)
        since = f"{time.monotonic() - story.killed_at:.1f}s after the kill, " if story.killed_at else ""
        story.say(f"{event.file:<11} [bold red]SessionFailedError[/] ({since}heartbeat timeout "
                  f"{HEARTBEAT_TIMEOUT:g}s): {event.detail}")  # fmt: skip
        redo = story.steps_done.get((event.file, event.attempt), 0)
        if story.progress is not None and redo:  # the dead worker's finished steps must be redone
            story.progress.update(story.progress_task, total=story.progress.tasks[0].total + redo)
        story.say(
            f"{event.file:<11} starting over in a new session: its download was on {event.worker}'s disk"
        )

    # -- the end ----------------------------------------------------------------------------
    def conclude(self, outcomes: list[Any]) -> None:
        table = Table(title="\nwho did what", title_justify="left")
        for name in ("file", "session worker(s)", "result", "time"):
            table.add_column(name)
        for outcome in outcomes:
            result = outcome.result or {}
            workers = " -> ".join(
                f"[strike red]{w}[/]" if w == self.story.victim_worker and i < len(outcome.workers) - 1 else w
                for i, w in enumerate(outcome.workers)
            )
            done = f"uploaded, {result['bytes']} bytes" if result else "[red]not done[/]"
            table.add_row(outcome.file, workers, done, f"{outcome.seconds:.1f}s")
        self.console.print(table)
        per_worker = Table(title="workers", title_justify="left")
        for name in ("worker", "pid", "files finished", "fate"):
            per_worker.add_column(name)
        for identity, proc in self.fleet.procs.items():
            finished = sum(1 for o in outcomes if o.workers and o.workers[-1] == identity)
            fate = "[red]killed (SIGKILL)[/]" if proc.killed else "stopped by SIGTERM at the end"
            per_worker.add_row(identity, str(proc.pid), str(finished), fate)
        self.console.print(per_worker)

    def check(self, outcomes: list[Any]) -> bool:
        """Did the story happen? Every file uploaded; the victim failed once and moved."""
        uploaded = {p.name for p in (self.tmp / "uploaded").glob("*")}
        ok = all(o.result for o in outcomes) and len(uploaded) == len(outcomes)
        victim = next((o for o in outcomes if o.file == self.story.victim_file), None)
        moved = (
            victim is not None and len(victim.workers) >= 2 and victim.workers[-1] != self.story.victim_worker
        )
        if ok and moved and self.story.failures:
            self.console.print(
                f"\n[green]All {len(outcomes)} files processed.[/] The killed worker's file failed fast with "
                "SessionFailedError and finished in a new session on another worker;\nthe other files never "
                "noticed."
            )
            return True
        self.console.print("\n[red]The demo did not go as planned[/] (see above).")
        return False

    # -- the host scene ---------------------------------------------------------------------
    def host_flags(self) -> tuple[str, ...]:
        return ("-Q", HOST_QUEUE, "--host-id", HOST_ID, "--restart-grace", "15", "--max-sessions", "1",
                "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT), "--shutdown-grace", "5")  # fmt: skip

    async def host_scene(self) -> bool:
        """A host worker restarted mid-session; the session carries on."""
        self.console.print(
            f"\n[bold]Host sessions[/]: with --host-id a session belongs to the host, not to one process. "
            f"One more file, on task queue {HOST_QUEUE!r}, host {HOST_ID!r}.\n"
        )
        self.host_fleet.start("demo-box-a", *self.host_flags())
        await self.host_fleet.wait_ready()
        self.story.say(
            f"worker demo-box-a (pid {self.host_fleet.procs['demo-box-a'].pid}) serves host {HOST_ID}"
        )
        (url,) = self.starter.make_inputs(self.tmp / "host-inputs", 1)
        client = sessionq.Client(self.backend.url, prefix=self.prefix)
        options = sessionq.SessionOptions(creation_timeout=30, execution_timeout=120)
        destination = self.tmp / "uploaded-host"
        failed: list[str] = []
        try:
            result = await self.starter.process_in_session(
                client,
                url,
                str(destination),
                on_event=self.on_host_event,
                options=options,
                task_queue=HOST_QUEUE,
            )
        except sessionq.SessionqError as exc:
            failed.append(f"{type(exc).__name__}: {exc}")
            result = None
        finally:
            await client.close()
        processed_by = ""
        for path in destination.glob("*"):
            processed_by = path.read_text().splitlines()[0].removeprefix("# processed by ").split(":")[0]
        ok = result is not None and not failed and processed_by == "demo-box-b"
        if ok:
            self.story.say(
                f"{Path(url).name:<11} [green]uploaded[/]: process ran again on [cyan]demo-box-b[/] "
                "(attempt 2) and read the file demo-box-a had downloaded onto the host's disk"
            )
            self.console.print(
                "\n[green]The host session survived its process's SIGKILL and restart[/]: the caller saw "
                "no error. Without --host-id the session would have failed, as in the first part."
            )
        else:
            self.console.print(f"\n[red]The host scene did not go as planned[/]: {failed or processed_by}")
        return ok

    def on_host_event(self, event: Any) -> None:
        story = self.story
        if event.kind == "session":
            story.say(f"{event.file:<11} session {str(event.detail)[:8]} on host [cyan]{HOST_ID}[/]")
        elif event.kind == "step":
            story.say(f"{event.file:<11} {event.step:<8} started")
            if event.step == "process" and "killed" not in self.host_story:
                self.host_story["killed"] = True
                task = asyncio.create_task(self.restart_host_process())
                self._kills.add(task)
                task.add_done_callback(self._kills.discard)
        elif event.kind == "stepdone":
            story.say(f"{event.file:<11} {event.step:<8} done")

    async def restart_host_process(self) -> None:
        await asyncio.sleep(self.work_seconds * 0.4)
        proc = self.host_fleet.kill("demo-box-a")
        self.story.say(f"[bold red]SIGKILL demo-box-a[/] (pid {proc.pid}) while it processes the file")
        replacement = self.host_fleet.start("demo-box-b", *self.host_flags())
        self.story.say(
            f"demo-box-b (pid {replacement.pid}) starts with --host-id {HOST_ID}, as a supervisor would "
            f"(`sessionq worker --processes N`); the session stays open for up to --restart-grace"
        )

    async def shutdown(self) -> None:
        """SIGTERM the surviving workers (graceful), then delete the demo's keys."""
        for task in list(self._kills):
            task.cancel()
        await self.host_fleet.stop_all()
        codes = await self.fleet.stop_all()
        if codes:
            text = ", ".join(
                f"{w} {'killed' if self.fleet.procs[w].killed else f'exit {c}'}" for w, c in codes.items()
            )
            self.story.say(f"workers stopped: {text}")
        try:
            deleted = delete_prefix(self.backend.url, self.prefix)
            if self.backend.users_redis:
                self.story.say(f"deleted the demo's {deleted} keys under {self.prefix}:*")
        except redis.exceptions.RedisError as exc:
            self.story.say(f"could not delete keys under {self.prefix}:* ({exc})")

    def cleanup_files(self) -> None:
        self.fleet.kill_all_now()
        self.host_fleet.kill_all_now()
        shutil.rmtree(self.tmp, ignore_errors=True)


async def run_demo(demo: Demo) -> bool:
    try:
        return await demo.run()
    finally:
        await demo.shutdown()


@click.command("demo")
@click.option(
    "--redis-url",
    metavar="URL",
    default=None,
    help="Run on this Redis (keys under a fresh prefix, deleted at the end).",
)
@click.option("--embedded", is_flag=True, help="Use a private embedded server even if a Redis is available.")
@click.option("--embedded-backend", type=click.Choice(BACKENDS), default=None,
              help="Embedded server to use (implies --embedded) [default: redis-server if installed, else "
                   "fakeredis].")  # fmt: skip
@click.option(
    "--sessions",
    type=click.IntRange(min=1, max=50),
    default=6,
    show_default=True,
    help="How many files (sessions) to process.",
)
@click.option(
    "--work-seconds",
    type=click.FloatRange(min=0.05, max=10),
    default=0.4,
    show_default=True,
    help="How long each step pretends to work.",
)
@logging_options("WARNING")
def demo_command(
    redis_url: str | None,
    embedded: bool,
    embedded_backend: str | None,
    sessions: int,
    work_seconds: float,
    log_level: str | None,
    log_format: str,
    verbose: int,
    quiet: int,
) -> None:
    """Watch worker sessions work: the spec's file-processing example, end to end.

    Starts three worker processes, processes files in sessions (download, process, upload
    on one worker each), SIGKILLs a worker mid-session to show SessionFailedError and
    recovery in a new session, then stops everything. Needs no Redis of your own: without
    a configured URL and nothing on localhost:6379, it starts a private one.
    """
    configure_logging(log_level, verbose, quiet, default="WARNING", log_format=log_format)
    console = Console(highlight=False)
    backend = choose_backend(redis_url, embedded, embedded_backend)
    demo: Demo | None = None
    try:
        demo = Demo(console, backend, sessions, work_seconds)
        ok = asyncio.run(run_demo(demo))
    except KeyboardInterrupt:
        console.print("\ninterrupted; cleaned up")
        raise SystemExit(130) from None
    except (RuntimeError, sessionq.SessionqError) as exc:
        raise CliError(f"{type(exc).__name__}: {exc}", 1) from None
    finally:
        if demo is not None:
            demo.cleanup_files()
        if backend.embedded is not None:
            backend.embedded.stop()
            console.print(f"stopped the {backend.embedded.description.split(' on ')[0]}")
    if not ok:
        raise SystemExit(1)
