"""Per-task options, attached to the function, never to enqueue's keywords.

``eta`` is the only keyword ``enqueue`` keeps for itself, so a task's own keyword
arguments never collide with sitq's; everything else a task needs to know
travels with the function::

    @sitq.task(retries=3, timeout=60)
    def fetch(url): ...

    await queue.enqueue(fetch, "https://example.org")              # with the options
    await queue.enqueue(fetch.options(timeout=5), "https://...")   # one call, other options
    await queue.enqueue(sitq.task(len, name="length"), [1, 2, 3])  # wrap any callable
    await queue.enqueue(sitq.task(total, after=ids), ids)          # runs once every id succeeded
    await queue.enqueue(fetch.options(key="fetch-home"), url)      # enqueued once, however often called
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import math
import random
import re
from collections.abc import Callable
from typing import Any, overload

from sitq.core import DEFAULT_QUEUE
from sitq.errors import InvalidTaskError

__all__ = ["Retry", "Task", "TaskOptions", "task", "QUEUE_DEFAULT", "DEFAULT_OPTIONS", "check_queue_name",
           "retention_seconds"]

QUEUE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,100}")


class _QueueDefault:
    """The retention a task gets when it names none: its queue's (``TaskQueue(retention=...)``)."""

    def __repr__(self) -> str:
        return "QUEUE_DEFAULT"

    def __reduce__(self) -> str:
        return "QUEUE_DEFAULT"  # one object, also after a round trip through pickle


QUEUE_DEFAULT = _QueueDefault()


class Retry(Exception):
    """Raise it in a task to ask for another attempt, after ``delay`` seconds if given.

    The task's ``retries`` option bounds how many attempts it gets in all; when
    none are left, the task fails with this exception as its error.
    """

    def __init__(self, reason: str = "the task asked to be retried", delay: float | None = None) -> None:
        super().__init__(reason)
        if delay is not None:
            _check_seconds("Retry(delay=...)", delay, allow_zero=True)
        self.delay = delay


@dataclasses.dataclass(frozen=True)
class TaskOptions:
    """How a task runs.

    ``retries`` more attempts are made after a failure whose exception is an
    instance of ``retry_on``, waiting ``retry_delay * backoff ** (attempt - 1)``
    seconds (at most ``max_delay``; with ``jitter``, a random 50-100 % of it).
    ``timeout`` bounds one attempt, in seconds.

    Where and when it runs: ``queue`` names the queue it goes to (workers serve
    all queues unless told which); of the ready tasks a worker serves, higher
    ``priority`` runs first, then the oldest. ``after`` holds ids of tasks that
    must all succeed first; if one fails or is cancelled, this task is
    cancelled. ``key`` makes enqueueing idempotent: while a task enqueued with
    that key exists, enqueueing again returns its id instead of a new task;
    one that failed or was cancelled is run again in its place if
    ``replace_failed`` (the default), else its id is returned too.
    ``retention`` (seconds or a timedelta; None: for ever) is how long the
    task is kept once it finished; by default, its queue's.
    """

    name: str | None = None
    retries: int = 0
    retry_delay: float = 1.0
    backoff: float = 2.0
    max_delay: float = 300.0
    jitter: bool = True
    retry_on: tuple[type[BaseException], ...] = (Exception,)  # or one class
    timeout: float | None = None
    queue: str = DEFAULT_QUEUE
    priority: int = 0
    after: tuple[str, ...] = ()
    key: str | None = None
    replace_failed: bool = True
    retention: float | dt.timedelta | None | _QueueDefault = QUEUE_DEFAULT

    def __post_init__(self) -> None:
        if self.name is not None and not isinstance(self.name, str):
            raise InvalidTaskError(f"task name must be a string, not {type(self.name).__name__}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise InvalidTaskError(f"retries must be a whole number >= 0, not {self.retries!r}")
        for label in ("retry_delay", "backoff", "max_delay"):
            _check_seconds(label, getattr(self, label), allow_zero=True)
        if self.timeout is not None:
            _check_seconds("timeout", self.timeout, allow_zero=False)
        retry_on = self.retry_on if isinstance(self.retry_on, tuple) else (self.retry_on,)
        if not all(isinstance(t, type) and issubclass(t, BaseException) for t in retry_on):
            raise InvalidTaskError(f"retry_on takes exception classes, not {self.retry_on!r}")
        object.__setattr__(self, "retry_on", retry_on)
        check_queue_name(self.queue)
        if isinstance(self.priority, bool) or not isinstance(self.priority, int) or abs(self.priority) >= 2**62:
            raise InvalidTaskError(f"priority must be a whole number (higher runs first), not {self.priority!r}")
        object.__setattr__(self, "after", _task_ids("after", self.after))
        if self.key is not None and (not isinstance(self.key, str) or not self.key or not _is_text(self.key)):
            raise InvalidTaskError(f"key must be a non-empty string of valid text, not {self.key!r}")
        if not isinstance(self.replace_failed, bool):
            raise InvalidTaskError(f"replace_failed must be True or False, not {self.replace_failed!r}")
        if self.retention is not QUEUE_DEFAULT:
            object.__setattr__(self, "retention", retention_seconds(self.retention))

    def retention_or(self, default: float | None) -> float | None:
        """The task's retention in seconds (None: for ever), or ``default`` if it names none."""
        retention = self.retention
        return default if isinstance(retention, _QueueDefault) else retention_seconds(retention)

    @property
    def max_attempts(self) -> int:
        """``retries + 1``: how many times the task may run in all."""
        return self.retries + 1

    def retry_after(self, attempt: int, exc: BaseException) -> float | None:
        """Seconds to wait before the next attempt, or None if the task should not be retried."""
        if attempt >= self.max_attempts:
            return None
        if isinstance(exc, Retry):
            if exc.delay is not None:
                return exc.delay
        elif not isinstance(exc, self.retry_on):
            return None
        delay = min(self.retry_delay * self.backoff ** (attempt - 1), self.max_delay)
        return delay * (0.5 + random.random() / 2) if self.jitter else delay


class Task:
    """A function with :class:`TaskOptions` attached. Calling it calls the function."""

    def __init__(self, func: Callable[..., Any], options: TaskOptions) -> None:
        if not callable(func):
            raise InvalidTaskError(f"sitq.task() wraps a callable, not {type(func).__name__} {func!r}")
        functools.update_wrapper(self, func)  # first: it copies func's __dict__, which may hold a "func" too
        self.func = func
        self.task_options = options

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)

    def options(self, **changes: Any) -> Task:
        """The same function with some options changed."""
        return Task(self.func, _with_options(self.task_options, changes))

    def __repr__(self) -> str:
        return f"<sitq.Task {getattr(self.func, '__qualname__', self.func)!s} {self.task_options}>"


