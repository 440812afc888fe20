"""What the notebook shows: plain rows, their HTML, and the widgets drawing
them (ipywidgets models work without a kernel), plus the promise that the core
never needs IPython."""

import datetime as dt
import linecache
import pickle
import re
import subprocess
import sys
import threading
import traceback

import pytest
from notebook_support import visible_text

from sitq.core import Result, TaskInfo
from sitq.notebook.render import board_html, result_html, task_html, traceback_html
from sitq.notebook.rows import TaskRow, format_seconds, load_value, short_repr, task_row
from sitq.serialization import CloudpickleSerializer

T0 = dt.datetime(2026, 11, 28, 12, 0, 0, tzinfo=dt.timezone.utc)


def info(status="running", done=None, total=None, message=None, started=2.0, finished=None,
         name="crunch", eta=0.0, attempts=1, error=None):
    at = lambda s: None if s is None else T0 + dt.timedelta(seconds=s)  # noqa: E731
    return TaskInfo(task_id="abc123", name=name, status=status, enqueued_at=T0, eta=at(eta),
                    started_at=at(started), finished_at=at(finished), attempts=attempts,
                    worker_id="w", progress_done=done, progress_total=total,
                    progress_message=message, error=error)


def result(status="success", value=None, tb=None, output=None, name="crunch"):
    return Result(task_id="abc123", name=name, status=status,
                  value=None if value is None else pickle.dumps(value),
                  error="ZeroDivisionError: division by zero" if status == "failed" else None,
                  traceback=tb, enqueued_at=T0, started_at=T0 + dt.timedelta(seconds=1),
                  finished_at=T0 + dt.timedelta(seconds=3.5), attempts=1, output=output)


def remote_traceback():
    def boom():
        return 1 / 0
    try:
        boom()
    except ZeroDivisionError as exc:
        return "".join(traceback.format_exception(exc))


# -- rows ----------------------------------------------------------------------

def test_row_of_a_running_task_has_elapsed_time_and_progress():
    row = task_row(info(done=3, total=12, message="loading"), now=T0 + dt.timedelta(seconds=4.5))
    assert (row.status, row.elapsed, row.fraction) == ("running", 2.5, 0.25)
    assert row.progress_text == "3/12 loading" and row.timing_text == "2.5s"
    assert row.line() == "abc123 crunch running 3/12 loading 2.5s"


def test_row_of_a_delayed_task_says_when_it_is_due():
    row = task_row(info(status="pending", started=None, eta=75), now=T0 + dt.timedelta(seconds=30))
    assert row.elapsed is None and row.timing_text == "due in 45s"
    assert row.fraction is None and row.progress_text == ""


def test_progress_without_a_total_has_no_fraction():
    row = task_row(info(done=7, message="files"))
    assert row.fraction is None and row.progress_text == "7 files"
    assert task_row(info(done=15, total=10)).fraction == 1.0  # clamped


