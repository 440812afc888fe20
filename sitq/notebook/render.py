"""How tasks, results and the queue are drawn as HTML (and tracebacks with rich).

Only the standard library and rich (a core dependency) are imported here, so
views draw without IPython or widgets; ``sitq.notebook`` registers them with
IPython's display formatter (the core's records draw nothing by themselves).
Every user string is escaped, and every view carries the classes that keep
MathJax away (``mathjax_ignore``, and ``tex2jax_ignore`` for older MathJax):
JupyterLab typesets HTML outputs, and would turn ``"$1,200 ... $5"`` in a
name or a value into mathematics. Colours come from JupyterLab's CSS variables
with fallbacks, and the traceback palette is mid-tone on a transparent
background, so light and dark themes both read well.
"""

from __future__ import annotations

import html
import io
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.style import Style
    from rich.syntax import SyntaxTheme

from sitq.notebook.rows import GroupRow, TaskRow, format_seconds, load_value, short_id, short_repr, task_row

__all__ = [
    "STATE_COLOURS",
    "state_badge",
    "progress_html",
    "task_html",
    "group_header_html",
    "group_html",
    "group_bar_html",
    "failures_html",
    "board_html",
    "table_html",
    "counts_html",
    "result_html",
    "traceback_html",
    "output_html",
    "live_output_html",
    "NO_MATH",
]

STATE_COLOURS = {
    "waiting": "var(--jp-ui-font-color2, #757575)",
    "pending": "var(--jp-ui-font-color2, #757575)",
    "running": "var(--jp-brand-color1, #1976d2)",
    "success": "var(--jp-success-color1, #388e3c)",
    "failed": "var(--jp-error-color1, #d32f2f)",
    "cancelled": "var(--jp-warn-color1, #f57c00)",
}
_FONT = "font-family: var(--jp-ui-font-family, sans-serif); font-size: var(--jp-ui-font-size1, 13px);"
_MONO = "font-family: var(--jp-code-font-family, monospace); font-size: var(--jp-code-font-size, 13px);"
_MUTED = "color: var(--jp-ui-font-color2, #757575);"
_BORDER = "var(--jp-border-color2, #e0e0e0)"
_PRE = (
    f"{_MONO} white-space: pre; overflow-x: auto; line-height: normal; margin: 4px 0;"
    f" padding: 4px 6px; border-left: 3px solid {{colour}}; background: transparent;"
)
MAX_OUTPUT_CHARS = 20_000  # what a result shows of a task's output
LIVE_LINES = 20  # what a running task's widget shows of its output so far
NO_MATH = "mathjax_ignore tex2jax_ignore"  # on every view's outermost element: a $ is a dollar
MAX_TRACEBACK_LINES = 400
e = html.escape


def state_badge(status: str) -> str:
    colour = STATE_COLOURS.get(status, STATE_COLOURS["pending"])
    return (f'<span class="sitq-state sitq-{e(status)}" style="color: {colour};'
            f' font-weight: 600;">{e(status)}</span>')


def progress_html(fraction: float | None, width: str = "8em") -> str:
    """A small static bar (the board's table); live bars are widgets."""
    if fraction is None:
        return ""
    pct = f"{fraction * 100:.1f}"
    return (f'<span class="sitq-bar" title="{pct}%" style="display: inline-block; width: {width};'
            f' height: 0.7em; vertical-align: middle; background: var(--jp-layout-color3, #ddd);'
            f' border-radius: 2px; overflow: hidden;"><span style="display: block; height: 100%;'
            f' width: {pct}%; background: {STATE_COLOURS["running"]};"></span></span>')


def task_html(row: TaskRow) -> str:
    """One line: state, name, id, timing and progress text."""
    bits = [state_badge(row.status), f"<b>{e(row.name)}</b>",
            f'<code class="sitq-id" style="{_MUTED}">{e(row.task_id)}</code>']
    for extra in (row.timing_text, row.progress_text):
        if extra:
            bits.append(f'<span style="{_MUTED}">{e(extra)}</span>')
    if row.attempts > 1:
        bits.append(f'<span style="{_MUTED}">attempt {row.attempts}</span>')
    return f'<span class="sitq-task {NO_MATH}" style="{_FONT}">{" ".join(bits)}</span>'


