"""The operations with real ``sitq worker`` processes on real files: a reduce after a map,
enqueueing once, schedules with several workers, named queues and priorities, retention."""

import datetime as dt
import os
import signal
import sqlite3
import subprocess
import time

import pytest
import taskfuncs
from conftest import sitq_command, worker_env

import sitq
from sitq import InvalidTaskError, SyncTaskQueue
from sitq.backends.rules import key_group_id, schedule_task_id


def drain(db, *options, timeout=120):
    worker = subprocess.run(sitq_command("worker", str(db), "--drain", "--quiet", *options),
                            env=worker_env(), capture_output=True, text=True, timeout=timeout)
    assert worker.returncode == 0, worker.stderr
    return worker


def start_worker(db, *options):
    return subprocess.Popen(sitq_command("worker", str(db), "--quiet", "--poll-interval", "0.1", *options),
                            env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def wait_until(condition, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)
    return value


def test_a_reduce_after_a_map_runs_once_every_item_succeeded(db_path):
    with SyncTaskQueue(db_path) as queue:
        ids = queue.map(taskfuncs.add, range(20), range(20))
        reduce = queue.enqueue(sitq.task(taskfuncs.sum_results, after=ids), str(db_path), ids)
        assert queue.status(reduce).status == "waiting"
    drain(db_path, "-c", "4")
    with SyncTaskQueue(db_path) as queue:
        assert queue.value(reduce, timeout=0) == sum(2 * i for i in range(20))
        last = max(queue.statuses(ids).values(), key=lambda i: i.finished_at)
        assert queue.status(reduce).started_at >= last.finished_at


def test_a_reduce_after_a_failed_item_is_cancelled_and_names_it(db_path):
    with SyncTaskQueue(db_path) as queue:
        ids = queue.map(taskfuncs.divide, [1, 2, 3], [1, 0, 1])
        reduce = queue.enqueue(sitq.task(taskfuncs.total, after=ids), [])
    drain(db_path)
    with SyncTaskQueue(db_path) as queue:
        result = queue.get_result(reduce, timeout=0)
        assert result.status == "cancelled"
        assert ids[1] in result.error and "failed" in result.error
        with pytest.raises(sitq.TaskCancelledError):
            queue.value(reduce, timeout=0)


def test_a_keyed_task_runs_once_however_often_the_cell_runs(db_path, tmp_path):
    log = tmp_path / "runs.txt"
    keyed = sitq.task(taskfuncs.record, key="load-2024")
    with SyncTaskQueue(db_path) as queue:
        first = queue.enqueue(keyed, str(log), "x")
        assert queue.enqueue(keyed, str(log), "x") == first
    drain(db_path)
    with SyncTaskQueue(db_path) as queue:
        assert queue.enqueue(keyed, str(log), "x") == first  # succeeded: still the same task
        assert queue.value(first, timeout=0) == "x"
    drain(db_path)
    assert len(log.read_text().splitlines()) == 1


def test_a_keyed_map_run_again_returns_the_same_ids_and_reruns_only_its_failures(db_path, tmp_path):
    with SyncTaskQueue(db_path) as queue:
        ids = queue.map(taskfuncs.divide, [1, 2, 3], [1, 0, 1], key="ratios")
    drain(db_path)
    with SyncTaskQueue(db_path) as queue:
        group = queue.group(key_group_id("ratios"))
        assert (group.counts["success"], group.counts["failed"]) == (2, 1)
        again = queue.map(taskfuncs.divide, [1, 2, 3], [1, 2, 1], key="ratios")  # the failing item fixed
        assert again == ids
        assert [queue.status(i).status for i in ids] == ["success", "pending", "success"]
    drain(db_path)
    with SyncTaskQueue(db_path) as queue:
        assert [queue.value(i, timeout=0) for i in ids] == [1.0, 1.0, 3.0]
        assert queue.group(key_group_id("ratios")).total == 3


def test_two_workers_enqueue_each_tick_of_a_schedule_once(db_path, tmp_path):
    log = tmp_path / "ticks.txt"
    with SyncTaskQueue(db_path) as queue:
        queue.schedule(taskfuncs.tick, every=1.0, args=(str(log),), start=dt.timedelta(0), name="beat")
    conn = sqlite3.connect(db_path)
    (first,) = conn.execute("SELECT next_run FROM sitq_schedules").fetchone()  # the tick's exact time
    conn.close()
    workers = [start_worker(db_path, "-c", "2") for _ in range(2)]
    try:
        wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= 4, "four ticks ran", timeout=60)
    finally:
        for proc in workers:
            stop(proc)
    with SyncTaskQueue(db_path) as queue:
        tasks = queue.list_tasks(limit=1000)
        (info,) = queue.schedules()
    # Each task is one tick of the schedule (its id says which), and each ran exactly once.
    possible = {schedule_task_id("beat", first + k * 1.0): k for k in range(120)}
    assert all(t.task_id in possible for t in tasks), [t.task_id for t in tasks]
    assert len(log.read_text().splitlines()) == len(tasks) >= 4
    assert info.next_run.timestamp() > info.last_run.timestamp()


