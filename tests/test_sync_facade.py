"""The blocking façade, from plain code and from inside a running event loop (as in a notebook cell)."""

import asyncio
import threading

import pytest
import taskfuncs

from sitq import (
    SQLiteBackend,
    SyncTaskQueue,
    TaskFailedError,
    TaskNotFoundError,
    Worker,
)
from sitq.sync import LoopThread


@pytest.fixture
def worker_thread(db_path):
    """A worker on its own loop thread, as the notebook layer runs one."""
    loop = LoopThread("test-worker")
    worker = Worker(SQLiteBackend(db_path), max_concurrency=2, poll_interval=0.5)
    running = loop.submit(worker.start())
    yield worker
    loop.run(worker.stop())
    running.result(timeout=10)
    loop.stop()


def test_values_none_on_timeout_and_errors(db_path, worker_thread):
    with SyncTaskQueue(SQLiteBackend(db_path)) as queue:
        assert queue.value(queue.enqueue(taskfuncs.add, 2, 3), timeout=10) == 5
        slow = queue.enqueue(taskfuncs.sleep_then, 0.5, "late")
        assert queue.value(slow, timeout=0) is None
        assert queue.value(slow, timeout=10) == "late"
        failing = queue.enqueue(taskfuncs.fail, "nope")
        with pytest.raises(TaskFailedError) as caught:
            queue.value(failing, timeout=10)
        assert caught.value.error == "ValueError: nope"
        assert "in fail" in caught.value.traceback
        assert caught.value.result.status == "failed"
        with pytest.raises(TaskNotFoundError, match="no task with id 'missing'"):
            queue.value("missing")
        ids = queue.map(taskfuncs.add, [1, 2], [10, 20])
        assert [queue.value(i, timeout=10) for i in ids] == [11, 22]
        assert queue.status(ids[0]).status == "success"
        assert queue.overview().counts["success"] >= 4


def test_works_inside_a_running_event_loop(db_path, worker_thread):
    async def cell():
        # a notebook cell runs inside the kernel's loop: asyncio.run() would fail here
        with SyncTaskQueue(SQLiteBackend(db_path)) as queue:
            return queue.value(queue.enqueue(taskfuncs.async_double, 21), timeout=10)

    assert asyncio.run(cell()) == 42


def test_blocking_call_from_the_loop_thread_is_refused(db_path):
    loop = LoopThread("test-refuse")
    queue = SyncTaskQueue(SQLiteBackend(db_path), loop=loop)

    async def inside():
        return queue.enqueue(taskfuncs.add, 1, 2)

    try:
        with pytest.raises(Exception, match="own loop thread"):
            loop.run(inside())
    finally:
        loop.stop()


def test_loop_thread_is_a_daemon_and_restartable():
    loop = LoopThread("test-restart")

    async def which_thread():
        return threading.current_thread().name

    assert loop.run(which_thread()) == "test-restart"
    loop.stop()
    assert not loop.is_running
    assert loop.run(which_thread()) == "test-restart"
    loop.stop()
