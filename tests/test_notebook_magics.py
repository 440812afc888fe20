"""%sitq and %%sitq through IPython's InteractiveShell: real magics, parser and
display machinery, a real worker on a SQLite file, no kernel."""

import datetime as dt
import os

import pytest

pytest.importorskip("IPython")

from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from notebook_support import visible_text, wait_until

import sitq
from sitq.notebook import runtime
from sitq.notebook.render import result_html

WORK = """
import sitq, time
def work(n):
    for i in range(n):
        sitq.progress(i + 1, n, "step")
        print("step", i)
    return n * 2
"""


@pytest.fixture
def ip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "sitq")
    yield shell
    runtime.stop_worker(timeout=10)
    shell.run_line_magic("unload_ext", "sitq")
    InteractiveShell.clear_instance()


def display_of(obj):
    """The mimebundle IPython's display() publishes for obj."""
    from IPython.display import display
    with capture_output() as cap:
        display(obj)
    (out,) = cap.outputs
    return out.data


def test_start_uses_a_file_in_the_working_folder_and_is_idempotent(ip, tmp_path):
    first = ip.run_line_magic("sitq", "start")
    assert ip.run_line_magic("sitq", "start") is first
    assert first.path == "sitq.db" and (tmp_path / "sitq.db").exists()
    with pytest.raises(UsageError, match="already running"):
        ip.run_line_magic("sitq", "start other.db")
    with capture_output() as cap:
        ip.run_line_magic("sitq", "stop")
        ip.run_line_magic("sitq", "stop")
    assert cap.stdout == "sitq: no worker was running\n"
    assert runtime.current(required=False) is None


def test_cell_magic_runs_the_body_with_a_copy_of_notebook_variables(ip):
    ip.run_line_magic("sitq", "start -c 2")
    ip.run_cell(WORK)
    ip.run_cell("x = 21")
    res = ip.run_cell("%%sitq -o h --name answer\nwork(3) + x")
    assert res.success
    handle = ip.user_ns["h"]
    assert res.result is handle and handle.name == "answer"
    ip.run_cell("x = 1000")  # taken at submit time: the task does not see this
    assert handle.result(timeout=30) == 27


def test_progress_of_a_running_task_is_visible(ip, tmp_path):
    ip.run_line_magic("sitq", "start")
    gate = tmp_path / "gate"
    ip.user_ns["gate"] = str(gate)
    handle = ip.run_cell("%%sitq\nimport os, sitq, time\nsitq.progress(2, 5, 'halfway')\n"
                         "while not os.path.exists(gate):\n    time.sleep(0.01)\n'done'").result
    wait_until(lambda: handle.info().progress_done == 2.0)
    info = handle.info()
    assert (info.status, info.progress_total, info.progress_message) == ("running", 5.0, "halfway")
    assert "2/5 halfway" in visible_text(display_of(handle)["text/html"])
    gate.touch()
    assert handle.result(timeout=30) == "done"


def test_cell_magic_awaits_at_top_level(ip):
    ip.run_line_magic("sitq", "start")
    res = ip.run_cell("%%sitq\nimport asyncio\nawait asyncio.sleep(0)\n'awaited'")
    assert res.success and res.result.result(timeout=30) == "awaited"


def test_task_output_is_kept_with_the_result_not_printed_in_the_cell(ip, capsys):
    ip.run_line_magic("sitq", "start")  # after capsys took sys.stdout, as a kernel's is
    ip.run_cell(WORK)
    handle = ip.run_cell("%%sitq\nwork(2)").result
    handle.result(timeout=30)
    print("the cell's own line")
    out = capsys.readouterr().out
    assert "the cell's own line" in out and "step" not in out
    assert handle.outcome().output == "step 0\nstep 1\n"
    html = display_of(handle)["text/html"]
    assert 'class="sitq-output"' in html and "step 1" in visible_text(html)


