"""Read what sessionq keeps in Redis, without changing any of it (for `sessionq inspect`).

Only read commands are sent (TIME, SMEMBERS, HGETALL, PTTL, XLEN, XRANGE, XINFO, LRANGE,
LLEN, SCAN, EXISTS): inspect never reaps a dead worker nor trims a stream, so it shows a
stuck system as it is. Reads come from Redis, not from live workers, so a dead worker's
leftovers (open sessions, queued activities, unacknowledged work) are visible too.
The shape of the dictionaries built here is the `--json` schema (see inspect_cmd).
"""

from __future__ import annotations

from typing import Any

from sessionq import resources
from sessionq.codec import default_codec
from sessionq.envelope import decode_task
from sessionq.keys import CONSUMER_GROUP, QueueKeys, host_of, host_worker_id, queues_index

STREAM_SCAN_LIMIT = 10_000
"""Most entries read from one worker's own stream when counting queued activities."""

SCHEMA_VERSION = 1

MIN_PREFIX = 6
"""Shortest start of a session id that `inspect session` looks up (the tables show 12)."""


class AmbiguousSession(LookupError):
    """Several sessions begin with what was given."""

    def __init__(self, start: str, matches: list[tuple[str, str]], too_short: bool = False) -> None:
        shown = ", ".join(f"{sid} ({queue})" for queue, sid in matches[:5])
        more = f" and {len(matches) - 5} more" if len(matches) > 5 else ""
        text = (
            f"no session {start!r}; give the whole id, or at least {MIN_PREFIX} characters of it"
            if too_short
            else f"{len(matches)} sessions begin with {start!r}: {shown}{more}; give more of the id"
        )
        super().__init__(text)
        self.matches = matches


