"""How the command line draws a queue: tables and lines that fit an 80-column terminal.

What to show comes from sitq's records (:class:`~sitq.core.QueueOverview`,
:class:`~sitq.core.TaskInfo`, :class:`~sitq.core.Result`); this module only
draws them with rich, which it imports when something is drawn. Every string
that comes from the store is escaped: a row changed by hand may hold anything,
rich markup included. Tasks are shown by their short id (:func:`short_id`);
every command takes a unique beginning or end of an id.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from typing import Any

from sitq.core import STATES, GroupInfo, QueueOverview, Result, ScheduleInfo, TaskInfo

__all__ = ["STATE_STYLES", "short_id", "counts_line", "tasks_table", "board", "result_view", "overview_json",
           "result_json", "info_json", "ellipsize"]

STATE_STYLES = {
    "waiting": "blue", "pending": "yellow", "running": "cyan", "success": "green", "failed": "red",
    "cancelled": "magenta",
}
SHORT_ID = 8  # sitq's ids end in 20 random hex digits: 8 of them tell tasks apart in any view
NAME_WIDTH = 24


def short_id(task_id: str) -> str:
    """The last 8 characters of an id, which views show and every command accepts."""
    return str(task_id)[-SHORT_ID:]


def ellipsize(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, ending in an ellipsis if it was longer."""
    return text if len(text) <= width else text[: width - 1] + "…"


def _style(status: Any) -> str:
    return STATE_STYLES.get(str(status), "bold red")  # a status sitq does not write stands out


def counts_line(counts: dict[str, int], total_label: str = "tasks") -> str:
    """``24 tasks: waiting 0  pending 2 ...`` in colour, statuses sitq does not write included."""
    from rich.markup import escape

    parts = [f"[{STATE_STYLES[s]}]{s} {counts.get(s, 0)}[/]" for s in STATES]
    parts += [f"[bold red]{escape(str(s))} {n}[/]" for s, n in counts.items() if s not in STATE_STYLES and n]
    return f"[bold]{sum(counts.values())} {total_label}[/]: " + "  ".join(parts)


def _duration(info: TaskInfo) -> str:
    if info.started_at is None:
        return ""
    end = info.finished_at or dt.datetime.now(dt.timezone.utc)
    return f"{(end - info.started_at).total_seconds():.2f}s"


def _detail(info: TaskInfo) -> str:
    if info.error:
        return info.error
    if isinstance(info.progress_done, (int, float)):
        total = f"/{info.progress_total:g}" if isinstance(info.progress_total, (int, float)) else ""
        return f"{info.progress_done:g}{total} {info.progress_message or ''}".strip()
    if info.status == "pending" and info.eta is not None and info.eta > dt.datetime.now(dt.timezone.utc):
        return f"due {info.eta:%H:%M:%S}"
    return ""


def tasks_table(infos: Iterable[TaskInfo], title: str | None = None, width: int = 80) -> Any:  # a rich Table
    """One line per task: short id, name, state, attempts, duration, progress or error, in ``width``
    columns (long names and errors end in an ellipsis)."""
    from rich.markup import escape
    from rich.table import Table

    infos = list(infos)
    names = [ellipsize(str(info.name), NAME_WIDTH) for info in infos]
    name_width = max((len(n) for n in names), default=4)
    # id, state, try and time columns, the borders and the padding take the rest of the line.
    detail_width = max(12, width - name_width - (SHORT_ID + 9 + 3 + 7) - 19)

    table = Table(title=escape(title) if title else None, title_justify="left", expand=False, pad_edge=False)
    table.add_column("id", no_wrap=True, min_width=SHORT_ID)
    table.add_column("name", no_wrap=True, overflow="ellipsis", max_width=NAME_WIDTH)
    table.add_column("state", no_wrap=True, min_width=9)
    table.add_column("try", no_wrap=True, justify="right", min_width=3)
    table.add_column("time", no_wrap=True, justify="right", min_width=7)
    table.add_column("progress / error", no_wrap=True, overflow="ellipsis")
    for info, name in zip(infos, names, strict=True):
        table.add_row(
            escape(short_id(info.task_id)),
            escape(name),
            f"[{_style(info.status)}]{escape(str(info.status))}[/]",
            "?" if info.attempts is None else str(info.attempts),
            _duration(info),
            escape(ellipsize(_detail(info), detail_width)),
        )
    return table


def _groups_table(groups: list[GroupInfo]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="groups", title_justify="left", pad_edge=False)
    table.add_column("group", no_wrap=True, min_width=SHORT_ID)
    table.add_column("name", no_wrap=True, overflow="ellipsis", max_width=NAME_WIDTH)
    table.add_column("done", no_wrap=True, justify="right")
    table.add_column("states", no_wrap=True, overflow="ellipsis", ratio=1)
    for group in groups:
        states = "  ".join(f"[{_style(s)}]{escape(str(s))} {n}[/]" for s, n in group.counts.items() if n)
        table.add_row(escape(short_id(group.group_id)), escape(ellipsize(group.name, NAME_WIDTH)),
                      f"{group.finished}/{group.total}", states)
    return table


