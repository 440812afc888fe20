"""Runs of short tasks cost neither latency nor fairness, with real ``sitq worker`` processes.

A worker whose recent tasks were very short claims them in runs (one store round for many
tasks). A result is never held back for the rest of its run, and when a task of a run turns
out slow, the tasks behind it are handed back to the store for another worker. Gates (a file
a task waits for) make the slow task as slow as the test needs, so nothing here depends on
timing: the tasks behind the gate can only finish if the worker handed them back.
"""

import signal
import subprocess
import time

import taskfuncs
from conftest import sitq_command, worker_env

from sitq import SyncTaskQueue


def start_worker(db):
    return subprocess.Popen(sitq_command("worker", str(db), "--quiet", "-c", "1", "--poll-interval", "0.1"),
                            env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def wait_until(condition, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)
    return value


def warmed_worker(queue, db):
    """A worker that has run enough no-ops to claim its tasks in runs."""
    worker = start_worker(db)
    warm = queue.map(taskfuncs.echo, range(200))
    wait_until(lambda: all(i.finished for i in queue.statuses(warm).values()), "the warm-up ran")
    return worker


def test_a_result_is_stored_while_a_slow_task_of_its_run_still_runs(db_path, tmp_path):
    gate = tmp_path / "gate"
    with SyncTaskQueue(db_path) as queue:
        worker = warmed_worker(queue, db_path)
        try:
            fast, slow = queue.map(taskfuncs.wait_for_file_if, [0, 1], [1, 1], [str(gate)] * 2)
            result = queue.get_result(fast, timeout=30)
            assert result is not None and result.status == "success"
            info = queue.status(slow)
            assert info.status == "running" and info.worker_id == queue.status(fast).worker_id  # one run
        finally:
            gate.touch()
            stop(worker)


def test_the_tasks_behind_a_slow_one_are_handed_back_to_an_idle_worker(db_path, tmp_path):
    gate = tmp_path / "gate"
    with SyncTaskQueue(db_path) as queue:
        first = warmed_worker(queue, db_path)
        second = None
        try:
            ids = queue.map(taskfuncs.wait_for_file_if, range(31), [0] * 31, [str(gate)] * 31)
            wait_until(lambda: queue.status(ids[0]).status == "running", "the slow task started")
            second = start_worker(db_path)
            # The first worker is stuck at the gate; only the second can run the rest.
            wait_until(lambda: all(i.finished for i in queue.statuses(ids[1:]).values()), "the rest ran")
            runners = {i.worker_id for i in queue.statuses(ids[1:]).values()}
            assert queue.status(ids[0]).status == "running"
            assert queue.status(ids[0]).worker_id not in runners
            assert {i.attempts for i in queue.statuses(ids[1:]).values()} == {1}  # a hand-back is no attempt
        finally:
            gate.touch()
            stop(first)
            if second is not None:
                stop(second)
        assert queue.value(ids[0], timeout=30) == 0
