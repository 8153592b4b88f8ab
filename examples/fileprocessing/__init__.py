"""The file-processing example of the Worker Sessions specification, on sessionq.

The code lives in the installed package, ``sessionq.cli.fileprocessing`` (cli/fileprocessing/
in a checkout), because ``sessionq demo`` runs it and must work from a plain ``pip install``.
These modules re-export it, so there is one copy, and the commands in README.md work from
the examples/ folder:

- ``fileprocessing.activities``: the three activities.
- ``fileprocessing.worker``: the Worker (``sessionq worker fileprocessing.worker:worker``).
- ``fileprocessing.starter``: the caller side (``python -m fileprocessing.starter``).
"""

from sessionq.cli.fileprocessing import TASK_QUEUE

__all__ = ["TASK_QUEUE"]