def _schedules_table(schedules: list[ScheduleInfo]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="schedules", title_justify="left", pad_edge=False)
    table.add_column("schedule", no_wrap=True, overflow="ellipsis", max_width=NAME_WIDTH)
    table.add_column("runs", no_wrap=True, overflow="ellipsis", ratio=1)
    table.add_column("next run (UTC)", no_wrap=True)
    table.add_column("queue", no_wrap=True, overflow="ellipsis", max_width=12)
    for s in schedules:
        next_run = "?" if s.next_run is None else f"{s.next_run:%Y-%m-%d %H:%M:%S}"
        table.add_row(escape(s.name), escape(s.period), next_run, escape(s.queue))
    return table


def board(overview: QueueOverview, title: str, rate: float | None = None, width: int = 80) -> Any:  # a rich Group
    """What ``sitq status`` shows: counts (per queue if several), running tasks and recent
    failures first, then the newest tasks, groups and schedules."""
    from rich.console import Group
    from rich.markup import escape

    parts: list[Any] = [f"[bold]{escape(title)}[/]", counts_line(overview.counts)]
    if rate is not None:
        parts.append(f"throughput: {rate:,.1f} tasks/s finished")
    if len(overview.queues) > 1:
        parts += [f"  queue [bold]{escape(name)}[/]: " + counts_line(counts).split(": ", 1)[1]
                  for name, counts in overview.queues.items()]
    if overview.running:
        parts.append(tasks_table(overview.running, "running", width))
    if overview.failures:
        parts.append(tasks_table(overview.failures, "recent failures", width))
    shown = {i.task_id for i in (*overview.running, *overview.failures)}
    rest = [i for i in overview.recent if i.task_id not in shown]
    if rest:
        parts.append(tasks_table(rest, "most recent tasks", width))
    if overview.groups:
        parts.append(_groups_table(overview.groups))
    if overview.schedules:
        parts.append(_schedules_table(overview.schedules))
    return Group(*parts)


def result_view(result: Result, value: Any = None) -> Any:  # a rich renderable
    """A task's outcome: a header line, then the value's repr or the remote traceback."""
    from rich.console import Group
    from rich.markup import escape
    from rich.syntax import Syntax

    header = (f"[bold]{escape(short_id(result.task_id))}[/] {escape(str(result.name))} "
              f"[{_style(result.status)}]{escape(str(result.status))}[/]")
    if result.duration is not None:
        header += f" in {result.duration:.2f}s"
    header += f", attempt {result.attempts}" if result.attempts else ""
    parts: list[Any] = [header]
    if result.status == "success":
        parts.append(escape(_repr(value)))
    elif result.traceback:
        parts.append(Syntax(result.traceback.rstrip(), "pytb", theme="ansi_dark", word_wrap=True))
    elif result.error:
        parts.append(f"[red]{escape(result.error)}[/]")
    if result.output:
        parts += ["[dim]output:[/]", escape(result.output.rstrip())]
    return Group(*parts)


def _repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception as exc:  # a value's __repr__ is user code
        return f"<{type(value).__name__}: its repr raised {type(exc).__name__}>"


# -- JSON, for scripts ---------------------------------------------------------------


def _time(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def info_json(info: TaskInfo) -> dict[str, Any]:
    return {
        "id": info.task_id, "name": info.name, "status": str(info.status), "queue": info.queue,
        "priority": info.priority, "group": info.group_id, "key": info.key, "attempts": info.attempts,
        "enqueued_at": _time(info.enqueued_at), "eta": _time(info.eta), "started_at": _time(info.started_at),
        "finished_at": _time(info.finished_at), "worker": info.worker_id, "error": info.error,
        "progress": None if info.progress_done is None else {
            "done": info.progress_done, "total": info.progress_total, "message": info.progress_message},
    }


def overview_json(overview: QueueOverview) -> str:
    return json.dumps({
        "counts": {str(k): v for k, v in overview.counts.items()},
        "queues": {q: {str(k): v for k, v in c.items()} for q, c in overview.queues.items()},
        "running": [info_json(i) for i in overview.running],
        "failures": [info_json(i) for i in overview.failures],
        "recent": [info_json(i) for i in overview.recent],
        "groups": [{"id": g.group_id, "name": g.name, "created_at": _time(g.created_at),
                    "counts": {str(k): v for k, v in g.counts.items()}} for g in overview.groups],
        "schedules": [{"name": s.name, "task": s.task_name, "queue": s.queue, "every": s.every, "cron": s.cron,
                       "tz": s.tz, "next_run": _time(s.next_run), "last_run": _time(s.last_run)}
                      for s in overview.schedules],
    }, indent=2)


def result_json(result: Result, value: Any = None) -> str:
    """The result as JSON; the value itself if JSON can hold it, else its repr (``value_repr``)."""
    body: dict[str, Any] = {
        "id": result.task_id, "name": result.name, "status": str(result.status), "attempts": result.attempts,
        "enqueued_at": _time(result.enqueued_at), "started_at": _time(result.started_at),
        "finished_at": _time(result.finished_at), "error": result.error, "traceback": result.traceback,
        "output": result.output,
    }
    if result.status == "success":
        try:
            json.dumps(value)
            body["value"] = value
        except (TypeError, ValueError):
            body["value_repr"] = _repr(value)
    return json.dumps(body, indent=2)

