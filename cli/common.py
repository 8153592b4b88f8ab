"""What every command shares: one-line errors, logging set-up, the Redis URL and prefix."""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import click
import tenacity

from sessionq.connection import as_cluster_url, is_cluster_url, resolve_url, split_cluster_url
from sessionq.errors import ConfigurationError
from sessionq.sentinel import is_sentinel_url, split_sentinel_url

F = TypeVar("F", bound=Callable[..., Any])

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s"


class CliError(click.ClickException):
    """A one-line error on stderr (no usage block, no traceback) with a chosen exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"Error: {self.format_message()}", err=True)


def redact(url: str) -> str:
    """The URL without its password, fit for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


URL_SCHEMES = (
    "redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://", "redis+sentinel://",
    "rediss+sentinel://",
)  # fmt: skip


def redis_url_from(flag: str | None, cluster: bool = False) -> str:
    """--redis-url, else SESSIONQ_REDIS_URL, else REDIS_URL, else redis://localhost:6379/0;
    with --cluster, redis://host:port becomes redis+cluster://host:port. An empty
    --redis-url is an error (it would otherwise fall back to the defaults unnoticed)."""
    try:
        url = resolve_url(flag)
    except ConfigurationError as exc:
        raise CliError(f"--redis-url: {exc}", 2) from None
    if cluster:
        try:
            url = as_cluster_url(url)
        except ConfigurationError as exc:
            raise CliError(str(exc), 2) from None
    return url


def sync_client(url: str, timeout: float = 3.0) -> Any:
    """A plain (sync) redis-py client: a RedisCluster for redis+cluster:// URLs, a client of
    the service's primary for redis+sentinel:// URLs, else a Redis."""
    import redis

    if is_sentinel_url(url):
        from redis.sentinel import Sentinel

        sentinels, service, settings, sentinel_settings = split_sentinel_url(url)
        sentinel_settings.setdefault("socket_connect_timeout", timeout)
        sentinel_settings.setdefault("socket_timeout", timeout)
        settings.setdefault("socket_connect_timeout", timeout)
        settings["socket_timeout"] = max(settings.get("socket_timeout") or 0, 10)
        return Sentinel(sentinels, sentinel_kwargs=sentinel_settings).master_for(service, **settings)
    if not is_cluster_url(url):
        return redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=max(timeout, 10))
    from redis.cluster import ClusterNode, RedisCluster

    single, nodes = split_cluster_url(url)
    kwargs: dict[str, Any] = dict(redis.connection.parse_url(single))
    if kwargs.pop("connection_class", None) is redis.connection.SSLConnection:
        kwargs["ssl"] = True
    for key in ("host", "port", "db"):
        kwargs.pop(key, None)
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in nodes],
        socket_connect_timeout=timeout,
        socket_timeout=max(timeout, 10),
        **kwargs,
    )


def url_configured(flag: str | None) -> bool:
    """Whether the user named a Redis (flag or environment), as opposed to the default."""
    return flag is not None or bool(os.environ.get("SESSIONQ_REDIS_URL") or os.environ.get("REDIS_URL"))


def ping(url: str, timeout: float = 3.0) -> str | None:
    """None when Redis answers at `url`, else the reason it does not (one line)."""
    failure = probe(url, timeout)
    return None if failure is None else one_line(failure)


def probe(url: str, timeout: float = 3.0) -> Exception | None:
    """None when Redis answers at `url`, else what went wrong."""
    try:
        with sync_client(url, timeout) as client:
            client.ping()
    except Exception as exc:
        return exc
    return None


def may_pass(failure: Exception | None) -> bool:
    """Whether waiting can help: Redis not up yet, or loading; not a wrong password or URL."""
    import redis

    if isinstance(failure, redis.exceptions.AuthenticationError | redis.exceptions.ResponseError):
        return isinstance(failure, redis.exceptions.BusyLoadingError)
    return isinstance(failure, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError | OSError)


