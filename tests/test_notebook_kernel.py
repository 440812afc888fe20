"""The notebook layer inside a real ipykernel, driven by nbclient.

nbclient records only messages whose parent is the cell it is running, so
every notebook here ends with a cell that waits (by polling a condition) for
the background work it wants to see recorded.
"""

import re

import pytest

pytest.importorskip("nbclient")

from notebook_support import execute, new_notebook, outputs_text, visible_text, widget_states

import sitq

pytestmark = pytest.mark.timeout(120)

FUNCTIONS = """
import os, sitq, time
def slow(n, delay=0.02):
    for i in range(n):
        sitq.progress(i + 1, n, f"step {i + 1}")
        print("SECRET line", i)
        time.sleep(delay)
    return n
def boom():
    raise ValueError("bad input")
"""

WAIT_UNTIL = """
def wait_until(condition, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
"""


def models(nb, name):
    return [m["state"] for m in widget_states(nb).values() if m["model_name"] == name]


def test_worker_runs_in_the_background_and_widgets_follow(tmp_path):
    nb = execute(new_notebook(
        "%load_ext sitq\n%sitq start tasks.db --concurrency 2",
        FUNCTIONS + WAIT_UNTIL,
        "h = sitq.notebook.submit(slow, 25)\nh",
        "bad = sitq.notebook.submit(boom)\nbad",
        "board = sitq.notebook.board()\nboard",
        # a long synchronous cell: the task finishes while the kernel is busy here
        "seen = set()\nwhile not h.done():\n    seen.add(h.info().progress_done)\n    time.sleep(0.01)\n"
        "print('progress seen while blocked:', len(seen - {None}) > 1)",
        "print(h.result(30), await h)\ntry:\n    bad.result(30)\nexcept sitq.TaskFailedError as e:\n"
        "    print('failed:', e.error)",
        "wait_until(lambda: board.table.value.count('class=\"sitq-row\"') == 2\n"
        "           and 'data-state=\"running\"' not in board.table.value)",
        "%sitq stop",
    ), tmp_path)
    cells = nb.cells
    assert cells[0].outputs[0].data["text/plain"].startswith("<sitq notebook worker running on tasks.db")
    view = cells[2].outputs[0].data
    assert "application/vnd.jupyter.widget-view+json" in view and "text/html" in view
    assert outputs_text(cells[5]) == "progress seen while blocked: True\n"
    assert outputs_text(cells[6]) == "25 25\nfailed: ValueError: bad input\n"

    bars = models(nb, "FloatProgressModel")
    assert {"value": 1.0, "bar_style": "success"}.items() <= bars[0].items()
    bodies = [visible_text(s["value"]) for s in models(nb, "HTMLModel")]
    done = next(b for b in bodies if "slow" in b and "success" in b and "SECRET" in b)
    assert "SECRET line 24" in done  # what the task printed is shown with its result...
    assert not any("SECRET" in outputs_text(c) for c in cells)  # ...and in no cell's output
    # boom() may already have failed when its cell displayed it (plain HTML, no widget)
    shown = [s["value"] for s in models(nb, "HTMLModel")] + [cells[3].outputs[0].data["text/html"]]
    failed = next(html for html in shown if "sitq-traceback" in html)
    assert "ValueError: bad input" in visible_text(failed) and "in boom" in visible_text(failed)
    counts = next(s["value"] for s in models(nb, "HTMLModel") if "sitq-counts" in s["value"])
    assert re.search(r'data-state="success".*?<b class="sitq-n">1</b>', counts)
    assert re.search(r'data-state="failed".*?<b class="sitq-n">1</b>', counts)


def test_results_outlive_the_kernel(tmp_path):
    first = execute(new_notebook(
        "import sitq\n%load_ext sitq\n%sitq start",
        "h = sitq.notebook.submit(divmod, 47, 5)\nprint(h.task_id, h.result(30))",
    ), tmp_path)
    task_id, value = outputs_text(first.cells[1]).split(maxsplit=1)
    assert value.strip() == "(9, 2)"
    second = execute(new_notebook(
        "import sitq\n%load_ext sitq\n%sitq start",
        f"%sitq result {task_id}",
        f"sitq.notebook.task({task_id!r}).result()",
    ), tmp_path)
    html = second.cells[1].outputs[0].data["text/html"]
    assert "(9, 2)" in visible_text(html) and "divmod" in visible_text(html)
    assert second.cells[2].outputs[0].data["text/plain"] == "(9, 2)"


