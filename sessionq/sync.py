"""Blocking facade over the async Client, for code without an event loop.

Not a second implementation: every call runs the async Client's coroutine on one
private event loop in a background thread and waits for its result.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from .calls import R, R_co
from .client import Client
from .errors import ConfigurationError, SessionAlreadyOpenError, SessionqError
from .execution import cancel_requests
from .handle import ActivityHandle
from .options import SessionOptions
from .session import Session
from .session_info import SessionInfo, SessionState, current_session

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .calls import ClientCall, ClientCallWithKwargs, SessionCall, SessionCallWithKwargs, Ts

T = TypeVar("T")


CLEANUP_WAIT = 15.0
"""How long an interrupted call may take to give back what it took (a slot, a running activity)."""


def _in_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _LoopThread:
    """An event loop running in a daemon thread; `call` runs a coroutine there and waits.

    A call interrupted in the calling thread (Ctrl-C, an exception) cancels its coroutine on
    the loop and waits for it to clean up, as the async API does when its task is cancelled:
    a session being created is given back, a running activity is cancelled on its worker.
    Once stopped, every call raises SessionqError; calls still under way are cancelled."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sessionq-sync", daemon=True)
        self.thread.start()
        self.stopped = False
        self._tasks: set[asyncio.Task[Any]] = set()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("SyncClient cannot be called from its own event loop; use Client there")
        if _in_running_loop():
            coro.close()
            raise ConfigurationError(
                "SyncClient",
                "was called from a running event loop (an async function, or a Jupyter cell): it "
                "would block that loop for the whole call; use sessionq.Client there and await its "
                "methods (Jupyter runs top-level await)",
            )
        if self.stopped:
            coro.close()
            raise SessionqError("this SyncClient was closed; create a new one")
        future = asyncio.run_coroutine_threadsafe(self._tracked(coro), self.loop)
        try:
            return future.result()
        except (concurrent.futures.CancelledError, asyncio.CancelledError):
            if self.stopped:  # cancelled by close(), from another thread
                raise SessionqError("the SyncClient was closed while this call was waiting") from None
            raise
        except BaseException:
            if not future.done():  # interrupted here, still running there: cancel it, let it clean up
                future.cancel()
                with contextlib.suppress(BaseException):
                    asyncio.run_coroutine_threadsafe(self._settled(), self.loop).result(CLEANUP_WAIT)
            raise

    async def _tracked(self, coro: Coroutine[Any, Any, T]) -> T:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            return await coro
        finally:
            self._tasks.discard(task)

    async def _settled(self) -> None:
        """Until the calls cancelled have finished cleaning up."""
        cancelled = [t for t in self._tasks if t.cancelled() or cancel_requests(t)]
        if cancelled:
            await asyncio.wait(cancelled)

    async def _cancel_all(self) -> None:
        """Cancel whatever still runs on the loop (other threads' calls after close, and their
        tasks) and wait for it, as asyncio.run does before it closes a loop."""
        me = asyncio.current_task()
        running = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=CLEANUP_WAIT)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        with contextlib.suppress(BaseException):
            asyncio.run_coroutine_threadsafe(self._cancel_all(), self.loop).result(CLEANUP_WAIT + 1)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.loop.is_running():
            self.loop.close()


class SyncActivityHandle(Generic[R_co]):
    """Blocking view of an ActivityHandle."""

    def __init__(self, handle: ActivityHandle[R_co], runner: _LoopThread) -> None:
        self._handle = handle
        self._runner = runner
        self.activity_id = handle.activity_id
        """As ActivityHandle.activity_id."""

    def result(self) -> R_co:
        """Block until the activity ends; its return value. Raises as ActivityHandle.result."""
        return self._runner.call(self._handle.result())

    def cancel(self) -> None:
        """Ask the worker to cancel the activity; ``result()`` then raises ActivityCancelledError."""
        self._runner.call(self._handle.cancel())


