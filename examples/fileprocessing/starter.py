"""The caller side of the file-processing example; defined in sessionq.cli.fileprocessing.starter.

    cd examples && python -m fileprocessing.starter --files 6

Needs workers (see worker.py); each file is processed in its own session.
"""

import asyncio

from sessionq.cli.fileprocessing.starter import (
    Event,
    Outcome,
    main,
    make_inputs,
    process_in_session,
    process_with_retry,
)

__all__ = ["Event", "Outcome", "main", "make_inputs", "process_in_session", "process_with_retry"]

if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