def test_failed_task_shows_its_highlighted_remote_traceback(ip):
    ip.run_line_magic("sitq", "start")
    res = ip.run_cell("%%sitq\ndef boom():\n    return 1 / 0\nboom()")
    handle = res.result
    with pytest.raises(sitq.TaskFailedError, match="ZeroDivisionError"):
        handle.result(timeout=30)
    data = display_of(handle)
    assert data["text/plain"] == repr(handle) and "\n" not in data["text/plain"]
    html = data["text/html"]
    assert 'class="sitq-traceback ' in html and "<span style=\"color:" in html
    text = visible_text(html)
    assert "in boom" in text and "return 1 / 0" in text  # the cell's own lines
    assert "ZeroDivisionError: division by zero" in text


@pytest.mark.parametrize("line, message", [
    ("%sitq", "needs a command"),
    ("%sitq frobnicate", "unknown command 'frobnicate'"),
    ("%sitq result", "required: ID"),
    ("%sitq start --concurrency many", "invalid int value"),
    ("%sitq start --processes 0", "must be 1 or more"),
    ("%sitq status", "no sitq worker runs in this kernel"),
    ("%%sitq --bogus\n1", "unrecognized arguments"),
    ("%%sitq\n", "cell body is empty"),
])
def test_misuse_is_a_one_line_usage_error(ip, line, message):
    with capture_output() as cap:
        res = ip.run_cell(line)
    assert isinstance(res.error_in_exec, UsageError)
    assert message in str(res.error_in_exec)
    assert cap.stderr.count("\n") == 1 and "Traceback" not in cap.stderr + cap.stdout


def test_unknown_task_and_syntax_errors_are_usage_errors(ip):
    ip.run_line_magic("sitq", "start")
    with pytest.raises(UsageError, match="no task id and no group id is, begins or ends with 'nope'"):
        ip.run_line_magic("sitq", "result nope")
    with pytest.raises(UsageError, match="does not parse"):
        ip.run_cell_magic("sitq", "", "1 +")


def test_unpicklable_variable_is_named(ip):
    ip.run_line_magic("sitq", "start")
    ip.run_cell("import threading\nlock = threading.Lock()")
    with pytest.raises(UsageError, match="reads 'lock', a lock that cannot be sent"):
        ip.run_cell_magic("sitq", "", "lock.locked()")


def test_help_describes_every_command(ip):
    doc = ip.find_line_magic("sitq").__doc__
    for word in ("%sitq start", "--processes", "%sitq stop", "%sitq status", "%sitq result",
                 "%sitq cancel", "%%sitq", "-o NAME"):
        assert word in doc


def test_result_of_a_task_from_an_earlier_worker(ip):
    ip.run_line_magic("sitq", "start results.db")
    task_id = ip.run_cell("%%sitq\n6 * 7").result.task_id
    runtime.current().handle(task_id).result(timeout=30)
    ip.run_line_magic("sitq", "stop")
    ip.run_line_magic("sitq", "start results.db")  # a new runtime, like after a restart
    handle = ip.run_line_magic("sitq", f"result {task_id}")
    assert handle.result(timeout=5) == 42
    assert "42" in visible_text(display_of(handle)["text/html"])


def test_status_outside_a_kernel_is_a_static_board(ip):
    ip.run_line_magic("sitq", "start")
    ip.run_cell("%%sitq -o h\n1").result.result(timeout=30)
    board = ip.run_line_magic("sitq", "status")
    html = display_of(board)["text/html"]
    assert 'data-state="success"' in html
    assert "success 1" in " ".join(visible_text(html).split())


def test_cancel_a_delayed_task_from_the_magic(ip):
    rt = ip.run_line_magic("sitq", "start")
    handle = rt.enqueue(pow, 2, 3, eta=dt.timedelta(hours=1))
    with capture_output() as cap:
        ip.run_line_magic("sitq", f"cancel {handle.task_id}")
        ip.run_line_magic("sitq", f"cancel {handle.task_id}")
    assert cap.stdout.splitlines() == [f"sitq: task {handle.task_id} cancelled before it started",
                                       f"sitq: task {handle.task_id} had already finished; nothing changed"]
    with pytest.raises(sitq.TaskCancelledError):
        handle.result(timeout=5)
    assert 'data-state="cancelled"' in display_of(handle)["text/html"]
    with pytest.raises(UsageError, match="no task id and no group id is, begins or ends with 'nope'"):
        ip.run_line_magic("sitq", "cancel nope")