def text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def number(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def age_s(now_ms: int, then_ms: int | None) -> float | None:
    """Seconds since `then_ms`; never negative (a heartbeat may land after the snapshot's clock read)."""
    return None if then_ms is None else max(0.0, round((now_ms - then_ms) / 1000, 3))


def strings(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in raw.items()}


def activities_run(record: dict[str, str]) -> int | None:
    """A session's activity count: one field, or one per process of its host, added up."""
    counts = [number(v) for k, v in record.items() if k == "activities" or k.startswith("activities:")]
    return sum(c for c in counts if c is not None) if counts else None


def glob_escape(value: str) -> str:
    """Escape Redis glob metacharacters so a prefix or queue name matches literally."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in value)


def entry_ms(entry_id: bytes) -> int:
    return int(entry_id.split(b"-")[0])


class Reader:
    """Collects queues, workers and sessions of one key prefix from a redis.Redis (sync)."""

    def __init__(self, redis: Any, prefix: str) -> None:
        self.r = redis
        self.prefix = prefix
        seconds, micros = self.r.time()
        self.now_ms = int(seconds) * 1000 + int(micros) // 1000
        self._streams: dict[str, list[dict[str, Any]]] = {}

    # -- queues ---------------------------------------------------------------------------
    def queue_names(self, only: str | None = None) -> list[str]:
        if only:
            return [only]
        return sorted(m.decode(errors="replace") for m in self.r.smembers(queues_index(self.prefix)))

    def queue(self, name: str, workers: list[dict[str, Any]]) -> dict[str, Any]:
        k = QueueKeys(self.prefix, name)
        with self.r.pipeline(transaction=False) as pipe:
            pipe.xlen(k.tasks)
            pipe.xrange(k.tasks, "-", "+", count=1)
            pipe.zcard(k.waiters)
            pipe.xlen(k.dead)
            length, first, waiting, dead = pipe.execute()
        group = self.group(k)
        mine = [w for w in workers if w["task_queue"] == name]
        session_workers = [w for w in mine if w["sessions_enabled"] and w["alive"] and not w.get("in_grace")]
        unlimited = any(w["max_sessions"] is None for w in session_workers)
        activity_sets = {tuple(w["activities"]) for w in mine if w["kind"] == "worker" and w["alive"]}
        return {
            "task_queue": name,
            "length": int(length),
            "pending": int(group.get("pending", 0)),
            "consumers": int(group.get("consumers", 0)),
            "oldest_age_s": age_s(self.now_ms, entry_ms(first[0][0])) if first else None,
            "waiting_sessions": int(waiting),
            "workers": sum(1 for w in mine if w["kind"] == "worker"),
            "workers_alive": sum(1 for w in mine if w["alive"] and w["kind"] == "worker"),
            "hosts": sum(1 for w in mine if w["kind"] == "host"),
            "open_sessions": sum(w["open_sessions"] for w in mine),
            "free_session_slots": None
            if unlimited
            else sum(max(0, w["max_sessions"] - w["open_sessions"]) for w in session_workers),
            "dead_letters": int(dead),
            "activities_differ": len(activity_sets) > 1,
        }

    def group(self, k: QueueKeys) -> dict[str, Any]:
        try:
            groups = self.r.xinfo_groups(k.tasks)
        except Exception:  # no stream yet
            return {}
        for group in groups:
            if text(group.get("name")) == CONSUMER_GROUP:
                return dict(group)
        return {}

    def consumers(self, k: QueueKeys, stream: str | None = None) -> dict[str, int]:
        """Activities each consumer of the shared stream (or a host's) read but did not acknowledge."""
        try:
            rows = self.r.xinfo_consumers(stream or k.tasks, CONSUMER_GROUP)
        except Exception:
            return {}
        return {text(row["name"]) or "": int(row.get("pending", 0)) for row in rows}

    # -- workers --------------------------------------------------------------------------
    def workers(self, queue: str) -> list[dict[str, Any]]:
        k = QueueKeys(self.prefix, queue)
        ids = sorted(m.decode(errors="replace") for m in self.r.smembers(k.workers))
        if not ids:
            return []
        with self.r.pipeline(transaction=False) as pipe:
            for w in ids:
                pipe.hgetall(k.worker(w))
                pipe.pttl(k.alive(w))
            replies = pipe.execute()
        pending = self.consumers(k)
        queued = {w: self.own_stream(k, w) for w in ids}
        out = []
        for i, w in enumerate(ids):
            record, ttl = strings(replies[2 * i]), int(replies[2 * i + 1])
            host_id = host_of(w)
            if host_id is None:
                row = self.worker_row(queue, w, record, ttl, pending.get(w, 0), queued[w])
            else:
                row = self.host_row(queue, host_id, record, ttl, queued[w])
            out.append(row)
        return out

    def host_row(
        self, queue: str, host_id: str, record: dict[str, str], ttl: int, queued: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """A host: the worker processes sharing one host id, as its sessions see it."""
        k = QueueKeys(self.prefix, queue)
        identity = host_worker_id(host_id)
        row = self.worker_row(queue, identity, record, ttl, 0, queued)
        members = sorted(m.decode(errors="replace") for m in self.r.smembers(k.host_procs(host_id)))
        with self.r.pipeline(transaction=False) as pipe:
            for member in members:
                pipe.exists(k.alive(member))
            pipe.exists(k.host_up(host_id))
            *alive, up = pipe.execute()
        grace_ms = number(record.get("grace_ms")) or 0
        pending = self.consumers(k, k.stream(identity))
        in_grace = row["alive"] and not up
        row.update(
            kind="host",
            host_id=host_id,
            restart_grace_s=grace_ms / 1000,
            processes=[{"identity": m, "alive": bool(a)} for m, a in zip(members, alive, strict=True)],
            processes_alive=sum(1 for a in alive if a),
            in_grace=bool(in_grace),
            no_live_process_s=round(max(0, grace_ms - ttl) / 1000, 3) if in_grace and ttl >= 0 else None,
            pending=sum(pending.values()),
        )
        return row

    def worker_row(
        self, queue: str, w: str, record: dict[str, str], ttl: int, pending: int, queued: list[dict[str, Any]]
    ) -> dict[str, Any]:
        cap = number(record.get("max_sessions"))
        hb_ms = number(record.get("hb_ms"))
        alive = ttl > 0 or ttl == -1
        return {
            "task_queue": queue,
            "kind": "worker",
            "identity": w,
            "state": ("stopping" if record.get("stopping") == "1" else "alive") if alive else "dead",
            "host_id": record.get("hid"),
            "host": record.get("host"),
            "pid": number(record.get("pid")),
            "alive": alive,
            "heartbeat_ttl_ms": ttl if ttl >= 0 else None,
            # An idle worker's beat renews only its heartbeat key: its age is what the TTL lost
            # (a host's key lives restart_grace longer; its record's 'beat' is kept current).
            "last_heartbeat_age_s": round((hb_ms - ttl) / 1000, 3)
            if hb_ms is not None and ttl >= 0 and not record.get("grace_ms")
            else age_s(self.now_ms, number(record.get("beat"))),
            "heartbeat_timeout_s": hb_ms / 1000 if hb_ms is not None else None,
            "sessions_enabled": cap is not None and cap >= 0,
            "open_sessions": number(record.get("open")) or 0,
            "max_sessions": cap if cap is not None and cap > 0 else None,
            "running_activities": number(record.get("running")) or 0,
            "waiting_activities": number(record.get("waiting")) or 0,
            "concurrency": number(record.get("concurrency")),
            "activities_done": number(record.get("done")) or 0,
            "pending": pending,
            "queued": len(queued),
            "registered_age_s": age_s(self.now_ms, number(record.get("registered"))),
            "activities": [a for a in record.get("activities", "").split(",") if a],
            "resources": {  # a host's process: its host's (the host's row shows them)
                name: {"used": number(record.get(f"u:{name}")) or 0, "total": total}
                for name, total in resources.decode(record.get("res")).items()
            }
            if not record.get("hid")
            else {},
        }

    def own_stream(self, k: QueueKeys, w: str) -> list[dict[str, Any]]:
        """Session activities in a worker's own stream (queued, or read within the last trim)."""
        key = k.stream(w)
        if key in self._streams:
            return self._streams[key]
        out: list[dict[str, Any]] = []
        self._streams[key] = out
        for entry_id, fields in self.r.xrange(k.stream(w), "-", "+", count=STREAM_SCAN_LIMIT):
            if fields.get(b"t") != b"a":
                continue
            try:
                task = decode_task(default_codec, fields[b"d"], entry_id)
            except Exception:
                continue
            out.append(
                {
                    "activity_id": task.activity_id,
                    "name": task.name,
                    "attempt": task.attempt,
                    "session_id": task.session_id,
                    "age_s": age_s(self.now_ms, entry_ms(entry_id)),
                }
            )
        return out

    # -- sessions -------------------------------------------------------------------------
    def sessions(
        self, queue: str, workers: list[dict[str, Any]], include_ended: bool = False
    ) -> list[dict[str, Any]]:
        k = QueueKeys(self.prefix, queue)
        mine = {w["identity"]: w for w in workers if w["task_queue"] == queue}
        ids: set[str] = set()
        for w in mine:
            ids.update(m.decode(errors="replace") for m in self.r.smembers(k.worker_sessions(w)))
        if include_ended:
            pattern = glob_escape(k.base) + "session:*"
            start = len(k.base + "session:")
            ids.update(key.decode()[start:] for key in self.r.scan_iter(match=pattern, count=1000))
        queued = self.queued_by_session(k, mine)
        rows = [
            row
            for sid in sorted(ids)
            if (row := self.session_row(queue, sid, self.r.hgetall(k.session(sid)), mine, queued))
        ]
        rows.sort(key=lambda row: row["created_ms"] or 0)
        return rows + self.waiting(queue)

    def queued_by_session(self, k: QueueKeys, workers: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for w in workers:
            for item in self.own_stream(k, w):
                out.setdefault(item["session_id"] or "", []).append(item)
        return out

    def session_row(
        self,
        queue: str,
        sid: str,
        raw: dict[bytes, bytes],
        workers: dict[str, dict[str, Any]],
        queued: dict[str, list[dict[str, Any]]],
    ) -> dict[str, Any] | None:
        if not raw:
            return None
        k = QueueKeys(self.prefix, queue)
        record = strings(raw)
        worker = record.get("worker")
        deadline, exec_ms = number(record.get("deadline")), number(record.get("exec_ms"))
        created = number(record.get("created"))  # written by earlier versions
        if created is None and deadline is not None and exec_ms is not None:
            created = deadline - exec_ms
        state = record.get("state", "?")
        items = queued.get(sid, []) if state == "OPEN" else []  # the worker drops an ended one's entries
        client, owner_ms = record.get("client") or None, number(record.get("owner_ms")) or 0
        leased = client and owner_ms and state == "OPEN"
        renewed = number(text(self.r.get(k.lease(client)))) if leased else None
        return {
            "task_queue": queue,
            "session_id": sid,
            "state": state,
            "worker": worker,
            "host": record.get("host"),
            "worker_alive": workers[worker]["alive"] if worker in workers else False,
            "owner": record.get("owner") or None,
            "owner_client": client,
            "owner_timeout_s": owner_ms / 1000 if owner_ms else None,
            "owner_silent_s": round((self.now_ms - renewed) / 1000, 3) if renewed is not None else None,
            "created_ms": created,
            "age_s": age_s(self.now_ms, created),
            "deadline_ms": deadline,
            "deadline_in_s": round((deadline - self.now_ms) / 1000, 3) if deadline is not None else None,
            "execution_timeout_s": exec_ms / 1000 if exec_ms is not None else None,
            "ended_ms": number(record.get("ended")),
            "reason": record.get("reason") or None,
            "activities_run": activities_run(record),
            "resources": resources.decode(record.get("res")),
            "queued": len(items),
            "queued_activities": [{k: v for k, v in item.items() if k != "session_id"} for item in items],
        }

    def waiting(self, queue: str) -> list[dict[str, Any]]:
        """Callers waiting for a slot (create_session / recreate_session), first come first."""
        k = QueueKeys(self.prefix, queue)
        rows = []
        sids = [m.decode(errors="replace") for m in self.r.zrange(k.waiters, 0, -1)]
        fields = ("c", "x", "d", "t", "o", "l", "r")
        with self.r.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.hmget(k.tickets, [f"{sid}:{f}" for f in fields])
            tickets = pipe.execute()
        for sid, ticket in zip(sids, tickets, strict=True):
            client, exec_ms, wait_until, target, owner, owner_ms, asked = (text(v) or "" for v in ticket)
            until = number(wait_until)
            renewed = number(text(self.r.get(k.lease(client)))) if client else None
            rows.append(
                {
                    "task_queue": queue,
                    "session_id": sid,
                    "state": "WAITING",
                    "worker": target or None,
                    "host": None,
                    "worker_alive": None,
                    "owner": owner or None,
                    "owner_client": client or None,
                    "owner_timeout_s": (number(owner_ms) or 0) / 1000 or None,
                    "owner_silent_s": None if renewed is None else round((self.now_ms - renewed) / 1000, 3),
                    "created_ms": None,
                    "age_s": None,
                    "deadline_ms": until,
                    "deadline_in_s": round((until - self.now_ms) / 1000, 3) if until is not None else None,
                    "execution_timeout_s": (number(exec_ms) or 0) / 1000,
                    "ended_ms": None,
                    "reason": None,
                    "activities_run": None,
                    "resources": resources.decode(asked),
                    "queued": 0,
                    "queued_activities": [],
                }
            )
        return rows

    def find_session(self, sid: str, queues: list[str]) -> dict[str, Any] | None:
        """One session by its id, or by the start of it (as the tables show: 12 characters);
        AmbiguousSession when several match."""
        found = self._find_exact(sid, queues)
        if found is not None:
            return found
        if len(sid) < MIN_PREFIX:
            raise AmbiguousSession(sid, [], too_short=True)
        matches = self.sessions_starting_with(sid, queues)
        if len(matches) > 1:
            raise AmbiguousSession(sid, sorted(matches))
        return self._find_exact(matches[0][1], [matches[0][0]]) if matches else None

    def sessions_starting_with(self, start: str, queues: list[str]) -> list[tuple[str, str]]:
        """(queue, session id) of the sessions (kept records and waiting callers) whose id
        begins with `start`."""
        out = []
        wanted = set(queues)
        # One walk of the keyspace for every queue: <prefix>:{<queue>}:session:<start>*
        pattern = glob_escape(self.prefix) + ":{*}:session:" + glob_escape(start) + "*"
        for key in self.r.scan_iter(match=pattern, count=1000):
            head, _, sid = key.decode(errors="replace").rpartition(":session:")
            queue = head[len(self.prefix) + 2 : -1]
            if queue in wanted:
                out.append((queue, sid))
        for queue in queues:
            k = QueueKeys(self.prefix, queue)
            out += [
                (queue, m.decode()) for m in self.r.zrange(k.waiters, 0, -1) if m.decode().startswith(start)
            ]
        return sorted(set(out))

    def _find_exact(self, sid: str, queues: list[str]) -> dict[str, Any] | None:
        for queue in queues:
            k = QueueKeys(self.prefix, queue)
            raw = self.r.hgetall(k.session(sid))
            if raw:
                worker = text(raw.get(b"worker")) or ""
                workers = {w["identity"]: w for w in self.workers(queue)}
                queued = {sid: [i for i in self.own_stream(k, worker) if i["session_id"] == sid]}
                return self.session_row(queue, sid, raw, workers, queued)
            for row in self.waiting(queue):
                if row["session_id"] == sid:
                    return row
        return None


def collect(
    redis: Any,
    prefix: str,
    view: str,
    task_queue: str | None = None,
    session_id: str | None = None,
    include_ended: bool = False,
    max_age_s: float = 60.0,
) -> dict[str, Any]:
    """One `--json` document for `view` (overview, workers, sessions, queues, session or
    health)."""
    reader = Reader(redis, prefix)
    queues = reader.queue_names(task_queue)
    doc: dict[str, Any] = {"schema": SCHEMA_VERSION, "prefix": prefix, "now_ms": reader.now_ms}
    if view == "session":
        doc["session"] = reader.find_session(session_id or "", queues)
        return doc
    workers = [row for q in queues for row in reader.workers(q)]
    if view == "health":
        doc["queues"] = [reader.queue(q, workers) for q in queues]
        doc["workers"] = workers
        doc["problems"] = health_problems(doc["queues"], workers, max_age_s, task_queue)
        if not queues:
            doc["problems"].append(f"no task queues under prefix {prefix!r} (a wrong --prefix?)")
        doc["healthy"] = not doc["problems"]
        return doc
    if view in ("overview", "queues"):
        doc["queues"] = [reader.queue(q, workers) for q in queues]
    if view in ("overview", "workers"):
        doc["workers"] = [row for row in workers if row["kind"] == "worker"]
    if view in ("overview", "workers", "hosts"):
        doc["hosts"] = [row for row in workers if row["kind"] == "host"]
    if view in ("overview", "sessions"):
        doc["sessions"] = [row for q in queues for row in reader.sessions(q, workers, include_ended)]
    return doc


def queue_problem(q: dict[str, Any], max_age_s: float | None = None) -> str | None:
    """What is wrong with a task queue by itself, or None: work in it and no live worker
    to do it (a mistyped queue name, a fleet that is down), for longer than `max_age_s`."""
    if q["workers_alive"] > 0:  # a host's processes are workers too
        return None
    if q["length"]:
        age = q["oldest_age_s"]
        if max_age_s is None or (age is not None and age > max_age_s):
            return f"{q['length']} activit{'y' if q['length'] == 1 else 'ies'} queued and no live worker"
    if q["waiting_sessions"]:
        return f"{q['waiting_sessions']} caller(s) waiting for a session and no live worker"
    return None


def health_problems(
    queues: list[dict[str, Any]], workers: list[dict[str, Any]], max_age_s: float, only: str | None
) -> list[str]:
    """Why the queues are not healthy (for `inspect health`): a queue asked for that has no
    live worker, work older than `max_age_s` with no live worker, a dead worker holding
    open sessions (stuck until it is reaped)."""
    problems = []
    for q in queues:
        name = q["task_queue"]
        problem = queue_problem(q, max_age_s)
        if problem is not None:
            problems.append(f"queue {name!r}: {problem}")
        elif only is not None and q["workers_alive"] == 0:
            problems.append(f"queue {name!r}: no live worker")
    for w in workers:
        if not w["alive"] and w["open_sessions"]:
            problems.append(
                f"queue {w['task_queue']!r}: {w['kind']} {w['identity']} is dead with "
                f"{w['open_sessions']} open session(s) (they fail once it is reaped)"
            )
    return problems
