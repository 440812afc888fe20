"""The board and task widgets live in a real browser: JupyterLab on 127.0.0.1,
Debian's Chromium driven by Playwright, Run All on a notebook that starts the
in-kernel worker. Skipped without /usr/bin/chromium unless SITQ_REQUIRE_BROWSER=1.

Live behaviour is awaited with wait_for_function on the DOM, never with sleeps.
"""

import json
import os
import statistics

import pytest
from notebook_support import (
    browser_available,
    chromium_page,
    jupyter_lab,
    new_notebook,
    open_notebook,
    run_all,
)

if not browser_available():
    pytest.skip("no /usr/bin/chromium (apt-get install chromium)", allow_module_level=True)

pytestmark = pytest.mark.timeout(180)

CELLS = [
    "import sitq, time\n%load_ext sitq\n%sitq start live.db --concurrency 3",
    # the message carries the kernel's clock, so the page can measure update latency
    "def slow(n, delay):\n"
    "    for i in range(n):\n"
    "        sitq.progress(i + 1, n, f't={time.time():.3f}')\n"
    "        time.sleep(delay)\n"
    "    return n\n"
    "def boom():\n"
    "    time.sleep(0.5)\n"
    "    return 1 / 0",
    "%sitq status",
    "h = sitq.notebook.submit(slow, 40, 0.1)\nh",
    "others = [sitq.notebook.submit(slow, 10, 0.1) for _ in range(2)]\nbad = sitq.notebook.submit(boom)\nbad",
    "h.result(120)",  # the kernel is busy here while the widgets keep moving
]

