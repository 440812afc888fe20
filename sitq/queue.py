"""The producer side: enqueue calls, look up their state, wait for their results."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sitq.backends import Backend, Target, open_backend
from sitq.backends.rules import RetryOutcome, key_group_id, key_task_id
from sitq.core import (
    CANCELLED,
    FAILED,
    FINISHED_STATES,
    STATES,
    GroupInfo,
    NewTask,
    NewTaskBatch,
    PurgeReport,
    QueueOverview,
    Result,
    Schedule,
    ScheduleInfo,
    TaskInfo,
    TaskStatus,
)
from sitq.errors import (
    BackendError,
    InvalidTaskError,
    SerializationError,
    SignatureError,
    TaskCancelledError,
    TaskFailedError,
    TaskNotFoundError,
)
from sitq.options import DEFAULT_OPTIONS, Task, TaskOptions, retention_seconds
from sitq.scheduling import first_run, period
from sitq.serialization import CloudpickleSerializer, Serializer, describe_callable
from sitq.signing import HOW_TO_SUPPLY, STORE_KEY_RECORD, Signer, check_store_key, signer_from

__all__ = ["TaskQueue", "new_task_id", "deserialize_value", "DEFAULT_RETENTION"]

MAP_SLICE = 0.002  # seconds map() pickles arguments before it lets the event loop run
ID_RANDOMS = 64  # map() draws the random part of this many task ids in one system call
DEFAULT_RETENTION = dt.timedelta(days=7)  # how long a finished task is kept unless the queue or task says
FINISHED_NAMES = ("success", "failed", "cancelled")


def new_task_id(now: float) -> str:
    """32 hex digits: milliseconds first, so ids sort by creation and index cheaply, then 80 random bits."""
    return f"{int(now * 1000):012x}{os.urandom(10).hex()}"


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
    use compatible ones. ``retention`` (a timedelta or seconds; None keeps them
    for ever) is how long the tasks this queue enqueues are kept once they
    finish, unless a task's own ``retention`` option says otherwise; running
    workers delete them after that. ``clock`` returns POSIX seconds; tests pass
    their own. ``map_pause`` is how long :meth:`map` sleeps after each slice of
    pickling (about 2 ms): 0 lets only this queue's event loop run in between;
    a notebook's queue, whose loop thread shares the GIL with the kernel's, gives
    the kernel its turn at once that way instead of after Python's switch interval.
    """

    def __init__(
        self,
        backend: Target,
        serializer: Serializer | None = None,
        *,
        secret_key: str | bytes | None = None,
        retention: dt.timedelta | float | None = DEFAULT_RETENTION,
        clock: Callable[[], float] = time.time,
        map_pause: float = 0.0,
    ) -> None:
        if isinstance(map_pause, bool) or not isinstance(map_pause, int | float) or not 0 <= map_pause <= 1:
            raise InvalidTaskError(f"map_pause takes seconds between 0 and 1, not {map_pause!r}")
        self.backend = open_backend(backend)
        self.serializer = serializer or CloudpickleSerializer()
        self.retention = retention_seconds(retention)
        self.clock = clock
        self.map_pause = float(map_pause)
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
        options (name, retries, timeout, queue, priority, ``after``, ``key``,
        retention) travel with the function: see :func:`sitq.task`. With a
        ``key``, the id is the key's: enqueueing the same key again returns the
        task already stored (see :class:`sitq.TaskOptions`). An ``after`` id that
        names no task raises :class:`InvalidTaskError`.
        """
        _check_callable(func)
        now = self.clock()
        start = _eta_seconds(eta, now)
        name, options = _describe(func)
        func_bytes = self.serializer.dumps_function(func)
        args_bytes = self.serializer.dumps_arguments(func, args, kwargs)
        task_id = new_task_id(now) if options.key is None else key_task_id(options.key)
        task = NewTask(
            task_id, name, func_bytes, args_bytes, start, now, options.max_attempts,
            self._sign(task_id, func_bytes, args_bytes), options.queue, options.priority, options.key,
            options.replace_failed, options.after, options.retention_or(self.retention),
        )
        backend = await self._checked(writing=True)
        await backend.enqueue([task])
        return task.task_id

    def _sign(self, task_id: str, func: bytes, args: bytes) -> bytes | None:
        """The payload's signature, or None without a key; ``enqueue`` and ``map`` both sign here."""
        return self._signer.sign_task(task_id, func, args) if self._signer is not None else None

    async def map(
        self,
        func: Callable[..., Any],
        /,
        *iterables: Iterable[Any],
        eta: Any = None,
        group: str | None = None,
        key: str | None = None,
    ) -> list[str]:
        """Enqueue ``func(*items)`` for each item of ``zip(*iterables)``, in one transaction.

        The function is pickled once; either every task is stored or none is.
        Returns the task ids in input order. ``group`` names a group the tasks
        join (``group(id)`` then counts them as one piece of work); with ``key``,
        item ``i`` is enqueued with the key ``f"{key}/{i}"`` and the group is
        the key's unless one is named, so running the same ``map`` again returns
        the same ids (see :class:`sitq.TaskOptions`' ``key``). Task options
        travel with the function, as for :meth:`enqueue`, except ``key``.
        The arguments are pickled a slice at a time, letting the event loop run in
        between, and the backend stores a large batch off the loop, so a big
        ``map`` does not freeze a notebook or a worker.
        """
        _check_callable(func)
        if not iterables:
            raise InvalidTaskError(f"map({describe_callable(func)}) needs at least one iterable of arguments")
        name, options = _describe(func)
        if options.key is not None:
            raise InvalidTaskError(
                f"map({describe_callable(func)}): the function carries the key option {options.key!r}, which "
                "would give every task one key; pass map(..., key=...) to key the tasks of the map instead"
            )
        if group is not None and (not isinstance(group, str) or not group):
            raise InvalidTaskError(f"group takes a group id (a non-empty string), not {group!r}")
        if key is not None and (not isinstance(key, str) or not key):
            raise InvalidTaskError(f"key takes a non-empty string, not {key!r}")
        if key is not None and group is None:
            group = key_group_id(key)
        now = self.clock()
        start = _eta_seconds(eta, now)
        func_bytes = self.serializer.dumps_function(func)
        dumps_arguments = self.serializer.dumps_arguments
        sign = self._sign
        urandom = os.urandom
        no_kwargs: dict[str, Any] = {}
        prefix = f"{int(now * 1000):012x}"
        randoms, used = "", ID_RANDOMS  # each id's 80 random bits, drawn ID_RANDOMS ids at a time
        task_ids: list[str] = []
        keys: list[str] | None = None if key is None else []
        payloads: list[bytes] = []
        signatures: list[bytes | None] = []
        pause, pause_at = self.map_pause, time.perf_counter() + MAP_SLICE
        for call in zip(*iterables, strict=False):  # stops at the shortest, as map() does
            if keys is None:
                if used == ID_RANDOMS:  # one system call for many ids (one each cost 1 us a task)
                    randoms, used = urandom(10 * ID_RANDOMS).hex(), 0
                task_id = prefix + randoms[20 * used: 20 * used + 20]
                used += 1
            else:
                keys.append(item_key := f"{key}/{len(task_ids)}")
                task_id = key_task_id(item_key)
            args = dumps_arguments(func, call, no_kwargs)
            task_ids.append(task_id)
            payloads.append(args)
            signatures.append(sign(task_id, func_bytes, args))
            if len(task_ids) % 64 == 0 and time.perf_counter() > pause_at:
                await asyncio.sleep(pause)  # let the loop run (a worker's tasks), and with a pause other threads
                pause_at = time.perf_counter() + MAP_SLICE
        if task_ids:
            backend = await self._checked(writing=True)
            batch = NewTaskBatch(
                name, func_bytes, start, now, options.max_attempts, task_ids, payloads, signatures, keys,
                options.queue, options.priority, options.replace_failed, options.after,
                options.retention_or(self.retention), group, name,
            )
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
            token = backend.finish_token
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
            await backend.wait_for_finish(token, remaining)

    async def get_results(self, task_ids: Sequence[str]) -> dict[str, Result]:
        """The current :class:`Result` of many tasks in one read, without waiting (a task that has
        not finished yet has status pending, waiting or running and no value); unknown ids are
        left out."""
        ids = _id_list("get_results", task_ids)
        backend = await self._checked(writing=False)
        return await backend.fetch_results(ids)

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

    async def retry(self, task_ids: Sequence[str]) -> dict[str, RetryOutcome]:
        """Run failed or cancelled tasks again, by hand: each is pending again at once, with one
        more attempt and its result, error and lost-worker count cleared (tasks cancelled because
        it failed stay cancelled). Says per id ``"retried"``, ``"unfinished"`` (still waiting,
        pending or running: nothing changed) or ``"succeeded"`` (nothing to retry); unknown ids
        are left out."""
        ids = _id_list("retry", task_ids)
        backend = await self._ready()
        return await backend.retry(ids, self.clock())

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


    async def list_tasks(
        self,
        status: str | Sequence[str] | None = None,
        *,
        queue: str | None = None,
        group: str | None = None,
        ungrouped: bool = False,
        limit: int = 100,
        offset: int = 0,
        newest_first: bool = True,
    ) -> list[TaskInfo]:
        """Tasks in ``status`` (one state or several), ``queue`` and ``group`` (None: any), newest
        first unless ``newest_first`` is false, skipping ``offset``, at most ``limit``. With
        ``ungrouped``, only tasks that belong to no group (``queue`` and ``group`` must be None):
        with a ``status``, found at a cost that does not grow with the groups beside them, and
        :meth:`count_ungrouped` says how many there are in all."""
        statuses = _statuses(status)
        for label, number in (("limit", limit), ("offset", offset)):
            if isinstance(number, bool) or not isinstance(number, int) or number < 0:
                raise InvalidTaskError(f"list_tasks({label}=...) takes a whole number >= 0, not {number!r}")
        backend = await self._ready()
        if ungrouped:
            if queue is not None or group is not None:
                raise InvalidTaskError("list_tasks(ungrouped=True) lists the tasks of no group in any queue; "
                                       "leave queue and group out")
            return await backend.find_ungrouped(statuses=statuses, limit=limit, offset=offset,
                                                newest_first=newest_first)
        return await backend.find_tasks(
            statuses=statuses, queue=queue, group_id=group, limit=limit, offset=offset, newest_first=newest_first
        )

    async def count_ungrouped(self) -> dict[str, int]:
        """How many tasks of no group are in each state, from the counts the store keeps (its
        totals less its groups'): the same cost beside a group of ten tasks and of a million.
        Raises ``NotImplementedError`` for a backend that keeps no such counts."""
        backend = await self._ready()
        return await backend.count_ungrouped()

    async def group(self, group_id: str) -> GroupInfo | None:
        """A group's name and its counts per state (``map(..., group=...)``); None if unknown. Costs
        the same for a group of ten tasks and of a million: the store keeps the counts."""
        _check_task_id(group_id)
        backend = await self._ready()
        return await backend.group(group_id)

    async def cancel_group(self, group_id: str) -> dict[str, int]:
        """Cancel every task of the group that has not finished, at once: ``{"cancelled": n}`` for the
        waiting and pending ones, which never run, and ``{"requested": m}`` for the running ones, whose
        workers stop them (see :meth:`cancel`). Finished tasks stay as they are."""
        _check_task_id(group_id)
        backend = await self._ready()
        done = await backend.cancel_group(group_id, self.clock())
        return {str(outcome): n for outcome, n in done.items()}

    async def resolve_group(self, fragment: str) -> str:
        """The full id of the one group whose id is ``fragment``, or begins or ends with it (as
        :meth:`resolve` for tasks). Raises :class:`TaskNotFoundError` if none matches and
        :class:`InvalidTaskError` if several do."""
        _check_task_id(fragment)
        if not fragment:
            raise InvalidTaskError("an empty group id matches every group; give at least a few characters")
        backend = await self._ready()
        try:
            found = await backend.match_group_ids(fragment, limit=2)
        except NotImplementedError:  # a backend that finds group ids only whole
            found = [fragment] if await backend.group(fragment) is not None else []
        if not found:
            raise TaskNotFoundError(f"no group id is, begins or ends with {fragment!r} in {backend!r}")
        if len(found) > 1:
            raise InvalidTaskError(
                f"{fragment!r} matches several groups ({found[0]}, {found[1]}, ...); give more characters of the id"
            )
        return found[0]

    async def resolve(self, fragment: str) -> str:
        """The full id of the one task whose id is ``fragment``, or begins or ends with it, as git takes
        a short hash (views show ids by their last 8 characters). Raises :class:`TaskNotFoundError` if
        none matches and :class:`InvalidTaskError` if several do."""
        _check_task_id(fragment)
        if not fragment:
            raise InvalidTaskError("an empty task id matches every task; give at least a few characters")
        backend = await self._ready()
        found = await backend.match_ids(fragment, limit=2)
        if not found:
            raise TaskNotFoundError(f"no task id is, begins or ends with {fragment!r} in {backend!r}")
        if len(found) > 1:
            raise InvalidTaskError(
                f"{fragment!r} matches several tasks ({found[0]}, {found[1]}, ...); give more characters of the id"
            )
        return found[0]

    async def purge(
        self,
        *,
        older_than: dt.timedelta | float | None = None,
        status: str | Sequence[str] = FINISHED_NAMES,
        dry_run: bool = False,
    ) -> PurgeReport:
        """Delete finished tasks in ``status`` (default: succeeded, failed and cancelled) that finished
        more than ``older_than`` ago (None: whenever), and say how many tasks and bytes went. Waiting,
        pending and running tasks are never touched. With ``dry_run``, nothing is deleted."""
        statuses = _statuses(status) or []
        unfinished = [s for s in statuses if s not in FINISHED_STATES]
        if unfinished:
            raise InvalidTaskError(
                f"purge deletes finished tasks only (success, failed, cancelled), not {', '.join(unfinished)}"
            )
        age = retention_seconds(older_than)
        backend = await self._ready()
        before = None if age is None else self.clock() - age
        return await backend.purge(statuses=statuses, finished_before=before, dry_run=dry_run)

    # -- schedules -------------------------------------------------------------

    async def schedule(
        self,
        func: Callable[..., Any],
        /,
        *,
        every: dt.timedelta | float | None = None,
        cron: str | None = None,
        tz: str = "UTC",
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        name: str | None = None,
        start: Any = None,
    ) -> ScheduleInfo:
        """Run ``func(*args, **kwargs)`` periodically, on any running worker: ``every`` (a timedelta or
        seconds) or at the times of the ``cron`` expression, read in the time zone ``tz``.

        The schedule is stored under ``name`` (the function's name by default); declaring it again
        replaces it and, if its period is unchanged, keeps its next run, so running a cell twice
        changes nothing. The first tick is at ``start`` (an aware datetime or a timedelta from now)
        if given, else one period from now (or the cron expression's next time). Each tick is
        enqueued by exactly one worker; a tick missed while no worker ran runs once, late, and the
        ticks after it are skipped. Task options (queue, priority, retries, timeout, retention)
        travel with the function. Returns the stored schedule.
        """
        _check_callable(func)
        every_s, cron_expr, zone = period(every, cron, tz)
        task_name, options = _describe(func)
        if options.key is not None or options.after:
            raise InvalidTaskError("a schedule's task cannot carry the key or after options: each tick is a new task")
        name = task_name if name is None else name
        if not isinstance(name, str) or not name:
            raise InvalidTaskError(f"a schedule's name is a non-empty string, not {name!r}")
        now = self.clock()
        func_bytes = self.serializer.dumps_function(func)
        args_bytes = self.serializer.dumps_arguments(func, tuple(args), dict(kwargs or {}))
        signature = None if self._signer is None else self._signer.sign_schedule(name, func_bytes, args_bytes)
        stored = Schedule(
            name, task_name, func_bytes, args_bytes, signature, every_s, cron_expr, zone,
            first_run(every_s, cron_expr, zone, start, now), None, options.queue, options.priority,
            options.max_attempts, options.retention_or(self.retention),
        )
        backend = await self._checked(writing=True)
        await backend.set_schedule(stored)
        return next(s for s in await backend.schedules() if s.name == name)

    async def unschedule(self, name: str) -> bool:
        """Remove the schedule ``name``; False if there was none. Tasks it enqueued stay."""
        backend = await self._ready()
        return await backend.delete_schedule(name)

    async def schedules(self) -> list[ScheduleInfo]:
        """Every schedule, soonest next run first."""
        backend = await self._ready()
        return await backend.schedules()


def _statuses(status: str | Sequence[str] | None) -> list[TaskStatus | str] | None:
    """One state or several, checked; None stays None (any state)."""
    if status is None:
        return None
    wanted = [status] if isinstance(status, str) else list(status)
    known = {s.value: s for s in TaskStatus}
    unknown = [s for s in wanted if s not in known]
    if unknown:
        raise InvalidTaskError(f"unknown task state {unknown[0]!r}; the states are {', '.join(STATES)}")
    return [known[s] for s in wanted]


def _id_list(label: str, task_ids: Any) -> list[str]:
    if isinstance(task_ids, (str, bytes)):
        raise InvalidTaskError(f"{label}() takes a list of task ids")
    try:
        ids = list(task_ids)
    except TypeError:
        raise InvalidTaskError(f"{label}() takes a list of task ids, not {type(task_ids).__name__}") from None
    for task_id in ids:
        _check_task_id(task_id)
    return ids


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


def _describe(func: Callable[..., Any]) -> tuple[str, TaskOptions]:
    """The task's display name and its options."""
    if isinstance(func, Task):
        options = func.task_options
        return options.name or describe_callable(func.func), options
    return describe_callable(func), DEFAULT_OPTIONS


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
