"""sessionq: worker sessions for Python over Redis.

Open a session on a task queue and every activity run through it executes on the same
live worker, until you complete it, its execution timeout passes, or the worker dies.
"""

from .activity import ActivityInfo, activity, activity_info, get_session_info, heartbeat, is_cancelled
from .client import ActivityHandle, Client
from .codec import Codec
from .errors import (
    ActivityCancelledError,
    ActivityError,
    ActivityNotRegisteredError,
    ActivityTimeoutError,
    ApplicationError,
    ConfigurationError,
    ConnectionPoolExhaustedError,
    RedisDataLostError,
    RedisUnavailableError,
    SerializationError,
    SessionAlreadyOpenError,
    SessionCompletedError,
    SessionCreationTimeoutError,
    SessionFailedError,
    SessionqError,
)
from .options import ActivityOptions, RetryPolicy, SessionOptions
from .session import Session
from .session_info import SessionInfo, SessionState
from .sync import SyncClient, SyncSession
from .worker import Worker

__version__ = "0.1.0"

__all__ = [
    "ActivityCancelledError",
    "ActivityError",
    "ActivityHandle",
    "ActivityInfo",
    "ActivityNotRegisteredError",
    "ActivityOptions",
    "ActivityTimeoutError",
    "ApplicationError",
    "Client",
    "Codec",
    "ConfigurationError",
    "ConnectionPoolExhaustedError",
    "RedisDataLostError",
    "RedisUnavailableError",
    "RetryPolicy",
    "SerializationError",
    "Session",
    "SessionAlreadyOpenError",
    "SessionCompletedError",
    "SessionCreationTimeoutError",
    "SessionFailedError",
    "SessionInfo",
    "SessionOptions",
    "SessionState",
    "SessionqError",
    "SyncClient",
    "SyncSession",
    "Worker",
    "activity",
    "activity_info",
    "get_session_info",
    "heartbeat",
    "is_cancelled",
]
