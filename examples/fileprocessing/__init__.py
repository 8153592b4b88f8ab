"""The file-processing example of the Worker Sessions specification, on sessionq.

Download a file, process it, upload the result: three activities that must run on the
same worker, because the file lives on that worker's local disk between the steps.
A session pins them to one worker; if that worker dies mid-way, the caller gets
SessionFailedError within the heartbeat timeout and starts over in a new session.

- ``fileprocessing.activities``: the three activities.
- ``fileprocessing.worker``: the Worker (``sessionq worker fileprocessing.worker:worker``).
- ``fileprocessing.starter``: the caller side (``python -m fileprocessing.starter``).
"""

TASK_QUEUE = "fileprocessing"
