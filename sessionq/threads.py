"""The threads plain-`def` activities run on.

concurrent.futures' ThreadPoolExecutor joins its threads when the interpreter exits, so
one sync activity that ignores its cancellation (never looks at `is_cancelled()`) would
keep a stopped worker's process alive for as long as it runs. These threads are daemon
threads: a worker stops when it has stopped, and says how many activities it left behind.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

T = TypeVar("T")


class DaemonThreadPool(Executor):
    """At most `size` daemon threads, started as needed, running submitted calls in order."""

    def __init__(self, size: int, name: str) -> None:
        self.size = size
        self.name = name
        self._work: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._waiting = 0  # threads waiting for work
        self._unclaimed = 0  # calls submitted that no thread took yet
        self._busy = 0
        self._lock = threading.Lock()
        self._shutdown = False

    @property
    def busy(self) -> int:
        """Calls running now (a cancelled activity that ignores its cancellation counts)."""
        return self._busy

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if self._shutdown:
            raise RuntimeError("the pool was shut down")
        future: Future[T] = Future()
        with self._lock:
            self._unclaimed += 1
            if self._unclaimed > self._waiting and len(self._threads) < self.size:
                name = f"{self.name}-{len(self._threads)}"
                thread = threading.Thread(target=self._serve, name=name, daemon=True)
                self._threads.append(thread)
                thread.start()
        self._work.put((future, lambda: fn(*args, **kwargs)))
        return future

    def _serve(self) -> None:
        while True:
            with self._lock:
                self._waiting += 1
            item = self._work.get()
            with self._lock:
                self._waiting -= 1
                if item is not None:
                    self._unclaimed -= 1
            if item is None:
                return
            future, call = item
            if not future.set_running_or_notify_cancel():
                continue
            with self._lock:
                self._busy += 1
            try:
                result = call()
            except BaseException as exc:  # SystemExit in an activity ends the activity, not the thread
                future.set_exception(exc)
            else:
                future.set_result(result)
            finally:
                with self._lock:
                    self._busy -= 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking work; threads still running a call finish it on their own (daemons)."""
        self._shutdown = True
        if cancel_futures:
            while True:
                try:
                    item = self._work.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in self._threads:
            self._work.put(None)
        if wait:
            for thread in self._threads:
                thread.join()
