"""The `sessionq` command line (installed as sessionq.cli): worker, inspect, demo."""

from __future__ import annotations

import click

import sessionq

from .demo import demo_command
from .inspect_cmd import inspect_command
from .worker_cmd import worker_command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(sessionq.__version__, prog_name="sessionq")
def main() -> None:
    """sessionq: worker sessions for Python over Redis.

    \b
    Run a worker:          sessionq worker myapp.worker:worker
    See what it is doing:  sessionq inspect            (workers, sessions, queues)
    Watch the whole story: sessionq demo               (needs no Redis of your own)

    The Redis URL comes from --redis-url, else $SESSIONQ_REDIS_URL, else $REDIS_URL,
    else redis://localhost:6379/0.
    """


main.add_command(worker_command)
main.add_command(inspect_command)
main.add_command(demo_command)

__all__ = ["main"]
