"""The worker of the file-processing example; defined in sessionq.cli.fileprocessing.worker.

    cd examples && sessionq worker fileprocessing.worker:worker      # or: python -m fileprocessing.worker

Start three of them to see sessions spread out; the Redis URL comes from
SESSIONQ_REDIS_URL / REDIS_URL (or `sessionq worker --redis-url`).
"""

from sessionq.cli.fileprocessing.worker import main, worker

__all__ = ["main", "worker"]

if __name__ == "__main__":
    main()