def test_records_render_as_html_once_the_extension_is_loaded(ip):
    rt = ip.run_line_magic("sitq", "start")
    handle = rt.enqueue(pow, 2, 5)
    handle.result(timeout=30)
    info_html = display_of(handle.info())["text/html"]
    assert "success" in visible_text(info_html) and "pow" in info_html
    overview = rt.run(rt.queue.overview(5))
    assert 'class="sitq-table ' in display_of(overview)["text/html"]
    outcome = handle.outcome()
    assert display_of(outcome)["text/html"] == result_html(outcome)


def test_records_draw_no_html_in_a_shell_without_the_extension():
    """The core draws nothing: Result's HTML view comes from the notebook layer."""
    InteractiveShell.clear_instance()
    shell = InteractiveShell.instance()
    try:
        now = dt.datetime.now(dt.timezone.utc)
        res = sitq.Result("abc123", "crunch", "failed", None, "ValueError: bad", None, now, now, now, 1)
        data, _ = shell.display_formatter.format(res)
        assert "text/html" not in data and data["text/plain"] == repr(res)
        shell.run_line_magic("load_ext", "sitq")
        data, _ = shell.display_formatter.format(res)
        assert data["text/html"] == result_html(res)
        shell.run_line_magic("unload_ext", "sitq")
    finally:
        InteractiveShell.clear_instance()


def test_a_handle_outlives_its_worker(ip):
    rt = ip.run_line_magic("sitq", "start kept.db")
    handle = rt.enqueue(sum, [1, 2, 3])
    assert handle.result(timeout=30) == 6
    ip.run_line_magic("sitq", "stop")
    with pytest.raises(sitq.SitqError, match=r"start it again \(%sitq start kept.db\)"):
        handle.result()
    ip.run_line_magic("sitq", "start kept.db")
    assert handle.result(timeout=5) == 6 and handle.runtime is runtime.current()


def test_tracebacks_of_notebook_functions_name_their_cells(ip):
    rt = ip.run_line_magic("sitq", "start")
    first = ip.execution_count
    ip.run_cell("def parse(text):\n    return float(text)\n", store_history=True)
    ip.run_cell("def total(items):\n    return sum(parse(i) for i in items)\n", store_history=True)
    handle = rt.enqueue(ip.user_ns["total"], ["1", "two"])
    with pytest.raises(sitq.TaskFailedError) as failure:
        handle.result(timeout=30)
    remote = failure.value.traceback
    assert "<dynamic-code>" not in remote and "<ipython-input-" not in remote
    frames = [line.strip() for line in remote.splitlines() if line.startswith("  Cell In[")]
    assert frames == [f"Cell In[{first + 1}], line 2, in total", f"Cell In[{first + 1}], line 2, in <genexpr>",
                      f"Cell In[{first}], line 2, in parse"], remote
    assert "return float(text)" in remote and "sitq/notebook" not in remote
    assert remote.rstrip() in str(failure.value)  # TaskFailedError shows it as it is stored


def test_cell_tasks_name_their_cell_and_its_lines(ip):
    ip.run_line_magic("sitq", "start")
    res = ip.run_cell("%%sitq -o h\nx = 1\ny = x / 0\n", store_history=True)
    with pytest.raises(sitq.TaskFailedError) as failure:
        ip.user_ns["h"].result(timeout=30)
    remote = failure.value.traceback
    assert f"  Cell In[{res.execution_count}], line 3, in <module>\n    y = x / 0\n" in remote, remote
    assert "<sitq cell" not in remote and "sitq/notebook" not in remote


def test_board_cancels_the_picked_running_task(ip):
    rt = ip.run_line_magic("sitq", "start")
    ip.run_cell("import asyncio\nasync def forever():\n    await asyncio.sleep(3600)\n")
    handle = rt.enqueue(ip.user_ns["forever"])  # a coroutine: cancelling stops it at once
    wait_until(lambda: handle.status == "running")
    board = rt.board()
    assert board.cancel.layout.display is None
    wait_until(lambda: handle.task_id in [value for _, value in board.picker.options])
    board.picker.value = handle.task_id
    wait_until(lambda: not board.cancel.disabled)  # the refresher saw it running
    board.cancel.click()
    wait_until(lambda: handle.status == "cancelled")
    wait_until(lambda: "cancelled" in board.detail.value)