@overload
def task(func: None = None, **options: Any) -> Callable[[Callable[..., Any]], Task]: ...


@overload
def task(func: Callable[..., Any], **options: Any) -> Task: ...


def task(func: Callable[..., Any] | None = None, **options: Any) -> Task | Callable[[Callable[..., Any]], Task]:
    """Attach task options to a function: ``task(f, retries=2)`` or ``@task(retries=2)``.

    The options are :class:`TaskOptions`' fields: ``name``, ``retries``, ``retry_delay``,
    ``backoff``, ``max_delay``, ``jitter``, ``retry_on``, ``timeout``, ``queue``, ``priority``,
    ``after``, ``key``, ``replace_failed`` and ``retention``. The returned
    :class:`Task` is called like the function, and enqueued with these options; its
    ``options(**changes)`` gives a copy with some changed, for one call. An unknown or
    invalid option raises :class:`InvalidTaskError` here, not when the task runs.

    >>> import sitq
    >>> fetch = sitq.task(len, retries=3, timeout=60)
    >>> fetch("abc"), fetch.task_options.retries, fetch.options(retries=0).task_options.retries
    (3, 3, 0)
    >>> sitq.task(len, retries=-1)
    Traceback (most recent call last):
    ...
    sitq.errors.InvalidTaskError: ...
    """
    settings = _with_options(TaskOptions(), options)
    if func is None:
        return lambda f: Task(f.func if isinstance(f, Task) else f, settings)
    return Task(func.func if isinstance(func, Task) else func, settings)


def _with_options(base: TaskOptions, changes: dict[str, Any]) -> TaskOptions:
    fields = [f.name for f in dataclasses.fields(TaskOptions)]
    unknown = sorted(set(changes) - set(fields))
    if unknown:
        raise InvalidTaskError(f"unknown task option {', '.join(unknown)}; task options are: {', '.join(fields)}")
    return dataclasses.replace(base, **changes)


def _check_seconds(label: str, value: Any, allow_zero: bool) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidTaskError(f"{label} must be a number of seconds {bound}, not {value!r}")


def check_queue_name(name: Any) -> str:
    """``name`` if it can name a queue (letters, digits and ``_.:-``, at most 100), else InvalidTaskError."""
    if not isinstance(name, str) or not QUEUE_NAME.fullmatch(name):
        raise InvalidTaskError(
            f"a queue name is 1 to 100 letters, digits or the characters _ . : - (so that a list of them "
            f"reads a,b on the command line), not {name!r}"
        )
    return name


def retention_seconds(value: Any) -> float | None:
    """A retention as seconds (None: keep for ever), from seconds or a timedelta; InvalidTaskError otherwise."""
    if value is None:
        return None
    if isinstance(value, dt.timedelta):
        value = value.total_seconds()
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value) and value >= 0
    if not ok:
        raise InvalidTaskError(
            f"retention must be a timedelta, a number of seconds >= 0, or None to keep finished tasks for ever, "
            f"not {value!r}"
        )
    return float(value)


def _is_text(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _task_ids(label: str, ids: Any) -> tuple[str, ...]:
    """``ids`` (one id or an iterable of them) as a tuple of ids; InvalidTaskError for anything else."""
    if isinstance(ids, str):
        ids = (ids,)
    try:
        found = tuple(ids)
    except TypeError:
        raise InvalidTaskError(f"{label} takes task ids (a list of the ids enqueue returned), not {ids!r}") from None
    for task_id in found:
        if not isinstance(task_id, str) or not task_id or not _is_text(task_id):
            raise InvalidTaskError(f"{label} takes task ids as enqueue returns them, not {task_id!r}")
    return found


DEFAULT_OPTIONS = TaskOptions()  # a function enqueued without sitq.task()
