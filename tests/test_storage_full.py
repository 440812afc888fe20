"""A full disk: a clear error, nothing stored is lost, and the queue works again once there is room.

The disk is "filled" with SQLite's ``max_page_count`` on the backend's own connection (private
API, used only to reach this error path): the file may not grow past the pages it has now.
"""

import asyncio

import pytest
import taskfuncs

from sitq import BackendError, SQLiteBackend, TaskQueue, Worker

NO_LIMIT = 4294967294


def fill_up(backend):
    """Let the database file grow no further."""
    conn = backend._conn
    (pages,) = conn.execute("PRAGMA page_count").fetchone()
    conn.execute(f"PRAGMA max_page_count = {pages}")


def make_room(backend):
    backend._conn.execute(f"PRAGMA max_page_count = {NO_LIMIT}")


def test_enqueue_on_a_full_disk_says_so_and_loses_nothing(db_path, run):
    async def go():
        backend = SQLiteBackend(db_path)
        queue = TaskQueue(backend)
        stored = await queue.map(taskfuncs.echo, range(20))
        fill_up(backend)
        with pytest.raises(BackendError, match="disk is full; free some space") as one:
            await queue.enqueue(taskfuncs.echo, "x" * 100_000)
        with pytest.raises(BackendError, match="disk is full"):
            await queue.map(taskfuncs.echo, ["y" * 1000] * 200)  # all or nothing
        while_full = await queue.overview(0)

        make_room(backend)
        late = await queue.enqueue(taskfuncs.echo, "x" * 100_000)
        await Worker(backend).drain()
        values = [queue.deserialize_result(await queue.get_result(i, timeout=0)) for i in stored + [late]]
        await queue.close()
        return one.value, while_full, values

    error, while_full, values = run(go())
    assert str(db_path) in str(error) and "nothing already stored was lost" in str(error)
    assert while_full.total == 20 and while_full.counts["pending"] == 20  # the failed writes left no trace
    assert values == list(range(20)) + ["x" * 100_000]


def test_a_worker_that_cannot_store_an_outcome_stops_and_the_task_runs_again(db_path, run):
    async def go():
        backend = SQLiteBackend(db_path)
        queue = TaskQueue(backend)
        small = await queue.map(taskfuncs.echo, range(5))
        big = await queue.enqueue(taskfuncs.big_value, 200_000)
        fill_up(backend)
        with pytest.raises(BackendError, match="disk is full"):
            await asyncio.wait_for(Worker(backend, lease=0.3).drain(), 60)
        while_full = {i: await queue.status(i) for i in small + [big]}

        make_room(backend)
        worker = Worker(backend, lease=0.3, poll_interval=0.05)
        running = asyncio.ensure_future(worker.start())  # it sweeps the stopped worker's leases
        results = [await queue.get_result(i, timeout=30) for i in small + [big]]
        await worker.stop()
        await running
        await queue.close()
        return while_full, results

    while_full, results = run(go())
    assert all(info is not None for info in while_full.values())  # every task is still there
    assert [r.status for r in results] == ["success"] * 6
    assert results[-1].attempts == 2  # its first outcome could not be stored, so it ran again
    assert TaskQueue(SQLiteBackend(db_path)).deserialize_result(results[-1]) == "v" * 200_000
