"""The file-processing example of the Worker Sessions specification, on sessionq.

Download a file, process it, upload the result: three activities that must run on the
same worker, because the file lives on that worker's local disk between the steps.
A session pins them to one worker; if that worker dies mid-way, the caller gets
SessionFailedError within the heartbeat timeout and starts over in a new session.

It ships inside the installed package (not only in examples/) because `sessionq demo`
runs it, and the demo must work from a plain `pip install sessionq`.
examples/fileprocessing re-exports these modules for the by-hand walkthrough.

- ``sessionq.cli.fileprocessing.activities``: the three activities.
- ``sessionq.cli.fileprocessing.worker``: the Worker
  (``sessionq worker sessionq.cli.fileprocessing.worker:worker``).
- ``sessionq.cli.fileprocessing.starter``: the caller side
  (``python -m sessionq.cli.fileprocessing.starter``).
"""

TASK_QUEUE = "fileprocessing"
