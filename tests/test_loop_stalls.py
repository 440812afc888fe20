"""A worker whose event loop stalls, or whose store is busy, is still a healthy worker.

Leases are renewed by a heartbeat thread with a connection of its own, so a coroutine that
holds a worker's loop for longer than the lease, another process's big ``map``, checkpoints
and a stream of writes never let a healthy worker's tasks be taken over and run twice. And
the work that grows with the data (a big ``map``, ``overview``, ``statuses`` of many ids,
checkpoints) runs on helper threads that ``close()`` stops.
"""

import asyncio
import datetime as dt
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import taskfuncs
from conftest import sitq_command, worker_env

import sitq
from sitq import SQLiteBackend, SyncTaskQueue, TaskQueue
from sitq.backends.sqlite import CHECKPOINT_COMMITS, OFFLOAD_ROWS
from sitq.core import NewTaskBatch
from sitq.errors import BackendError
from sitq.serialization import CloudpickleSerializer

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses POSIX signals to stop workers")

BIG_MAP = """
import sys
import taskfuncs
from sitq import SQLiteBackend, SyncTaskQueue

db, count = sys.argv[1], int(sys.argv[2])
with SyncTaskQueue(SQLiteBackend(db)) as queue:
    queue.map(taskfuncs.echo, range(count))  # one long write transaction, then big checkpoints
"""

SMALL_WRITES = """
import sys
import taskfuncs
from sitq import SQLiteBackend, SyncTaskQueue

db, log, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
with SyncTaskQueue(SQLiteBackend(db)) as queue:
    for i in range(count):
        queue.enqueue(taskfuncs.record, log, f"small-{i}")
"""


def wait_until(condition, what, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)
    return value


def query(db, sql, *params):
    conn = sqlite3.connect(db, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def test_healthy_workers_with_a_1s_lease_never_run_a_task_twice_under_load(tmp_path):
    db, log = tmp_path / "tasks.db", tmp_path / "runs.log"
    big, small, stalls = 100_000, 300, 6
    with SyncTaskQueue(SQLiteBackend(db)) as queue:
        # Coroutines that hold their worker's loop for 2.5 leases, among short thread tasks.
        queue.map(taskfuncs.record_blocking_the_loop, [str(log)] * stalls, [f"stall-{i}" for i in range(stalls)],
                  [2.5] * stalls)
        queue.map(taskfuncs.record, [str(log)] * 200, [f"short-{i}" for i in range(200)], [0.01] * 200)
    procs = []
    errs = []
    try:
        for number in range(2):
            err = open(tmp_path / f"worker-{number}.err", "w")
            errs.append(tmp_path / f"worker-{number}.err")
            procs.append(subprocess.Popen(
                sitq_command(
                    "worker", str(db), "--quiet", "--lease", "1", "--concurrency", "4", "--poll-interval", "0.2"
                ),
                env=worker_env(), stdout=subprocess.DEVNULL, stderr=err,
            ))
            err.close()
        wait_until(lambda: query(db, "SELECT count(*) FROM sitq_tasks WHERE name LIKE '%record_blocking%' "
                                     "AND status = 'running'")[0][0] >= 2, "loop-blocking tasks run")
        # Meanwhile: another process's big map (a long write transaction, big checkpoints) and
        # a stream of small writes from a third.
        (tmp_path / "big_map.py").write_text(BIG_MAP)
        (tmp_path / "small_writes.py").write_text(SMALL_WRITES)
        loaders = [
            subprocess.Popen([sys.executable, str(tmp_path / "big_map.py"), str(db), str(big)], env=worker_env(),
                             stderr=subprocess.PIPE, text=True),
            subprocess.Popen([sys.executable, str(tmp_path / "small_writes.py"), str(db), str(log), str(small)],
                             env=worker_env(), stderr=subprocess.PIPE, text=True),
        ]
        for loader in loaders:
            _, err = loader.communicate(timeout=120)
            assert loader.returncode == 0, err
        total = stalls + 200 + big + small
        finished = "SELECT count(*) FROM sitq_tasks WHERE status IN ('success', 'failed', 'cancelled')"
        wait_until(lambda: query(db, finished)[0][0] == total, "every task has finished", timeout=240)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    for path in errs:
        text = path.read_text()
        assert "Traceback" not in text and "lost its claim" not in text and "requeued" not in text, text

    # No task was claimed twice (a lease ran out under a live worker), and none ran twice.
    assert query(db, "SELECT status, attempts, count(*) FROM sitq_tasks GROUP BY 1, 2") == [("success", 1, total)]
    runs = Counter(line.split()[0] for line in log.read_text().splitlines())
    assert len(runs) == stalls + 200 + small and set(runs.values()) == {1}, runs.most_common(3)
    # and the loop-blocking tasks really held up both workers' loops
    pids = {int(line.split()[1]) for line in log.read_text().splitlines() if line.startswith("stall-")}
    assert pids == {proc.pid for proc in procs}


class SlowSerializer(CloudpickleSerializer):
    """Takes at least a millisecond per call's arguments, as big arguments do."""

    def dumps_arguments(self, func, args, kwargs):
        time.sleep(0.001)
        return super().dumps_arguments(func, args, kwargs)


def test_map_lets_the_loop_run_while_it_pickles(db_path, run):
    async def go():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0)
                ticks += 1

        async with TaskQueue(SQLiteBackend(db_path), SlowSerializer()) as queue:
            await queue.overview(0)
            running = asyncio.ensure_future(ticker())
            await asyncio.sleep(0)
            before = ticks
            ids = await queue.map(taskfuncs.echo, range(200))  # 200 ms of pickling
            during = ticks - before
            running.cancel()
            assert len(await queue.statuses(ids)) == 200
        return during

    assert run(go()) >= 2  # it yielded between slices, not only once at the end


