"""What a worker does with the tasks it runs, in one process on a real SQLite file."""

import asyncio
import datetime as dt
import time

import pytest
import taskfuncs
from conftest import worker_running

from sitq import SitqError, SQLiteBackend, TaskQueue, Worker
from sitq.worker.loop import LOOK_TRIES


@pytest.fixture
def backend(db_path):
    return SQLiteBackend(db_path)


def results(queue, ids, run):
    async def go():
        return [await queue.get_result(i, timeout=0) for i in ids]

    return run(go())


def test_coroutines_and_plain_functions_both_run(backend, run):
    queue = TaskQueue(backend)
    ids = [
        run(queue.enqueue(taskfuncs.async_double, 21)),
        run(queue.enqueue(taskfuncs.add, 40, 2)),
        run(queue.enqueue(taskfuncs.async_fail)),
        run(queue.enqueue(taskfuncs.fail, "bad input")),
    ]
    run(Worker(backend, max_concurrency=2).drain())
    ok_async, ok_sync, bad_async, bad_sync = results(queue, ids, run)
    assert queue.deserialize_result(ok_async) == 42 and queue.deserialize_result(ok_sync) == 42
    assert bad_async.error == "KeyError: 'missing'" and "in async_fail" in bad_async.traceback
    assert bad_sync.error == "ValueError: bad input" and "in fail" in bad_sync.traceback


def test_unpicklable_return_value_fails_the_task_not_the_worker(backend, run):
    queue = TaskQueue(backend)
    bad = run(queue.enqueue(taskfuncs.unpicklable_value))
    good = run(queue.enqueue(taskfuncs.add, 1, 1))
    run(Worker(backend).drain())
    bad_result, good_result = results(queue, [bad, good], run)
    assert bad_result.status == "failed"
    assert bad_result.error.startswith("SerializationError: cannot pickle the return value, a lock")
    assert queue.deserialize_result(good_result) == 2


def test_payload_that_cannot_be_unpickled_fails_only_that_task(backend, run):
    from sitq.core import NewTask

    queue = TaskQueue(backend)
    now = time.time()
    run(backend.enqueue([NewTask("broken", "gone.module.f", b"\x80\x05garbage", b"x", now, now)]))
    good = run(queue.enqueue(taskfuncs.add, 2, 2))
    run(Worker(backend).drain())
    broken, fine = results(queue, ["broken", good], run)
    assert broken.status == "failed" and "cannot unpickle the task in this worker" in broken.error
    assert queue.deserialize_result(fine) == 4


def test_never_more_than_max_concurrency_at_once(backend, run):
    queue = TaskQueue(backend)
    run(queue.map(taskfuncs.measured, [0.02] * 12))
    run(queue.map(taskfuncs.measured_async, [0.02] * 12))
    run(Worker(backend, max_concurrency=3).drain())
    assert taskfuncs.GAUGE.peak == 3  # reached, never exceeded, across threads and coroutines together
    assert run(queue.overview(0)).counts["success"] == 24


def test_eta_delays_the_start_and_the_task_starts_promptly_after(backend, run):
    async def go():
        queue = TaskQueue(backend)
        worker = Worker(backend, poll_interval=10)  # the eta, not the poll, must wake it
        eta = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=0.5)
        task_id = await queue.enqueue(taskfuncs.add, 1, 2, eta=eta)
        running = asyncio.ensure_future(worker.start())
        result = await queue.get_result(task_id, timeout=10)
        await worker.stop()
        await running
        assert result.status == "success"
        assert result.started_at >= eta
        assert (result.started_at - eta).total_seconds() < 5  # promptly, not a poll interval later
        await queue.close()

    run(go())


def test_an_idle_worker_sees_a_delayed_task_from_another_process_in_time(backend, db_path, run):
    # The worker found nothing pending, so it sleeps up to its poll interval; a task with an eta
    # enqueued elsewhere (another backend on the file, as another process would) must wake it
    # and run at its eta, not a poll interval later.
    async def go():
        worker = Worker(backend, poll_interval=30)
        running = asyncio.ensure_future(worker.start())
        await asyncio.sleep(0.2)  # it has looked and found the queue empty
        async with TaskQueue(SQLiteBackend(db_path)) as producer:
            eta = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=0.5)
            task_id = await producer.enqueue(taskfuncs.add, 1, 2, eta=eta)
            result = await producer.get_result(task_id, timeout=20)
        await worker.stop()
        await running
        assert result is not None and result.status == "success"
        assert (result.started_at - eta).total_seconds() < 5

    run(go())


