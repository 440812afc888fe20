"""The producer side: enqueue calls, look up their state, wait for their results."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sitq.backends import Backend, Target, open_backend
from sitq.core import CANCELLED, FAILED, FINISHED_STATES, STATES, NewTask, NewTaskBatch, QueueOverview, Result, TaskInfo
from sitq.errors import (
    BackendError,
    InvalidTaskError,
    SerializationError,
    SignatureError,
    TaskCancelledError,
    TaskFailedError,
)
from sitq.options import Task
from sitq.serialization import CloudpickleSerializer, Serializer, describe_callable
from sitq.signing import HOW_TO_SUPPLY, STORE_KEY_RECORD, Signer, check_store_key, signer_from

__all__ = ["TaskQueue", "new_task_id", "deserialize_value"]

MAP_SLICE = 0.002  # seconds map() pickles arguments before it lets the event loop run


def new_task_id(now: float) -> str:
    """32 hex digits: milliseconds first, so ids sort by creation and index cheaply."""
    return f"{int(now * 1000):012x}{secrets.token_hex(10)}"


class TaskQueue:
    """Enqueue function calls into a backend and get their results back.

    ``backend`` is a store target: a file path (``"tasks.db"``), a
    ``sqlite:///`` or ``postgresql://`` URL, or a backend object (see
    :func:`sitq.open_backend`).

    The queue connects to its backend on first use. Use it as ``async with
    TaskQueue(...) as queue:`` or call ``await queue.close()`` when done.
    With ``secret_key`` (or ``SITQ_SECRET_KEY`` in the environment) every
    payload is signed, for workers that only run signed tasks, and only values
    signed by such a worker are unpickled. A store that was used with a key
    records it (its fingerprint): a queue without that key may still look at
    tasks (``status``, ``statuses``, ``overview``, ``cancel``), but refuses to
    enqueue into it or to fetch results from it, with :class:`SignatureError`.
    ``serializer`` turns calls and values into bytes (default: a
    :class:`CloudpickleSerializer`); queues and workers that share a store must
    use compatible ones. ``clock`` returns POSIX seconds; tests pass their own.
    """

    def __init__(
        self,
        backend: Target,
        serializer: Serializer | None = None,
        *,
        secret_key: str | bytes | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = open_backend(backend)
        self.serializer = serializer or CloudpickleSerializer()
        self.clock = clock
        self._signer = signer_from(secret_key)
        self._connected = False
        self._key_checked = False  # the store's key record was read (and, to enqueue, written)
        self._store_signed = False  # the store records a key: unsigned values are not to be trusted

    def __repr__(self) -> str:
        return f"<TaskQueue backend={self.backend!r}>"

    async def __aenter__(self) -> TaskQueue:
        await self._ready()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the backend's connections. Stored tasks stay where they are."""
        self._connected = self._key_checked = False
        await self.backend.close()

    async def _ready(self) -> Backend:
        if not self._connected:
            await self.backend.connect()
            self._connected = True
        return self.backend

    async def _checked(self, writing: bool) -> Backend:
        """The backend, once this queue's key fits the store (see the class docstring).

        The store is checked once per connection. A queue with a key records it in a store
        that has none when it first enqueues: the store is then set up for signing, and its
        older, unsigned tasks and values are refused by everyone who holds the key.
        """
        backend = await self._ready()
        if not self._key_checked or (writing and self._signer is not None and not self._store_signed):
            recorded = await backend.get_meta(STORE_KEY_RECORD)
            if recorded is None and writing and self._signer is not None:
                recorded = await backend.set_meta_if_absent(STORE_KEY_RECORD, self._signer.fingerprint)
            check_store_key(self._signer, recorded, repr(backend), "this queue")
            self._store_signed = recorded is not None
            self._key_checked = True
        return backend

    # -- enqueueing ----------------------------------------------------------

    async def enqueue(self, func: Callable[..., Any], /, *args: Any, eta: Any = None, **kwargs: Any) -> str:
        """Store a call of ``func(*args, **kwargs)`` and return its task id.

        ``eta`` (a timezone-aware datetime, or a timedelta from now) delays the
        start; it is the only keyword ``enqueue`` keeps for itself, so every
        other keyword (``func=``, ``self=`` included) goes to the task. Task
        options (name, retries, timeout) travel with the function: see
        :func:`sitq.task`.
        """
        _check_callable(func)
        now = self.clock()
        start = _eta_seconds(eta, now)
        name, max_attempts = _describe(func)
        func_bytes = self.serializer.dumps_function(func)
        args_bytes = self.serializer.dumps_arguments(func, args, kwargs)
        task = self._new_task(new_task_id(now), name, func_bytes, args_bytes, start, now, max_attempts)
        backend = await self._checked(writing=True)
        await backend.enqueue([task])
        return task.task_id

    def _new_task(
        self, task_id: str, name: str, func: bytes, args: bytes, eta: float, now: float, max_attempts: int
    ) -> NewTask:
        return NewTask(task_id, name, func, args, eta, now, max_attempts, self._sign(task_id, func, args))

    def _sign(self, task_id: str, func: bytes, args: bytes) -> bytes | None:
        """The payload's signature, or None without a key; ``enqueue`` and ``map`` both sign here."""
        return self._signer.sign_task(task_id, func, args) if self._signer is not None else None

    async def map(self, func: Callable[..., Any], /, *iterables: Iterable[Any], eta: Any = None) -> list[str]:
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
        no_kwargs: dict[str, Any] = {}
        prefix = f"{int(now * 1000):012x}"
        task_ids: list[str] = []
        payloads: list[bytes] = []
        signatures: list[bytes | None] = []
        pause_at = time.perf_counter() + MAP_SLICE
        for call in zip(*iterables, strict=False):  # stops at the shortest, as map() does
            task_id = prefix + secrets.token_hex(10)
            args = dumps_arguments(func, call, no_kwargs)
            task_ids.append(task_id)
            payloads.append(args)
            signatures.append(sign(task_id, func_bytes, args))
            if len(task_ids) % 64 == 0 and time.perf_counter() > pause_at:
                await asyncio.sleep(0)  # let the loop run: a notebook's kernel, a worker's tasks
                pause_at = time.perf_counter() + MAP_SLICE
        if task_ids:
            backend = await self._checked(writing=True)
            batch = NewTaskBatch(name, func_bytes, start, now, max_attempts, task_ids, payloads, signatures)
            await backend.enqueue(batch)
        return task_ids

    # -- results -------------------------------------------------------------

    async def get_result(self, task_id: str, timeout: float | None = None) -> Result | None:
        """Wait for the task to finish and return its :class:`Result`.

        Returns ``None`` at once if no task has this id, and ``None`` if the
        task has not finished within ``timeout`` seconds (``0`` checks without
        waiting; ``None`` waits as long as it takes). Never raises on timeout.
        Raises ``BackendError`` if the stored status is not one sitq writes: such
        a task would never finish.
        """
        _check_task_id(task_id)
        _check_timeout(timeout)
        backend = await self._checked(writing=False)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            token = backend.change_token
            result = await backend.fetch_result(task_id)
            if result is None or result.status in FINISHED_STATES:
                return result
            if result.status not in STATES:
                raise _unknown_status(result)
            remaining = None
            if deadline is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
            await backend.wait_for_change(token, remaining)

    def deserialize_result(self, result: Result) -> Any:
        """The task's return value, unpickled.

        Raises :class:`TaskFailedError` or :class:`TaskCancelledError` when the
        result has no value because the task failed or was cancelled, and
        :class:`SignatureError`, without unpickling, when this queue has a key
        and the value is not signed for this task with it, or when the value
        is signed and this queue has no key to check it.
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
        return deserialize_value(result, self.serializer, self._signer, store_signed=self._store_signed)

    async def cancel(self, task_id: str) -> str | None:
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

    async def status(self, task_id: str) -> TaskInfo | None:
        """The task's current state, timings, attempts and progress; None if unknown."""
        _check_task_id(task_id)
        backend = await self._ready()
        return (await backend.fetch_info([task_id])).get(task_id)

    async def statuses(self, task_ids: Sequence[str]) -> dict[str, TaskInfo]:
        """Current state of many tasks at once, keyed by id; unknown ids are left out."""
        if isinstance(task_ids, (str, bytes)):
            raise InvalidTaskError("statuses() takes a list of task ids; use status() for one id")
        try:
            ids = list(task_ids)
        except TypeError:
            raise InvalidTaskError(
                f"statuses() takes a list of task ids, not {type(task_ids).__name__} {task_ids!r}"
            ) from None
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


