"""Blocking use of sitq, from scripts and from notebook cells alike.

sitq's core is async. :class:`SyncTaskQueue` runs it on sitq's own event loop
in a daemon thread (:func:`shared_loop`), so it works the same in a plain
script and inside a running event loop such as a Jupyter cell, without
patching asyncio. It holds no logic of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

from sitq.backends import Target
from sitq.backends.rules import RetryOutcome
from sitq.core import GroupInfo, PurgeReport, QueueOverview, Result, ScheduleInfo, TaskInfo
from sitq.errors import SitqError, TaskNotFoundError
from sitq.queue import DEFAULT_RETENTION, FINISHED_NAMES, TaskQueue
from sitq.serialization import Serializer

__all__ = ["LoopThread", "shared_loop", "SyncTaskQueue"]

T = TypeVar("T")


class LoopThread:
    """An asyncio event loop running forever on a daemon thread."""

    def __init__(self, name: str = "sitq-loop") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"<LoopThread {self.name} {state}>"

    @property
    def is_running(self) -> bool:
        """Whether the loop's thread is alive (it starts on first use of :attr:`loop`)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop, started on first use."""
        with self._lock:
            if not self.is_running:
                loop = asyncio.new_event_loop()
                ready = threading.Event()
                self._thread = threading.Thread(target=self._serve, args=(loop, ready), name=self.name, daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            assert self._loop is not None  # set, and cleared, with the thread
            return self._loop

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop and return a concurrent future for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and block until it is done (Ctrl-C cancels it)."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise SitqError("a blocking sitq call was made on sitq's own loop thread; await the async API there")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def stop(self) -> None:
        """Stop the loop and wait for its thread to end."""
        with self._lock:
            thread, loop = self._thread, self._loop
            self._thread = self._loop = None
        if thread is not None and loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)


_shared: LoopThread | None = None
_shared_lock = threading.Lock()