def group_bar_html(row: GroupRow, width: str = "8em") -> str:
    """A static bar of a group: succeeded and failed (or cancelled) parts side by side."""
    total = row.total or 1
    ok = row.counts.get("success", 0) / total * 100
    bad = (row.failed + row.counts.get("cancelled", 0)) / total * 100
    return (f'<span class="sitq-bar sitq-group-bar" title="{row.done:,}/{row.total:,}" style="display: inline-flex;'
            f' width: {width}; height: 0.7em; vertical-align: middle; background: var(--jp-layout-color3, #ddd);'
            f' border-radius: 2px; overflow: hidden;">'
            f'<span class="sitq-bar-ok" style="display: block; flex: none; height: 100%; width: {ok:.1f}%;'
            f' background: {STATE_COLOURS["success"]};"></span>'
            f'<span class="sitq-bar-bad" style="display: block; flex: none; height: 100%; width: {bad:.1f}%;'
            f' background: {STATE_COLOURS["failed"]};"></span></span>')


def group_header_html(row: GroupRow) -> str:
    """One line: the group's state, name, short id and summary (done/total, failed, running, rate, time left)."""
    return (f'<span class="sitq-group-header {NO_MATH}" style="{_FONT}">{state_badge(row.status)} '
            f'<b>{e(row.name)}</b> <code class="sitq-id" title="{e(row.group_id)}" style="{_MUTED}">'
            f'group {e(short_id(row.group_id))}</code> '
            f'<span class="sitq-group-summary" style="{_MUTED}">{e(row.summary())}</span></span>')


def failures_html(row: GroupRow, tracebacks: Mapping[str, str | None] | None = None, shown: int = 3) -> str:
    """The group's first failures, each a line that opens onto its traceback (a ``<details>``:
    a click in any frontend, no round trip to the kernel)."""
    if not row.failures:
        return ""
    items = []
    for failure in row.failures[:shown]:
        traceback = (tracebacks or {}).get(failure.task_id)
        body = traceback_html(traceback) if traceback else (
            f'<pre class="sitq-error" style="{_PRE.format(colour=STATE_COLOURS["failed"])}">'
            f"{e(failure.error or 'failed')}</pre>")
        items.append(f'<details class="sitq-failure" data-task-id="{e(failure.task_id)}">'
                     f'<summary style="cursor: pointer;">{state_badge("failed")} '
                     f'<code class="sitq-id">{e(short_id(failure.task_id))}</code> '
                     f"{e(failure.error or '')}</summary>{body}</details>")
    more = row.failed - min(len(row.failures), shown)
    label = "first failures" if row.failed > 1 else "failure"
    tail = f'<div style="{_MUTED}">and {more:,} more: group.failures() has them all</div>' if more > 0 else ""
    return (f'<div class="sitq-failures {NO_MATH}" style="{_FONT}"><div style="{_MUTED}">{label} '
            f"(click one for its traceback)</div>{''.join(items)}{tail}</div>")


def group_html(row: GroupRow, tracebacks: Mapping[str, str | None] | None = None) -> str:
    """A still picture of a group: its header, a bar, and its first failures."""
    return (f'<div class="sitq-group-view {NO_MATH}" data-state="{e(row.status)}">{group_header_html(row)}'
            f'<div>{group_bar_html(row, "24em")}</div>{failures_html(row, tracebacks)}</div>')


def counts_html(counts: Mapping[str, int]) -> str:
    pills = []
    for status in STATE_COLOURS:
        n = int(counts.get(status, 0))
        pills.append(f'<span class="sitq-count" data-state="{status}" style="margin-right: 1em;">'
                     f'{state_badge(status)} <b class="sitq-n">{n}</b></span>')
    return f'<div class="sitq-counts {NO_MATH}" style="{_FONT} margin: 2px 0 6px 0;">{" ".join(pills)}</div>'