def test_results_draw_as_html_once_the_notebook_layer_is_imported(tmp_path):
    nb = execute(new_notebook(
        "import datetime as dt, sitq\nnow = dt.datetime.now(dt.timezone.utc)\n"
        "res = sitq.Result('abc123', 'crunch', 'failed', None, 'ValueError: bad', None, now, now, now, 1)\nres",
        "import sitq.notebook\nres",
    ), tmp_path)
    before, after = (cell.outputs[0].data for cell in nb.cells)
    assert "text/html" not in before and before["text/plain"].startswith("<Result abc123 crunch failed")
    assert 'class="sitq-result ' in after["text/html"] and "ValueError: bad" in visible_text(after["text/html"])


def test_kernel_shutdown_lets_the_running_task_finish(tmp_path):
    nb = execute(new_notebook(
        "import sitq\n%load_ext sitq\n%sitq start",
        "import time\nh = sitq.notebook.submit(time.sleep, 0.5)\n"
        "while h.status != 'running':\n    time.sleep(0.01)\nprint(h.task_id)",
    ), tmp_path)  # nbclient shuts the kernel down right after the last cell
    task_id = outputs_text(nb.cells[1]).strip()
    with sitq.SyncTaskQueue(sitq.SQLiteBackend(tmp_path / "sitq.db")) as queue:
        assert queue.status(task_id).status == "success"


def test_processes_run_notebook_functions_side_by_side(tmp_path):
    nb = execute(new_notebook(
        "import sitq\n%load_ext sitq\n%sitq start --processes 2",
        # Each task waits until both are running: they only finish in parallel processes.
        "import os, pathlib, sitq, time\n"
        "def meet(i, folder, n):\n"
        "    path = pathlib.Path(folder)\n"
        "    (path / f'{i}.here').touch()\n"
        "    deadline = time.time() + 30\n"
        "    while len(list(path.glob('*.here'))) < n:\n"
        "        if time.time() > deadline:\n"
        "            raise TimeoutError('the other task never started')\n"
        "        time.sleep(0.01)\n"
        "    print('met in', os.getpid())\n"
        "    return os.getpid(), sum(k * k for k in range(200_000))\n"
        "def crash():\n"
        "    raise KeyError('from a process')\n",
        f"hs = [sitq.notebook.submit(meet, i, {str(tmp_path)!r}, 2) for i in range(2)]\n"
        "pids = {h.result(60)[0] for h in hs}\n"
        "print(len(pids), os.getpid() in pids, hs[0].outcome().output.strip() == f'met in {hs[0].result()[0]}')",
        "bad = sitq.notebook.submit(crash)\ntry:\n    bad.result(60)\nexcept sitq.TaskFailedError as e:\n"
        "    print(e.traceback)",
        "hs[0].info().name",
    ), tmp_path)
    assert outputs_text(nb.cells[2]) == "2 False True\n"
    remote = outputs_text(nb.cells[3])
    assert "raise KeyError('from a process')" in remote and "in crash" in remote
    assert nb.cells[4].outputs[0].data["text/plain"] == "'meet'"


@pytest.mark.parametrize("mode, wait", [("", "h.result()"), ("--processes 1", "h.result()"),
                                        ("", "sitq.notebook.map(slow, [gate, gate]).results()")])
