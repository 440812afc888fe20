"""Keeps live views current: task widgets until their task ends, group widgets until their
group ends, and boards.

The refresher runs on the runtime's loop thread, fetches rows from the queue
and hands them to the widgets, which only draw. Widgets are added from the
kernel's main thread; only the loop thread touches the lists of views.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from sitq.core import GroupInfo, TaskInfo, TaskStatus
from sitq.notebook.render import group_html, result_html, task_html
from sitq.notebook.rows import GroupRow, TaskRow, group_row, task_row
from sitq.queue import TaskQueue
from sitq.sync import LoopThread

if TYPE_CHECKING:  # the widgets (and ipywidgets) load when a view is first shown
    from sitq.notebook.widgets import BoardWidget, GroupWidget, TaskWidget

__all__ = ["Refresher", "GroupWatch", "REFRESH_INTERVAL", "FIRST_FAILURES"]

log = logging.getLogger(__name__)

REFRESH_INTERVAL = 0.25  # live views redraw at least this often
COALESCE = 0.05  # after a change, wait this long so a burst of changes is one redraw
FIRST_FAILURES = 3  # how many of a group's failures its view lists, with their tracebacks
RATE_WINDOW = 10.0  # seconds of history a group's rate is taken over
T = TypeVar("T")


class Look(Protocol):
    """``Worker.look``: run a read of the store, and return it with the tasks that wait in a run as of it."""

    def __call__(self, read: Callable[[], Awaitable[T]], /) -> Awaitable[tuple[T, list[str]]]: ...


class Counted(Protocol):
    """``Refresher.counted``: run a read of the store, and return it with the tasks that wait in a run
    of the kernel's worker as of it, and their groups."""

    def __call__(self, read: Callable[[], Awaitable[T]], /) -> Awaitable[tuple[T, dict[str, str | None]]]: ...


OTHER_STATES = ("waiting", "pending", "success", "cancelled")  # the board's paged part: tasks of no group


@dataclass(eq=False)
class _Board:
    widget: BoardWidget
    limit: int
    detail_of: tuple[str, TaskStatus | str] | None = field(default=None)  # (task id, state) the detail shows
    page: int = 0  # which page of the other tasks of no group it shows
    watches: dict[str, GroupWatch] = field(default_factory=dict)  # groups picked for the detail


class GroupWatch:
    """What a group's views need beyond its counts, kept between redraws: the rate (from the
    finished count over the last ``RATE_WINDOW`` seconds) and the first failures with their
    tracebacks (read again only when the failed count moves). Each redraw reads a fixed number
    of rows, whatever the group's size: the counts from ``group()``, at most ``FIRST_FAILURES``
    failed members, and the tracebacks of those not read before."""

    def __init__(self, group_id: str, name: str, expected: int | None = None,
                 stored: concurrent.futures.Future[Any] | None = None) -> None:
        self.group_id, self.name, self.expected, self.stored = group_id, name, expected, stored
        self.samples: deque[tuple[float, int]] = deque()
        self.failures: tuple[TaskRow, ...] = ()
        self.tracebacks: dict[str, str | None] = {}
        self._failed_seen = -1

    @property
    def storing(self) -> bool:
        """Whether the map is still storing the group's tasks."""
        return self.stored is not None and not self.stored.done()

    async def row(self, queue: TaskQueue, counted: Counted | None = None) -> GroupRow:
        """The group as drawn now (its counts are the store's, kept as tasks move); with ``counted``
        (``Refresher.counted``), its members that wait in a run of the kernel's worker as pending."""
        storing = self.storing
        stored = self.stored
        if stored is not None and stored.done() and not stored.cancelled() and stored.exception() is not None:
            error = stored.exception()
            return GroupRow(self.group_id, self.name, {}, expected=self.expected,
                            error=f"{type(error).__name__}: {error}")
        waiting: dict[str, str | None] = {}
        if counted is None:
            info = await queue.group(self.group_id)
        else:
            info, waiting = await counted(lambda: queue.group(self.group_id))
        if info is None:
            return GroupRow(self.group_id, self.name, {}, storing=storing, expected=self.expected)
        failed = info.counts.get(TaskStatus.FAILED, 0)
        if failed != self._failed_seen:
            first = await queue.list_tasks("failed", group=self.group_id, limit=FIRST_FAILURES, newest_first=False)
            self.failures = tuple(task_row(i) for i in first)
            unread = [r.task_id for r in self.failures if r.task_id not in self.tracebacks]
            if unread:
                results = await queue.get_results(unread)
                self.tracebacks.update({i: results[i].traceback if i in results else None for i in unread})
            self._failed_seen = failed
        held = sum(1 for g in waiting.values() if g == self.group_id)
        return group_row(_waiting_shown(info, held), self.rate(info), self.failures, storing, self.expected)

    def shown_tracebacks(self) -> dict[str, str | None]:
        return {r.task_id: self.tracebacks.get(r.task_id) for r in self.failures}

    def rate(self, info: GroupInfo) -> float | None:
        """Members finished per second over the last ``RATE_WINDOW`` seconds of calls (None at first)."""
        now, done = time.monotonic(), info.finished
        samples = self.samples
        if samples and done < samples[-1][1]:  # tasks retried: they are unfinished again
            samples.clear()
        samples.append((now, done))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW:
            samples.popleft()
        first_at, first_done = samples[0]
        if now - first_at < 0.5 or done == first_done:
            return None
        return (done - first_done) / (now - first_at)


