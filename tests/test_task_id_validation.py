"""Task ids that are not valid text get a clear InvalidTaskError from every entry point, not an
encoder traceback, and the queue goes on working: nothing stored is lost."""

import pytest
import taskfuncs

import sitq.notebook as sn
from sitq import InvalidTaskError, SQLiteBackend, SyncTaskQueue, TaskQueue, Worker

BAD_IDS = {
    "lone surrogate": "\ud800",
    "surrogate inside": "01a2\udfff",
    "bytes": b"01a2",
    "int": 12,
    "None": None,
}
TEXT_PROBLEM = "not valid text|task ids are strings"


@pytest.mark.parametrize("bad", BAD_IDS.values(), ids=BAD_IDS.keys())
def test_the_async_queue_refuses_ids_that_are_not_text(db_path, run, bad):
    async def go():
        async with TaskQueue(SQLiteBackend(db_path)) as queue:
            task_id = await queue.enqueue(taskfuncs.add, 1, 2)
            for call in (
                queue.get_result(bad, timeout=0),
                queue.status(bad),
                queue.cancel(bad),
                queue.statuses([task_id, bad]),
            ):
                with pytest.raises(InvalidTaskError, match=TEXT_PROBLEM):
                    await call
            worker = Worker(queue.backend)
            await worker.drain()
            result = await queue.get_result(task_id)
            assert queue.deserialize_result(result) == 3

    run(go())


@pytest.mark.parametrize("bad", BAD_IDS.values(), ids=BAD_IDS.keys())
def test_the_blocking_queue_refuses_ids_that_are_not_text(db_path, bad):
    with SyncTaskQueue(SQLiteBackend(db_path)) as queue:
        task_id = queue.enqueue(taskfuncs.add, 1, 2)
        for call in (queue.get_result, queue.value, queue.status, queue.cancel, lambda i: queue.statuses([i])):
            with pytest.raises(InvalidTaskError, match=TEXT_PROBLEM):
                call(bad)
        assert queue.status(task_id).status == "pending"


@pytest.mark.parametrize("not_a_list", [None, 5, b"01a2", "01a2"])
def test_statuses_wants_a_list_of_ids(db_path, not_a_list):
    with SyncTaskQueue(SQLiteBackend(db_path)) as queue:
        with pytest.raises(InvalidTaskError, match="statuses\\(\\) takes a list of task ids"):
            queue.statuses(not_a_list)


@pytest.fixture
def kernel_runtime(tmp_path):
    runtime = sn.start_worker(tmp_path / "nb.db", concurrency=1)
    yield runtime
    sn.stop_worker(timeout=10)


def test_the_notebook_helpers_refuse_ids_that_are_not_text(kernel_runtime):
    for bad in BAD_IDS.values():
        with pytest.raises(InvalidTaskError, match=TEXT_PROBLEM):
            sn.task(bad)
        with pytest.raises(InvalidTaskError, match=TEXT_PROBLEM):
            kernel_runtime.cancel(bad)
    handle = sn.submit(taskfuncs.add, 2, 2)
    assert handle.result(timeout=60) == 4


def test_the_magics_report_ids_that_are_not_text_as_usage_errors(tmp_path, monkeypatch):
    pytest.importorskip("IPython")
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    monkeypatch.chdir(tmp_path)
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "sitq")
    try:
        shell.run_line_magic("sitq", "start")
        for command in ("result", "cancel"):
            with pytest.raises(UsageError, match=f"%sitq {command}: task id '\\\\ud800' is not valid text"):
                shell.run_line_magic("sitq", f"{command} \ud800")
    finally:
        sn.stop_worker(timeout=10)
        shell.run_line_magic("unload_ext", "sitq")
        InteractiveShell.clear_instance()


def test_the_message_names_the_offending_character(db_path):
    with SyncTaskQueue(SQLiteBackend(db_path)) as queue:
        with pytest.raises(InvalidTaskError) as caught:
            queue.status("01a2\udfff")
    message = str(caught.value)
    assert "'\\udfff', a lone surrogate" in message and "pass the id enqueue returned" in message
    assert isinstance(caught.value, ValueError)
