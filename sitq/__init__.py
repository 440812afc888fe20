"""sitq: a task queue you can see.

An asyncio task queue with an embedded SQLite store, made for Jupyter::

    from sitq import TaskQueue, Worker

    queue = TaskQueue("tasks.db")            # a path, sqlite:///path or postgresql://...
    task_id = await queue.enqueue(pow, 2, 10)
    await Worker("tasks.db").drain()         # or: sitq worker tasks.db
    result = await queue.get_result(task_id)
"""

from typing import Any

from sitq.backends import Backend, SQLiteBackend, open_backend
from sitq.core import QueueOverview, Result, TaskInfo, TaskStatus
from sitq.errors import (
    BackendError,
    InvalidTaskError,
    SchemaVersionError,
    SerializationError,
    SignatureError,
    SitqError,
    TaskCancelledError,
    TaskFailedError,
    TaskNotFoundError,
    TaskTimeoutError,
)
from sitq.options import Retry, Task, TaskOptions, task
from sitq.queue import TaskQueue
from sitq.serialization import CloudpickleSerializer, Serializer
from sitq.sync import SyncTaskQueue
from sitq.worker import Worker, progress

__version__ = "0.2.0"  # the one place the version is written (pyproject.toml reads it)

__all__ = [
    "Backend",
    "BackendError",
    "CloudpickleSerializer",
    "InvalidTaskError",
    "QueueOverview",
    "Result",
    "Retry",
    "SQLiteBackend",
    "SchemaVersionError",
    "SerializationError",
    "Serializer",
    "SignatureError",
    "SitqError",
    "SyncTaskQueue",
    "Task",
    "TaskCancelledError",
    "TaskFailedError",
    "TaskInfo",
    "TaskNotFoundError",
    "TaskOptions",
    "TaskQueue",
    "TaskStatus",
    "TaskTimeoutError",
    "Worker",
    "open_backend",
    "progress",
    "task",
]


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext sitq``: register the ``%sitq`` magics."""
    from sitq.notebook import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext sitq``: remove what ``%load_ext sitq`` registered."""
    from sitq.notebook import unload_ipython_extension as unload

    unload(ipython)
