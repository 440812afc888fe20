"""Every Python block in docs/ (and in the spec page, when present) runs against a live worker,
unless the line before it marks it as illustrative and says why:

    <!-- illustrative: runs in a Jupyter kernel (tests/test_notebook_kernel.py runs it there) -->

Blocks of one page run in order in one namespace, as cells of a notebook
would, with top-level ``await`` allowed. A worker runs on ``tasks.db`` in a
fresh folder for each page. The generated reference pages hold no blocks.
"""

import ast
import asyncio
import contextlib
import io
import os
import re
from pathlib import Path

import pytest
from conftest import PROJECT

from sitq import SQLiteBackend, Worker
from sitq.sync import LoopThread

DOCS = PROJECT / "docs"
SPEC = Path(os.environ.get("SITQ_SPEC_DIR", PROJECT.parent / "shared" / "spec")) / "get-results.md"
BLOCK = re.compile(r"^(?:<!-- illustrative:(?P<reason>[^\n]*?)-->\n)?```python\n(?P<source>.*?)^```", re.S | re.M)
PAGES = sorted(str(page.relative_to(DOCS)) for page in DOCS.rglob("*.md"))


def python_blocks(page: Path) -> list:
    """The page's Python blocks that run (the illustrative ones left out)."""
    return [m["source"] for m in BLOCK.finditer(page.read_text()) if m["reason"] is None]


@pytest.mark.parametrize("page", PAGES)
def test_illustrative_blocks_say_why(page):
    reasons = [m["reason"] for m in BLOCK.finditer((DOCS / page).read_text()) if m["reason"] is not None]
    assert all(len(reason.strip()) > 10 for reason in reasons), f"{page}: an illustrative block needs a reason"


def my_function(*args):
    """The spec page's example task."""
    return "Hello, World!"


async def run_blocks(blocks: list, namespace: dict) -> list:
    outputs = []
    for number, source in enumerate(blocks, 1):
        code = compile(source, f"<block {number}>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                maybe = eval(code, namespace)
                if asyncio.iscoroutine(maybe):
                    await maybe
            except Exception as exc:
                raise AssertionError(f"block {number} failed:\n{source}\n{out.getvalue()}") from exc
        outputs.append(out.getvalue())
    return outputs


def run_page(blocks: list, folder: Path, namespace: dict) -> list:
    """Run the blocks on this thread's loop while a worker runs on its own loop thread,
    as in a notebook, so that blocking calls in a block do not stall the worker."""
    old = os.getcwd()
    os.chdir(folder)
    worker_loop = LoopThread("docs-worker")
    worker = Worker(SQLiteBackend(folder / "tasks.db"), max_concurrency=4, poll_interval=0.5, capture_output=False)
    running = worker_loop.submit(worker.start())
    try:
        return asyncio.run(asyncio.wait_for(run_blocks(blocks, namespace), 120))
    finally:
        worker_loop.run(worker.stop())
        running.result(timeout=30)
        worker_loop.stop()
        os.chdir(old)


@pytest.mark.parametrize("page", PAGES)
def test_docs_page_runs(page, tmp_path):
    blocks = python_blocks(DOCS / page)
    if not blocks:
        pytest.skip(f"{page} has no Python blocks")
    namespace = {"__name__": "__main__"}
    outputs = run_page(blocks, tmp_path, namespace)
    assert len(outputs) == len(blocks)


def test_docs_pages_say_what_their_blocks_print(tmp_path):
    quick = run_page(python_blocks(DOCS / "tutorials" / "quickstart.md"), tmp_path, {"__name__": "__main__"})
    assert quick[0] == "success 144\n"
    assert quick[1] == str([i * i for i in range(10)]) + "\n"
    assert quick[2] == "pending\nHello, Ada!\n"
    error = "ValueError: invalid literal for int() with base 10: 'forty-two'"
    assert quick[3].splitlines() == ["failed", error, error]  # status, error, last traceback line
    assert quick[5] == "49\nfailed: ValueError: invalid literal for int() with base 10: 'seven'\n"
    (tmp_path / "teaching").mkdir()
    teaching = run_page(python_blocks(DOCS / "tutorials" / "teaching.md"), tmp_path / "teaching",
                        {"__name__": "__main__"})
    assert teaching[1] == "True 111\n"  # a key: the cell run twice is one task
    assert teaching[2] == "failed TypeError: not all arguments converted during string formatting\n"


def test_how_to_pages_say_what_their_blocks_print(tmp_path):
    def page(name):
        folder = tmp_path / name.replace("/", "-")
        folder.mkdir()
        return run_page(python_blocks(DOCS / "how-to" / name), folder, {"__name__": "__main__"})

    deps = page("dependencies-and-priorities.md")
    assert deps[2] == "285\n"  # the reduce after the map
    assert deps[3].startswith("cancelled DependencyError: it runs after task ") and "(invert)" in deps[3]
    once = page("enqueue-once.md")
    assert once[1] == once[2] == "True\n"  # a key, and a keyed map, enqueue once
    assert once[3] == "100\n"
    assert page("schedules.md")[1] == "hourly-heartbeat every 3600s\n['hourly-heartbeat']\n"
    retries = page("retries-timeouts-cancellation.md")
    assert retries[1] == "success 3 None https://example.org: 200 OK\n"
    assert retries[4] == "cancelled\nrequested\ncancelled\nfinished\nNone\n"
    assert retries[5] == "retried\n"
    signing = page("signing.md")
    assert signing[1].startswith("1024\nthe store ") and "pass secret_key=" in signing[1]


@pytest.fixture
def spec_blocks():
    if not SPEC.exists():
        pytest.skip(f"the spec page is not here ({SPEC}); CI has it beside the checkout")
    return python_blocks(SPEC)


def test_spec_page_runs_as_written(spec_blocks, tmp_path):
    namespace = {"__name__": "__main__", "asyncio": asyncio, "my_function": my_function}
    outputs = run_page(spec_blocks, tmp_path, namespace)
    by_block = dict(zip(spec_blocks, outputs, strict=True))

    def printed(fragment):
        (block,) = [b for b in spec_blocks if fragment in b]
        return by_block[block]

    assert printed('task_id = await queue.enqueue(my_function, "arg1", "arg2")') == "Result: Hello, World!\n"
    assert printed("# Status: \"success\" or \"failed\"") == "success\nHello, World!\n"
    assert printed("# Without deserializing").startswith("b'\\x80")
    assert printed("# Without deserializing").splitlines()[1] == "Hello, World!"
    assert printed("# Use polling function") == "Result: Hello, World!\n"
    assert printed("# Get all results").count(": Hello, World!") == 5
    assert printed("result = await get_result_with_retry(task_id)") == "Result: Hello, World!\n"
    assert printed('default="fallback_value"') == "Result: Hello, World!\n"
    # a task id nobody enqueued is "not found" at once, whatever the timeout
    unknown = dict(namespace, task_id="no-such-task")
    lookups = [b for b in spec_blocks if b.startswith("result = await queue.get_result(task_id)\n\nif result is None")]
    assert len(lookups) == 2
    outputs = run_page(lookups, tmp_path, unknown)
    assert outputs == ["Task no-such-task not found\n", "Task not found\n"]
