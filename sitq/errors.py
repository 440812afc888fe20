"""Exceptions raised by sitq.

Every error sitq raises derives from :class:`SitqError`, so ``except SitqError``
catches them all. Where a builtin already says the same thing, the leaf also
subclasses it, so callers can catch what they already know::

    SitqError
    ├── InvalidTaskError (TypeError, ValueError)   bad input at enqueue or lookup
    │   └── SerializationError                     something could not be (un)pickled
    ├── BackendError                               the store cannot be opened or used
    │   └── SchemaVersionError                     the database was made by a newer sitq
    ├── SignatureError                             a signature or the store's key does not match
    ├── TaskTimeoutError (TimeoutError)            a task ran past its timeout
    ├── TaskNotFoundError (LookupError)            no task with that id (blocking façade)
    ├── TaskFailedError                            the task raised (blocking façade)
    └── TaskCancelledError                         the task was cancelled (blocking façade)

A task that fails is data, not an exception in the worker: it is stored with
status ``"failed"``, its error and its remote traceback. Only the blocking
façade turns it into :class:`TaskFailedError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sitq.core import Result

__all__ = [
    "SitqError",
    "InvalidTaskError",
    "SerializationError",
    "BackendError",
    "SchemaVersionError",
    "SignatureError",
    "TaskTimeoutError",
    "TaskNotFoundError",
    "TaskFailedError",
    "TaskCancelledError",
]


class SitqError(Exception):
    """Base class of every error sitq raises."""


class InvalidTaskError(SitqError, TypeError, ValueError):
    """A task, its options or a task id was rejected before anything was stored."""


class SerializationError(InvalidTaskError):
    """A function, argument or value could not be pickled or unpickled."""


class BackendError(SitqError):
    """The task store cannot be opened or used (path, permissions, corruption, locks)."""


class SchemaVersionError(BackendError):
    """The database was written by a newer version of sitq than this one."""


class SignatureError(SitqError):
    """A payload or value is not signed for its task with this key (it was not unpickled),
    or the store was set up with a key this process does not hold."""


class TaskTimeoutError(SitqError, TimeoutError):
    """A task ran longer than its ``timeout`` option allows."""


class TaskNotFoundError(SitqError, LookupError):
    """No task with the given id exists in the store."""


class _TaskOutcomeError(SitqError):
    def __init__(self, message: str, result: Result) -> None:
        super().__init__(message)
        self.result = result
        self.task_id = result.task_id


class TaskFailedError(_TaskOutcomeError):
    """The task raised. ``error`` and ``traceback`` are the remote ones."""

    def __init__(self, result: Result) -> None:
        super().__init__(f"task {result.task_id} ({result.name}) failed: {result.error}", result)
        self.error = result.error
        self.traceback = result.traceback

    def __str__(self) -> str:
        message = super().__str__()
        if self.traceback:
            return f"{message}\n\nRemote traceback:\n{self.traceback.rstrip()}"
        return message


class TaskCancelledError(_TaskOutcomeError):
    """The task was cancelled before it could finish."""

    def __init__(self, result: Result) -> None:
        super().__init__(f"task {result.task_id} ({result.name}) was cancelled", result)
