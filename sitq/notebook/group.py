"""GroupHandle: the tasks of one ``sitq.notebook.map``, as one piece of work.

Displayed in a cell it is one live widget: an aggregate bar, done/total, failed,
running, rate and time left, the first failures (each opens onto its traceback)
and a cancel-all button. Its counts come from the store's group record, kept as
the tasks move, so a redraw costs the same for ten tasks and for a million.
``group.results()`` (or ``await group``) returns the values in input order.

Failures: by default ``results()`` waits for every task, then raises the first
failure in input order as :class:`sitq.TaskFailedError` (a cancelled task as
:class:`sitq.TaskCancelledError`); ``results(failures="return")`` puts those
exceptions in the list in place of the values instead, and raises nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from sitq.core import FINISHED_STATES, GroupInfo, Result
from sitq.errors import SitqError, TaskCancelledError, TaskFailedError, TaskNotFoundError
from sitq.notebook.handle import TaskHandle, _Runtime, widgets_enabled
from sitq.notebook.refresher import GroupWatch
from sitq.notebook.rows import short_id

if TYPE_CHECKING:
    from sitq.notebook.widgets import GroupWidget

__all__ = ["GroupHandle", "FAILURE_CHOICES"]

log = logging.getLogger(__name__)

T = TypeVar("T")
FAILURE_CHOICES = ("raise", "return")
READ_CHUNK = 2000  # ids per read of results or states: the loop runs between chunks


class GroupHandle:
    """The tasks of one map, stored with one group id. Cheap to make and to keep.

    ``len(group)`` is how many tasks it holds, ``group[i]`` the :class:`TaskHandle` of the task
    for item ``i`` (slices give lists), and iterating gives every member's handle in input order.
    A big map may still be storing its tasks when ``map`` returns (its widget says so); every
    method that needs them waits for that first, and raises the map's error if storing failed.
    """

    def __init__(self, runtime: _Runtime, group_id: str, name: str = "", *, task_ids: list[str] | None = None,
                 stored: concurrent.futures.Future[list[str]] | None = None, expected: int | None = None) -> None:
        self._runtime = runtime
        self.group_id = group_id
        self.name = name
        self._ids = task_ids
        self._stored = stored
        self._expected = expected if expected is not None else (None if task_ids is None else len(task_ids))
        self._widget: GroupWidget | None = None

    @property
    def runtime(self) -> _Runtime:
        """The runtime the group was mapped on or, once that one was stopped, the kernel's current
        runtime on the same file."""
        if self._runtime.stopped:
            now = self._runtime.successor()
            if now is None:
                raise SitqError(f"the sitq worker on {self._runtime.path} was stopped; start it again "
                                f"(%sitq start {self._runtime.path}) to reach group {self.group_id}")
            self._runtime = now
        return self._runtime

    def __repr__(self) -> str:
        # no I/O here: a repr may be taken on any thread
        size = f" {self._expected:,} tasks" if self._expected is not None else ""
        return f"<GroupHandle {short_id(self.group_id)} {self.name}{size}>"

    # -- members ---------------------------------------------------------------

    @property
    def task_ids(self) -> list[str]:
        """The members' task ids, in input order (for a group re-attached by id: in enqueue order)."""
        if self._ids is None:
            runtime = self.runtime
            self._ids = runtime.run(self._member_ids(runtime))
        return self._ids

    async def _member_ids(self, runtime: _Runtime) -> list[str]:
        if self._ids is not None:
            return self._ids
        if self._stored is not None:
            ids = await asyncio.wrap_future(self._stored)
        else:
            ids = []
            while True:  # enqueue order is the map's input order
                page = await runtime.queue.list_tasks(group=self.group_id, newest_first=False, limit=10_000,
                                                      offset=len(ids))
                ids += [info.task_id for info in page]
                if len(page) < 10_000:
                    break
        self._ids = ids
        self._expected = len(ids)
        return ids

    def stored(self, timeout: float | None = None) -> list[str]:
        """Wait until the map has stored every task (most maps have by the time it returns) and
        return their ids; raises the error that made storing fail."""
        if self._stored is not None and self._ids is None:
            self._ids = self._stored.result(timeout)
        return self.task_ids

    def __len__(self) -> int:
        return len(self.task_ids)

    @overload
    def __getitem__(self, index: int) -> TaskHandle: ...

    @overload
    def __getitem__(self, index: slice) -> list[TaskHandle]: ...

    def __getitem__(self, index: int | slice) -> TaskHandle | list[TaskHandle]:
        ids = self.task_ids
        if isinstance(index, slice):
            return [TaskHandle(self.runtime, task_id, self.name) for task_id in ids[index]]
        return TaskHandle(self.runtime, ids[index], self.name)

    def __iter__(self) -> Iterator[TaskHandle]:
        runtime = self.runtime
        return (TaskHandle(runtime, task_id, self.name) for task_id in self.task_ids)

    # -- state -----------------------------------------------------------------

    def info(self) -> GroupInfo:
        """The group's counts per state now (one read, whatever the group's size)."""
        runtime = self.runtime
        if self._stored is not None and self._ids is None:
            self.stored()
        info = runtime.run(runtime.queue.group(self.group_id))
        if info is None:
            raise TaskNotFoundError(f"no group with id {self.group_id!r} in {runtime.path} (its tasks were purged?)")
        self.name = self.name or info.name
        return info

    @property
    def counts(self) -> dict[str, int]:
        """How many members are in each state."""
        return {str(state): n for state, n in self.info().counts.items()}

    def done(self) -> bool:
        """Whether every member has finished (succeeded, failed or was cancelled)."""
        info = self.info()
        return info.finished == info.total

    def wait(self, timeout: float | None = None) -> GroupInfo:
        """Wait until every member has finished and return the counts. Raises the builtin
        ``TimeoutError`` if they have not in ``timeout`` seconds (the tasks go on)."""
        runtime = self.runtime
        return runtime.run(self._wait(runtime, timeout))

    async def _wait(self, runtime: _Runtime, timeout: float | None) -> GroupInfo:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        await self._member_ids(runtime)
        backend = runtime.queue.backend
        while True:
            token = backend.finish_token
            info = await runtime.queue.group(self.group_id)
            if info is None:
                raise TaskNotFoundError(f"no group with id {self.group_id!r} in {runtime.path}")
            if info.finished == info.total:
                return info
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"group {short_id(self.group_id)} ({self.name}) has {info.total - info.finished:,} "
                                   f"of {info.total:,} tasks unfinished after {timeout}s; wait again, or await it")
            await backend.wait_for_finish(token, remaining)

    # -- results ---------------------------------------------------------------

    def results(self, timeout: float | None = None, failures: Literal["raise", "return"] = "raise") -> list[Any]:
        """Wait for every member and return their values in input order.

        ``failures="raise"`` (the default) raises the first failure in input order, as
        :class:`sitq.TaskFailedError` with the remote traceback (a cancelled task:
        :class:`sitq.TaskCancelledError`), once every member has finished.
        ``failures="return"`` puts those exceptions in the list in place of the values and
        raises nothing. Raises the builtin ``TimeoutError`` after ``timeout`` seconds.
        """
        _check_failures(failures)
        runtime = self.runtime
        return runtime.run(self._results(runtime, timeout, failures))

    def __await__(self) -> Generator[Any, None, list[Any]]:
        # The queue lives on the runtime's loop; the awaiting cell on the kernel's.
        runtime = self.runtime
        future = asyncio.wrap_future(runtime.loop.submit(self._results(runtime, None, "raise")))
        values: list[Any] = yield from future.__await__()
        return values

    async def _results(self, runtime: _Runtime, timeout: float | None, failures: str) -> list[Any]:
        await self._wait(runtime, timeout)
        ids = await self._member_ids(runtime)
        queue = runtime.queue
        values: list[Any] = []
        for start in range(0, len(ids), READ_CHUNK):
            chunk = ids[start:start + READ_CHUNK]
            found = await queue.get_results(chunk)
            for task_id in chunk:
                result = found.get(task_id)
                if result is None:
                    raise TaskNotFoundError(f"task {task_id} of group {short_id(self.group_id)} is no longer "
                                            f"stored in {runtime.path} (purged?)")
                try:
                    values.append(queue.deserialize_result(result))
                except (TaskFailedError, TaskCancelledError) as exc:
                    if failures == "raise":
                        raise
                    values.append(exc)
            await asyncio.sleep(0)
        return values

    def as_completed(self, timeout: float | None = None) -> Iterator[TaskHandle]:
        """The members' handles as they finish: those finished already first (in input order), then
        each as it ends. Raises the builtin ``TimeoutError`` if they have not all finished after
        ``timeout`` seconds. Each wait reads the group's counts; the members' states are read only
        when those say that more have finished."""
        runtime = self.runtime
        pending = list(self.task_ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            finished = runtime.run(self._newly_finished(runtime, pending, remaining))
            if not finished:
                raise TimeoutError(f"group {short_id(self.group_id)} ({self.name}): {len(pending):,} tasks "
                                   f"unfinished after {timeout}s")
            done = set(finished)
            pending = [task_id for task_id in pending if task_id not in done]
            for task_id in finished:
                yield TaskHandle(runtime, task_id, self.name)

    async def _newly_finished(self, runtime: _Runtime, pending: list[str], timeout: float | None) -> list[str]:
        """Which of ``pending`` have finished, waiting (up to ``timeout``) until at least one has."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        backend, queue = runtime.queue.backend, runtime.queue
        members = len(await self._member_ids(runtime))
        while True:
            token = backend.finish_token
            info = await queue.group(self.group_id)
            if info is not None and info.finished > members - len(pending):
                found: list[str] = []
                for start in range(0, len(pending), READ_CHUNK):
                    chunk = pending[start:start + READ_CHUNK]
                    states = await queue.statuses(chunk)
                    found += [i for i in chunk if i in states and states[i].status in FINISHED_STATES]
                if found:
                    return found
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return []
            await backend.wait_for_finish(token, remaining)

    def failures(self) -> list[Result]:
        """The :class:`sitq.Result` of every failed member, in input order (``.error``, ``.traceback``,
        ``.output``; displayed in a cell, each draws with its traceback). Reads the failed members
        only, not the whole group."""
        runtime = self.runtime
        return runtime.run(self._failures(runtime, ["failed"]))

    async def _failed_ids(self, runtime: _Runtime, states: list[str]) -> list[str]:
        ids: list[str] = []
        while True:
            page = await runtime.queue.list_tasks(states, group=self.group_id, newest_first=False, limit=10_000,
                                                  offset=len(ids))
            ids += [info.task_id for info in page]
            if len(page) < 10_000:
                return ids

    async def _failures(self, runtime: _Runtime, states: list[str]) -> list[Result]:
        await self._member_ids(runtime)
        ids = await self._failed_ids(runtime, states)
        found: dict[str, Result] = {}
        for start in range(0, len(ids), READ_CHUNK):
            found.update(await runtime.queue.get_results(ids[start:start + READ_CHUNK]))
        return [found[i] for i in ids if i in found]

    # -- actions ---------------------------------------------------------------

    def cancel(self) -> dict[str, int]:
        """Cancel every member that has not finished, at once: ``{"cancelled": n, "requested": m}``
        (pending ones never run; running ones are stopped by their worker, see ``TaskQueue.cancel``)."""
        runtime = self.runtime
        if self._stored is not None and self._ids is None:
            self.stored()
        done = runtime.run(runtime.queue.cancel_group(self.group_id))
        runtime.refresher.wake()
        return done

    def retry_failed(self) -> int:
        """Run the failed members again (each gets one more attempt); returns how many. The group's
        widget follows them again until they end."""
        runtime = self.runtime
        ids = runtime.run(self._retry_failed(runtime))
        if ids and self._widget is not None:
            runtime.refresher.add_group(self._widget, self._watch())
        runtime.refresher.wake()
        return ids

    async def _retry_failed(self, runtime: _Runtime) -> int:
        await self._member_ids(runtime)
        ids = await self._failed_ids(runtime, ["failed"])
        retried = await runtime.queue.retry(ids) if ids else {}
        return sum(1 for outcome in retried.values() if outcome == "retried")

    # -- display ---------------------------------------------------------------

    def _watch(self) -> GroupWatch:
        stored = self._stored if self._ids is None else None
        return GroupWatch(self.group_id, self.name, self._expected, stored)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None, **kwargs: Any) -> dict[str, Any]:
        from sitq.notebook.render import group_html
        from sitq.notebook.rows import GroupRow

        runtime = self.runtime
        watch = self._watch()
        if watch.storing:  # no read while the map stores: the first picture is what is known
            row = GroupRow(self.group_id, self.name, {}, storing=True, expected=self._expected)
        else:  # a map whose storing failed draws as failed, saying why
            row = runtime.run(watch.row(runtime.queue, runtime.refresher.counted))
            self.name = self.name or row.name
        html = group_html(row, watch.shown_tracebacks())
        if not widgets_enabled():
            return {"text/plain": repr(self), "text/html": html}
        if self._widget is None:
            from sitq.notebook.widgets import GroupWidget

            self._widget = GroupWidget(self.group_id, self.name, self._expected, on_cancel=self._cancel_clicked)
        self._widget.show(row, watch.shown_tracebacks())
        if not row.finished:
            runtime.refresher.add_group(self._widget, watch)
        bundle = self._widget._repr_mimebundle_()
        bundle.setdefault("text/html", html)  # frontends without widgets (nbconvert, GitHub)
        bundle["text/plain"] = repr(self)
        return bundle

    def _cancel_clicked(self) -> None:
        """The widget's cancel-all button (on the kernel's main thread, between cells)."""
        runtime = self.runtime

        def report(future: concurrent.futures.Future[Any]) -> None:
            if not future.cancelled() and future.exception() is not None:
                log.warning("sitq: cancelling group %s failed: %s", self.group_id, future.exception())

        runtime.loop.submit(runtime.queue.cancel_group(self.group_id)).add_done_callback(report)
        runtime.refresher.wake()


def _check_failures(failures: Any) -> None:
    if failures not in FAILURE_CHOICES:
        raise ValueError(f"results(failures=...) takes 'raise' (the first failure is raised) or 'return' "
                         f"(failures are returned in place of their values), not {failures!r}")