def table_html(rows: Iterable[TaskRow | GroupRow], page: str = "") -> str:
    """A table of tasks (id, name, state, attempts, time, progress); a group is one row, with its
    bar. ``page`` says which part of a longer list the last rows are (the board's pager)."""
    cell = f'style="padding: 2px 8px; text-align: left; border-bottom: 1px solid {_BORDER};"'
    head = "".join(f"<th {cell}>{h}</th>" for h in
                   ("task", "name", "state", "attempts", "time", "progress"))
    body = []
    for row in rows:
        if isinstance(row, GroupRow):
            body.append(
                f'<tr class="sitq-row sitq-group-row" data-group-id="{e(row.group_id)}" data-state="{e(row.status)}">'
                f'<td {cell}><code title="{e(row.group_id)}">group {e(short_id(row.group_id))}</code></td>'
                f"<td {cell}>{e(row.name)}</td><td {cell}>{state_badge(row.status)}</td><td {cell}></td>"
                f"<td {cell}>{e(row.summary())}</td><td {cell}>{group_bar_html(row)}</td></tr>")
            continue
        body.append(
            f'<tr class="sitq-row" data-task-id="{e(row.task_id)}" data-state="{e(row.status)}">'
            f'<td {cell}><code>{e(row.task_id)}</code></td><td {cell}>{e(row.name)}</td>'
            f"<td {cell}>{state_badge(row.status)}</td><td {cell}>{row.attempts}</td>"
            f"<td {cell}>{e(row.timing_text)}</td><td {cell}>{_progress_cell(row)}</td></tr>")
    if not body:
        body.append(f'<tr><td colspan="6" {cell}><i style="{_MUTED}">no tasks yet</i></td></tr>')
    if page:
        body.append(f'<tr class="sitq-page"><td colspan="6" {cell}><i style="{_MUTED}">{e(page)}</i></td></tr>')
    return (f'<table class="sitq-table {NO_MATH}" style="{_FONT} border-collapse: collapse;">'
            f'<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')


def _progress_cell(row: TaskRow) -> str:
    """A bar while the task runs; where it stopped if it failed; nothing once it succeeded."""
    if row.status == "running":
        return f"{progress_html(row.fraction)} {e(row.progress_text)}"
    return "" if row.status == "success" else e(row.progress_text)


def board_html(counts: Mapping[str, int], rows: Iterable[TaskRow | GroupRow], page: str = "") -> str:
    """A still picture of the board: counts per state, then groups and tasks (see ``table_html``)."""
    return f'<div class="sitq-board-view {NO_MATH}">{counts_html(counts)}{table_html(rows, page)}</div>'


def result_html(result: Any, deserialize: Callable[[Any], Any] | None = None) -> str:
    """A finished task: state, timings, a short repr of the value, the remote
    traceback of a failure, and what the task printed. ``deserialize`` loads the
    value (the queue's ``deserialize_result``; see ``rows.load_value``)."""
    row = task_row(result)
    times = []
    enqueued, started = result.enqueued_at, result.started_at
    if enqueued is not None:  # None only in a row sitq did not write
        times.append(f"enqueued {enqueued.astimezone():%H:%M:%S}")
        if started is not None:
            times.append(f"waited {format_seconds((started - enqueued).total_seconds())}")
    if row.elapsed is not None:
        times.append(f"ran {format_seconds(row.elapsed)}")
    if row.attempts > 1:
        times.append(f"{row.attempts} attempts")
    parts = [f'<div style="{_FONT}">{state_badge(row.status)} <b>{e(row.name)}</b> '
             f'<code class="sitq-id" style="{_MUTED}">{e(row.task_id)}</code> '
             f'<span style="{_MUTED}">{e(" · ".join(times))}</span></div>']
    if result.status == "success":
        parts.append(f'<pre class="sitq-value" style="{_PRE.format(colour=STATE_COLOURS["success"])}">'
                     f"{e(_value_repr(result, deserialize))}</pre>")
    elif result.traceback:
        parts.append(traceback_html(result.traceback))
    elif result.error:
        parts.append(f'<pre class="sitq-error" style="{_PRE.format(colour=STATE_COLOURS["failed"])}">'
                     f"{e(result.error)}</pre>")
    if result.output:
        parts.append(output_html(result.output))
    return f'<div class="sitq-result {NO_MATH}" data-state="{e(row.status)}">{"".join(parts)}</div>'