def test_progress_from_a_process_reaches_the_task_row(ip, tmp_path):
    rt = ip.run_line_magic("sitq", "start --processes 1")
    ip.run_cell("import os, sitq, time\n"
                "def stepper(gate):\n"
                "    sitq.progress(3, 10, 'in a process')\n"
                "    while not os.path.exists(gate):\n"
                "        time.sleep(0.01)\n"
                "    return os.getpid()\n")
    handle = rt.enqueue(ip.user_ns["stepper"], str(tmp_path / "gate"))
    wait_until(lambda: handle.info().progress_done == 3.0)
    assert handle.info().progress_message == "in a process"
    (tmp_path / "gate").touch()
    assert handle.result(timeout=30) != os.getpid()


PRINTER = """
import asyncio, os, sys, time
def printer(gate):
    for i in range(3):
        print("line", i)
    print("to stderr", file=sys.stderr)
    while not os.path.exists(gate):
        time.sleep(0.01)
    print("after the gate")
    return "done"
async def async_printer(gate):
    for i in range(3):
        print("line", i)
    print("to stderr", file=sys.stderr)
    while not os.path.exists(gate):
        await asyncio.sleep(0.01)
    print("after the gate")
    return "done"
"""


@pytest.mark.parametrize("mode", ["thread", "coroutine", "cell", "process"])
def test_what_a_task_prints_reaches_its_widget_while_it_runs(ip, tmp_path, mode):
    from sitq.notebook.widgets import TaskWidget

    rt = ip.run_line_magic("sitq", "start --processes 1" if mode == "process" else "start")
    ip.run_cell(PRINTER)
    gate = str(tmp_path / "gate")
    ip.user_ns["gate"] = gate
    if mode == "cell":
        handle = ip.run_cell("%%sitq\nfor i in range(3):\n    print('line', i)\nimport os, sys, time\n"
                             "print('to stderr', file=sys.stderr)\nwhile not os.path.exists(gate):\n"
                             "    time.sleep(0.01)\nprint('after the gate')\n'done'").result
    else:
        handle = rt.enqueue(ip.user_ns["async_printer" if mode == "coroutine" else "printer"], gate)
    widget = TaskWidget(handle.task_id)
    rt.refresher.add_task(widget)
    wait_until(lambda: "to stderr" in visible_text(widget.output.value))
    assert handle.status == "running" and not widget.finished
    assert "line 0\nline 1\nline 2\nto stderr" in visible_text(widget.output.value)
    assert handle.output() == "line 0\nline 1\nline 2\nto stderr\n"
    (tmp_path / "gate").touch()
    assert handle.result(timeout=30) == "done"
    wait_until(lambda: widget.finished)
    assert widget.output.value == "" and "after the gate" in visible_text(widget.body.value)
    assert handle.output() == "line 0\nline 1\nline 2\nto stderr\nafter the gate\n"  # all of it, stored


def test_result_and_cancel_take_a_group_or_a_short_id(ip):
    ip.run_line_magic("sitq", "start")
    done = sitq.notebook.map(divmod, [7, 9], [2, 4])
    assert done.results(30) == [(3, 1), (2, 1)]
    shown = ip.run_line_magic("sitq", f"result {done.group_id[-8:]}")  # the id as the widget shows it
    assert shown.group_id == done.group_id and "2/2 done" in visible_text(display_of(shown)["text/html"])
    task = ip.run_line_magic("sitq", f"result {done.task_ids[1][-8:]}")
    assert task.task_id == done.task_ids[1] and task.result() == (2, 1)
    later = sitq.notebook.map(pow, [2, 3], [2, 2], eta=dt.timedelta(hours=1))
    with capture_output() as cap:
        ip.run_line_magic("sitq", f"cancel {later.group_id[-8:]}")
    assert cap.stdout == (f"sitq: group {later.group_id[-8:]} (pow): 2 tasks cancelled before they started, "
                          "0 running asked to stop\n")
    assert later.counts["cancelled"] == 2
