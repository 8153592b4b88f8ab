"""sessionq: worker sessions for Python over Redis.

Open a session on a task queue and every activity run through it executes on the same
live worker, until you complete it, its execution timeout passes, or the worker dies.

Reading the code, one path at a time (the wire format: envelope.py; the keys: keys.py):

- A plain activity: `Client.execute_activity` (client.py) encodes a task (envelope.py) and
  adds it to the task queue's stream; a worker reads it (shared_queue.py), runs it in a
  slot (runner.py, execution.py), and writes the result to the caller's inbox (outbox.py);
  the caller's inbox reader (inbox.py) settles its `ActivityHandle` (handle.py).
- A session: `Client.create_session` (session.py, `SessionOpener`) runs the
  create_session script (scripts.py, lua/), which places it on a worker with a free slot
  or queues a ticket in the waiting line; the worker learns of it on its own stream
  (own_stream.py) and holds it (held.py); `Session.execute_activity` sends to that
  stream, and the result comes back as above. `complete()`, the execution timeout, the
  owner's silence or the worker's death (liveness.py, housekeeping.py) end it with the
  end_session or reap_worker script, which hands the slot to the next waiter.
- A host session: worker processes started with one `host_id` form a host, registered
  (register_worker script) and placed like one worker under the id ``host=<host_id>``
  (keys.py); its sessions' activities go to the host's stream, which its processes read
  through a consumer group (host_queue.py), so one a dead process had read is taken over
  by another (housekeeping.py); the host is reaped only `restart_grace` after its last
  process stopped beating (heartbeat script).
- Faults: every error is classified once (faults.py); worker.py's module docstring maps
  the worker's parts.
"""

from .activity import ActivityInfo, activity, activity_info, get_session_info, heartbeat, is_cancelled
from .calls import ActivityCallOptions
from .client import Client
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
from .handle import ActivityHandle
from .options import ActivityOptions, RetryPolicy, SessionOptions
from .session import Session
from .session_info import SessionInfo, SessionState
from .sync import SyncClient, SyncSession
from .worker import Worker

__version__ = "0.1.0"

__all__ = [
    "ActivityCallOptions",
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