def test_interrupting_a_cell_that_waits_leaves_the_tasks_and_the_worker_running(tmp_path, mode, wait):
    """Interrupt (as the frontend's stop button does) while a cell blocks in handle.result() or in
    group.results(): the cell ends at once with KeyboardInterrupt; the tasks go on, and so does the worker."""
    import time

    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    try:
        def run(code, timeout=60):
            reply = kc.execute_interactive(code, timeout=timeout, output_hook=lambda msg: None)
            return reply["content"]

        assert run(f"import os, sitq, time\n%load_ext sitq\n%sitq start {mode}\n"
                   "def slow(gate):\n    while not os.path.exists(gate):\n        time.sleep(0.01)\n"
                   "    return 'finished'\n"
                   f"gate = {str(tmp_path / 'gate')!r}\nh = sitq.notebook.submit(slow, gate)")["status"] == "ok"
        msg_id = kc.execute(f"print('waiting', flush=True)\n{wait}")
        while True:  # the cell runs (a signal before that would find no cell to interrupt) ...
            msg = kc.get_iopub_msg(timeout=30)
            if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream"
                    and "waiting" in msg["content"]["text"]):
                break
        time.sleep(0.5)  # ... and is blocked in the wait by now (an interrupt before it still ends the cell)
        started = time.monotonic()
        km.interrupt_kernel()
        while True:
            reply = kc.get_shell_msg(timeout=30)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        interrupted_after = time.monotonic() - started
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        assert interrupted_after < 5, interrupted_after
        # asked in the reply itself (user_expressions), not in output that may trail it
        status = kc.execute_interactive("", timeout=30, user_expressions={"s": "str(h.status)"},
                                        output_hook=lambda msg: None)
        assert status["content"]["status"] == "ok", status["content"]
        assert status["content"]["user_expressions"]["s"]["data"]["text/plain"] == "'running'", status["content"]
        (tmp_path / "gate").touch()
        status = kc.execute_interactive("", timeout=60, output_hook=lambda msg: None, user_expressions={
            "s": "(h.result(30), sitq.notebook.submit(divmod, 7, 2).result(30))"})
        assert status["content"]["user_expressions"]["s"]["data"]["text/plain"] == "('finished', (3, 1))", status
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_tracebacks_point_at_cells_and_output_streams_in_a_kernel(tmp_path):
    nb = execute(new_notebook(
        "import sitq\n%load_ext sitq\n%sitq start --processes 1",
        "def check(x):\n    if x > 1:\n        raise ValueError(f'{x} is too big')\n    return x",
        "bad = sitq.notebook.submit(check, 5)\ntry:\n    bad.result(60)\nexcept sitq.TaskFailedError as e:\n"
        "    print(e)",
        "%sitq result {bad.task_id}",
        "import os, time\n"
        "def chatty(gate):\n    for i in range(3):\n        print('step', i)\n"
        "    while not os.path.exists(gate):\n        time.sleep(0.01)\n    return 'ok'\n"
        f"h = sitq.notebook.submit(chatty, {str(tmp_path / 'gate')!r})\nh",
        "deadline = time.monotonic() + 30\n"
        "while 'step 2' not in h._widget.output.value:\n    assert time.monotonic() < deadline\n"
        "    time.sleep(0.02)\n"
        f"print(h.status, 'step 2' in h.output())\nopen({str(tmp_path / 'gate')!r}, 'w').close()\nh.result(30)",
    ), tmp_path)
    cells = nb.cells
    printed = outputs_text(cells[2])
    assert "Cell In[2], line 3, in check\n    raise ValueError(f'{x} is too big')" in printed, printed
    assert "ipykernel_" not in printed and "sitq/" not in printed and "direct cause" not in printed
    shown = outputs_text(cells[3])
    assert "Cell In[2], line 3, in check" in shown and "ValueError: 5 is too big" in shown
    assert outputs_text(cells[5]).startswith("running True")


GROUP_WORK = """
import os, sitq, time
def work(x, gate=None):
    if gate:
        while not os.path.exists(gate):
            time.sleep(0.01)
    time.sleep(0.01)
    if x == 3:
        raise ValueError(f"unlucky {x}")
    return x * x
"""


def test_a_map_is_one_group_widget_and_comes_back_after_a_restart(tmp_path):
    gate = str(tmp_path / "gate")
    first = execute(new_notebook(
        "%load_ext sitq\n%sitq start groups.db --concurrency 2",
        GROUP_WORK + WAIT_UNTIL,
        "group = sitq.notebook.map(work, range(10), key='squares')\ngroup",
        "try:\n    group.results(60)\nexcept sitq.TaskFailedError as e:\n    print('raised:', e.error)",
        "values = group.results(failures='return')\n"
        "print([v if not isinstance(v, Exception) else type(v).__name__ for v in values])",
        "print(len(group), group[4].result(), [f.error for f in group.failures()])",
        "print('retried', group.retry_failed())\ngroup.wait(60)\n"
        "print(group.counts['failed'], group[3].info().attempts)",
        "later = sitq.notebook.map(work, range(20), [" + repr(gate) + "] * 20)\nlater",
        "wait_until(lambda: later.counts['running'] > 0)\nlater._widget.cancel.click()  # its cancel-all button\n"
        "wait_until(lambda: later.counts['cancelled'] >= 18)\nprint(later.cancel()['cancelled'] == 0)\n"
        f"open({gate!r}, 'w').close()\nlater.wait(60)\nprint(later.counts['cancelled'] + later.counts['success'])",
        "wait_until(lambda: 'sitq-group-done' in group._widget.box._dom_classes"
        " and 'sitq-group-done' in later._widget.box._dom_classes)\n"
        # nbclient records only the widget updates sent while a cell runs; the refresher's thread
        # may have sent the last ones between cells, so send the final state again, in this cell.
        "for w in (group._widget, later._widget):\n"
        "    for part in (w.header, w.bar, w.cancel, w.failures):\n"
        "        part.send_state()\n"
        "print(group.group_id, await sitq.notebook.map(work, [1, 2]))",
        "%sitq stop",
    ), tmp_path)
    cells = first.cells
    assert "application/vnd.jupyter.widget-view+json" in cells[2].outputs[0].data
    assert outputs_text(cells[3]) == "raised: ValueError: unlucky 3\n"
    assert outputs_text(cells[4]) == "[0, 1, 4, 'TaskFailedError', 16, 25, 36, 49, 64, 81]\n"
    assert outputs_text(cells[5]) == "10 16 ['ValueError: unlucky 3']\n"
    assert outputs_text(cells[6]) == "retried 1\n1 2\n"
    assert outputs_text(cells[8]).splitlines() == ["True", "20"]
    group_id, awaited = outputs_text(cells[9]).split(maxsplit=1)
    assert awaited == "[1, 4]\n"
    bars = models(first, "FloatProgressModel")
    assert {"value": 1.0, "bar_style": "danger"}.items() <= bars[0].items()  # the keyed map: 10/10, one failed
    html = [visible_text(s["value"]) for s in models(first, "HTMLModel")]
    assert any("10/10 done · 1 failed" in h and f"group {group_id[-8:]}" in h for h in html)
    failures = next(h for h in html if "click one for its traceback" in h)
    assert "ValueError: unlucky 3" in failures and 'raise ValueError(f"unlucky {x}")' in failures
    buttons = [s for s in models(first, "ButtonModel") if s.get("description") == "cancel all"]
    assert len(buttons) == 2 and all(b["disabled"] for b in buttons)  # both groups have ended

    # A new kernel: the group is found by the end of its id, and the keyed cell run again re-attaches.
    second = execute(new_notebook(
        "%load_ext sitq\n%sitq start groups.db",
        GROUP_WORK,
        f"%sitq result {group_id[-8:]}",
        f"again = sitq.notebook.group({group_id[-8:]!r})\nprint(again.group_id, again.results(failures='return')[:3])",
        "rerun = sitq.notebook.map(work, range(10), key='squares')\n"
        "print(rerun.group_id == again.group_id, rerun.task_ids == again.task_ids)",
        "rerun.wait(60)\nprint(rerun.info().total, [h.info().attempts for h in rerun][:3])",
    ), tmp_path)
    cells = second.cells
    shown = cells[2].outputs[0].data
    assert "10/10 done · 1 failed" in visible_text(shown["text/html"])
    assert outputs_text(cells[3]) == f"{group_id} [0, 1, 4]\n"
    assert outputs_text(cells[4]) == "True True\n"
    # nothing ran again but the failure, which a keyed map replaces (TaskOptions.replace_failed)
    assert outputs_text(cells[5]) == "10 [1, 1, 1]\n"


