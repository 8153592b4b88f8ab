"""Worker sessions, caller side: claim a slot, pin activities to it, complete or fail.

The path of one session: `SessionOpener` runs the create_session script (claim a slot,
or queue for one and wait for its grant in the inbox); `Session.start_activity` appends
to the worker's own stream; `Session.complete` runs end_session. While activities are
outstanding the client's liveness monitor (liveness.py) checks the worker's heartbeat
key, so a dead worker surfaces as SessionFailedError within its heartbeat timeout plus a
fraction, never a hang. While a session with an owner_timeout is open, or a creator
waits, the client renews its lease (lease.py), so a caller that vanishes leaks nothing.

One place settles a session's state as its caller sees it (`Session._settle`), and one
way leads out of the waiting line (`SessionOpener._leave_line`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, overload

from . import resources
from .calls import R
from .durations import to_ms
from .envelope import Grant, Refusal, Result
from .errors import (
    ActivityCancelledError,
    ConfigurationError,
    RedisDataLostError,
    RedisUnavailableError,
    SessionAlreadyOpenError,
    SessionCompletedError,
    SessionCreationTimeoutError,
    SessionFailedError,
    SessionqError,
)
from .faults import describe, is_transient, public, retrying
from .handle import ActivityHandle
from .keys import QueueKeys, host_of, new_id
from .liveness import check_interval, reap
from .options import SessionOptions
from .scripts import Claim, Ended
from .session_info import RecreateToken, SessionInfo, SessionState, current_session

if TYPE_CHECKING:
    from collections.abc import Generator

    from typing_extensions import Unpack

    from .calls import SessionCall, SessionCallWithKwargs, Ts
    from .client import Client

log = logging.getLogger("sessionq")


class Session:
    """An open reservation of one worker. Every activity run through it runs there."""

    def __init__(
        self,
        client: Client,
        keys: QueueKeys,
        info: SessionInfo,
        options: SessionOptions,
        deadline_ms: int,
        hb_ms: int,
    ) -> None:
        self.client = client
        self.keys = keys
        self.info = info
        """The session's id, worker, host, state and recreate token."""
        self.options = options
        self.deadline_ms = deadline_ms
        self.hb_ms = hb_ms
        self.owner_ms = to_ms(options.owner_timeout)  # type: ignore[arg-type]
        self._expires_at = time.monotonic() + float(options.execution_timeout)  # type: ignore[arg-type]
        self._pending: set[str] = set()
        self._inbox = client.inbox(info.task_queue)
        client.hold(self)

    @property
    def session_id(self) -> str:
        """The session's unique id (``info.session_id``)."""
        return self.info.session_id

    @property
    def state(self) -> SessionState:
        """OPEN, COMPLETED or FAILED, as this caller last learnt (``info.state``)."""
        return self.info.state

    # -- activities --------------------------------------------------------------------
    def _raise_if_closed(self, cause: BaseException | None = None) -> None:
        if self.info.state is SessionState.COMPLETED:
            raise SessionCompletedError(
                f"session {self.session_id} was completed; create a new session to run more activities"
            ) from cause
        if self.info.state is SessionState.FAILED:
            raise SessionFailedError(
                f"session {self.session_id} failed: {self.info.failure}; create a new session",
                self.session_id,
            ) from cause

    async def _start_activity(
        self,
        activity: Any,
        *args: Any,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> ActivityHandle[Any]:
        """start_activity, without the public-API wrapper (execute_activity has its own)."""
        self._raise_if_closed()
        opts = self.client.resolve_options(self.options.activity_options, options)
        activity_id, name, payload = self.client.prepare(
            activity, args, kwargs, opts, self.info.task_queue, self.session_id
        )
        future = await self._inbox.expect(activity_id)
        self._pending.add(activity_id)
        stream = self.keys.stream(self.info.worker_id)
        try:
            sent = await retrying(
                lambda: self.client.wire.execute(
                    stream, "XADD", stream, "NOMKSTREAM", "*", "t", "a", "d", payload
                ),
                within=self.client.unavailable_timeout,
                what="sending a session activity",
            )
        except BaseException:
            self._forget(activity_id)
            self._inbox.forget(activity_id)
            raise
        if sent is None:  # the worker's stream is gone: it was declared dead or shut down
            self._forget(activity_id)
            self._inbox.forget(activity_id)
            await self.refresh()
            self._raise_if_closed()
            await self._end("fail", f"worker {self.info.worker_id} is gone")
            self._raise_if_closed()
        self.client.monitor.watch(self)
        return ActivityHandle(
            activity_id=activity_id,
            name=name,
            future=future,
            inbox=self._inbox,
            schedule_to_close=opts.schedule_to_close_timeout,  # type: ignore[arg-type]
            on_done=self._forget,
            cancel=lambda: self._cancel_activity(activity_id, sent),
        )

    @overload
    async def start_activity(
        self,
        activity: Callable[[Unpack[Ts]], Awaitable[R]],
        *args: Unpack[Ts],
        **options: Unpack[SessionCall],
    ) -> ActivityHandle[R]: ...
    @overload
    async def start_activity(
        self, activity: Callable[[Unpack[Ts]], R], *args: Unpack[Ts], **options: Unpack[SessionCall]
    ) -> ActivityHandle[R]: ...
    @overload
    async def start_activity(
        self, activity: Callable[..., Any], *args: Any, **options: Unpack[SessionCallWithKwargs]
    ) -> ActivityHandle[Any]: ...
    @overload
    async def start_activity(
        self, activity: str, *args: Any, **options: Unpack[SessionCall]
    ) -> ActivityHandle[Any]: ...
    @public("starting a session activity")  # type: ignore[misc]  # mypy misreads an implementation of *args: *Ts
    async def start_activity(
        self,
        activity: Any,
        *args: Any,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> ActivityHandle[Any]:
        """Queue an activity on the session's worker and return at once with its handle.

        It takes the arguments of `execute_activity`.

        Returns:
            An ActivityHandle: ``await handle.result()``, ``await handle.cancel()``.

        Raises:
            SessionFailedError, SessionCompletedError: the session already ended.
            RedisUnavailableError: Redis stayed unreachable for ``unavailable_timeout``.
            ConfigurationError, SerializationError: bad options or arguments; nothing was sent.
        """
        return await self._start_activity(activity, *args, kwargs=kwargs, **options)

    @overload
    async def execute_activity(
        self,
        activity: Callable[[Unpack[Ts]], Awaitable[R]],
        *args: Unpack[Ts],
        **options: Unpack[SessionCall],
    ) -> R: ...
    @overload
    async def execute_activity(
        self, activity: Callable[[Unpack[Ts]], R], *args: Unpack[Ts], **options: Unpack[SessionCall]
    ) -> R: ...
    @overload
    async def execute_activity(
        self, activity: Callable[..., Any], *args: Any, **options: Unpack[SessionCallWithKwargs]
    ) -> Any: ...
    @overload
    async def execute_activity(self, activity: str, *args: Any, **options: Unpack[SessionCall]) -> Any: ...
    @public("running a session activity")  # type: ignore[misc]  # mypy misreads an implementation of *args: *Ts
    async def execute_activity(
        self,
        activity: Any,
        *args: Any,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        """Run an activity on the session's worker and return its result.

        Args:
            activity: a function decorated with ``@sessionq.activity``, or its registered name.
            *args: its positional arguments (encoded by the client's codec: msgpack types,
                or what the Codec was taught).
            kwargs: its keyword arguments, as a dict (this call's own keywords are options).
            **options: ActivityOptions fields: ``start_to_close_timeout``,
                ``schedule_to_close_timeout``, ``schedule_to_start_timeout``,
                ``heartbeat_timeout``, ``retry_policy``; or ``options``, a whole
                ActivityOptions, which those override.

        Returns:
            What the activity returned.

        Raises:
            ActivityError: the activity raised, after the retry policy's attempts; its
                ``cause`` has the remote type, message and traceback.
            ActivityTimeoutError: a timeout passed (``timeout_type`` says which).
            ActivityCancelledError: it was cancelled (``handle.cancel()``, a cancelled await,
                the session's completion).
            ActivityNotRegisteredError: the worker that took it does not have it.
            SessionFailedError: the session failed (its worker died, its execution timeout
                passed, its owner went away); the activity's fate is unknown.
            SessionCompletedError: the session was completed before this call.
            RedisUnavailableError: Redis stayed unreachable for ``unavailable_timeout``.
            RedisDataLostError: Redis lost the task or its result (failover, restart).
            ConfigurationError, SerializationError: bad options or arguments; nothing was sent.
        """
        handle = await self._start_activity(activity, *args, kwargs=kwargs, **options)
        try:
            return await handle.outcome()
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # the cancellation stands, whatever Redis says
                await asyncio.shield(handle.cancel())
            raise
        except SessionFailedError as exc:
            # The worker says the session ended: make Redis agree (idempotent: whatever
            # ended it stands), so the slot is free and not only this caller knows.
            try:
                await self._end("fail", str(exc))
            except Exception:
                self._settle(SessionState.FAILED, str(exc))
            raise
        except RedisDataLostError as exc:
            # Redis lost the result; if it lost the session too, that is what the caller must hear.
            with contextlib.suppress(Exception):
                await self.refresh()
            self._raise_if_closed(cause=exc)
            raise

    def _forget(self, activity_id: str) -> None:
        self._pending.discard(activity_id)

    @property
    def busy(self) -> bool:
        """Whether activities are outstanding (the liveness monitor watches only these)."""
        return bool(self._pending) and self.info.state is SessionState.OPEN

    @property
    def past_deadline(self) -> bool:
        """Whether its execution timeout passed, by this process' clock."""
        return time.monotonic() >= self._expires_at

    async def _cancel_activity(self, activity_id: str, entry_id: bytes) -> None:
        """Tell the session's worker to cancel the activity (running, waiting for a slot, or
        not read yet). On a host: delete its entry from the host's stream (so no process,
        not even one that starts later, ever runs it) and tell every process (one may run it)."""
        k, wire = self.keys, self.client.wire

        async def send() -> None:
            host_id = self.info.host_id
            commands: list[tuple[object, ...]] = []
            if host_id is None:
                targets = [self.info.worker_id]
            else:
                commands.append(("XDEL", k.stream(self.info.worker_id), entry_id))
                targets = [m.decode() for m in await wire.execute(k.tasks, "SMEMBERS", k.host_procs(host_id))]
            commands += [
                ("XADD", k.stream(w), "NOMKSTREAM", "*", "t", "x", "i", activity_id) for w in targets
            ]
            if commands:
                await wire.execute_many(k.tasks, commands)

        await self.client.retrying(send, what="cancelling a session activity")

    # -- ending --------------------------------------------------------------------------
    @public("completing a session")
    async def complete(self) -> None:
        """End the session: release the worker's slot (to the next waiting caller) and cancel
        the session's activities still running there. Idempotent; safe on a failed session
        (use it in ``finally``).

        Raises:
            RedisUnavailableError: Redis stayed unreachable for ``unavailable_timeout`` (the
                session then ends by its owner lease or its execution timeout).
        """
        if self.info.state is SessionState.OPEN:
            try:
                await self.client.retrying(lambda: self._end("complete", ""), what="completing a session")
            except Exception:
                # Redis cannot be reached: finish in the background, and stop renewing the owner
                # lease, so that the session ends by its owner_timeout if we cannot do it sooner.
                self.client.release(self)
                self.client.settle_later(
                    lambda: self._end("complete", ""), what=f"completing session {self.session_id}"
                )
                raise
        if current_session.get() is self.info:
            current_session.set(None)

    async def _end(self, mode: str, reason: str) -> None:
        """End the session in Redis (idempotent: the state it already has stands) and here."""
        ended = await self.client.scripts.end_session(
            self.keys, self.session_id, mode, reason, self.client.retention_ms
        )
        self._settle_from(ended)

    def _settle_from(self, ended: Ended) -> None:
        if ended.state == "MISSING":
            self._settle(SessionState.FAILED, "its record is gone from Redis (Redis lost its data?)")
        elif ended.state != "OPEN":
            self._settle(SessionState(ended.state), ended.reason or None)

    def _settle(self, state: SessionState, reason: str | None) -> None:
        """Record the end here, once, and settle every activity still waiting."""
        if self.info.state is not SessionState.OPEN:
            return
        self.info.state = state
        self.info.failure = reason
        for activity_id in list(self._pending):
            if state is SessionState.COMPLETED:
                error: Exception = ActivityCancelledError(
                    f"activity {activity_id} was cancelled: session {self.session_id} was completed"
                )
            else:
                error = SessionFailedError(f"session {self.session_id} failed: {reason}", self.session_id)
            self._inbox.fail(activity_id, error)
        self._pending.clear()
        self.client.release(self)

    async def refresh(self) -> None:
        """Look at Redis: is the session still open, its worker alive, its deadline ahead?"""
        k, w = self.keys, self.info.worker_id
        wire = self.client.wire
        (state, reason), alive = await wire.execute_many(
            k.tasks, [("HMGET", k.session(self.session_id), "state", "reason"), ("EXISTS", k.alive(w))]
        )
        if state == b"OPEN" and not alive:
            await reap(self.client, k, w, self.hb_ms)
            state, reason = await wire.execute(
                k.tasks, "HMGET", k.session(self.session_id), "state", "reason"
            )
            if state == b"OPEN":  # reaped by someone else meanwhile, or its heartbeat came back
                return
        if state is None:
            self._settle(SessionState.FAILED, "its record is gone from Redis (Redis lost its data?)")
        elif state != b"OPEN":
            self._settle(SessionState(state.decode()), (reason or b"").decode() or None)
        elif self.past_deadline:
            await self._end("expire", "execution timeout passed")

    async def close_quietly(self) -> None:
        """Complete the session as its client closes; a failure is logged, not raised."""
        try:
            await self.complete()
        except SessionqError as exc:
            log.warning("session %s: could not complete it on close (%s)", self.session_id, exc)

    # -- context manager ---------------------------------------------------------------
    async def __aenter__(self) -> Session:
        current_session.set(self.info)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.leave_block()

    async def leave_block(self) -> None:
        """Complete the session as `async with` ends, and drop it from the caller's context
        (the shielded complete() runs in a task of its own, on a copy of that context)."""
        try:
            await asyncio.shield(self.complete())
        finally:
            if current_session.get() is self.info:
                current_session.set(None)


class SessionOpener:
    """What create_session/recreate_session return: `await` it, or `async with` it."""

    def __init__(
        self, client: Client, task_queue: str, options: SessionOptions, token: RecreateToken | None
    ) -> None:
        if not isinstance(options, SessionOptions):
            raise ConfigurationError("options", "must be a sessionq.SessionOptions")
        self.client = client
        self.keys = client.keys(task_queue)
        self.task_queue = task_queue
        self.options = options
        self.token = token
        self.resources: dict[str, int] = dict(
            options.resources if options.resources is not None else (token.resources if token else {})
        )
        """What the session asks for: its options', else (recreate) the token's session's."""
        self._session: Session | None = None

    def __await__(self) -> Generator[Any, None, Session]:
        return self.open().__await__()

    def __getattr__(self, name: str) -> Any:
        if name in _SESSION_ATTRIBUTES:
            raise AttributeError(
                f"{type(self).__name__} has no {name!r}: create_session() returns an opener, not the "
                "session; use `session = await client.create_session(...)` or "
                "`async with client.create_session(...) as session:`"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __enter__(self) -> NoReturn:
        raise TypeError(
            "create_session() of the async Client needs `async with` (or `await`); for a plain "
            "`with` use sessionq.SyncClient"
        )

    def __exit__(self, *exc: object) -> None:  # pragma: no cover - __enter__ always raises
        pass

    async def __aenter__(self) -> Session:
        self._session = await self.open()
        current_session.set(self._session.info)
        return self._session

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.leave_block()

    @public("creating a session")
    async def open(self) -> Session:
        held = current_session.get()
        if held is not None and held.state is SessionState.OPEN:
            raise SessionAlreadyOpenError(
                f"this context already holds open session {held.session_id}; complete it first, or "
                "create the new session outside its block (tasks started inside it inherit it)"
            )
        deadline = time.monotonic() + float(self.options.creation_timeout)  # type: ignore[arg-type]
        sid = new_id()
        with self.client.in_flight():  # close() waits for it (and gives back what it got)
            while True:
                try:
                    return await self._claim(sid, deadline)
                except _Requeue as why:
                    if time.monotonic() >= deadline:
                        await self._raise_timeout()
                    # Same session id: the script hands back the session if it was made after all.
                    log.warning("session %s: %s; queueing again", sid, why)

    async def _claim(self, sid: str, deadline: float) -> Session:
        """Claim a slot now, or queue for one and wait for its grant until `deadline`."""
        client, opts = self.client, self.options
        target = self.token.worker_id if self.token else ""
        asked = self.resources
        inbox = client.inbox(self.task_queue)
        grant_future = await inbox.expect(sid)
        owner_ms = to_ms(opts.owner_timeout)  # type: ignore[arg-type]
        claim = asyncio.ensure_future(
            client.retrying(
                lambda: client.scripts.create_session(
                    self.keys,
                    sid,
                    client_id=client.client_id,
                    exec_ms=to_ms(opts.execution_timeout),  # type: ignore[arg-type]
                    wait_ms=max(1, int((deadline - time.monotonic()) * 1000)),
                    target=target,
                    owner=client.identity,
                    owner_ms=owner_ms,
                    lease_ms=client.leases.ttl_ms(self.task_queue, owner_ms),
                    resources=resources.encode(asked),
                ),
                what="creating a session",
            )
        )
        try:
            reply: Claim = await asyncio.shield(claim)
        except asyncio.CancelledError:
            await asyncio.shield(self._undo_claim(claim, sid))
            raise
        except Exception as exc:
            if is_transient(exc) or isinstance(exc, RedisUnavailableError):
                self._leave_line_later(sid)  # it may have run: undo whatever it did
            else:
                inbox.forget(sid)
            raise
        if reply.status == "OK":
            inbox.forget(sid)
            grant = Grant(sid, reply.worker_id, reply.hostname, reply.deadline_ms, reply.hb_ms)
            return await self._session_from(grant)
        if reply.status == "DEAD":
            inbox.forget(sid)
            raise SessionFailedError(
                f"cannot recreate the session: worker {target} of task queue {self.task_queue!r} "
                "is no longer alive; create a new session with create_session()"
            )
        leases = client.leases
        leases.waiting(self.task_queue, +1)  # renewed while it waits: a silent waiter loses its place
        try:
            message = await self._wait_for_grant(grant_future, sid, target, deadline)
        except asyncio.CancelledError:
            await asyncio.shield(self._leave_line(sid))
            raise
        except (_Requeue, RedisDataLostError) as exc:
            raise _Requeue(str(exc)) from exc
        except BaseException:
            self._leave_line_later(sid)
            raise
        finally:
            leases.waiting(self.task_queue, -1)
        if isinstance(message, Refusal):
            if message.kind == "lease":
                raise _Requeue(f"the line dropped it ({message.reason})")
            raise SessionFailedError(
                f"cannot recreate the session on worker {target}: {message.reason}; "
                "create a new session with create_session()"
            )
        assert isinstance(message, Grant)
        return await self._session_from(message)

    async def _wait_for_grant(
        self,
        future: asyncio.Future[Result | Grant | Refusal],
        sid: str,
        target: str,
        deadline: float,
    ) -> Grant | Refusal | Result:
        """Block on the inbox until a slot is handed over or creation_timeout passes."""
        step = check_interval(0) if target else None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                return await asyncio.wait_for(asyncio.shield(future), min(remaining, step or remaining))
            except asyncio.TimeoutError:
                if target and await self._target_dead(target):
                    continue  # the reaper refuses our ticket; the refusal arrives next
        try:
            outcome = await self._give_up(sid, complete_if_granted=False)
        except Exception as exc:
            if not is_transient(exc):
                raise
            self._leave_line_later(sid)
            raise SessionCreationTimeoutError(
                f"no session slot on task queue {self.task_queue!r} within creation_timeout="
                f"{float(self.options.creation_timeout):g}s, and Redis could not be reached to leave "  # type: ignore[arg-type]
                f"the waiting line ({describe(exc)}); sessionq keeps trying to leave it in the background"
            ) from exc
        if outcome == "GRANTED":  # granted at the last moment: the grant is in the inbox
            try:
                return await asyncio.wait_for(asyncio.shield(future), self.client.unavailable_timeout)
            except asyncio.TimeoutError:  # the grant was lost on its way: give the slot back
                self._leave_line_later(sid)
        await self._raise_timeout()
        raise AssertionError("unreachable")

    async def _target_dead(self, worker_id: str) -> bool:
        try:
            if await self.client.wire.execute(self.keys.tasks, "EXISTS", self.keys.alive(worker_id)):
                return False
            await reap(self.client, self.keys, worker_id, 0)
        except Exception as exc:
            if not is_transient(exc):
                raise
            return False  # cannot tell now; the inbox reader reports a lasting outage
        return True

    async def _undo_claim(self, claim: asyncio.Future[Claim], sid: str) -> None:
        """The caller was cancelled while the create_session script ran: wait for its answer
        and give back what it took, its place in the line or its slot (a session nobody holds
        would keep the slot until its execution timeout)."""
        try:
            await claim
        except Exception:
            self.client.forget_wait(self.task_queue, sid)
            return
        await self._leave_line(sid)

    # -- the one way out of the line ------------------------------------------------------
    async def _leave_line(self, sid: str) -> None:
        """Leave the waiting line for good; a slot granted meanwhile is given back. Done in
        the background if Redis cannot be reached now."""
        try:
            await self._give_up(sid)
        except Exception as exc:
            if not is_transient(exc):
                raise
            self._leave_line_later(sid)

    def _leave_line_later(self, sid: str) -> None:
        if self.client.closed:
            return  # nothing can reach Redis any more; the ticket's deadline drops it
        self.client.forget_wait(self.task_queue, sid)
        self.client.settle_later(lambda: self._give_up(sid), what=f"leaving the waiting line (session {sid})")

    async def _give_up(self, sid: str, complete_if_granted: bool = True) -> str:
        """Leave the waiting line; a slot granted meanwhile is released if unwanted."""
        outcome = await self.client.scripts.cancel_wait(self.keys, sid)
        if outcome == "GRANTED" and complete_if_granted:
            await self.client.scripts.end_session(self.keys, sid, "complete", "", self.client.retention_ms)
        if outcome != "GRANTED" or complete_if_granted:
            self.client.forget_wait(self.task_queue, sid)
        return outcome

    async def _raise_timeout(self) -> None:
        k = self.keys
        timeout = float(self.options.creation_timeout)  # type: ignore[arg-type]
        if self.token is not None:
            wanted = f" with {resources.encode(self.resources)} free" if self.resources else ""
            short = ""
            if self.resources:
                with contextlib.suppress(Exception):
                    offer = await self.client.wire.execute(
                        k.tasks, "HGET", k.worker(self.token.worker_id), "res"
                    )
                    short = self._resources_nobody_has([resources.decode(offer)])
            raise SessionCreationTimeoutError(
                f"worker {self.token.worker_id} had no free session slot{wanted} within creation_timeout="
                f"{timeout:g}s"
                + (
                    f" and never could: {short}; ask for less with SessionOptions(resources=...)"
                    if short
                    else "; complete sessions on it sooner, or raise creation_timeout"
                )
            )
        try:
            wire = self.client.wire
            members = await wire.execute(k.tasks, "SMEMBERS", k.workers)
            rows = (
                await wire.execute_many(
                    k.tasks,
                    [("HMGET", k.worker(w.decode()), "max_sessions", "res") for w in members]
                    + [("EXISTS", k.alive(w.decode())) for w in members],
                )
                if members
                else []
            )
        except Exception as exc:
            raise SessionCreationTimeoutError(
                f"no session slot on task queue {self.task_queue!r} within creation_timeout={timeout:g}s "
                f"(and the workers could not be listed: {describe(exc)})"
            ) from exc
        records, alive = rows[: len(members)], rows[len(members) :]
        placed_on = [
            (w.decode(), resources.decode(res), bool(up))
            for w, (cap, res), up in zip(members, records, alive, strict=True)
            if cap is not None and int(cap) >= 0
        ]
        session_workers = len(placed_on)
        hosts = sum(1 for w, _, _ in placed_on if host_of(w) is not None)
        if session_workers == 0:
            raise SessionCreationTimeoutError(
                f"no worker with sessions enabled polls task queue {self.task_queue!r} (waited "
                f"{timeout:g}s); start one with Worker(..., enable_sessions=True) or "
                f"`sessionq worker MODULE:ATTR --task-queue {self.task_queue}`"
            )
        if self.resources:
            short = self._resources_nobody_has([offer for _, offer, up in placed_on if up])
            if short:
                raise SessionCreationTimeoutError(
                    f"no live worker of task queue {self.task_queue!r} could ever hold this session "
                    f"(waited {timeout:g}s): {short}; start a worker with "
                    "Worker(session_resources=...) (`sessionq worker --resource NAME=AMOUNT`) that offers "
                    "it, or ask for less"
                )
        which = f"{session_workers} session worker(s)"
        if hosts:
            which = f"{session_workers - hosts} session worker(s) and {hosts} host(s)"
        if self.resources:
            raise SessionCreationTimeoutError(
                f"none of the {which} of task queue {self.task_queue!r} had a free slot with "
                f"{resources.encode(self.resources)} free within creation_timeout={timeout:g}s (its "
                "resources stayed taken); start more workers that offer them, or complete sessions sooner"
            )
        raise SessionCreationTimeoutError(
            f"all {which} of task queue {self.task_queue!r} stayed full for creation_timeout={timeout:g}s; "
            "start more workers, raise max_concurrent_sessions, or complete sessions sooner"
        )

    def _resources_nobody_has(self, offers: list[dict[str, int]]) -> str:
        """Why no live worker could ever hold what this session asks for ("" if one could):
        a resource nobody offers, more than anyone offers, or no one worker offering it all."""
        if any(all(offer.get(n, 0) >= a for n, a in self.resources.items()) for offer in offers):
            return ""
        problems = []
        for name, amount in self.resources.items():
            most = max((offer.get(name, 0) for offer in offers), default=0)
            if most == 0:
                problems.append(f"no live worker offers resource {name!r} (asked: {amount})")
            elif most < amount:
                problems.append(
                    f"it asks for {name}={amount}, but the most any live worker offers is {name}={most}"
                )
        if not problems:  # each is offered somewhere, but never all of them together
            each = ", ".join(f"{name} up to {max(o.get(name, 0) for o in offers)}" for name in self.resources)
            problems.append(
                f"no single live worker offers all of {resources.encode(self.resources)} "
                f"(offered apart: {each})"
            )
        return "; ".join(problems)

    async def _session_from(self, grant: Grant) -> Session:
        if self.client.closing:  # the client closed while this claim ran: give the slot back
            await self._give_up(grant.session_id)
            raise SessionqError("the Client was closed while this call was waiting")
        info = SessionInfo(
            session_id=grant.session_id,
            hostname=grant.hostname,
            worker_id=grant.worker_id,
            task_queue=self.task_queue,
            prefix=self.client.prefix,
            host_id=host_of(grant.worker_id),
            resources=dict(self.resources),
        )
        return Session(self.client, self.keys, info, self.options, grant.deadline_ms, grant.hb_ms)


class _Requeue(Exception):
    """The caller's place in line was lost (Redis lost it, or it was dropped while the
    client was silent): queue again with the same session id."""


_SESSION_ATTRIBUTES = frozenset(name for name in dir(Session) if not name.startswith("_")) | {
    "session_id",
    "info",
    "state",
}
"""What a Session has and its opener does not: the names a forgotten await reaches for."""