BAR = ".sitq-task-widget .widget-hprogress .progress-bar"
COUNT = ".sitq-board-counts .sitq-count[data-state='{}'] .sitq-n"
# Records, for every progress message that reaches the page, how old it is.
WATCH = """() => {
  window.sitqLatency = []; window.sitqBoardUpdates = [];
  const seen = new Set();
  new MutationObserver(() => {
    const now = Date.now() / 1000;
    for (const m of document.body.innerText.matchAll(/t=(\\d+\\.\\d+)/g)) {
      if (!seen.has(m[1])) { seen.add(m[1]); window.sitqLatency.push(now - parseFloat(m[1])); }
    }
    const table = document.querySelector('.sitq-board-table');
    if (table && table.innerHTML !== window.sitqLastTable) {
      window.sitqLastTable = table.innerHTML; window.sitqBoardUpdates.push(now);
    }
  }).observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    import nbformat

    root = tmp_path_factory.mktemp("lab-root")
    nbformat.write(new_notebook(*CELLS), root / "live.ipynb")
    with jupyter_lab(root, log_path=root / "jupyter.log") as (base, token):
        yield base, token, root


def count(page, state):
    return int(page.inner_text(COUNT.format(state)))


def width(page):
    return page.evaluate(f"() => parseFloat(document.querySelector({json.dumps(BAR)}).style.width)")


def test_board_and_task_widgets_update_live_in_jupyterlab(lab, tmp_path):
    base, token, root = lab
    with chromium_page() as page:
        open_notebook(page, base, token, "live.ipynb")
        page.evaluate(WATCH)
        run_all(page)

        # counts change while the tasks run: something is running, later three succeed
        page.wait_for_selector(COUNT.format("running"), timeout=60_000)
        page.wait_for_function(
            f"() => parseInt(document.querySelector({json.dumps(COUNT.format('running'))}).innerText) > 0",
            timeout=30_000)
        assert count(page, "success") < 3

        # the long task's bar appears and moves
        page.wait_for_function(
            f"() => {{ const b = document.querySelector({json.dumps(BAR)}); "
            "return b && parseFloat(b.style.width) > 0; }", timeout=30_000)
        first = width(page)
        page.wait_for_function(
            f"(w) => parseFloat(document.querySelector({json.dumps(BAR)}).style.width) > w",
            arg=first, timeout=30_000)
        assert width(page) > first

        # the failed task's widget turns into its traceback
        page.wait_for_function(
            "() => [...document.querySelectorAll('.sitq-task-widget pre.sitq-traceback')]"
            ".some(e => e.innerText.includes('ZeroDivisionError'))", timeout=30_000)
        traceback = page.inner_text(".sitq-task-widget pre.sitq-traceback")
        assert "in boom" in traceback and "return 1 / 0" in traceback

        page.wait_for_function(
            f"() => parseInt(document.querySelector({json.dumps(COUNT.format('success'))}).innerText) >= 3",
            timeout=60_000)
        assert count(page, "failed") == 1 and count(page, "running") == 0
        page.wait_for_function(  # the long task's widget became its result
            "() => document.querySelector('.sitq-task-widget .sitq-result[data-state=success]')",
            timeout=30_000)
        assert width(page) == 100.0

        # pick the failed task on the board (the kernel handles it once Run All is done)
        label = page.evaluate("() => [...document.querySelectorAll('.sitq-board-picker option')]"
                              ".map(o => o.textContent).find(t => t.includes('boom'))")
        assert label.replace("\xa0", " ").endswith("· failed")  # ipywidgets uses no-break spaces
        page.select_option(".sitq-board-picker select", label=label)
        page.wait_for_selector(".sitq-board-detail pre.sitq-traceback", timeout=30_000)
        assert "ZeroDivisionError" in page.inner_text(".sitq-board-detail")

        shot = tmp_path / "sitq-board.png"
        page.screenshot(path=str(shot), full_page=True)
        latency = page.evaluate("() => window.sitqLatency")
        updates = page.evaluate("() => window.sitqBoardUpdates")
    gaps = [b - a for a, b in zip(updates, updates[1:], strict=False)]
    print(f"\nscreenshot: {shot}")
    print(f"progress messages seen in the page: {len(latency)}; age when shown: median "
          f"{statistics.median(latency):.3f}s, max {max(latency):.3f}s")
    print(f"board table redraws: {len(updates)}; median gap {statistics.median(gaps):.3f}s")


# -- what a task prints, tracebacks that name cells, dollars: Lab light and dark, Notebook 7 ------------

ROUND_TWO = [
    "import os, sitq, time\n%load_ext sitq\n%sitq start two.db --concurrency 3",
    "def chatty(gate):\n"
    "    for i in range(3):\n"
    "        print(f'line {i} of the output')\n"
    "        sitq.progress(i + 1, 4, 'printing')\n"
    "    while not os.path.exists(gate):\n"
    "        time.sleep(0.02)\n"
    "    print('after the gate')\n"
    "    return 'chatty is done'\n"
    "def check(amount):\n"
    "    if amount > 100:\n"
    "        raise ValueError(f'{amount} is too much')\n"
    "    return amount\n"
    "def pay():\n"
    "    return 'paid $1,200 in $5 notes'",
    "h = sitq.notebook.submit(chatty, 'gate')\nh",
    "bad = sitq.notebook.submit(check, 500)\nbad",
    "money = sitq.notebook.submit(sitq.task(pay, name='pay $1,200 in $5 notes'))\nmoney",
    "%sitq status",
    "while not os.path.exists('gate'):\n    time.sleep(0.05)\nh.result(120), money.result(60)",
]
FRONTENDS = {  # id: (server app, theme)
    "lab-light": ("jupyterlab", None),
    "lab-dark": ("jupyterlab", "JupyterLab Dark"),
    "notebook7": ("notebook", None),
}


@pytest.fixture(scope="module", params=list(FRONTENDS))
def frontend(request, tmp_path_factory):
    import nbformat

    app, theme = FRONTENDS[request.param]
    root = tmp_path_factory.mktemp(f"{request.param}-root")
    nbformat.write(new_notebook(*ROUND_TWO), root / "two.ipynb")
    with jupyter_lab(root, log_path=root / "jupyter.log", theme=theme, app=app) as (base, token):
        yield request.param, app, base, token, root


def test_output_streams_tracebacks_name_cells_and_dollars_stay_dollars(frontend, tmp_path):
    name, app, base, token, root = frontend
    shots = os.environ.get("SITQ_SCREENSHOTS")  # a folder: the docs' pictures come from here
    with chromium_page(width=1100, height=1200) as page:
        open_notebook(page, base, token, "two.ipynb", app=app)
        run_all(page)

        # the chatty task's widget shows what it printed while it is still running (it waits for the gate)
        page.wait_for_function(
            "() => [...document.querySelectorAll('.sitq-task-widget .sitq-live-output')]"
            ".some(e => e.innerText.includes('line 2 of the output'))", timeout=60_000)
        live = page.locator(".sitq-task-widget:has(.sitq-live-output)").first
        assert "running" in live.inner_text() and live.locator(".sitq-result").count() == 0
        assert not (root / "gate").exists()
        if shots and name == "lab-light":
            live.screenshot(path=os.path.join(shots, "notebook-live-output.png"))

        # the failure's traceback names the cell that defined the function, as IPython does
        # (in its widget, or as plain HTML if it had failed already when its cell showed it)
        page.wait_for_function(
            "() => [...document.querySelectorAll('.jp-OutputArea pre.sitq-traceback')]"
            ".some(e => e.innerText.includes('is too much'))", timeout=60_000)
        traceback = page.locator(".sitq-result:has(pre.sitq-traceback)").first
        text = traceback.inner_text()
        assert "Cell In[2], line 11, in check" in text and "ipykernel_" not in text, text
        if shots and name == "lab-light":
            traceback.screenshot(path=os.path.join(shots, "notebook-traceback.png"))

        # "$1,200 in $5" is text, not mathematics, in the task's widget and on the board
        page.wait_for_function(
            "() => document.querySelector('.sitq-board-table') &&"
            " document.querySelector('.sitq-board-table').innerText.includes('pay $1,200 in $5 notes')",
            timeout=60_000)
        page.wait_for_function(
            "() => [...document.querySelectorAll('.sitq-result pre.sitq-value')]"
            ".some(e => e.innerText.includes('paid $1,200 in $5 notes'))", timeout=60_000)
        assert "pay $1,200 in $5 notes" in page.locator(".sitq-result:has(pre.sitq-value)").last.inner_text()
        assert page.locator(".jp-Notebook mjx-container, .jp-Notebook .MathJax").count() == 0

        (root / "gate").touch()  # now the chatty task may end: its widget becomes its result, with all its output
        page.wait_for_function(
            "() => [...document.querySelectorAll('.sitq-task-widget .sitq-result[data-state=success]')]"
            ".some(e => e.innerText.includes('after the gate') && e.innerText.includes('line 0 of the output'))",
            timeout=60_000)
        assert page.locator(".sitq-task-widget .sitq-live-output").count() == 0
        page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
        if shots and name == "lab-dark":
            page.locator(".sitq-board").first.screenshot(path=os.path.join(shots, "notebook-board-dark.png"))
    print(f"\nscreenshot: {tmp_path / f'{name}.png'}")


# -- a map as one group: its widget fills up and shows its failure; the board has one row for it ----------

GROUPS = [
    "import os, sitq, time\n%load_ext sitq\n%sitq start groups.db --concurrency 2",
    "def work(x):\n"
    "    time.sleep(0.15)\n"
    "    if x == 5:\n"
    "        raise ValueError(f'unlucky {x}')\n"
    "    return x * x",
    "group = sitq.notebook.map(work, range(24))\ngroup",
    "%sitq status",
    "group.wait(120)",  # the kernel is busy here while the widgets fill up
]
GROUP_BAR = ".sitq-group-widget .widget-hprogress .progress-bar"


def test_a_group_widget_fills_up_shows_its_failure_and_is_one_row_on_the_board(frontend, tmp_path):
    import nbformat

    name, app, base, token, root = frontend
    nbformat.write(new_notebook(*GROUPS), root / "groups.ipynb")
    shots = os.environ.get("SITQ_SCREENSHOTS")
    bar_width = f"() => {{ const b = document.querySelector({json.dumps(GROUP_BAR)}); " \
                "return b ? parseFloat(b.style.width) : -1; }"
    with chromium_page(width=1100, height=1200) as page:
        open_notebook(page, base, token, "groups.ipynb", app=app)
        run_all(page)

        # one widget for the 24 tasks, whose aggregate bar fills up while the kernel is busy
        page.wait_for_function(f"() => ({bar_width})() > 0", timeout=60_000)
        first = page.evaluate(bar_width)
        page.wait_for_function(f"(w) => ({bar_width})() > w", arg=first, timeout=30_000)
        widget = page.locator(".sitq-group-widget").first
        header = widget.locator(".sitq-group-header").inner_text()
        assert "work" in header and "/24 done" in header
        if shots and name == "lab-light":
            widget.screenshot(path=os.path.join(shots, "notebook-group-running.png"))

        # the failure is listed under the bar; a click opens its traceback, which names the cell
        page.wait_for_function(
            "() => [...document.querySelectorAll('.sitq-group-widget .sitq-failure summary')]"
            ".some(e => e.innerText.includes('unlucky 5'))", timeout=60_000)
        page.wait_for_function(
            "() => document.querySelector('.sitq-group-widget .sitq-group-header').innerText"
            ".includes('24/24 done · 1 failed')", timeout=60_000)
        # the bar is another widget model: its last update may be drawn a moment after the header's
        page.wait_for_function(f"() => ({bar_width})() == 100", timeout=10_000)
        failure = widget.locator(".sitq-failure").first
        assert not failure.locator("pre.sitq-traceback").is_visible()
        failure.locator("summary").click()
        traceback = failure.locator("pre.sitq-traceback")
        traceback.wait_for(state="visible", timeout=10_000)
        assert "Cell In[2], line 4, in work" in traceback.inner_text()
        assert widget.locator(".sitq-group-cancel button, button.sitq-group-cancel").first.is_disabled()

        # the board: the group is one row with its own bar, and no pending rows are listed
        page.wait_for_function(
            "() => { const t = document.querySelector('.sitq-board-table');"
            " return t && t.innerText.includes('24/24 done'); }", timeout=60_000)
        table = page.locator(".sitq-board-table")
        assert table.locator("tr.sitq-group-row").count() == 1
        assert table.locator("tr.sitq-row[data-state=pending]").count() == 0
        assert table.locator("tr.sitq-group-row .sitq-group-bar").count() == 1
        ok = table.locator("tr.sitq-group-row .sitq-bar-ok").bounding_box()
        bad = table.locator("tr.sitq-group-row .sitq-bar-bad").bounding_box()
        assert ok["height"] > 0 and 0 < bad["width"] < ok["width"]  # 23 succeeded, 1 failed, side by side
        page.screenshot(path=str(tmp_path / f"groups-{name}.png"), full_page=True)
        if shots and name == "lab-light":
            widget.screenshot(path=os.path.join(shots, "notebook-group.png"))
        if shots and name == "lab-dark":
            page.locator(".sitq-board").first.screenshot(path=os.path.join(shots, "notebook-board-group-dark.png"))
    print(f"\nscreenshot: {tmp_path / f'groups-{name}.png'}")