def test_a_schedule_declared_again_keeps_its_next_run_and_a_bad_one_is_refused(db_path):
    with SyncTaskQueue(db_path) as queue:
        first = queue.schedule(taskfuncs.echo, cron="0 9 * * 1-5", tz="Europe/Berlin", args=(1,))
        again = queue.schedule(taskfuncs.echo, cron="0 9 * * 1-5", tz="Europe/Berlin", args=(2,))
        assert again.next_run == first.next_run and again.name == "taskfuncs.echo"
        assert first.next_run.astimezone(dt.timezone(dt.timedelta(hours=1))).hour in (8, 9)
        with pytest.raises(InvalidTaskError, match="cron expression"):
            queue.schedule(taskfuncs.echo, cron="every day at nine")
        with pytest.raises(InvalidTaskError, match="time zone"):
            queue.schedule(taskfuncs.echo, every=60, tz="Mars/Olympus")
        with pytest.raises(InvalidTaskError, match="one of them"):
            queue.schedule(taskfuncs.echo, every=60, cron="* * * * *")
        assert queue.unschedule("taskfuncs.echo") and not queue.unschedule("taskfuncs.echo")


def test_a_worker_serves_only_its_queues_and_runs_higher_priority_first(db_path, tmp_path):
    log = tmp_path / "order.txt"
    with SyncTaskQueue(db_path) as queue:
        queue.enqueue(sitq.task(taskfuncs.record, queue="gpu"), str(log), "gpu")
        for i in range(3):
            queue.enqueue(taskfuncs.record, str(log), f"low{i}")
        queue.enqueue(sitq.task(taskfuncs.record, priority=10), str(log), "urgent")
    drain(db_path, "--queue", "default")
    assert log.read_text().split()[::2] == ["urgent", "low0", "low1", "low2"]
    with SyncTaskQueue(db_path) as queue:
        overview = queue.overview()
        assert overview.queues["gpu"]["pending"] == 1 and overview.queues["default"]["success"] == 4
    drain(db_path, "--queue", "gpu,other")
    assert log.read_text().split()[-2] == "gpu"


def test_a_running_worker_deletes_tasks_past_their_retention_and_the_file_gives_space_back(db_path):
    blob = os.urandom(50_000)
    with SyncTaskQueue(db_path, retention=dt.timedelta(seconds=0.2)) as queue:
        kept = queue.enqueue(sitq.task(taskfuncs.echo, retention=None), "kept")
        queue.map(taskfuncs.echo, [blob] * 200)
    size_full = None
    worker = start_worker(db_path, "-c", "4", "--prune-interval", "0.2")
    try:
        with SyncTaskQueue(db_path) as queue:
            wait_until(lambda: queue.overview().counts["success"] >= 1, "tasks ran")
            size_full = os.path.getsize(db_path)
            wait_until(lambda: queue.overview().total == 1, "the expired tasks were deleted")
            assert queue.value(kept, timeout=0) == "kept"
    finally:
        stop(worker)
    assert os.path.getsize(db_path) < size_full / 4  # incremental vacuum gave the pages back


def test_pruning_keeps_up_with_a_backlog_bigger_than_one_prune(db_path):
    """A worker deletes at most PRUNE_LIMIT expired tasks per prune; with more expired, it takes
    the next slice at once rather than a whole prune interval later (an hour here)."""
    from sitq.worker.loop import PRUNE_LIMIT

    backlog = 2 * PRUNE_LIMIT + 100
    with SyncTaskQueue(db_path, retention=0) as queue:
        queue.map(taskfuncs.echo, range(backlog))
    drain(db_path, "-c", "8", "--prune-interval", "3600")  # runs them; its one prune may take a slice
    worker = start_worker(db_path, "--prune-interval", "3600")
    try:
        with SyncTaskQueue(db_path) as queue:
            wait_until(lambda: queue.overview().total == 0, "every expired task was deleted")
    finally:
        stop(worker)


def test_retention_must_be_a_duration():
    with pytest.raises(InvalidTaskError, match="retention"):
        sitq.task(taskfuncs.echo, retention="a week")
    with pytest.raises(InvalidTaskError, match="retention"):
        sitq.TaskQueue("memory://", retention=-1)


def test_the_tasks_of_no_group_are_found_wherever_they_are_and_counted(db_path):
    with SyncTaskQueue(db_path) as queue:
        before = queue.enqueue(taskfuncs.echo, 1)
        group = queue.map(taskfuncs.echo, range(50), group="g")
        after = queue.enqueue(taskfuncs.echo, 2)
        assert [t.task_id for t in queue.list_tasks("pending", ungrouped=True)] == [after, before]
        assert [t.task_id for t in queue.list_tasks(ungrouped=True, newest_first=False, limit=1)] == [before]
        assert queue.count_ungrouped()["pending"] == 2 and len(group) == 50
        with pytest.raises(InvalidTaskError, match="leave queue and group out"):
            queue.list_tasks(ungrouped=True, group="g")