def test_a_queue_with_a_map_pause_sleeps_that_long_between_slices(db_path, run, monkeypatch):
    """A notebook's queue shares the GIL with the kernel's thread: it sleeps, not only yields."""
    slept = []
    real_sleep = asyncio.sleep

    async def sleep(delay, *args, **kwargs):
        slept.append(delay)
        return await real_sleep(delay, *args, **kwargs)

    async def go():
        async with TaskQueue(SQLiteBackend(db_path), SlowSerializer(), map_pause=0.0123) as queue:
            await queue.overview(0)
            monkeypatch.setattr(asyncio, "sleep", sleep)
            ids = await queue.map(taskfuncs.echo, range(200))  # 200 ms of pickling
            monkeypatch.setattr(asyncio, "sleep", real_sleep)
            assert len(await queue.statuses(ids)) == 200

    run(go())
    assert slept.count(0.0123) >= 2 and 0 not in slept
    with pytest.raises(sitq.InvalidTaskError, match="map_pause takes seconds"):
        TaskQueue(SQLiteBackend(db_path), map_pause=-1)


def test_big_maps_in_a_row_are_stored_once_each_and_leave_the_stage_empty(db_path, run):
    async def go():
        backend = SQLiteBackend(db_path)
        async with TaskQueue(backend) as queue:
            first = await queue.map(taskfuncs.echo, range(OFFLOAD_ROWS + 1))
            second = await queue.map(taskfuncs.echo, range(2 * OFFLOAD_ROWS))  # staged after the first is emptied
            assert (await queue.overview(0)).counts["pending"] == len(first) + len(second)
            assert len(await queue.statuses(first + second)) == len(first) + len(second)
            # The helper's jobs run in order: this one after the stage was emptied, which the map did not wait for.
            staged = backend._helper("offload").submit(
                lambda conn, stopped: conn.execute("SELECT count(*) FROM temp.sitq_new").fetchone()[0])
            assert await asyncio.wrap_future(staged) == 0

    run(go())


def sitq_threads(besides=()):
    return {t.name for t in threading.enumerate() if t.name.startswith("sitq-") and t not in besides}