def require_redis(url: str, wait: float = 0.0) -> None:
    """Fail with a one-line error (exit 1) when Redis does not answer at `url`, after trying
    for `wait` seconds with backoff (a worker started with Redis, or before it: compose,
    systemd, a pod whose Redis comes up second). One warning says it waits, not one a try."""
    if not url.lower().startswith(URL_SCHEMES):
        raise CliError(
            f"{url!r} is not a Redis URL; use e.g. redis://localhost:6379/0 (redis+cluster://host:port "
            "for Redis Cluster, redis+sentinel://host:port/service_name for Sentinel)",
            2,
        )
    failure = probe(url)
    problem = None if failure is None else one_line(failure)
    waited = ""
    if failure is not None and wait > 0 and may_pass(failure):
        waited = f" (tried for {wait:g}s)"
        logging.getLogger("sessionq.cli").warning(
            "cannot reach Redis at %s yet (%s); trying again for up to %gs (--wait-for-redis)",
            redact(url), problem, wait,
        )  # fmt: skip
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_delay(wait),
            wait=tenacity.wait_exponential(multiplier=0.1, max=2.0),
            retry=tenacity.retry_if_result(may_pass),
            retry_error_callback=lambda state: state.outcome.result() if state.outcome else failure,
        )
        failure = retrying(probe, url, min(3.0, wait))
        problem = None if failure is None else one_line(failure)
        if problem is None:
            logging.getLogger("sessionq.cli").info("Redis at %s answers", redact(url))
    if problem is not None:
        fix = "check the password or user in the URL" if not may_pass(failure) else "start Redis"
        raise CliError(
            f"cannot reach Redis at {redact(url)}{waited}: {problem} "
            f"({fix}, or pass --redis-url / set SESSIONQ_REDIS_URL)",
            1,
        )


def one_line(exc: BaseException) -> str:
    """An exception as one line: its message, or its type when it has none."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def configure_logging(
    level: str | None, verbose: int = 0, quiet: int = 0, default: str = "WARNING", log_format: str = "text"
) -> None:
    """Log to stderr, as text or one JSON object a line. --log-level wins; otherwise -v / -q
    move from `default`. Only sessionq's own loggers move: redis-py, asyncio and the rest
    stay at WARNING (their debug output is for debugging them)."""
    if level is None:
        index = LOG_LEVELS.index(default) - verbose + quiet
        level = LOG_LEVELS[max(0, min(len(LOG_LEVELS) - 1, index))]
    handler = logging.StreamHandler(sys.stderr)
    text = logging.Formatter(LOG_FORMAT, "%H:%M:%S")
    handler.setFormatter(JsonFormatter() if log_format == "json" else text)
    logging.basicConfig(handlers=[handler], force=True)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("sessionq").setLevel(level.upper())


_RECORD_ATTRIBUTES = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _plain(value: object) -> object:
    """A value json.dumps takes as it is, else its repr()."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return repr(value)
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object a line, for log shippers: time (UTC, ISO 8601), level, logger,
    message, pid, the record's own fields (an activity's queue, name, id, session, attempt,
    duration_ms, outcome: sessionq/activity_log.py) and the exception's traceback."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        line: dict[str, object] = {
            "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in line:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        try:
            return json.dumps(line, default=str, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError):  # tuple keys, a cycle, NaN: the field as repr(), the line kept
            return json.dumps({k: _plain(v) for k, v in line.items()}, ensure_ascii=False)


def logging_options(default: str) -> Callable[[F], F]:
    """--log-level, -v and -q, for a command whose usual level is `default`."""

    def decorate(fn: F) -> F:
        fn = click.option("-q", "--quiet", count=True, help="Less logging (repeatable).")(fn)
        fn = click.option("-v", "--verbose", count=True, help="More logging (repeatable).")(fn)
        fn = click.option(
            "--log-format",
            type=click.Choice(["text", "json"]),
            default="text",
            show_default=True,
            help="json: one JSON object a line (time, level, logger, message and each record's fields).",
        )(fn)
        return click.option(
            "--log-level",
            type=click.Choice(LOG_LEVELS, case_sensitive=False),
            default=None,
            help=f"Level of the sessionq logger on stderr [default: {default}].",
        )(fn)

    return decorate


def redis_url_option(fn: F) -> F:
    """--redis-url and --cluster."""
    fn = click.option(
        "--cluster",
        is_flag=True,
        help="The URL names a Redis Cluster node (same as a redis+cluster://host:port URL).",
    )(fn)
    return click.option(
        "--redis-url",
        metavar="URL",
        default=None,
        help="Redis URL [default: $SESSIONQ_REDIS_URL, else $REDIS_URL, else redis://localhost:6379/0]; "
        "redis+cluster://host:port[,host:port] for Redis Cluster.",
    )(fn)


def prefix_option(default: str | None) -> Callable[[F], F]:
    """--prefix (env SESSIONQ_PREFIX): the key prefix, as given to Client/Worker(prefix=...)."""
    shown = f" [default: {default}]" if default else " [default: the Worker's, else sq]"
    return click.option(
        "--prefix",
        metavar="P",
        envvar="SESSIONQ_PREFIX",
        default=default,
        help="Key prefix of every sessionq key (env SESSIONQ_PREFIX)." + shown,
    )
