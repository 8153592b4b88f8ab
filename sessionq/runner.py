"""Running activities on a worker, never more at once than max_concurrent_activities.

Every activity, plain or of a session, takes one slot before it starts and gives it back
when its execution (and, for a plain `def`, its thread) is done: the limit is hard. An
entry read from the shared stream while the slots were taken by session activities waits
here, in this worker's pending list (another worker takes it over if this one dies).

Cancelling by activity id reaches an activity wherever it is: running (it is cancelled),
waiting here for a slot, or not yet read (the id is remembered, and it never starts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from . import activity_log
from .activity import ActivityInfo, _RunningActivity
from .envelope import RemoteError, Task, encode_error
from .execution import Execution, Reply, execute, failed
from .options import DEFAULT_RETRY_POLICY
from .threads import DaemonThreadPool

if TYPE_CHECKING:
    from .held import HeldSession
    from .shared_queue import SharedQueue
    from .worker import Worker

log = logging.getLogger("sessionq")

CANCELLED_MEMORY = 10_000


INTERRUPTED = RemoteError("Interrupted", "", "the worker stopped while it ran")
"""The metrics' outcome of an execution cut by the worker's own stop ("Interrupted")."""


class ActivityRunner:
    """The worker's activity slots and executions."""

    def __init__(self, worker: Worker, limit: int) -> None:
        self.worker = worker
        self.limit = limit
        self.in_use = 0
        self.reserved = 0  # plain activities read from the shared stream, not yet in a slot
        self.done = 0
        self.waiting = 0
        """Activities here waiting for a slot (all in use), for inspect."""
        self.executions: dict[str, Execution] = {}
        self.pool = DaemonThreadPool(limit, "sessionq-activity")
        self._slot_freed = asyncio.Event()
        self._cancelled: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._seen: OrderedDict[str, None] = OrderedDict()  # activity ids started here lately

    @property
    def free(self) -> int:
        """Slots neither in use nor promised to a plain activity already read."""
        return self.limit - self.in_use - self.reserved

    def reserve(self) -> None:
        """A plain activity was read: count it now, so the next read asks for one fewer."""
        self.reserved += 1

    def unreserve(self) -> None:
        """A reserved activity will not run here after all."""
        self.reserved -= 1
        self._slot_freed.set()

    async def wait_for_free_slot(self) -> None:
        while self.free <= 0:
            self._slot_freed.clear()
            await self._slot_freed.wait()

    async def _take_slot(self, reserved: bool) -> None:
        """Take a slot (a reserved plain activity turns its reservation into one)."""
        if self.in_use >= self.limit or (not reserved and self.free <= 0):
            self.waiting += 1
            try:
                while self.in_use >= self.limit or (not reserved and self.free <= 0):
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
            finally:
                self.waiting -= 1
        self.in_use += 1
        if reserved:
            self.reserved -= 1

    def _give_slot(self) -> None:
        self.in_use -= 1
        self.done += 1
        self._slot_freed.set()

    # -- cancelling ---------------------------------------------------------------------
    def cancel(self, activity_id: str, kind: str, reason: str) -> None:
        """Cancel an activity by id, running or not started yet."""
        execution = self.executions.get(activity_id)
        if execution is not None:
            execution.cancel(kind, reason)
            return
        self._cancelled[activity_id] = (kind, reason)
        while len(self._cancelled) > CANCELLED_MEMORY:
            self._cancelled.popitem(last=False)

    def cancel_all(self, kind: str, reason: str) -> None:
        for execution in list(self.executions.values()):
            execution.cancel(kind, reason)

    # -- running ------------------------------------------------------------------------
    def first_copy(self, activity_id: str) -> bool:
        """False for a second copy of an activity this worker already started (its caller
        re-sent it after a lost reply): the first copy's result answers the caller."""
        if activity_id in self._seen:
            return False
        self._seen[activity_id] = None
        while len(self._seen) > CANCELLED_MEMORY:
            self._seen.popitem(last=False)
        return True

    async def run(
        self, task: Task, held: HeldSession | None, ack: bytes | None, queue: SharedQueue | None = None
    ) -> None:
        """Run one task and queue its reply. One read through a consumer group (a plain
        activity from the shared stream, or a session activity from its host's stream) has
        `ack`, its entry, and `queue`, where it was read; it reserved its slot then."""
        w = self.worker
        reserved = ack is not None
        stream = queue.stream if queue is not None else None
        if not self.first_copy(task.activity_id):
            log.info("worker %s: activity %s arrived twice; running it once", w.worker_id, task.activity_id)
            if reserved:
                self.unreserve()
            if ack is not None:
                w.outbox.ack(ack, stream)
            return
        await self._take_slot(reserved)
        execution: Execution | None = None
        if w.stopping and ack is not None and task.activity_id not in self._cancelled:
            self._give_slot()  # not started: left pending for another process to take over
            return
        try:
            refusal = self._refusal(task, held)
            if refusal is not None:
                message = encode_error(w.codec, task.activity_id, refusal)
                info = self._info(task, held)
                activity_log.not_started(info, refusal)
                if w.metrics is not None:
                    w.metrics.finished(info, 0.0, refusal, started=False)
            else:
                began = time.perf_counter()
                execution = Execution(task, _RunningActivity(self._info(task, held)))
                activity_log.started(execution.running.info)
                if w.metrics is not None:
                    w.metrics.started(execution.running.info)
                message, error = await self._execute(execution, held)
                took = time.perf_counter() - began
                activity_log.finished(execution.running.info, took, error)
                if w.metrics is not None:
                    w.metrics.finished(execution.running.info, took, error)
        except asyncio.CancelledError:
            if execution is not None:
                left = "left for another worker" if ack is not None else "its caller gets SessionFailedError"
                activity_log.interrupted(execution.running.info, time.perf_counter() - began, left)
                if w.metrics is not None:
                    w.metrics.finished(execution.running.info, time.perf_counter() - began, INTERRUPTED)
            if ack is not None:
                if queue is not None and not w.stopping:  # not a stop: make sure it is found again
                    self._seen.pop(task.activity_id, None)  # and that the copy found then runs
                    queue.lost_track_of(ack)
                return  # the worker stops: left pending, a live worker takes it over (at-least-once)
            message = encode_error(
                w.codec,
                task.activity_id,
                RemoteError(
                    "SessionFailedError",
                    "",
                    f"worker {w.worker_id} shut down while activity {task.name!r} ran",
                ),
            )
        finally:
            self._give_slot_after(execution)
        w.outbox.reply(task.client_id, message, ack, stream)

    def _give_slot_after(self, execution: Execution | None) -> None:
        """Free the slot now, or, if a thread still runs the activity (it ignored its
        cancellation), once that thread returns: the limit counts what really runs."""
        running = [call for call in (execution.threads if execution else []) if not call.done()]
        if not running:
            self._give_slot()
            return
        log.warning(
            "worker %s: activity %r (%s) was cancelled but its thread runs on (it never checks "
            "is_cancelled()); it keeps its activity slot until it returns",
            self.worker.worker_id, execution.task.name, execution.task.activity_id,  # type: ignore[union-attr]
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        left = [len(running)]

        def one_done(_: object) -> None:
            left[0] -= 1
            if left[0] == 0:
                with contextlib.suppress(RuntimeError):  # the worker's loop is gone: nothing to free
                    loop.call_soon_threadsafe(self._give_slot)

        for call in running:
            call.add_done_callback(one_done)

    def _refusal(self, task: Task, held: HeldSession | None) -> RemoteError | None:
        """Why this task must not start now, or None."""
        w = self.worker
        cancelled = self._cancelled.pop(task.activity_id, None)
        if cancelled is not None:
            why = f"activity {task.name!r} was not started: {cancelled[1]}"
            return RemoteError("ActivityCancelledError", "", why)
        if held is not None and held.info.session_id not in w.sessions.open:  # ended while waiting for a slot
            kind, reason = w.sessions.why_not_open(held.info.session_id)
            error = "ActivityCancelledError" if kind == "completed" else "SessionFailedError"
            return RemoteError(error, "", f"activity {task.name!r} was not started: {reason}")
        if w.stopping:
            return RemoteError(
                "SessionFailedError",
                "",
                f"activity {task.name!r} was not started: worker {w.worker_id} is shutting down",
            )
        policy = task.retry_policy or DEFAULT_RETRY_POLICY
        if policy.maximum_attempts and task.attempt > policy.maximum_attempts:
            return RemoteError(
                "ApplicationError",
                "sessionq.WorkerLost",
                f"the worker running activity {task.name!r} died (or its event loop was blocked for "
                f"good) during attempt {task.attempt - 1}, and no attempt is left "
                f"(maximum_attempts={policy.maximum_attempts}); it is not started again",
                attempt=task.attempt - 1,
            )
        return None

    def _info(self, task: Task, held: HeldSession | None) -> ActivityInfo:
        w = self.worker
        return ActivityInfo(
            task.activity_id,
            task.name,
            task.attempt,
            w.task_queue,
            w.worker_id,
            held.info if held else None,
            task.heartbeat_timeout,
        )

    async def _execute(self, execution: Execution, held: HeldSession | None) -> Reply:
        w, task = self.worker, execution.task
        definition = w.registry.get(task.name)
        if definition is None:
            return failed(
                w.codec,
                task.activity_id,
                RemoteError(
                    "ActivityNotRegisteredError",
                    "",
                    f"activity {task.name!r} is not registered on worker "
                    f"{w.worker_id} of task queue {w.task_queue!r} "
                    f"(it has: {', '.join(sorted(w.registry))}); "
                    "register it in Worker(activities=[...]) on every worker of the queue",
                ),
            )
        waited_ms = w.redis_now_ms() - task.enqueued_ms
        if task.schedule_to_start is not None and waited_ms > task.schedule_to_start * 1000:
            return failed(
                w.codec,
                task.activity_id,
                RemoteError(
                    "ActivityTimeoutError",
                    "",
                    f"activity {task.name!r} waited in the queue longer than "
                    f"schedule_to_start_timeout={task.schedule_to_start:g}s; "
                    "add workers or raise the timeout",
                    timeout_type="schedule_to_start",
                ),
            )
        execution.asyncio_task = asyncio.current_task()
        self.executions[task.activity_id] = execution
        if held is not None:
            held.executions[task.activity_id] = execution
        try:
            return await execute(execution, definition, w.codec, self.pool, w.redis_now_ms)
        finally:
            self.executions.pop(task.activity_id, None)
            if held is not None:
                held.executions.pop(task.activity_id, None)

    def blame(self) -> str:
        """Which activity runs on the event loop right now (for the heartbeat's stall report)."""
        current = asyncio.current_task(self.worker.loop) if self.worker.loop is not None else None
        for execution in list(self.executions.values()):
            if current is not None and execution.asyncio_task is current:
                return f"activity {execution.task.name!r} ({execution.task.activity_id})"
        return "code that is not an activity (the worker itself, or a callback)"
