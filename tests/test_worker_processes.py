"""Real worker processes sharing one SQLite file: every task runs exactly once."""

import asyncio
import signal
import subprocess
from collections import Counter

import pytest
import taskfuncs
from conftest import sitq_command, worker_env

from sitq import SQLiteBackend, SyncTaskQueue, TaskQueue


@pytest.mark.parametrize("processes", [2, 3])
def test_worker_processes_drain_1000_tasks_exactly_once(tmp_path, processes, run):
    db = tmp_path / "shared.db"
    log = tmp_path / "executions.log"

    async def enqueue():
        async with TaskQueue(SQLiteBackend(db)) as queue:
            # a few ms each, so that every process gets a share however fast the others start
            return await queue.map(taskfuncs.record, [str(log)] * 1000, range(1000), [0.004] * 1000)

    ids = run(enqueue())
    workers = [
        subprocess.Popen(sitq_command("worker", str(db), "--drain", "--concurrency", "4", "--quiet"), env=worker_env())
        for _ in range(processes)
    ]
    for proc in workers:
        assert proc.wait(timeout=120) == 0

    executions = Counter(line.split()[0] for line in log.read_text().splitlines())
    assert len(executions) == 1000 and set(executions.values()) == {1}
    pids = Counter(line.split()[1] for line in log.read_text().splitlines())
    assert len(pids) >= 2, f"one process did all the work: {pids}"

    async def collect():
        async with TaskQueue(SQLiteBackend(db)) as queue:
            return [await queue.get_result(i, timeout=0) for i in ids]

    results = run(collect())
    assert all(r.status == "success" and r.attempts == 1 for r in results)
    assert sorted(TaskQueue(SQLiteBackend(db)).deserialize_result(r) for r in results) == list(range(1000))


def test_notebook_style_function_runs_in_a_worker_process(tmp_path):
    """A function defined in __main__ (as in a notebook) travels by value to another process."""
    db = tmp_path / "bv.db"
    script = tmp_path / "producer.py"
    script.write_text(
        "import sys\n"
        "from sitq import SyncTaskQueue, SQLiteBackend\n"
        "def shout(word):\n"
        "    return word.upper() + '!'\n"
        "def broken(x):\n"
        "    y = x * 2\n"
        "    return y / 0\n"
        "with SyncTaskQueue(SQLiteBackend(sys.argv[1])) as q:\n"
        "    print(q.enqueue(shout, 'hello'), q.enqueue(broken, 1))\n"
    )
    out = subprocess.run(
        [__import__("sys").executable, str(script), str(db)], capture_output=True, text=True, check=True
    )
    shout_id, broken_id = out.stdout.split()
    worker = subprocess.Popen(sitq_command("worker", str(db), "--quiet"), env=worker_env())
    try:
        with SyncTaskQueue(SQLiteBackend(db)) as queue:
            assert queue.value(shout_id, timeout=30) == "HELLO!"
            failed = queue.get_result(broken_id, timeout=30)
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    assert failed.error == "ZeroDivisionError: division by zero"
    # the source line travelled with the function, so the remote traceback shows it
    assert "producer.py" in failed.traceback and "return y / 0" in failed.traceback


def test_sigterm_lets_the_running_task_finish(tmp_path, run):
    db = tmp_path / "stop.db"

    async def enqueue():
        async with TaskQueue(SQLiteBackend(db)) as queue:
            return await queue.enqueue(taskfuncs.sleep_then, 1.0, "finished")

    task_id = run(enqueue())
    worker = subprocess.Popen(sitq_command("worker", str(db), "--quiet"), env=worker_env())

    async def wait_running():
        async with TaskQueue(SQLiteBackend(db)) as queue:
            while (await queue.status(task_id)).status != "running":
                await asyncio.sleep(0.02)

    run(asyncio.wait_for(wait_running(), 30))
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    with SyncTaskQueue(SQLiteBackend(db)) as queue:
        assert queue.value(task_id, timeout=0) == "finished"


def test_round_trip_to_a_worker_process_needs_no_poll_interval(tmp_path):
    """Results from another process arrive through the change check, not the 30 s poll."""
    db = tmp_path / "rt.db"
    with SyncTaskQueue(SQLiteBackend(db)) as queue:
        worker = subprocess.Popen(
            sitq_command("worker", str(db), "--quiet", "--poll-interval", "30"), env=worker_env()
        )
        try:
            first = queue.enqueue(taskfuncs.add, 1, 1)
            assert queue.value(first, timeout=60) == 2  # the worker has started
            task_id = queue.enqueue(taskfuncs.add, 2, 2)
            assert queue.value(task_id, timeout=20) == 4  # a 30 s poll would miss this
        finally:
            worker.send_signal(signal.SIGINT)
            assert worker.wait(timeout=30) == 0
