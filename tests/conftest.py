"""Fixtures: every behavioural test runs on fakeredis and on a real Redis server.

- ``backend`` / ``redis_url``: parametrised over ``fakeredis`` (an in-process fakeredis TCP
  server, so worker subprocesses can reach it) and ``redis`` (SESSIONQ_TEST_REDIS_URL,
  default redis://127.0.0.1:6379/0; ``scripts/test`` starts a private one when needed).
  SESSIONQ_TEST_BACKENDS=fakeredis (or =redis) runs only the named backends.
- ``cluster``, a third backend, only for modules that opt in with ``pytestmark =
  pytest.mark.cluster`` (the session behaviours; SESSIONQ_TEST_CLUSTER_ALL=1 runs every
  test on it): a Redis Cluster of three masters at
  SESSIONQ_TEST_CLUSTER_URL (``redis+cluster://...``, started by ``scripts/test``), else one
  started here for the run (tests/cluster.py); skipped only when no redis-server exists.
- ``key_prefix`` / ``task_queue``: unique per test; the prefix's keys are deleted after it
  (SCAN + DEL of ``<prefix>:*`` only: the real server may be shared, so never FLUSH*).
- ``redis_client``: a ``redis.asyncio.Redis`` on the backend, for inspecting state.
- ``spawn_worker``: starts workers as real subprocesses (``tests.workerproc``) and
  SIGKILLs the survivors at teardown.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import pytest_asyncio
import redis
import redis.asyncio

import sessionq
from sessionq.connection import is_cluster_url
from sessionq.keys import QueueKeys
from tests.cluster import LocalCluster, async_cluster, cluster_tools, delete_cluster_keys, probe_cluster
from tests.helpers import SpawnWorker, WorkerProcess, start_worker_process
from tests.ports import release, reserve_port

REPO_ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("fakeredis", "redis", "cluster")
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


# --- backend selection -----------------------------------------------------------------


def enabled_backends() -> tuple[str, ...]:
    """Backends named by SESSIONQ_TEST_BACKENDS (default: all), validated."""
    raw = os.environ.get("SESSIONQ_TEST_BACKENDS", ",".join(BACKENDS))
    names = tuple(name.strip() for name in raw.split(",") if name.strip())
    if not names or not set(names) <= set(BACKENDS):
        raise pytest.UsageError(
            f"SESSIONQ_TEST_BACKENDS={raw!r}: expected a comma list of {', '.join(BACKENDS)}"
        )
    return names


def real_redis_url() -> str:
    return os.environ.get("SESSIONQ_TEST_REDIS_URL", DEFAULT_REDIS_URL)


def redact(url: str) -> str:
    """The URL without its password, fit for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


@cache
def probe_real_redis() -> tuple[bool, str]:
    """(reachable, "Redis <version>" or the reason it is not), checked once per run."""
    try:
        with redis.Redis.from_url(real_redis_url(), socket_connect_timeout=2, socket_timeout=2) as client:
            client.ping()
            version = client.info("server").get("redis_version", "?")
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, f"Redis {version}"


def backends_header() -> str:
    parts = []
    for name in enabled_backends():
        if name == "fakeredis":
            parts.append("fakeredis (in-process TCP server)")
        elif name == "cluster":
            parts.append(cluster_header())
        else:
            ok, detail = probe_real_redis()
            state = detail if ok else f"UNREACHABLE, run scripts/test: {detail}"
            parts.append(f"redis at {redact(real_redis_url())} ({state})")
    return "sessionq test backends: " + "; ".join(parts)


def cluster_header() -> str:
    url = os.environ.get("SESSIONQ_TEST_CLUSTER_URL")
    if url:
        return f"cluster at {redact(url)} (pytest.mark.cluster modules)"
    missing = cluster_tools()
    if missing:
        return f"cluster SKIPPED ({missing})"
    return "cluster started on demand (pytest.mark.cluster modules)"


def pytest_configure(config: pytest.Config) -> None:
    enabled_backends()  # a typo in SESSIONQ_TEST_BACKENDS is a usage error, not 0 tests
    config.addinivalue_line(
        "markers", "cluster: also run this test on the Redis Cluster backend (session behaviours)"
    )


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [backends_header()]


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Under -q pytest prints no header; say which backends run anyway."""
    config = session.config
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and config.get_verbosity() < 0:
        reporter.write_line(backends_header())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    enabled = enabled_backends()
    # The cluster backend runs only where a module opted in (keeps the suite fast), unless
    # SESSIONQ_TEST_CLUSTER_ALL=1 asks for every test on it.
    everything = os.environ.get("SESSIONQ_TEST_CLUSTER_ALL") == "1"
    off_cluster = {
        item
        for item in items
        if _backend_of(item) == "cluster" and not everything and not item.get_closest_marker("cluster")
    }
    if off_cluster:
        config.hook.pytest_deselected(items=list(off_cluster))
        items[:] = [item for item in items if item not in off_cluster]
    for item in items:
        backend = _backend_of(item)
        if backend is not None and backend not in enabled:
            reason = f"backend {backend!r} disabled by SESSIONQ_TEST_BACKENDS={','.join(enabled)}"
            item.add_marker(pytest.mark.skip(reason=reason))


def _backend_of(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("backend") if callspec is not None else None


# --- backends --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fakeredis_url() -> Iterator[str]:
    """A fakeredis server on a free loopback TCP port, shared by the whole run.

    TCP rather than an in-process FakeRedis because worker subprocesses must reach it.
    """
    from fakeredis import TcpFakeServer

    port = reserve_port()  # not port 0: the kernel may offer a killed server's reserved one
    server = TcpFakeServer(("127.0.0.1", port), server_type="redis")
    from sessionq.cli.embedded import error_tolerant_handler  # the demo's embedded server uses it too

    handler = error_tolerant_handler()
    if handler is not None:
        server.RequestHandlerClass = handler
    # A connection someone forgot to close must not hang the end of the run.
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="fakeredis-tcp", daemon=True)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{server.server_address[1]}/0"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        release(port)


@pytest.fixture(scope="session")
def cluster_url() -> Iterator[str]:
    """A Redis Cluster: SESSIONQ_TEST_CLUSTER_URL, else three local masters started for the run."""
    url = os.environ.get("SESSIONQ_TEST_CLUSTER_URL")
    if url:
        ok, detail = probe_cluster(url)
        if not ok:
            pytest.fail(f"no Redis Cluster answers at {redact(url)} ({detail})", pytrace=False)
        yield url
        return
    missing = cluster_tools()
    if missing:
        pytest.skip(f"cluster backend: no Redis Cluster to test on ({missing}); install redis-server")
    cluster = LocalCluster(replicas=1)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Which Redis the test runs on: "fakeredis", "redis" or "cluster"."""
    return str(request.param)