def test_close_stops_every_helper_thread_and_they_start_again_on_use(db_path, run):
    async def go():
        before = set(threading.enumerate())  # other tests' threads
        backend = SQLiteBackend(db_path)
        queue = TaskQueue(backend)
        for _ in range(2):  # the second round reuses the closed backend
            ids = await queue.map(taskfuncs.echo, range(OFFLOAD_ROWS + 1))  # stored by the helper
            assert (await queue.overview(0)).counts["pending"] == len(ids) * (_ + 1)
            assert len(await queue.statuses(ids)) == len(ids)
            heartbeat = backend.start_heartbeat("w", 60.0)
            assert sitq_threads(before) == {"sitq-offload-tasks.db", "sitq-checkpoint-tasks.db", "sitq-heartbeat-w"}
            await queue.close()
            assert not heartbeat.is_alive()
            assert sitq_threads(before) == set()

    run(go())


def test_the_wal_is_checkpointed_while_the_store_is_in_use(db_path, run):
    """The loop's connection never checkpoints (a COMMIT could pay for it); a helper does."""

    async def go():
        async with TaskQueue(SQLiteBackend(db_path)) as queue:
            for i in range(CHECKPOINT_COMMITS + 10):  # one small write at a time, on the loop
                await queue.enqueue(taskfuncs.echo, i)
            deadline = time.monotonic() + 30
            while os.path.getsize(db_path) < 100_000:  # pages copied from the WAL into the file
                assert time.monotonic() < deadline, "no checkpoint ran"
                await asyncio.sleep(0.01)

    run(go())


def test_a_big_map_waiting_for_another_process_gives_up_after_lock_timeout_and_on_close(db_path, run):
    holder = None

    async def go():
        nonlocal holder
        backend = SQLiteBackend(db_path, lock_timeout=0.3)
        queue = TaskQueue(backend)
        await queue.overview(0)
        holder = sqlite3.connect(db_path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process is writing, and takes its time
        with pytest.raises(BackendError, match="stayed locked by another process for 0.3 s"):
            await queue.map(taskfuncs.echo, range(OFFLOAD_ROWS + 1))
        backend.lock_timeout = 60
        batch = NewTaskBatch("echo", b"f", 0.0, 0.0, 1, [f"id{i}" for i in range(OFFLOAD_ROWS + 1)],
                             [b"a"] * (OFFLOAD_ROWS + 1), [None] * (OFFLOAD_ROWS + 1))
        waiting = asyncio.ensure_future(backend.enqueue(batch))
        await asyncio.sleep(0)  # it runs up to waiting for the helper, which waits for the lock
        await queue.close()  # does not wait out the lock
        with pytest.raises(BackendError, match="closed"):
            await waiting
        holder.execute("ROLLBACK")
        async with TaskQueue(SQLiteBackend(db_path)) as again:
            assert (await again.overview(0)).total == 0  # nothing half-stored

    try:
        run(go())
    finally:
        if holder is not None:
            holder.close()


def test_an_in_memory_store_shares_its_one_connection_with_the_helpers(run):
    async def go():
        backend = SQLiteBackend(":memory:")
        async with TaskQueue(backend) as queue:
            heartbeat = backend.start_heartbeat("w", 0.05)
            ids = await queue.map(taskfuncs.echo, range(3 * OFFLOAD_ROWS))
            infos = await queue.statuses(ids)
            overview = await queue.overview(5)
            heartbeat.stop()
        assert len(infos) == len(ids) and overview.counts["pending"] == len(ids)
        assert [info.task_id for info in overview.recent] == ids[::-1][:5]

    run(go())


class CountingBackend(SQLiteBackend):
    """Counts the result lookups get_result makes: one per wake-up."""

    lookups = 0

    async def fetch_result(self, task_id):
        self.lookups += 1
        return await super().fetch_result(task_id)


def test_an_idle_worker_and_a_waiter_in_one_process_do_not_wake_each_other(db_path, run):
    async def go():
        backend = CountingBackend(db_path)
        async with TaskQueue(backend) as queue:
            later = await queue.enqueue(taskfuncs.echo, 1, eta=dt.timedelta(hours=1))
            worker = sitq.Worker(backend, poll_interval=0.1)
            running = asyncio.ensure_future(worker.start())
            assert await queue.get_result(later, timeout=0.5) is None  # the worker polls 5 times meanwhile
            await worker.stop()
            await running
        return backend.lookups

    assert run(go()) < 20  # at most once per poll of the worker (about 5), not by every read
