"""Live views drawn with ipywidgets: one task, one group of tasks, and the board for a whole queue.

These classes only draw what they are given (rows, results, counts); the
runtime's refresher fetches the data and calls them from its loop thread.
Updates from that thread only ever set traits, which ipywidgets turns into
comm messages the frontend routes by widget id, whichever cell is running.
Never ``with output:`` from a thread: that would follow the running cell.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ipywidgets as W

from sitq.notebook.render import (
    counts_html,
    failures_html,
    group_header_html,
    live_output_html,
    result_html,
    table_html,
    task_html,
)
from sitq.notebook.rows import GroupRow, TaskRow, short_id

__all__ = ["TaskWidget", "GroupWidget", "BoardWidget", "GROUP_PREFIX"]

GROUP_PREFIX = "group:"  # a board picker's value for a group, before the group's id

_BAR_STYLE = {"running": "info", "success": "success", "failed": "danger", "cancelled": "warning"}


class TaskWidget:
    """A task while it runs (state, name, elapsed time, a progress bar once the
    task reports progress), replaced by its result or traceback when it ends."""

    def __init__(self, task_id: str, name: str = "") -> None:
        self.task_id = task_id
        self.finished = False
        self.header = W.HTML(value=task_html(TaskRow(task_id, name, "pending")))
        self.bar = W.FloatProgress(value=0.0, min=0.0, max=1.0, bar_style="info",
                                   layout=W.Layout(display="none", width="24em"))
        self.output = W.HTML(value="")
        self.output.add_class("sitq-task-output")
        self.body = W.HTML(value="")
        self.box = W.VBox([self.header, self.bar, self.output, self.body])
        self.box.add_class("sitq-task-widget")

    def show(self, row: TaskRow) -> None:
        """Draw the task's current state (called repeatedly while it runs)."""
        if self.finished:
            return
        self.header.value = task_html(row)
        if row.fraction is not None:
            self.bar.value = row.fraction
            self.bar.layout.display = None
        self.bar.bar_style = _BAR_STYLE.get(row.status, "info")

    def show_output(self, text: str) -> None:
        """Draw what the running task has printed so far (its last lines)."""
        if not self.finished:
            self.output.value = live_output_html(text)

    def finish(self, result: Any, deserialize: Callable[[Any], Any] | None = None) -> None:
        """Replace the live view by the result (or traceback) and captured output;
        ``deserialize`` loads the value (the queue's ``deserialize_result``)."""
        self.finished = True
        self.bar.bar_style = _BAR_STYLE.get(result.status, "info")
        if result.status == "success" and self.bar.layout.display != "none":
            self.bar.value = 1.0
        self.header.value = ""
        self.header.layout.display = "none"
        self.output.value = ""  # the result shows all of it
        self.body.value = result_html(result, deserialize)
        self.box.add_class(f"sitq-done-{result.status}")

    def __repr__(self) -> str:
        return f"<sitq task widget {self.task_id}>"

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        return _bundle(self, **kwargs)


class GroupWidget:
    """A group of tasks as one thing: a header (done/total, failed, running, rate, time left), an
    aggregate bar, a cancel-all button, and the first failures, each opening onto its traceback.

    ``on_cancel()`` runs when the button is pressed (on the kernel's main thread, between cells);
    None hides the button.
    """

    def __init__(self, group_id: str, name: str, expected: int | None = None,
                 on_cancel: Callable[[], None] | None = None) -> None:
        self.group_id = group_id
        self._on_cancel = on_cancel
        self.finished = False
        # The parts with no layout of their own share one, and the two HTML parts a style: four models
        # fewer to open: about a third less time to make it, which a big map's cell waits for.
        shared = W.Layout()
        self.header = W.HTML(value=group_header_html(GroupRow(group_id, name, {}, storing=True,
                                                              expected=expected)), layout=shared)
        self.header.add_class("sitq-group-header-view")
        self.bar = W.FloatProgress(value=0.0, min=0.0, max=1.0, bar_style="info", layout=W.Layout(width="24em"))
        self.cancel = W.Button(description="cancel all", button_style="warning", icon="stop",
                               layout=W.Layout(display=None if on_cancel else "none", width="8em"))
        self.cancel.add_class("sitq-group-cancel")
        self.cancel.on_click(self._cancel_clicked)
        self.failures = W.HTML(value="", layout=shared, style=self.header.style)
        self.failures.add_class("sitq-group-failures")
        self.box = W.VBox([self.header, W.HBox([self.bar, self.cancel], layout=shared), self.failures],
                          layout=shared)
        self.box.add_class("sitq-group-widget")
        self._failures_shown: tuple[Any, ...] | None = None

    def show(self, row: GroupRow, tracebacks: Mapping[str, str | None] | None = None) -> None:
        """Draw the group's current counts (called repeatedly; traits send only what changed)."""
        self.bar.value = row.fraction  # sent before the header that says the same in words
        self.bar.bar_style = "danger" if row.failed else ("success" if row.finished else "info")
        self.header.value = group_header_html(row)
        shown = (tuple(f.task_id for f in row.failures), row.failed, tuple(sorted((tracebacks or {}).items())))
        if shown != self._failures_shown:
            self._failures_shown = shown
            self.failures.value = failures_html(row, tracebacks)
        self.cancel.disabled = row.finished
        if row.finished != self.finished:
            self.finished = row.finished
            (self.box.add_class if row.finished else self.box.remove_class)("sitq-group-done")

    def _cancel_clicked(self, _button: Any) -> None:
        if self._on_cancel is not None:
            self.cancel.disabled = True
            self._on_cancel()

    def __repr__(self) -> str:
        return f"<sitq group widget {self.group_id}>"

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        return _bundle(self, **kwargs)


