"""A worker's life around its tasks: a start that fails leaves it stopped, and finished tasks let go
of what they held."""

import gc

import pytest
import taskfuncs
from conftest import worker_running

import sitq
from sitq import BackendError, SQLiteBackend, TaskQueue, Worker


def test_a_worker_whose_store_cannot_be_opened_is_left_stopped_and_can_start_again(tmp_path, run):
    folder = tmp_path / "not-yet"
    backend = SQLiteBackend(folder / "tasks.db")
    worker = Worker(backend, poll_interval=0.05)

    async def go():
        with pytest.raises(BackendError, match="does not exist"):
            await worker.drain()
        assert not worker.is_running
        await worker.stop()  # returns at once: there is nothing to stop
        folder.mkdir()
        queue = TaskQueue(backend)
        task_id = await queue.enqueue(taskfuncs.add, 1, 2)
        await worker.drain()  # not "already running"
        return queue.deserialize_result(await queue.get_result(task_id, timeout=0))

    assert run(go()) == 3
    assert not worker.is_running and worker.processed == 1


@pytest.mark.parametrize("func", [taskfuncs.keep_blob, taskfuncs.async_keep_blob], ids=["thread", "coroutine"])
def test_finished_tasks_let_go_of_their_arguments_and_output_while_the_worker_runs(db_path, func, run):
    """Their hour-long timeouts must not keep them alive: the timer goes when the task is done."""
    taskfuncs.BLOB_REFS.clear()
    task = sitq.task(func, timeout=3600)

    async def go():
        backend = SQLiteBackend(db_path)
        queue = TaskQueue(backend)
        async with worker_running(backend, max_concurrency=4) as worker:
            ids = [await queue.enqueue(task, taskfuncs.Blob(10_000)) for _ in range(200)]
            results = [await queue.get_result(i, timeout=60) for i in ids]
            gc.collect()
            held = [ref for ref in taskfuncs.BLOB_REFS if ref() is not None]
            return results, held, worker.is_running

    results, held, was_running = run(go())
    assert all(r.status == "success" and r.output == "some output 10000\n" for r in results)
    assert was_running and len(taskfuncs.BLOB_REFS) == 400  # an argument and an output buffer per task
    assert held == []