@pytest.fixture
def redis_url(backend: str, request: pytest.FixtureRequest) -> str:
    """URL of the chosen backend. A missing real server fails the test: never a silent skip."""
    if backend == "fakeredis":
        return str(request.getfixturevalue("fakeredis_url"))
    if backend == "cluster":
        return str(request.getfixturevalue("cluster_url"))
    ok, detail = probe_real_redis()
    if not ok:
        pytest.fail(
            f"no Redis server answers at {redact(real_redis_url())} ({detail}).\n"
            "Run the suite with scripts/test, which starts a private redis-server, or point "
            "SESSIONQ_TEST_REDIS_URL at one (SESSIONQ_TEST_BACKENDS=fakeredis runs without it).",
            pytrace=False,
        )
    return real_redis_url()


# --- per-test namespaces ---------------------------------------------------------------


def delete_keys(url: str, pattern: str) -> int:
    """Delete the keys matching ``pattern`` with SCAN, never FLUSH*: the server may be shared."""
    if is_cluster_url(url):
        return delete_cluster_keys(url, pattern)
    deleted = 0
    with redis.Redis.from_url(url, socket_timeout=10) as client:
        batch: list[bytes] = []
        for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += client.delete(*batch)
                batch.clear()
        if batch:
            deleted += client.delete(*batch)
    return deleted


@pytest.fixture
def key_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix unique to this test; pass it as ``prefix=`` to Client and Worker."""
    prefix = "sqt" + uuid.uuid4().hex[:10]
    yield prefix
    delete_keys(redis_url, f"{prefix}:*")


@pytest.fixture
def task_queue() -> str:
    """A task-queue name unique to this test."""
    return "q" + uuid.uuid4().hex[:6]


@pytest_asyncio.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """An asyncio Redis client on the backend, for looking at raw state (a RedisCluster on
    the cluster backend: single-key commands and same-queue pipelines work alike)."""
    if is_cluster_url(redis_url):
        client = await async_cluster(redis_url)
    else:
        client = redis.asyncio.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest_asyncio.fixture
async def client(redis_url: str, key_prefix: str) -> AsyncIterator[sessionq.Client]:
    """A caller on the per-test prefix, closed at the end of the test."""
    async with sessionq.Client(redis_url, prefix=key_prefix) as c:
        yield c


@pytest.fixture
def keys(key_prefix: str, task_queue: str) -> QueueKeys:
    """The test's task queue's keys."""
    return QueueKeys(key_prefix, task_queue)


# --- worker processes ------------------------------------------------------------------


@pytest_asyncio.fixture
async def spawn_worker(redis_url: str, key_prefix: str, task_queue: str) -> AsyncIterator[SpawnWorker]:
    """Factory: ``w = await spawn_worker(identity="w1", max_sessions=1)`` -> WorkerProcess.

    Returns once the child printed ``READY <worker_id>``. Depends on ``key_prefix`` so the
    workers are dead before that fixture deletes their keys.
    """
    workers: list[WorkerProcess] = []
    numbers = itertools.count(1)
    default_queue = task_queue

    async def spawn(
        *,
        task_queue: str | None = None,
        activities: str = "tests.activities:ALL",
        identity: str | None = None,
        max_sessions: int | None = None,
        heartbeat_timeout: float = 2.0,
        concurrency: int = 10,
        enable_sessions: bool = True,
        extra_args: Sequence[str] = (),
        ready_timeout: float = 20.0,
    ) -> WorkerProcess:
        __tracebackhide__ = True
        identity = identity or f"w{next(numbers)}"
        argv = [
            sys.executable, "-m", "tests.workerproc", activities,
            "--redis-url", redis_url,
            "--prefix", key_prefix,
            "--task-queue", task_queue or default_queue,
            "--identity", identity,
            "--heartbeat-timeout", str(heartbeat_timeout),
            "--concurrency", str(concurrency),
        ]  # fmt: skip
        if max_sessions is not None:
            argv += ["--max-sessions", str(max_sessions)]
        if not enable_sessions:
            argv.append("--no-sessions")
        argv += extra_args
        env = dict(os.environ)  # read now, so monkeypatch.setenv in the test applies
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        return await start_worker_process(
            argv,
            identity=identity,
            cwd=REPO_ROOT,
            env=env,
            ready_timeout=ready_timeout,
            register=workers.append,
        )

    yield spawn

    for worker in workers:
        await worker.kill()
        # The pipes reach EOF once the child is gone; leave no task to a closed loop.
        if worker.drainers:
            _, pending = await asyncio.wait(worker.drainers, timeout=5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        print(f"[{worker.identity}:{worker.pid}] exit code {worker.returncode}", file=sys.stderr)
