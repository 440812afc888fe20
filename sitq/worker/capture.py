"""Progress and output from inside a running task: the worker as a task's own code sees it.

A task reaches its worker only through context variables that the runner
sets in the task's context (:func:`task_context`): the worker's record of
the task, which :func:`progress` and :func:`stop_event` read and write, and
the buffer that what the task prints goes to (:data:`sitq.output.capture_into`;
the stream wrapper itself lives in :mod:`sitq.output`, installed for the whole
process while a capturing worker runs). This module knows nothing of how a task
is run, so task code, and runners that execute a task somewhere else and relay
its progress back (the notebook's process pool), need only this.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, Protocol, TypeVar

from sitq.errors import InvalidTaskError
from sitq.output import CapturedOutput, capture_into

__all__ = ["ProgressLog", "progress", "reporting_progress", "stop_event"]


class TaskRecord(Protocol):
    """What this module reads and writes of the worker's record of a running task."""

    progress: tuple[float, float | None, str | None] | None
    stop_reason: str | None  # "timeout" or "cancel" once the worker stopped waiting for it
    stopped: threading.Event | None  # see stop_event()
    progress_log: ProgressLog[Any]


R = TypeVar("R", bound=TaskRecord)


class ProgressLog(Generic[R]):
    """The running tasks whose progress changed since the worker last stored it.

    Task threads add to it while the worker's loop takes it away; hence the lock.
    """

    def __init__(self) -> None:
        self._changed: set[R] = set()
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._changed)  # a cheap look without the lock: take() is what counts

    def add(self, running: R) -> None:
        with self._lock:
            self._changed.add(running)

    def discard(self, running: R) -> None:
        with self._lock:
            self._changed.discard(running)

    def take(self) -> set[R]:
        with self._lock:
            changed, self._changed = self._changed, set()
        return changed


_current: contextvars.ContextVar[TaskRecord | None] = contextvars.ContextVar("sitq_current_task", default=None)
_reporter: contextvars.ContextVar[Callable[[float, float | None, str | None], None] | None] = contextvars.ContextVar(
    "sitq_progress_reporter", default=None
)
_stop_lock = threading.Lock()  # between a task's thread asking for its stop event and the loop setting it


def task_context(running: TaskRecord, output: CapturedOutput | None) -> contextvars.Context:
    """A copy of the current context for running's code to run in: :func:`progress` and
    :func:`stop_event` find its record there, and what it prints goes to ``output`` (unless None)."""
    context = contextvars.copy_context()
    context.run(_current.set, running)
    if output is not None:
        context.run(capture_into.set, output)
    return context


def mark_stopped(running: TaskRecord, reason: str) -> None:
    """Record that the worker stopped waiting for the task, and set its stop event if it has one.

    Under the lock :func:`stop_event` takes, so an event made while the task is
    being stopped is set either way.
    """
    with _stop_lock:
        running.stop_reason = reason
        if running.stopped is not None:
            running.stopped.set()  # a process runner terminates the task's process


@contextlib.contextmanager
def reporting_progress(report: Callable[[float, float | None, str | None], None]) -> Iterator[None]:
    """Within this block, :func:`progress` calls ``report(done, total, message)``.

    For runners that execute a task's function somewhere else (another
    process) and relay its progress back to the worker.
    """
    token = _reporter.set(report)
    try:
        yield
    finally:
        _reporter.reset(token)


def stop_event() -> threading.Event | None:
    """The event set once the worker stops waiting for the task running in this context.

    The worker sets it when the task's timeout passes or the task is
    cancelled; by then its outcome is recorded and anything the task does
    later is discarded. For runners that execute a task somewhere they can
    stop it (a child process) and wait for it in the task's thread. None
    outside a task.
    """
    running = _current.get()
    if running is None:
        return None
    with _stop_lock:
        if running.stopped is None:  # made on demand: most tasks never need one
            running.stopped = threading.Event()
            if running.stop_reason is not None:
                running.stopped.set()
        return running.stopped


def progress(done: float, total: float | None = None, message: str | None = None) -> bool:
    """Report progress from inside a running task: ``done`` out of ``total``, and a short message.

    Works in coroutine and thread tasks. Cheap enough to call in a tight loop:
    the worker stores the latest value a few times a second. Outside a task
    it does nothing and returns False, so the function still runs on its own.
    """
    for label, number in (("done", done), ("total", total)):
        if (number is not None or label == "done") and (
            isinstance(number, bool) or not isinstance(number, (int, float))
        ):
            raise InvalidTaskError(f"sitq.progress({label}=...) takes a number, not {type(number).__name__}")
    value = (float(done), None if total is None else float(total), None if message is None else str(message))
    running = _current.get()
    if running is None:
        report = _reporter.get()
        if report is None:
            return False
        report(*value)
        return True
    running.progress = value
    running.progress_log.add(running)  # task threads add while the loop takes the log away
    return True