@pytest.mark.parametrize("mode", ["--concurrency 2", "--processes 2"])
def test_a_group_widget_shows_no_more_running_than_the_worker_has_slots(tmp_path, mode):
    """A slot claims many very short tasks at once and the store counts them all running; the
    widget counts those that wait in the run as pending."""
    gate = str(tmp_path / "gate")
    nb = execute(new_notebook(
        f"%load_ext sitq\n%sitq start runs.db {mode}",
        GROUP_WORK + WAIT_UNTIL
        + "import sitq.worker.runners as runners\n"
        "runners.SLOW_TASK = 60  # else the worker hands back what waits behind a slow task after 4 ms\n"
        "sitq.notebook.map(abs, range(300)).wait(60)  # short tasks: each slot now claims many at once",
        f"busy = sitq.notebook.map(work, range(10), [{gate!r}] * 10)\nbusy",
        "wait_until(lambda: busy.counts['running'] == 10\n"
        "           and any(f' {n} running' in busy._widget.header.value for n in (1, 2)))\n"
        "print(busy.counts['running'], busy._widget.header.value)",
        f"open({gate!r}, 'w').close()\nbusy.wait(60)\nprint(busy.counts['success'])",
        "%sitq stop",
    ), tmp_path)
    store, header = outputs_text(nb.cells[3]).split(" ", 1)
    shown = visible_text(header)  # one run per free slot: with processes, both may be in one process's run
    assert store == "10" and re.search(r"\b[12] running", shown) and "10 running" not in shown
    assert outputs_text(nb.cells[4]) == "9\n"


def test_the_board_lists_loose_tasks_stored_before_a_map_of_100000(tmp_path):
    nb = execute(new_notebook(
        "%load_ext sitq\n%sitq start loose.db --concurrency 2",
        GROUP_WORK + WAIT_UNTIL,
        "loose = [sitq.notebook.submit(work, x) for x in range(5)]\n[h.result(30) for h in loose[:3]]",
        "import datetime as dt\nbig = sitq.notebook.map(work, range(100_000), eta=dt.timedelta(hours=1))\n"
        "big.stored(60)\nboard = sitq.notebook.board()\nboard",
        "wait_until(lambda: board.table.value.count('class=\"sitq-row\"') == 5)\n"
        "print(sorted(h.task_id[-8:] in board.table.value for h in loose), big.counts['pending'])",
        "big.cancel()\n%sitq stop",
    ), tmp_path)
    assert outputs_text(nb.cells[4]) == "[True, True, True, True, True] 100000\n"
    table = next(s["value"] for s in models(nb, "HTMLModel") if "sitq-group-row" in s["value"])
    assert table.count('class="sitq-row"') == 5 and table.count("sitq-group-row") == 1