class BoardWidget:
    """Counts per state, a table of recent tasks, and a task inspector.

    ``on_select(task_id)`` runs when the user picks a task (on the kernel's
    main thread, between cells); ``on_cancel(task_id)`` when they press cancel.
    Pass ``on_cancel=None`` when the queue cannot cancel: the button is hidden.
    """

    def __init__(self, on_select: Callable[[str], None],
                 on_cancel: Callable[[str], None] | None,
                 on_page: Callable[[int], None] | None = None) -> None:
        self._on_select = on_select
        self._on_cancel = on_cancel
        self._on_page = on_page
        self._syncing = False
        self.counts = W.HTML(value=counts_html({}))
        self.counts.add_class("sitq-board-counts")
        self.table = W.HTML(value=table_html([]))
        self.table.add_class("sitq-board-table")
        self.picker = W.Dropdown(options=[("inspect a task…", "")], value="",
                                 layout=W.Layout(width="32em"))
        self.picker.add_class("sitq-board-picker")
        self.picker.observe(self._picked, "value")
        self.cancel = W.Button(description="cancel", button_style="warning", disabled=True,
                               icon="stop",
                               layout=W.Layout(display=None if on_cancel else "none"))
        self.cancel.add_class("sitq-board-cancel")
        self.cancel.on_click(self._cancel_clicked)
        self.newer = W.Button(description="newer", icon="arrow-left", disabled=True, layout=W.Layout(width="7em"))
        self.older = W.Button(description="older", icon="arrow-right", disabled=True, layout=W.Layout(width="7em"))
        self.newer.add_class("sitq-board-newer")
        self.older.add_class("sitq-board-older")
        self.newer.on_click(lambda _b: self._page(-1))
        self.older.on_click(lambda _b: self._page(1))
        self.pager = W.HBox([self.newer, self.older], layout=W.Layout(display="none"))
        self.detail = W.HTML(value="")
        self.detail.add_class("sitq-board-detail")
        self.box = W.VBox([self.counts, self.table, self.pager, W.HBox([self.picker, self.cancel]),
                           self.detail])
        self.box.add_class("sitq-board")

    @property
    def selected(self) -> str:
        value: str = self.picker.value
        return value

    def show(self, counts: Mapping[str, int], rows: Iterable[TaskRow | GroupRow], page: str = "",
             newer: bool = False, older: bool = False) -> None:
        """Draw the queue: counts, the table (groups as one row each), the pager and the picker's choices.
        ``page`` says which tasks the last rows are; ``newer``/``older``: whether there are more."""
        rows = list(rows)
        self.counts.value = counts_html(counts)
        self.table.value = table_html(rows, page)
        self.newer.disabled, self.older.disabled = not newer, not older
        self.pager.layout.display = None if (newer or older) else "none"
        options = [("inspect a task…", "")] + [(_label(r), _value(r)) for r in rows]
        selected = self.picker.value
        if selected and selected not in {value for _, value in options}:
            options.append((selected, selected))  # keep a task that scrolled off
        if list(self.picker.options) != options:
            self._syncing = True
            try:
                self.picker.options = options
                self.picker.value = selected  # setting options resets the value
            finally:
                self._syncing = False

    def _page(self, step: int) -> None:
        if self._on_page is not None:
            self._on_page(step)

    def show_detail(self, html: str, cancellable: bool) -> None:
        self.detail.value = html
        self.cancel.disabled = not (cancellable and self._on_cancel)

    def _picked(self, change: Mapping[str, Any]) -> None:
        if self._syncing:
            return
        self.cancel.disabled = True
        self.detail.value = ""
        if change["new"]:
            self._on_select(change["new"])

    def _cancel_clicked(self, _button: Any) -> None:
        if self.picker.value and self._on_cancel:
            self.cancel.disabled = True
            self._on_cancel(self.picker.value)

    def __repr__(self) -> str:
        return "<sitq board>"

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        return _bundle(self, **kwargs)


def _label(row: TaskRow | GroupRow) -> str:
    if isinstance(row, GroupRow):
        return f"group {short_id(row.group_id)} · {row.name} · {row.done:,}/{row.total:,}"
    return f"{row.task_id} · {row.name} · {row.status}"


def _value(row: TaskRow | GroupRow) -> str:
    return GROUP_PREFIX + row.group_id if isinstance(row, GroupRow) else row.task_id


def _bundle(view: TaskWidget | GroupWidget | BoardWidget, **kwargs: Any) -> dict[str, Any]:
    """The box's widget view, with a one-line text form instead of the widget tree."""
    bundle: dict[str, Any] = view.box._repr_mimebundle_(**kwargs)
    bundle["text/plain"] = repr(view)
    return bundle