class Refresher:
    """Redraws live views on the runtime's loop: task widgets until their task
    ends, boards for as long as the runtime runs. It wakes on every change the
    store reports and at least every ``REFRESH_INTERVAL`` seconds, so elapsed
    times move too; a view's traits only send messages when a value changes.

    ``output_of(task_id)`` is what a running task has printed so far, or None
    (the kernel's worker knows it for the tasks it runs; a worker elsewhere
    stores output only when the task ends): task widgets show its last lines
    while the task runs, at most every ``REFRESH_INTERVAL`` seconds.
    """

    def __init__(self, queue: TaskQueue, loop: LoopThread,
                 output_of: Callable[[str], str | None] | None = None, look: Look | None = None) -> None:
        self.queue = queue
        self._output_of = output_of
        self._look = look
        self._group_of: dict[str, str | None] = {}  # the group of each task seen waiting in a run
        self.tasks: dict[str, list[TaskWidget]] = {}
        self.groups: dict[str, tuple[GroupWatch, list[GroupWidget]]] = {}
        self.boards: list[_Board] = []
        self._loop = loop
        self._wake = asyncio.Event()  # binds to the loop thread's loop on first use

    def add_task(self, widget: TaskWidget) -> None:
        self._call_soon(self._add_task, widget)

    def add_board(self, widget: BoardWidget, limit: int) -> None:
        self._call_soon(self._add_board, widget, limit)

    def add_group(self, widget: GroupWidget, watch: GroupWatch) -> None:
        """Keep ``widget`` drawing the group ``watch`` follows until every member has finished
        (add it again after a retry)."""
        self._call_soon(self._add_group, widget, watch)

    def page(self, widget: BoardWidget, step: int) -> None:
        """Show the next (``step`` 1) or previous (-1) page of the board's other tasks."""
        self._call_soon(self._page, widget, step)

    def wake(self) -> None:
        self._call_soon(self._wake.set)

    def _call_soon(self, callback: Callable[..., object], *args: Any) -> None:
        if self._loop.is_running:  # a stopped runtime's views stay as they are
            self._loop.loop.call_soon_threadsafe(callback, *args)

    def _add_task(self, widget: TaskWidget) -> None:
        self.tasks.setdefault(widget.task_id, []).append(widget)
        self._wake.set()

    def _add_board(self, widget: BoardWidget, limit: int) -> None:
        self.boards.append(_Board(widget, limit))
        self._wake.set()

    def _add_group(self, widget: GroupWidget, watch: GroupWatch) -> None:
        known = self.groups.get(watch.group_id)
        if known is None:
            self.groups[watch.group_id] = (watch, [widget])
        elif widget not in known[1]:
            known[1].append(widget)
        self._wake.set()

    def _page(self, widget: BoardWidget, step: int) -> None:
        for board in self.boards:
            if board.widget is widget:
                board.page = max(0, board.page + step)
        self._wake.set()

    async def run(self) -> None:
        backend = self.queue.backend
        while True:
            if not self.tasks and not self.groups and not self.boards:
                await self._wake.wait()
            self._wake.clear()
            token = backend.change_token
            try:
                await self.refresh()
            except Exception:  # a view must never stop the worker; say why it froze
                log.exception("sitq: refreshing notebook views failed")
            wake = asyncio.ensure_future(self._wake.wait())
            change = asyncio.ensure_future(backend.wait_for_change(token, REFRESH_INTERVAL))
            try:
                await asyncio.wait({wake, change}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for fut in (wake, change):
                    fut.cancel()
                await asyncio.gather(wake, change, return_exceptions=True)
            await asyncio.sleep(COALESCE)

    async def refresh(self) -> None:
        if self.tasks:
            infos, waiting = await self.counted(lambda: self.queue.statuses(list(self.tasks)))
            for task_id, widgets in list(self.tasks.items()):
                info = infos.get(task_id)
                if info is None:
                    continue  # not visible yet to this connection; try again next time
                row = task_row(_as_waiting(info) if task_id in waiting else info)
                output = self._output_of(task_id) if self._output_of is not None and not info.finished else None
                for widget in widgets:
                    widget.show(row)
                    if output is not None:
                        widget.show_output(output)
                if info.finished:
                    result = await self.queue.get_result(task_id, 0)
                    for widget in widgets:
                        widget.finish(result, self.queue.deserialize_result)
                    del self.tasks[task_id]
        for group_id, (watch, group_widgets) in list(self.groups.items()):
            drawn = await watch.row(self.queue, self.counted)
            tracebacks = watch.shown_tracebacks()
            for group_widget in group_widgets:
                group_widget.show(drawn, tracebacks)
            if drawn.finished:
                del self.groups[group_id]
        for board in self.boards:
            counts, rows, page, newer, older = await self.board_rows(board.limit, board.page, board.watches)
            board.widget.show(counts, rows, page, newer, older)
            await self._refresh_detail(board)

    async def counted(self, read: Callable[[], Awaitable[T]]) -> tuple[T, dict[str, str | None]]:
        """What ``read()`` read from the store, with the tasks it counts running that were not running
        then in a run of the kernel's worker, and their groups: views draw those as pending, so that
        no more run than the worker has slots. The worker's ``look`` runs the read, so that none of its
        claims or outcome writes lands between the read and the list; the groups are read after (once
        per task)."""
        if self._look is None:
            return await read(), {}
        value, ids = await self._look(read)
        known = self._group_of
        unknown = [i for i in ids if i not in known]
        if unknown:
            known.update({i: info.group_id for i, info in (await self.queue.statuses(unknown)).items()})
        self._group_of = {i: known[i] for i in ids if i in known}
        return value, self._group_of

    async def task_info(self, task_id: str) -> TaskInfo | None:
        """The task as views draw it (None if there is no such task): pending while it waits in a run."""
        info, waiting = await self.counted(lambda: self.queue.status(task_id))
        return _as_waiting(info) if info is not None and task_id in waiting else info

    async def board_rows(
        self, limit: int, page: int = 0, watches: dict[str, GroupWatch] | None = None
    ) -> tuple[dict[str, int], list[TaskRow | GroupRow], str, bool, bool]:
        """What a board shows: the counts; then the running and failed tasks of no group; then the
        newest groups, one row each (unfinished ones first); then a page of ``limit`` of the other
        tasks of no group, newest first. Also the page's label and whether newer and older pages exist.
        Tasks that wait in a run of the kernel's worker (see :meth:`counted`) count as pending."""
        watches = {} if watches is None else watches
        overview, waiting = await self.counted(lambda: self.queue.overview(limit))
        by_group = Counter(waiting.values())
        # The store finds the tasks of no group by state without reading the groups' rows, so a
        # refresh costs the same beside a group of a million, wherever the loose tasks are.
        loose = await self._loose_counts()
        running = [task_row(i) for i in overview.running if i.group_id is None and i.task_id not in waiting]
        failed = [] if loose is not None and not loose["failed"] else [
            task_row(i) for i in await self.queue.list_tasks("failed", ungrouped=True, limit=limit)]
        groups = []
        for info in overview.groups:
            watch = watches.setdefault(info.group_id, GroupWatch(info.group_id, info.name))
            groups.append(group_row(_waiting_shown(info, by_group[info.group_id]), watch.rate(info)))  # no failure rows
        for stale in set(watches) - {g.group_id for g in groups}:
            del watches[stale]
        groups.sort(key=lambda g: (g.finished, g.failed == 0))  # stable: newest first within each
        if loose is not None:
            states = [s for s in OTHER_STATES if loose[s]]
        else:  # a backend without the counts: leave out the states the groups shown account for
            states = [s for s in OTHER_STATES
                      if overview.counts.get(s, 0) > sum(g.counts.get(s, 0) for g in overview.groups)]
        others = await self.queue.list_tasks(states, ungrouped=True, limit=limit + 1,
                                             offset=page * limit) if states else []
        older = len(others) > limit
        others = others[:limit]
        total = None if loose is None else sum(loose[s] for s in states)
        label = _page_label(page * limit, len(others), total, older)
        rows: list[TaskRow | GroupRow] = [*running, *failed, *groups, *(task_row(i) for i in others)]
        counts = dict(overview.counts)
        moved = min(len(waiting), counts.get(TaskStatus.RUNNING, 0))
        counts[TaskStatus.RUNNING] = counts.get(TaskStatus.RUNNING, 0) - moved
        counts[TaskStatus.PENDING] = counts.get(TaskStatus.PENDING, 0) + moved
        return counts, rows, label, page > 0, older

    async def _loose_counts(self) -> dict[str, int] | None:
        """The tasks of no group per state, or None for a backend that keeps no such counts."""
        try:
            return await self.queue.count_ungrouped()
        except NotImplementedError:
            return None

    async def _refresh_detail(self, board: _Board) -> None:
        """The picked task: live while it runs, its result (or traceback) once it ends;
        a picked group: its counts and first failures."""
        task_id = board.widget.selected
        if not task_id:  # nothing picked: nothing to read, nor to import (the widgets load ipywidgets)
            board.detail_of = None
            return
        from sitq.notebook.widgets import GROUP_PREFIX

        if task_id.startswith(GROUP_PREFIX):
            group_id = task_id[len(GROUP_PREFIX):]
            watch = GroupWatch(group_id, "")
            row = await watch.row(self.queue, self.counted)
            board.widget.show_detail(group_html(row, watch.shown_tracebacks()), cancellable=not row.finished)
            board.detail_of = None
            return
        info = await self.task_info(task_id)
        if info is None:
            board.detail_of = None
            return
        if not info.finished:
            board.widget.show_detail(task_html(task_row(info)), cancellable=True)
        elif board.detail_of != (task_id, info.status) or not board.widget.detail.value:
            result = await self.queue.get_result(task_id, 0)
            board.widget.show_detail(result_html(result, self.queue.deserialize_result), cancellable=False)
        board.detail_of = (task_id, info.status)


def _page_label(skipped: int, shown: int, total: int | None, older: bool) -> str:
    """What the board's listed tasks of no group are: which of how many (``""`` when they all fit)."""
    if not shown:
        return "no more tasks" if skipped else ""
    if not (skipped or older):
        return ""
    of = "" if total is None else f" of {total:,}"
    return f"other tasks {skipped + 1:,}–{skipped + shown:,}{of}, newest first"


def _waiting_shown(info: GroupInfo, waiting: int) -> GroupInfo:
    """``info`` with ``waiting`` of its running members counted as pending (see Refresher.waiting)."""
    if not waiting:
        return info
    counts = dict(info.counts)
    moved = min(waiting, counts.get(TaskStatus.RUNNING, 0))
    counts[TaskStatus.RUNNING] = counts.get(TaskStatus.RUNNING, 0) - moved
    counts[TaskStatus.PENDING] = counts.get(TaskStatus.PENDING, 0) + moved
    return dataclasses.replace(info, counts=counts)


def _as_waiting(info: TaskInfo) -> TaskInfo:
    """A claimed task that waits in its run, drawn as what it is: not started yet."""
    return dataclasses.replace(info, status=TaskStatus.PENDING, started_at=None)