def output_html(text: str) -> str:
    """What a task printed, in a muted box under its result (the end of it, if long)."""
    label = "output"
    if len(text) > MAX_OUTPUT_CHARS:
        label = (f"output, last {MAX_OUTPUT_CHARS:,} of {len(text):,} characters "
                 "(the result's .output has all)")
        text = text[-MAX_OUTPUT_CHARS:]
    return (f'<div class="sitq-output-label {NO_MATH}" style="{_FONT} {_MUTED}">{label}</div>'
            f'<pre class="sitq-output" style="{_PRE.format(colour=_BORDER)}">{e(text)}</pre>')


def live_output_html(text: str, lines: int = LIVE_LINES) -> str:
    """What a running task has printed so far: its last ``lines`` lines (the result shows it all)."""
    kept = text.splitlines()
    label = "output so far"
    if len(kept) > lines:
        label = f"output so far, last {lines} lines"
        kept = kept[-lines:]
    return (f'<div class="sitq-live-output {NO_MATH}"><div style="{_FONT} {_MUTED}">{label}</div>'
            f'<pre style="{_PRE.format(colour=STATE_COLOURS["running"])}">{e(chr(10).join(kept))}</pre></div>')


def traceback_html(traceback: str, width: int = 100) -> str:
    """A remote traceback (plain text, as the worker stored it), highlighted by
    rich with pygments' traceback lexer, as a ``<pre class="sitq-traceback">``."""
    from rich.console import Console
    from rich.syntax import Syntax

    # force_jupyter=False: inside a kernel rich would otherwise ignore file=
    # and display every print() itself
    console = Console(record=True, width=width, file=io.StringIO(), color_system="truecolor",
                      force_jupyter=False, force_terminal=True)
    lines = traceback.rstrip("\n").splitlines()
    if len(lines) > MAX_TRACEBACK_LINES:  # e.g. a RecursionError: keep both ends
        head, tail = MAX_TRACEBACK_LINES // 4, MAX_TRACEBACK_LINES * 3 // 4
        skipped = len(lines) - head - tail
        lines = lines[:head] + [f"    ... {skipped} lines not shown ..."] + lines[-tail:]
    console.print(Syntax("\n".join(lines), "pytb", theme=_traceback_theme(),
                         word_wrap=True))
    # line-height: normal as in rich's own Jupyter format, or lines show gaps
    pre = _PRE.format(colour=STATE_COLOURS["failed"]).replace("{", "{{").replace("}", "}}")
    return console.export_html(inline_styles=True, code_format=(
        f'<pre class="sitq-traceback {NO_MATH}" style="{pre}">{{code}}</pre>'))


_THEME: SyntaxTheme | None = None


def _traceback_theme() -> SyntaxTheme:
    """Mid-tone colours and no background: readable on white and on near-black.
    Unstyled text gets no colour at all, so it inherits the theme's."""
    global _THEME
    if _THEME is None:
        from pygments.token import Comment, Error, Generic, Keyword, Name, Number, String
        from rich.style import Style
        from rich.syntax import SyntaxTheme

        palette = {
            Generic.Traceback: Style(color="#d9534f", bold=True),
            Generic.Error: Style(color="#d9534f", bold=True),
            Error: Style(color="#d9534f"),
            Name.Builtin: Style(color="#3b8fd9"),
            Number: Style(color="#c0862b"),
            Keyword: Style(color="#a46ad1"),
            String: Style(color="#3a9a5b"),
            Comment: Style(color="#8a8a8a", italic=True),
        }

        class TracebackTheme(SyntaxTheme):
            def get_style_for_token(self, token_type: Any) -> Style:  # a pygments token type
                while token_type is not None:
                    if token_type in palette:
                        return palette[token_type]
                    token_type = token_type.parent
                return Style()

            def get_background_style(self) -> Style:
                return Style()

        _THEME = TracebackTheme()
    return _THEME


def _value_repr(result: Any, deserialize: Callable[[Any], Any] | None) -> str:
    try:
        return short_repr(load_value(result, deserialize))
    except Exception as exc:  # e.g. the value's class is not importable here, or its signature is wrong
        return f"<value cannot be loaded here: {type(exc).__name__}: {exc}>"
