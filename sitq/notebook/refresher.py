"""Keeps live views current: task widgets until their task ends, and boards.

The refresher runs on the runtime's loop thread, fetches rows from the queue
and hands them to the widgets, which only draw. Widgets are added from the
kernel's main thread; only the loop thread touches the lists of views.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sitq.core import TaskStatus
from sitq.notebook.render import result_html, task_html
from sitq.notebook.rows import task_row
from sitq.queue import TaskQueue
from sitq.sync import LoopThread

if TYPE_CHECKING:  # the widgets (and ipywidgets) load when a view is first shown
    from sitq.notebook.widgets import BoardWidget, TaskWidget

__all__ = ["Refresher", "REFRESH_INTERVAL"]

log = logging.getLogger(__name__)

REFRESH_INTERVAL = 0.25  # live views redraw at least this often
COALESCE = 0.05  # after a change, wait this long so a burst of changes is one redraw


@dataclass(eq=False)
class _Board:
    widget: BoardWidget
    limit: int
    detail_of: tuple[str, TaskStatus | str] | None = field(default=None)  # (task id, state) the detail shows


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
                 output_of: Callable[[str], str | None] | None = None) -> None:
        self.queue = queue
        self._output_of = output_of
        self.tasks: dict[str, list[TaskWidget]] = {}
        self.boards: list[_Board] = []
        self._loop = loop
        self._wake = asyncio.Event()  # binds to the loop thread's loop on first use

    def add_task(self, widget: TaskWidget) -> None:
        self._call_soon(self._add_task, widget)

    def add_board(self, widget: BoardWidget, limit: int) -> None:
        self._call_soon(self._add_board, widget, limit)

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

    async def run(self) -> None:
        backend = self.queue.backend
        while True:
            if not self.tasks and not self.boards:
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
            infos = await self.queue.statuses(list(self.tasks))
            for task_id, widgets in list(self.tasks.items()):
                info = infos.get(task_id)
                if info is None:
                    continue  # not visible yet to this connection; try again next time
                row = task_row(info)
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
        for board in self.boards:
            overview = await self.queue.overview(board.limit)
            board.widget.show(overview.counts, [task_row(info) for info in overview.recent])
            await self._refresh_detail(board)

    async def _refresh_detail(self, board: _Board) -> None:
        """The picked task: live while it runs, its result (or traceback) once it ends."""
        task_id = board.widget.selected
        info = await self.queue.status(task_id) if task_id else None
        if info is None:
            board.detail_of = None
            return
        if not info.finished:
            board.widget.show_detail(task_html(task_row(info)), cancellable=True)
        elif board.detail_of != (task_id, info.status) or not board.widget.detail.value:
            result = await self.queue.get_result(task_id, 0)
            board.widget.show_detail(result_html(result, self.queue.deserialize_result), cancellable=False)
        board.detail_of = (task_id, info.status)
