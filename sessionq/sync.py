"""Blocking facade over the async Client, for code without an event loop.

Not a second implementation: every call runs the async Client's coroutine on one
private event loop in a background thread and waits for its result.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

from .client import ActivityHandle, Client
from .errors import SessionAlreadyOpenError
from .options import SessionOptions
from .session import Session
from .session_info import SessionInfo, SessionState, current_session

T = TypeVar("T")


class _LoopThread:
    """An event loop running in a daemon thread; `call` runs a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sessionq-sync", daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            raise RuntimeError("SyncClient cannot be called from its own event loop; use Client there")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.loop.is_running():
            self.loop.close()


class SyncActivityHandle:
    """Blocking view of an ActivityHandle."""

    def __init__(self, handle: ActivityHandle, runner: _LoopThread) -> None:
        self._handle = handle
        self._runner = runner
        self.activity_id = handle.activity_id

    def result(self) -> Any:
        return self._runner.call(self._handle.result())

    def cancel(self) -> None:
        self._runner.call(self._handle.cancel())


class SyncSession:
    """Blocking view of a Session; `with` completes it on exit."""

    def __init__(self, session: Session, runner: _LoopThread) -> None:
        self._session = session
        self._runner = runner

    @property
    def info(self) -> SessionInfo:
        return self._session.info

    def execute_activity(self, activity: Any, *args: Any, **options: Any) -> Any:
        return self._runner.call(self._session.execute_activity(activity, *args, **options))

    def start_activity(self, activity: Any, *args: Any, **options: Any) -> SyncActivityHandle:
        return SyncActivityHandle(
            self._runner.call(self._session.start_activity(activity, *args, **options)), self._runner
        )

    def complete(self) -> None:
        self._runner.call(self._session.complete())
        if current_session.get() is self._session.info:
            current_session.set(None)

    def __enter__(self) -> SyncSession:
        current_session.set(self._session.info)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.complete()


class SyncClient:
    """The Client's methods, blocking. Arguments are the same as Client's."""

    def __init__(self, redis: Any = None, **kwargs: Any) -> None:
        self._runner = _LoopThread()

        async def make() -> Client:
            return Client(redis, **kwargs)

        self._client = self._runner.call(make())

    @property
    def client(self) -> Client:
        """The async Client underneath."""
        return self._client

    def execute_activity(self, activity: Any, *args: Any, **options: Any) -> Any:
        return self._runner.call(self._client.execute_activity(activity, *args, **options))

    def start_activity(self, activity: Any, *args: Any, **options: Any) -> SyncActivityHandle:
        return SyncActivityHandle(
            self._runner.call(self._client.start_activity(activity, *args, **options)), self._runner
        )

    def _open(self, opener: Any) -> SyncSession:
        held = current_session.get()
        if held is not None and held.state is SessionState.OPEN:
            raise SessionAlreadyOpenError(
                f"this context already holds open session {held.session_id}; complete it first"
            )
        return SyncSession(self._runner.call(opener.open()), self._runner)

    def create_session(self, task_queue: str, options: SessionOptions | None = None) -> SyncSession:
        """Open a session (blocking); use it plainly or as `with ... as session`."""
        return self._open(self._client.create_session(task_queue, options))

    def recreate_session(self, token: bytes, options: SessionOptions | None = None) -> SyncSession:
        return self._open(self._client.recreate_session(token, options))

    def close(self) -> None:
        try:
            self._runner.call(self._client.close())
        finally:
            self._runner.stop()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