def test_a_task_whose_function_is_loaded_already_still_fails_alone_on_bad_arguments(backend, db_path, run):
    import sqlite3

    from sitq.core import NewTask

    queue = TaskQueue(backend)
    first = run(queue.enqueue(taskfuncs.add, 1, 1))
    with sqlite3.connect(db_path) as conn:
        func = conn.execute("SELECT func FROM sitq_tasks WHERE id = ?", (first,)).fetchone()[0]
    now = time.time()
    run(backend.enqueue([NewTask("broken-args", "add", func, b"\x80\x05garbage", now, now)]))
    last = run(queue.enqueue(taskfuncs.add, 2, 3))
    run(Worker(backend, max_concurrency=1).drain())
    one, broken, five = results(queue, [first, "broken-args", last], run)
    assert queue.deserialize_result(one) == 2 and queue.deserialize_result(five) == 5
    assert broken.status == "failed" and "cannot unpickle the task's arguments in this worker" in broken.error


def test_drain_leaves_future_tasks_queued(backend, run):
    queue = TaskQueue(backend)
    later = run(queue.enqueue(taskfuncs.add, 1, 2, eta=dt.timedelta(hours=1)))
    now = run(queue.enqueue(taskfuncs.add, 1, 2))
    run(Worker(backend).drain())
    assert run(queue.status(later)).status == "pending"
    assert run(queue.status(now)).status == "success"


def test_stop_lets_running_tasks_finish(backend, run):
    async def go():
        queue = TaskQueue(backend)
        ids = await queue.map(taskfuncs.sleep_then, [0.3, 0.3], ["a", "b"])
        queued = await queue.enqueue(taskfuncs.add, 1, 2)
        worker = Worker(backend, max_concurrency=2)
        running = asyncio.ensure_future(worker.start())
        while (await queue.overview(0)).counts["running"] < 2:
            await asyncio.sleep(0.01)
        await worker.stop()
        await running
        finished = [await queue.get_result(i, timeout=0) for i in ids]
        assert [queue.deserialize_result(r) for r in finished] == ["a", "b"]
        assert (await queue.status(queued)).status == "pending"  # not started after stop
        await queue.close()

    run(go())


def test_worker_cannot_run_twice_at_once(backend, run):
    async def go():
        worker = Worker(backend)
        running = asyncio.ensure_future(worker.start())
        await asyncio.sleep(0.05)
        with pytest.raises(SitqError, match="already running"):
            await worker.start()
        await worker.stop()
        await running

    run(go())


def test_output_is_captured_per_task(backend, run, capsys):
    queue = TaskQueue(backend)
    task_id = run(queue.enqueue(taskfuncs.chatty, "hello from the task"))
    print("outside any task")
    run(Worker(backend).drain())
    result = run(queue.get_result(task_id, timeout=0))
    assert result.output == "hello from the task\nto stderr\n"
    out = capsys.readouterr()
    assert "hello from the task" not in out.out and "outside any task" in out.out


def test_progress_outside_a_task_is_harmless():
    import sitq

    assert sitq.progress(1, 2, "not in a task") is False
    assert taskfuncs.report_progress(3) == 3  # a task function still runs on its own
    with pytest.raises(TypeError, match="takes a number"):
        sitq.progress("one")


def test_memory_backend_is_shared_by_queue_and_worker_on_one_object(run):
    async def go():
        backend = SQLiteBackend(":memory:")
        queue = TaskQueue(backend)
        ids = await queue.map(taskfuncs.echo, range(50))
        await Worker(backend, max_concurrency=4).drain()
        values = [queue.deserialize_result(await queue.get_result(i, timeout=0)) for i in ids]
        assert values == list(range(50))
        await queue.close()

    run(go())


def test_a_view_read_overlapped_by_the_workers_writes_is_read_again_and_then_holds_them_back(
        backend, run, monkeypatch):
    """Worker.look reads again when one of the worker's claim or outcome writes lands during the read,
    and returns a read that none landed in: after LOOK_TRIES reads at most, the worker's next write
    waits for the view's read."""
    writes = 0
    finish_and_claim = backend.finish_and_claim

    async def counting(*args, **kwargs):
        nonlocal writes
        writes += 1
        return await finish_and_claim(*args, **kwargs)

    monkeypatch.setattr(backend, "finish_and_claim", counting)
    reads = []

    async def read():  # lasts until the busy worker writes, or for a long while if it is held back
        seen = writes
        for _ in range(100_000):
            if writes != seen:
                break
            await asyncio.sleep(0)
        reads.append((seen, writes))
        return reads[-1]

    async def go():
        await TaskQueue(backend).map(abs, range(50_000))
        async with worker_running(backend, max_concurrency=2) as worker:
            while writes < 3:
                await asyncio.sleep(0)
            looked = await worker.look(read)
            processed = worker.processed
            while worker.processed == processed:  # and it goes on once the read is done
                await asyncio.sleep(0.001)
        return looked

    (start, end), waiting = run(go())
    assert start == end  # the read returned saw no write of the worker
    assert all(seen != after for seen, after in reads[:-1]) and 1 < len(reads) <= LOOK_TRIES + 1, reads
    assert isinstance(waiting, list)
