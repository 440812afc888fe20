"""The board and task widgets live in a real browser: JupyterLab on 127.0.0.1,
Debian's Chromium driven by Playwright, Run All on a notebook that starts the
in-kernel worker. Skipped without /usr/bin/chromium unless SITQ_REQUIRE_BROWSER=1.

Live behaviour is awaited with wait_for_function on the DOM, never with sleeps.
"""

import json
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
