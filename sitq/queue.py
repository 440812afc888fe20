"""The producer side: enqueue calls, look up their state, wait for their results."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import secrets
import time
from typing import Any, Callable, Iterable, Optional, Sequence

from sitq.backends.base import Backend
from sitq.core import CANCELLED, FAILED, FINISHED_STATES, NewTask, NewTaskBatch, QueueOverview, Result, TaskInfo
from sitq.errors import InvalidTaskError, SerializationError, TaskCancelledError, TaskFailedError
from sitq.options import Task
from sitq.serialization import CloudpickleSerializer, Serializer, describe_callable
from sitq.signing import signer_from

__all__ = ["TaskQueue", "new_task_id"]

MAP_SLICE = 0.002  # seconds map() pickles arguments before it lets the event loop run


def new_task_id(now: float) -> str:
    """32 hex digits: milliseconds first, so ids sort by creation and index cheaply."""
    return f"{int(now * 1000):012x}{secrets.token_hex(10)}"


class TaskQueue:
    """Enqueue function calls into a backend and get their results back.

    The queue connects to its backend on first use. Use it as ``async with
    TaskQueue(...) as queue:`` or call ``await queue.close()`` when done.
    With ``secret_key`` (or ``SITQ_SECRET_KEY`` in the environment) every
    payload is signed, for workers that only run signed tasks.
    ``clock`` returns POSIX seconds; tests pass their own.
    """

    def __init__(
        self,
        backend: Backend,
        serializer: Optional[Serializer] = None,
        *,
        secret_key: Optional[Any] = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(backend, Backend):
            raise TypeError(
                f"TaskQueue needs a sitq backend such as SQLiteBackend('tasks.db'), not {type(backend).__name__}"
            )
        self.backend = backend
        self.serializer = serializer or CloudpickleSerializer()
        self.clock = clock
        self._signer = signer_from(secret_key)
        self._connected = False

    def __repr__(self) -> str:
        return f"<TaskQueue backend={self.backend!r}>"

    async def __aenter__(self) -> "TaskQueue":
        await self._ready()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the backend's connections. Stored tasks stay where they are."""
        self._connected = False
        await self.backend.close()

    async def _ready(self) -> Backend:
        if not self._connected:
            await self.backend.connect()
            self._connected = True
        return self.backend

    # -- enqueueing ----------------------------------------------------------

    async def enqueue(self, func: Callable, *args: Any, eta: Any = None, **kwargs: Any) -> str:
        """Store a call of ``func(*args, **kwargs)`` and return its task id.

        ``eta`` (a timezone-aware datetime, or a timedelta from now) delays the
        start; it is the only keyword ``enqueue`` keeps for itself. Task
        options (name, retries, timeout) travel with the function: see
        :func:`sitq.task`.
        """
        _check_callable(func)
        now = self.clock()
        start = _eta_seconds(eta, now)
        name, max_attempts = _describe(func)
        func_bytes = self.serializer.dumps_function(func)
        task = self._new_task(new_task_id(now), name, func_bytes, self.serializer.dumps_arguments(func, args, kwargs), start, now, max_attempts)
        backend = await self._ready()
        await backend.enqueue([task])
        return task.task_id

    def _new_task(self, task_id, name, func, args, eta, now, max_attempts) -> NewTask:
        return NewTask(task_id, name, func, args, eta, now, max_attempts, self._sign(task_id, func, args))

    def _sign(self, task_id: str, func: bytes, args: bytes) -> Optional[bytes]:
        """The payload's signature, or None without a key; ``enqueue`` and ``map`` both sign here."""
        return self._signer.sign(func, args) if self._signer is not None else None

    async def map(self, func: Callable, *iterables: Iterable, eta: Any = None) -> list[str]:
        """Enqueue ``func(*items)`` for each item of ``zip(*iterables)``, in one transaction.

        The function is pickled once; either every task is stored or none is.
        Returns the task ids in input order. The arguments are pickled a slice at a
        time, letting the event loop run in between, and the backend stores a large
        batch off the loop, so a big ``map`` does not freeze a notebook or a worker.
        """
        _check_callable(func)
        if not iterables:
            raise InvalidTaskError(f"map({describe_callable(func)}) needs at least one iterable of arguments")
        now = self.clock()
        start = _eta_seconds(eta, now)
        name, max_attempts = _describe(func)
        func_bytes = self.serializer.dumps_function(func)
        dumps_arguments = self.serializer.dumps_arguments
        sign = self._sign
        no_kwargs: dict = {}
        prefix = f"{int(now * 1000):012x}"
        task_ids: list[str] = []
        payloads: list[bytes] = []
        signatures: list[Optional[bytes]] = []
        pause_at = time.perf_counter() + MAP_SLICE
        for call in zip(*iterables):
            task_id = prefix + secrets.token_hex(10)
            args = dumps_arguments(func, call, no_kwargs)
            task_ids.append(task_id)
            payloads.append(args)
            signatures.append(sign(task_id, func_bytes, args))
            if len(task_ids) % 64 == 0 and time.perf_counter() > pause_at:
                await asyncio.sleep(0)  # let the loop run: a notebook's kernel, a worker's tasks
                pause_at = time.perf_counter() + MAP_SLICE
        if task_ids:
            backend = await self._ready()
            await backend.enqueue(NewTaskBatch(name, func_bytes, start, now, max_attempts, task_ids, payloads, signatures))
        return task_ids

    # -- results -------------------------------------------------------------

    async def get_result(self, task_id: str, timeout: Optional[float] = None) -> Optional[Result]:
        """Wait for the task to finish and return its :class:`Result`.

        Returns ``None`` at once if no task has this id, and ``None`` if the
        task has not finished within ``timeout`` seconds (``0`` checks without
        waiting; ``None`` waits as long as it takes). Never raises on timeout.
        """
        _check_task_id(task_id)
        _check_timeout(timeout)
        backend = await self._ready()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            token = backend.change_token
            result = await backend.fetch_result(task_id)
            if result is None or result.status in FINISHED_STATES:
                return result
            remaining = None
            if deadline is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
            await backend.wait_for_change(token, remaining)

    def deserialize_result(self, result: Result) -> Any:
        """The task's return value, unpickled.

        Raises :class:`TaskFailedError` or :class:`TaskCancelledError` when the
        result has no value because the task failed or was cancelled.
        """
        if not isinstance(result, Result):
            got = "None (the task was not found, or get_result timed out)" if result is None else type(result).__name__
            raise InvalidTaskError(f"deserialize_result needs a Result from get_result, got {got}")
        if result.status == FAILED:
            raise TaskFailedError(result)
        if result.status == CANCELLED:
            raise TaskCancelledError(result)
        if result.value is None:
            raise InvalidTaskError(f"task {result.task_id} is {result.status}; it has no value yet")
        try:
            return self.serializer.loads(result.value)
        except Exception as exc:
            raise SerializationError(
                f"cannot unpickle the value of task {result.task_id} ({result.name}): "
                f"{type(exc).__name__}: {exc}; this process needs the modules the value's classes come from"
            ) from exc

    async def cancel(self, task_id: str) -> Optional[str]:
        """Cancel a task, and say what that did.

        ``"cancelled"``: it was pending and will never run. ``"requested"``: it
        is running; its worker cancels a coroutine at once, and for a function
        in a thread it discards the outcome (the thread itself cannot be
        stopped); either way the task ends as ``"cancelled"``. ``"finished"``:
        it had already finished, and nothing changed. ``None``: no such task.
        """
        _check_task_id(task_id)
        backend = await self._ready()
        return await backend.cancel(task_id, self.clock())

    # -- state ---------------------------------------------------------------

    async def status(self, task_id: str) -> Optional[TaskInfo]:
        """The task's current state, timings, attempts and progress; None if unknown."""
        _check_task_id(task_id)
        backend = await self._ready()
        return (await backend.fetch_info([task_id])).get(task_id)

    async def statuses(self, task_ids: Sequence[str]) -> dict[str, TaskInfo]:
        """Current state of many tasks at once, keyed by id; unknown ids are left out."""
        if isinstance(task_ids, str):
            raise InvalidTaskError("statuses() takes a list of task ids; use status() for one id")
        ids = list(task_ids)
        for task_id in ids:
            _check_task_id(task_id)
        backend = await self._ready()
        return await backend.fetch_info(ids)

    async def overview(self, limit: int = 20) -> QueueOverview:
        """Counts per state for the whole queue and the ``limit`` newest tasks."""
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise InvalidTaskError(f"overview(limit=...) takes a whole number >= 0, not {limit!r}")
        backend = await self._ready()
        return await backend.overview(limit)


