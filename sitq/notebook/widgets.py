"""Live views drawn with ipywidgets: one task, and the board for a whole queue.

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

from sitq.notebook.render import counts_html, live_output_html, result_html, table_html, task_html
from sitq.notebook.rows import TaskRow

__all__ = ["TaskWidget", "BoardWidget"]

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


class BoardWidget:
    """Counts per state, a table of recent tasks, and a task inspector.

    ``on_select(task_id)`` runs when the user picks a task (on the kernel's
    main thread, between cells); ``on_cancel(task_id)`` when they press cancel.
    Pass ``on_cancel=None`` when the queue cannot cancel: the button is hidden.
    """

    def __init__(self, on_select: Callable[[str], None],
                 on_cancel: Callable[[str], None] | None) -> None:
        self._on_select = on_select
        self._on_cancel = on_cancel
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
        self.detail = W.HTML(value="")
        self.detail.add_class("sitq-board-detail")
        self.box = W.VBox([self.counts, self.table, W.HBox([self.picker, self.cancel]),
                           self.detail])
        self.box.add_class("sitq-board")

    @property
    def selected(self) -> str:
        value: str = self.picker.value
        return value

    def show(self, counts: Mapping[str, int], rows: Iterable[TaskRow]) -> None:
        """Draw the queue: counts, the table, and the picker's choices."""
        rows = list(rows)
        self.counts.value = counts_html(counts)
        self.table.value = table_html(rows)
        options = [("inspect a task…", "")] + [(_label(r), r.task_id) for r in rows]
        selected = self.picker.value
        if selected and selected not in {r.task_id for r in rows}:
            options.append((selected, selected))  # keep a task that scrolled off
        if list(self.picker.options) != options:
            self._syncing = True
            try:
                self.picker.options = options
                self.picker.value = selected  # setting options resets the value
            finally:
                self._syncing = False

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


def _label(row: TaskRow) -> str:
    return f"{row.task_id} · {row.name} · {row.status}"


def _bundle(view: TaskWidget | BoardWidget, **kwargs: Any) -> dict[str, Any]:
    """The box's widget view, with a one-line text form instead of the widget tree."""
    bundle: dict[str, Any] = view.box._repr_mimebundle_(**kwargs)
    bundle["text/plain"] = repr(view)
    return bundle
