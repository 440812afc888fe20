"""The sitq command, run as users run it."""

import subprocess

import pytest
import taskfuncs
from conftest import sitq_command, worker_env

from sitq import SQLiteBackend, SyncTaskQueue


def sitq(*args, cwd=None, timeout=120):
    return subprocess.run(
        sitq_command(*args), capture_output=True, text=True, cwd=cwd, env=worker_env(), timeout=timeout
    )


def test_demo_runs_its_tasks_and_leaves_the_database_for_status(tmp_path):
    demo = sitq("demo", cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    assert "Enqueued 24 tasks" in demo.stdout
    assert "sitq.demo.count_primes: 78498" in demo.stdout
    assert "ZeroDivisionError: division by zero" in demo.stdout
    assert "ratio = a / b" in demo.stdout  # the failing line, from the remote traceback
    status = sitq("status", "sitq-demo.db", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "24 tasks" in status.stdout and "success 23" in status.stdout and "failed 1" in status.stdout


def test_status_of_a_missing_file_says_so_and_creates_nothing(tmp_path):
    status = sitq("status", "nothing.db", cwd=tmp_path)
    assert status.returncode == 1
    assert "there is no sitq database at 'nothing.db'" in status.stderr
    assert not (tmp_path / "nothing.db").exists()


def test_worker_drain_runs_what_was_enqueued(tmp_path):
    db = tmp_path / "q.db"
    with SyncTaskQueue(SQLiteBackend(db)) as queue:
        ids = queue.map(taskfuncs.add, range(20), range(20))
    worker = sitq("worker", str(db), "--drain", "-c", "3")
    assert worker.returncode == 0, worker.stderr
    assert "worker stopped after 20 task(s), 0 failed" in worker.stderr
    with SyncTaskQueue(SQLiteBackend(db)) as queue:
        assert [queue.value(i, timeout=0) for i in ids] == [2 * i for i in range(20)]


@pytest.mark.parametrize("args", [["worker"], ["worker", "x.db", "--concurrency", "0"], ["bogus"]])
def test_misuse_gets_a_usage_message(tmp_path, args):
    result = sitq(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "usage: sitq" in result.stderr


def test_no_command_prints_help(tmp_path):
    result = sitq(cwd=tmp_path)
    assert result.returncode == 2 and "worker" in result.stdout and "demo" in result.stdout