def _check_callable(func: Any) -> None:
    if not callable(func):
        raise InvalidTaskError(
            f"enqueue needs a callable as its first argument, got {type(func).__name__} {func!r}; "
            "pass the function itself (f), not its result (f())"
        )


def _describe(func: Callable) -> tuple[str, int]:
    """The task's display name and how many attempts it gets."""
    if isinstance(func, Task):
        options = func.task_options
        return options.name or describe_callable(func.func), options.max_attempts
    return describe_callable(func), 1


def _check_task_id(task_id: Any) -> None:
    if not isinstance(task_id, str):
        raise InvalidTaskError(
            f"task ids are strings as returned by enqueue, got {type(task_id).__name__} {task_id!r}"
        )


def _check_timeout(timeout: Any) -> None:
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout) or timeout < 0:
        raise InvalidTaskError(f"timeout must be None or a number of seconds >= 0, not {timeout!r}")


def _eta_seconds(eta: Any, now: float) -> float:
    if eta is None:
        return now
    if isinstance(eta, dt.timedelta):
        return now + eta.total_seconds()
    if isinstance(eta, dt.datetime):
        if eta.tzinfo is None or eta.utcoffset() is None:
            raise InvalidTaskError(
                f"eta={eta!r} has no timezone, so sitq cannot tell when it is; pass an aware datetime "
                "such as datetime.now(timezone.utc) + timedelta(minutes=5), or a timedelta"
            )
        return eta.timestamp()
    raise InvalidTaskError(f"eta must be a timezone-aware datetime or a timedelta, not {type(eta).__name__}")