def shared_loop() -> LoopThread:
    """The process-wide loop thread that blocking sitq calls run on."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = LoopThread()
        return _shared


class SyncTaskQueue:
    """The blocking face of :class:`TaskQueue`: the same methods, without ``await``.

    ``get_result`` returns a :class:`Result` (or ``None``), as ``TaskQueue.get_result``
    does. ``value`` is the shortcut that returns the task's value itself: it raises
    :class:`TaskFailedError` (with the remote error and traceback) or
    :class:`TaskCancelledError`, returns ``None`` if the task has not finished within
    ``timeout``, and raises :class:`TaskNotFoundError` for an unknown id, since ``None``
    already means "not yet".

    The arguments are :class:`TaskQueue`'s; ``loop`` is the :class:`LoopThread` the calls
    run on (by default the process-wide one, :func:`shared_loop`). Every call blocks until
    it is done, also inside a running event loop such as a notebook cell's.
    """

    def __init__(
        self,
        backend: Target,
        serializer: Serializer | None = None,
        *,
        secret_key: str | bytes | None = None,
        retention: dt.timedelta | float | None = DEFAULT_RETENTION,
        clock: Callable[[], float] = time.time,
        loop: LoopThread | None = None,
    ) -> None:
        self.queue = TaskQueue(backend, serializer, secret_key=secret_key, retention=retention, clock=clock)
        self._loop = loop or shared_loop()

    def __repr__(self) -> str:
        return f"<SyncTaskQueue backend={self.queue.backend!r}>"

    def __enter__(self) -> SyncTaskQueue:
        self._loop.run(self.queue._ready())
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the backend's connections. Stored tasks stay where they are."""
        self._loop.run(self.queue.close())

    def enqueue(self, func: Callable[..., Any], /, *args: Any, eta: Any = None, **kwargs: Any) -> str:
        """Store a call of ``func(*args, **kwargs)`` and return its task id; see :meth:`TaskQueue.enqueue`."""
        return self._loop.run(self.queue.enqueue(func, *args, eta=eta, **kwargs))

    def map(
        self,
        func: Callable[..., Any],
        /,
        *iterables: Iterable[Any],
        eta: Any = None,
        group: str | None = None,
        key: str | None = None,
    ) -> list[str]:
        """Enqueue ``func(*items)`` for each item of ``zip(*iterables)`` in one transaction and
        return the task ids in order; see :meth:`TaskQueue.map`."""
        return self._loop.run(self.queue.map(func, *iterables, eta=eta, group=group, key=key))

    def get_result(self, task_id: str, timeout: float | None = None) -> Result | None:
        """Wait for the task and return its :class:`Result`; see :meth:`TaskQueue.get_result`."""
        return self._loop.run(self.queue.get_result(task_id, timeout))

    def get_results(self, task_ids: Sequence[str]) -> dict[str, Result]:
        """The current results of many tasks in one read, without waiting; see :meth:`TaskQueue.get_results`."""
        return self._loop.run(self.queue.get_results(task_ids))

    def value(self, task_id: str, timeout: float | None = None) -> Any:
        """Wait for the task and return its value (see the class docstring for failures)."""
        return self._loop.run(self._value(task_id, timeout))

    async def _value(self, task_id: str, timeout: float | None) -> Any:
        result = await self.queue.get_result(task_id, timeout)
        if result is not None:
            return self.queue.deserialize_result(result)
        if await self.queue.status(task_id) is None:
            raise TaskNotFoundError(f"no task with id {task_id!r} in {self.queue.backend!r}")
        return None

    def cancel(self, task_id: str) -> str | None:
        """Cancel a task: ``"cancelled"``, ``"requested"``, ``"finished"`` or None for an unknown id;
        see :meth:`TaskQueue.cancel`."""
        return self._loop.run(self.queue.cancel(task_id))

    def retry(self, task_ids: Sequence[str]) -> dict[str, RetryOutcome]:
        """Run failed or cancelled tasks again, by hand; see :meth:`TaskQueue.retry`."""
        return self._loop.run(self.queue.retry(task_ids))

    def deserialize_result(self, result: Result) -> Any:
        """The value in ``result``, unpickled (or the task's error raised); see :meth:`TaskQueue.deserialize_result`."""
        return self.queue.deserialize_result(result)

    def status(self, task_id: str) -> TaskInfo | None:
        """The task's current state, timings, attempts and progress; None if unknown."""
        return self._loop.run(self.queue.status(task_id))

    def statuses(self, task_ids: Sequence[str]) -> dict[str, TaskInfo]:
        """Current state of many tasks at once, keyed by id; unknown ids are left out."""
        return self._loop.run(self.queue.statuses(task_ids))

    def overview(self, limit: int = 20) -> QueueOverview:
        """Counts per state for the whole queue and the ``limit`` newest tasks."""
        return self._loop.run(self.queue.overview(limit))

    def list_tasks(
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
        """Tasks by state, queue and group, newest first; see :meth:`TaskQueue.list_tasks`."""
        return self._loop.run(self.queue.list_tasks(
            status, queue=queue, group=group, ungrouped=ungrouped, limit=limit, offset=offset,
            newest_first=newest_first,
        ))

    def count_ungrouped(self) -> dict[str, int]:
        """How many tasks of no group are in each state; see :meth:`TaskQueue.count_ungrouped`."""
        return self._loop.run(self.queue.count_ungrouped())

    def cancel_group(self, group_id: str) -> dict[str, int]:
        """Cancel every unfinished task of a group at once; see :meth:`TaskQueue.cancel_group`."""
        return self._loop.run(self.queue.cancel_group(group_id))

    def resolve_group(self, fragment: str) -> str:
        """The full id of the one group whose id is, begins or ends with ``fragment``; see
        :meth:`TaskQueue.resolve_group`."""
        return self._loop.run(self.queue.resolve_group(fragment))

    def group(self, group_id: str) -> GroupInfo | None:
        """A group's name and counts per state; see :meth:`TaskQueue.group`."""
        return self._loop.run(self.queue.group(group_id))

    def resolve(self, fragment: str) -> str:
        """The full id of the one task whose id is, begins or ends with ``fragment``; see :meth:`TaskQueue.resolve`."""
        return self._loop.run(self.queue.resolve(fragment))

    def purge(
        self,
        *,
        older_than: dt.timedelta | float | None = None,
        status: str | Sequence[str] = FINISHED_NAMES,
        dry_run: bool = False,
    ) -> PurgeReport:
        """Delete finished tasks and say how many tasks and bytes went; see :meth:`TaskQueue.purge`."""
        return self._loop.run(self.queue.purge(older_than=older_than, status=status, dry_run=dry_run))

    def schedule(
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
        """Run ``func`` periodically on any running worker; see :meth:`TaskQueue.schedule`."""
        return self._loop.run(self.queue.schedule(
            func, every=every, cron=cron, tz=tz, args=args, kwargs=kwargs, name=name, start=start
        ))

    def unschedule(self, name: str) -> bool:
        """Remove a schedule; see :meth:`TaskQueue.unschedule`."""
        return self._loop.run(self.queue.unschedule(name))

    def schedules(self) -> list[ScheduleInfo]:
        """Every schedule, soonest next run first."""
        return self._loop.run(self.queue.schedules())