@pytest.mark.parametrize("seconds, text", [(0.4213, "0.42s"), (9.96, "10.0s"), (42.4, "42s"),
                                           (245, "4m05s"), (7380, "2h03m")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


def test_short_repr_is_one_short_line_and_never_raises():
    class Bad:
        def __repr__(self):
            raise RuntimeError("nope")
    assert short_repr(list(range(100))) == "[0, 1, 2, 3, 4, 5, 6, 7, ...]"
    assert "\n" not in short_repr("a\nb" * 100) and len(short_repr("x" * 500)) < 100
    assert short_repr(Bad()).startswith("<Bad ")


# -- HTML ----------------------------------------------------------------------

def test_user_strings_are_escaped_everywhere():
    evil = "<script>alert(1)</script>"
    row = task_row(info(name=evil, message=evil))
    for html in (task_html(row), board_html({"running": 1}, [row]),
                 result_html(result(name=evil, value=evil, output=evil))):
        assert "<script>" not in html and "&lt;script&gt;" in html


def test_colours_follow_the_jupyterlab_theme():
    html = board_html({"failed": 2}, [task_row(info(status="failed", error="x"))])
    assert "var(--jp-error-color1" in html and "var(--jp-ui-font-family" in html


def test_board_html_counts_every_state_and_draws_progress():
    rows = [task_row(info(done=1, total=4)), task_row(info(status="success", finished=5))]
    html = board_html({"running": 1, "success": 1}, rows)
    text = " ".join(visible_text(html).split())
    assert "pending 0 running 1 success 1 failed 0 cancelled 0" in text
    assert 'class="sitq-bar" title="25.0%"' in html and "1/4" in text


def test_success_result_shows_state_timings_value_and_output():
    html = result_html(result(value={"answer": 42}, output="hello\n"))
    text = visible_text(html)
    assert "success" in text and "crunch" in text and "ran 2.5s" in text and "waited 1.0s" in text
    assert "{'answer': 42}" in text and "hello" in text
    assert html.count('class="sitq-output"') == 1


def test_failed_result_shows_a_highlighted_traceback():
    html = result_html(result(status="failed", tb=remote_traceback()))
    assert 'pre class="sitq-traceback ' in html and "line-height: normal" in html
    assert 'color: #d9534f' in html  # the exception line is coloured
    assert "background-color" not in html  # transparent: readable on light and dark themes
    text = visible_text(html)
    assert "in boom" in text and "ZeroDivisionError: division by zero" in text


def test_result_repr_is_one_line():
    res = result(status="failed", tb=remote_traceback())
    assert "\n" not in repr(res) and repr(res).startswith("<Result abc123 crunch failed")


def test_traceback_html_only_needs_text():
    assert "KeyError" in visible_text(traceback_html("KeyError: 'x'"))


def test_value_that_cannot_be_loaded_is_described():
    broken = Result(task_id="t", name="f", status="success", value=b"not a pickle", error=None,
                    traceback=None, enqueued_at=T0, started_at=T0, finished_at=T0, attempts=1)
    assert "value cannot be loaded here" in visible_text(result_html(broken))


def notebook_class():
    """A class as a notebook cell defines it: in ``__main__``, its source only in linecache."""
    source = ("class Point:\n"
              "    def __init__(self, x, y):\n"
              "        self.x, self.y = x, y\n"
              "    def __repr__(self):\n"
              "        return f'Point({self.x}, {self.y})'\n")
    filename = "<ipython-input-7-5e1f0c2b>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"__name__": "__main__"}
    exec(compile(source, filename, "exec"), namespace)
    return namespace["Point"]


def test_a_value_of_a_notebook_defined_class_shows_as_itself():
    """Such a value is stored with its class's source (for tracebacks); the view loads it the
    way sitq does, so it shows the value, not the wrapper that carries the source."""
    value = CloudpickleSerializer().dumps(notebook_class()(3, 4))
    assert type(pickle.loads(value)).__name__ == "ShippedSource"  # what a bare pickle.loads shows
    shown = Result(task_id="t", name="f", status="success", value=value, error=None, traceback=None,
                   enqueued_at=T0, started_at=T0, finished_at=T0, attempts=1)
    assert repr(load_value(shown)) == "Point(3, 4)"
    assert "Point(3, 4)" in visible_text(result_html(shown))
    assert "ShippedSource" not in result_html(shown)


# -- widgets (no kernel: ipywidgets uses a dummy comm) ---------------------------------

widgets = pytest.importorskip("sitq.notebook.widgets")


def test_task_widget_moves_from_a_background_thread_then_shows_the_result():
    w = widgets.TaskWidget("abc123", "crunch")
    assert w.bar.layout.display == "none"  # no bar until the task reports progress
    seen = []
    w.bar.observe(lambda change: seen.append((change["new"], threading.current_thread().name)),
                  "value")

    def run():
        for done in (1, 2, 3):
            w.show(task_row(info(done=done, total=4)))
        w.finish(result(value=99, output="printed\n"))

    t = threading.Thread(target=run, name="sitq-notebook")
    t.start()
    t.join()
    assert seen == [(0.25, "sitq-notebook"), (0.5, "sitq-notebook"), (0.75, "sitq-notebook"),
                    (1.0, "sitq-notebook")]
    assert w.bar.layout.display is None and w.bar.bar_style == "success"
    assert "99" in visible_text(w.body.value) and "printed" in visible_text(w.body.value)
    assert "sitq-done-success" in w.box._dom_classes
    w.show(task_row(info()))  # a late refresh does not bring the live view back
    assert w.header.value == ""


def test_failed_task_widget_shows_the_traceback():
    w = widgets.TaskWidget("abc123")
    w.finish(result(status="failed", tb=remote_traceback()))
    assert 'class="sitq-traceback ' in w.body.value and w.bar.bar_style == "danger"


def test_board_keeps_the_picked_task_while_rows_change():
    picked = []
    board = widgets.BoardWidget(on_select=picked.append, on_cancel=None)
    assert board.cancel.layout.display == "none"  # no cancel without core support
    first = [task_row(info(status="running")), TaskRow("def456", "other", "failed", 1)]
    board.show({"running": 1, "failed": 1}, first)
    board.picker.value = "def456"
    assert picked == ["def456"]
    board.show({"success": 1, "failed": 1}, [task_row(info(status="success", finished=3)),
                                             TaskRow("def456", "other", "failed", 1)])
    assert board.picker.value == "def456" and picked == ["def456"]  # redraws do not re-select
    assert "abc123 · crunch · success" in [label for label, _ in board.picker.options]
    board.show({}, [])  # the picked task scrolled off the list: still selectable
    assert board.picker.value == "def456"


def test_board_cancel_button_cancels_the_picked_task():
    cancelled = []
    board = widgets.BoardWidget(on_select=lambda _: None, on_cancel=cancelled.append)
    board.show({"running": 1}, [task_row(info())])
    board.picker.value = "abc123"
    board.show_detail(task_html(task_row(info())), cancellable=True)
    assert board.cancel.layout.display is None and not board.cancel.disabled
    board.cancel.click()
    assert cancelled == ["abc123"] and board.cancel.disabled


# -- the core stays headless -----------------------------------------------------

def test_core_runs_without_ipython_and_never_imports_the_notebook_layer(tmp_path):
    code = f"""
import sys
for name in ("IPython", "ipywidgets", "ipykernel", "comm"):
    sys.modules[name] = None  # any import of them now fails
import asyncio, sitq
async def main():
    backend = sitq.SQLiteBackend({str(tmp_path / "h.db")!r})
    queue = sitq.TaskQueue(backend)
    task_id = await queue.enqueue(pow, 2, 8)
    await sitq.Worker(backend).drain()
    print(queue.deserialize_result(await queue.get_result(task_id)))
    await queue.close()
asyncio.run(main())
assert not [m for m in sys.modules if m.startswith("sitq.notebook")], "notebook layer imported"
import sitq.notebook  # importable too; widgets and magics come in lazily
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "256\n"


def test_public_names_of_the_notebook_layer():
    import sitq.notebook

    assert sitq.notebook.__all__ == [
        "GroupHandle", "Runtime", "TaskHandle", "board", "current", "group", "load_ipython_extension",
        "lookup", "map", "start_worker", "stop_worker", "submit", "task", "unload_ipython_extension"]


def test_long_output_keeps_its_end_and_long_tracebacks_both_ends():
    html = result_html(result(value=1, output="".join(f"line {i}\n" for i in range(10_000))))
    text = visible_text(html)
    assert "line 9999" in text and "line 0\n" not in text and "the result's .output has all" in text
    deep = "Traceback (most recent call last):\n" + "  File \"x.py\", line 1, in f\n" * 2000 \
        + "RecursionError: maximum recursion depth exceeded"
    text = visible_text(traceback_html(deep))
    assert "lines not shown" in text and text.count("in f") < 500
    assert text.startswith("Traceback") and "RecursionError" in text


def test_every_view_keeps_mathjax_away_from_dollars():
    """JupyterLab typesets HTML outputs: "$1,200 ... $5" would come out as mathematics."""
    from sitq.notebook.render import NO_MATH, counts_html, live_output_html, output_html, table_html

    money = task_row(info(status="failed", error="ValueError: $5 short", message="$1,200 of $5", name="pay $1,200"))
    paid = result(value="$5", output="paid $1,200\nleft $5\n", name="pay $1,200")
    failed = result(status="failed", tb="Traceback (most recent call last):\nValueError: $5 short\n",
                    name="pay $1,200")
    views = {
        "task": task_html(money), "board": board_html({"failed": 1}, [money]),
        "counts": counts_html({"failed": 1}), "table": table_html([money]),
        "result": result_html(paid), "failure": result_html(failed),
        "traceback": traceback_html(failed.traceback), "live output": live_output_html("paid $1,200"),
        "output": output_html("paid $1,200"),
    }
    for name, html in views.items():
        outer = re.match(r'\s*<(\w+)[^>]*class="([^"]*)"', html)
        assert outer and set(NO_MATH.split()) <= set(outer[2].split()), (name, html[:200])
        if name != "counts":
            assert "$" in visible_text(html), name  # still there, as a dollar


def test_live_output_shows_the_last_lines_escaped():
    from sitq.notebook.render import LIVE_LINES, live_output_html

    text = "\n".join(f"line {i} <b>" for i in range(100))
    html = live_output_html(text)
    shown = visible_text(html)
    assert f"last {LIVE_LINES} lines" in shown
    assert "line 99 <b>" in shown and "line 79 <b>" not in shown and f"line {100 - LIVE_LINES} <b>" in shown
    assert "<b>" not in html.replace("<b>line", "")  # escaped
    assert "last" not in visible_text(live_output_html("one\ntwo"))


def test_task_widget_shows_output_while_running_and_the_result_after():
    from sitq.notebook import widgets

    w = widgets.TaskWidget("abc123", "crunch")
    w.show(task_row(info(status="running")))
    w.show_output("step 1\nstep 2")
    assert "step 2" in visible_text(w.output.value)
    w.finish(result(value=1, output="step 1\nstep 2\nstep 3\n"))
    assert w.output.value == "" and "step 3" in visible_text(w.body.value)
    w.show_output("late")
    assert w.output.value == ""