def deserialize_value(
    result: Result, serializer: Serializer, signer: Signer | None, *, store_signed: bool = False
) -> Any:
    """Check and unpickle a result's value: the one place sitq turns stored value bytes into an object.

    With a signer, the value must carry the worker's signature for this task. Without one,
    a signed value, or any value of a store known to be signed (``store_signed``), is refused:
    it could only be checked with the key.
    """
    if not isinstance(result.value, bytes):
        raise SerializationError(
            f"cannot unpickle the value of task {result.task_id} ({result.name}): the stored row has "
            f"{'text' if isinstance(result.value, str) else 'a number'} in column 'value' where sitq "
            "stores bytes; it was not written by sitq, or was changed by hand"
        )
    if signer is not None:
        signer.verify_value(result.task_id, result.name, result.value, result.value_signature)
    elif result.value_signature is not None or store_signed:
        raise SignatureError(
            f"refused to unpickle the value of task {result.task_id} ({result.name}): its store "
            "signs what it keeps, and without the secret key this process cannot check it; "
            f"{HOW_TO_SUPPLY}"
        )
    try:
        return serializer.loads(result.value)
    except Exception as exc:
        raise SerializationError(
            f"cannot unpickle the value of task {result.task_id} ({result.name}): "
            f"{type(exc).__name__}: {exc}; this process needs the modules the value's classes come from"
        ) from exc


def _check_callable(func: Any) -> None:
    if not callable(func):
        raise InvalidTaskError(
            f"enqueue needs a callable as its first argument, got {type(func).__name__} {func!r}; "
            "pass the function itself (f), not its result (f())"
        )


def _describe(func: Callable[..., Any]) -> tuple[str, int]:
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
    if not task_id.isascii():  # sitq's own ids are hex; others must at least be storable text
        try:
            task_id.encode()
        except UnicodeEncodeError as exc:
            raise InvalidTaskError(
                f"task id {task_id!r} is not valid text: it holds {task_id[exc.start:exc.end]!r}, a lone "
                "surrogate, which cannot be stored or looked up; pass the id enqueue returned"
            ) from None


def _unknown_status(result: Result) -> BackendError:
    return BackendError(
        f"task {result.task_id} has {result.status!r} in column 'status', a status sitq does not write "
        f"({', '.join(STATES)}); the row was not written by sitq, or was changed by hand, and sitq cannot "
        "wait for it to finish. Set its status to 'pending' to run it again, or delete the row."
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
