"""The `sessionq` command line (installed as sessionq.cli): worker, inspect, demo.

Each command lives in its own module, imported only when that command runs, so a
worker process does not pay for the demo's or inspect's imports.
"""

from __future__ import annotations

import importlib

import click

import sessionq

COMMANDS = {
    # name: (module, attribute, one-line help for `sessionq --help`)
    "worker": (
        "worker_cmd",
        "worker_command",
        "Run a worker for MODULE:ATTR (a Worker or a list of activities).",
    ),
    "inspect": ("inspect_cmd", "inspect_command", "Show workers, sessions and queues (read-only)."),
    "demo": ("demo", "demo_command", "Run the file-processing example end to end (no Redis needed)."),
}


class LazyGroup(click.Group):
    """Lists the commands in a fixed order and imports each one on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attr, short_help = COMMANDS[cmd_name]
        command: click.Command = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        command.short_help = short_help
        return command


@click.group(
    cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(sessionq.__version__, prog_name="sessionq")
def main() -> None:
    """sessionq: worker sessions for Python over Redis.

    \b
    Run a worker:          sessionq worker myapp.worker:worker
    See what it is doing:  sessionq inspect            (workers, sessions, queues)
    Watch the whole story: sessionq demo               (needs no Redis of your own)

    The Redis URL comes from --redis-url, else $SESSIONQ_REDIS_URL, else $REDIS_URL,
    else redis://localhost:6379/0. `sessionq COMMAND --help` tells more.
    """


__all__ = ["main"]