class SyncSession:
    """Blocking view of a Session; `with` completes it on exit."""

    def __init__(self, session: Session, runner: _LoopThread) -> None:
        self._session = session
        self._runner = runner

    @property
    def info(self) -> SessionInfo:
        """The session's id, worker, host, state and recreate token."""
        return self._session.info

    @overload
    def execute_activity(
        self,
        activity: Callable[[Unpack[Ts]], Awaitable[R]],
        *args: Unpack[Ts],
        **options: Unpack[SessionCall],
    ) -> R: ...
    @overload
    def execute_activity(
        self, activity: Callable[[Unpack[Ts]], R], *args: Unpack[Ts], **options: Unpack[SessionCall]
    ) -> R: ...
    @overload
    def execute_activity(
        self, activity: Callable[..., Any], *args: Any, **options: Unpack[SessionCallWithKwargs]
    ) -> Any: ...
    @overload
    def execute_activity(self, activity: str, *args: Any, **options: Unpack[SessionCall]) -> Any: ...
    def execute_activity(self, activity: Any, *args: Any, **options: Any) -> Any:  # type: ignore[misc]  # mypy misreads an implementation of *args: *Ts
        """Run an activity on the session's worker and block until its result (arguments,
        result and errors as Session.execute_activity)."""
        return self._runner.call(self._session.execute_activity(activity, *args, **options))

    @overload
    def start_activity(
        self,
        activity: Callable[[Unpack[Ts]], Awaitable[R]],
        *args: Unpack[Ts],
        **options: Unpack[SessionCall],
    ) -> SyncActivityHandle[R]: ...
    @overload
    def start_activity(
        self, activity: Callable[[Unpack[Ts]], R], *args: Unpack[Ts], **options: Unpack[SessionCall]
    ) -> SyncActivityHandle[R]: ...
    @overload
    def start_activity(
        self, activity: Callable[..., Any], *args: Any, **options: Unpack[SessionCallWithKwargs]
    ) -> SyncActivityHandle[Any]: ...
    @overload
    def start_activity(
        self, activity: str, *args: Any, **options: Unpack[SessionCall]
    ) -> SyncActivityHandle[Any]: ...
    def start_activity(self, activity: Any, *args: Any, **options: Any) -> SyncActivityHandle[Any]:  # type: ignore[misc]  # as above
        """Queue an activity on the session's worker; a handle whose ``result()`` blocks."""
        return SyncActivityHandle(
            self._runner.call(self._session.start_activity(activity, *args, **options)), self._runner
        )

    def complete(self) -> None:
        """End the session and free its slot (as Session.complete; ``with`` does it on exit)."""
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

        try:
            self._client = self._runner.call(make())
        except BaseException:
            self._runner.stop()  # no thread left behind by a client that could not be made
            raise

    @property
    def client(self) -> Client:
        """The async Client underneath."""
        return self._client

    @overload
    def execute_activity(
        self, activity: Callable[[Unpack[Ts]], Awaitable[R]], *args: Unpack[Ts], **options: Unpack[ClientCall]
    ) -> R: ...
    @overload
    def execute_activity(
        self, activity: Callable[[Unpack[Ts]], R], *args: Unpack[Ts], **options: Unpack[ClientCall]
    ) -> R: ...
    @overload
    def execute_activity(
        self, activity: Callable[..., Any], *args: Any, **options: Unpack[ClientCallWithKwargs]
    ) -> Any: ...
    @overload
    def execute_activity(self, activity: str, *args: Any, **options: Unpack[ClientCall]) -> Any: ...
    def execute_activity(self, activity: Any, *args: Any, **options: Any) -> Any:  # type: ignore[misc]  # mypy misreads an implementation of *args: *Ts
        """Run an activity on any worker of ``task_queue=`` and block until its result
        (arguments, result and errors as Client.execute_activity)."""
        return self._runner.call(self._client.execute_activity(activity, *args, **options))

    @overload
    def start_activity(
        self, activity: Callable[[Unpack[Ts]], Awaitable[R]], *args: Unpack[Ts], **options: Unpack[ClientCall]
    ) -> SyncActivityHandle[R]: ...
    @overload
    def start_activity(
        self, activity: Callable[[Unpack[Ts]], R], *args: Unpack[Ts], **options: Unpack[ClientCall]
    ) -> SyncActivityHandle[R]: ...
    @overload
    def start_activity(
        self, activity: Callable[..., Any], *args: Any, **options: Unpack[ClientCallWithKwargs]
    ) -> SyncActivityHandle[Any]: ...
    @overload
    def start_activity(
        self, activity: str, *args: Any, **options: Unpack[ClientCall]
    ) -> SyncActivityHandle[Any]: ...
    def start_activity(self, activity: Any, *args: Any, **options: Any) -> SyncActivityHandle[Any]:  # type: ignore[misc]  # as above
        """Queue an activity on ``task_queue=``; a handle whose ``result()`` blocks."""
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
        """Open a session, blocking until a worker's slot is reserved (arguments and errors
        as Client.create_session); use it plainly (then ``complete()``) or as ``with ... as
        session`` (completed on exit)."""
        return self._open(self._client.create_session(task_queue, options))

    def recreate_session(self, token: bytes, options: SessionOptions | None = None) -> SyncSession:
        """A new session on the worker of the session that gave `token` (as
        Client.recreate_session), blocking until it is open."""
        return self._open(self._client.recreate_session(token, options))

    def close(self) -> None:
        """Close the client (see Client.close) and stop its thread; calls still under way in
        other threads end with a SessionqError. Safe to call twice."""
        if self._runner.stopped:
            return
        try:
            self._runner.call(self._client.close())
        finally:
            self._runner.stop()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
