"""The sitq command, run as users run it."""

import json
import shutil
import subprocess
import time
import uuid

import pytest
import taskfuncs
from conftest import sitq_command, worker_env

import sitq as sitq_package
from sitq import SQLiteBackend, SyncTaskQueue


def sitq(*args, cwd=None, timeout=120, columns=80):
    env = worker_env() | {"COLUMNS": str(columns)}
    return subprocess.run(sitq_command(*args), capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


@pytest.fixture
def finished_queue(db_path):
    """A store with one success, one failure, one pending task and one cancelled, by name."""
    with SyncTaskQueue(db_path) as queue:
        ids = {"ok": queue.enqueue(taskfuncs.add, 2, 3), "boom": queue.enqueue(taskfuncs.fail, "it broke")}
    assert sitq("worker", str(db_path), "--drain").returncode == 0
    with SyncTaskQueue(db_path) as queue:
        ids["later"] = queue.enqueue(taskfuncs.add, 1, 1)
        ids["cancelled"] = queue.enqueue(taskfuncs.add, 1, 2)
        queue.cancel(ids["cancelled"])
    return db_path, ids


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
    # Both fit an 80-column terminal, show short ids, and the demo ends on a summary, not an empty table.
    for output in (demo.stdout, status.stdout):
        assert max(len(line) for line in output.splitlines()) <= 80, output
    assert "24 tasks ran in" in demo.stdout and "23 succeeded, 1 failed" in demo.stdout
    ids = [line.split()[0] for line in demo.stdout.splitlines() if ": " in line and line[:8].isalnum()]
    assert ids and all(len(i) == 8 for i in ids)


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


def test_version_comes_from_the_package():
    result = sitq("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"sitq {sitq_package.__version__}"


def test_result_prints_a_value_and_exits_0(finished_queue):
    db, ids = finished_queue
    shown = sitq("result", str(db), ids["ok"][-8:])
    assert shown.returncode == 0, shown.stderr
    assert "success" in shown.stdout and "5" in shown.stdout.splitlines()[1]
    as_json = json.loads(sitq("result", str(db), ids["ok"][:16], "--json").stdout)
    assert (as_json["id"], as_json["status"], as_json["value"]) == (ids["ok"], "success", 5)


def test_result_of_a_failure_prints_the_traceback_and_exits_1_with_a_reason(finished_queue):
    db, ids = finished_queue
    shown = sitq("result", str(db), ids["boom"])
    assert shown.returncode == 1
    assert "ValueError: it broke" in shown.stdout and "raise ValueError(message)" in shown.stdout
    assert shown.stderr.strip().splitlines() == [f"sitq: task {ids['boom'][-8:]} failed: ValueError: it broke"]


def test_result_of_an_unfinished_or_unknown_task_says_so_on_one_line(finished_queue):
    db, ids = finished_queue
    pending = sitq("result", str(db), ids["later"])
    assert pending.returncode == 1 and "is pending: it has no result yet" in pending.stderr
    unknown = sitq("result", str(db), "nosuchid")
    assert unknown.returncode == 1 and len(unknown.stderr.strip().splitlines()) == 1
    assert "no task id is, begins or ends with 'nosuchid'" in unknown.stderr


def test_cancel_says_what_it_did_to_each_task(finished_queue):
    db, ids = finished_queue
    cancel = sitq("cancel", str(db), ids["later"][-8:], ids["ok"][-8:], "nosuchid")
    assert cancel.returncode == 1  # one id named no task
    lines = cancel.stdout.splitlines()
    assert lines == [f"{ids['later'][-8:]} cancelled: it will not run",
                     f"{ids['ok'][-8:]} had finished already: nothing changed"]
    with SyncTaskQueue(db) as queue:
        assert queue.status(ids["later"]).status == "cancelled"


def test_retry_failed_runs_the_failures_again(finished_queue):
    db, ids = finished_queue
    retry = sitq("retry", str(db), "--failed")
    assert retry.returncode == 0 and retry.stdout.strip() == "1 failed task(s) retried"
    with SyncTaskQueue(db) as queue:
        assert queue.status(ids["boom"]).status == "pending"
    one = sitq("retry", str(db), ids["cancelled"], ids["ok"])
    assert one.stdout.splitlines() == [f"{ids['cancelled'][-8:]} retried: pending again",
                                       f"{ids['ok'][-8:]} had succeeded: nothing to retry"]
    assert sitq("retry", str(db)).returncode == 1  # neither ids nor --failed


def test_purge_deletes_finished_tasks_only_and_reports_what_went(finished_queue):
    db, ids = finished_queue
    dry = sitq("purge", str(db), "--dry-run")
    assert dry.returncode == 0 and dry.stdout.startswith("would delete 3 finished task(s)")
    assert sitq("purge", str(db), "--older-than", "1d").stdout.startswith("deleted 0 finished task(s)")
    gone = sitq("purge", str(db), "--status", "success,failed")
    assert gone.stdout.startswith("deleted 2 finished task(s)")
    with SyncTaskQueue(db) as queue:
        assert {i.status for i in queue.list_tasks()} == {"pending", "cancelled"}
    bad = sitq("purge", str(db), "--status", "pending")
    assert bad.returncode == 2 and "never purged" in bad.stderr
    assert sitq("purge", str(db), "--older-than", "soon").returncode == 2


def test_status_json_is_for_scripts(finished_queue):
    db, ids = finished_queue
    overview = json.loads(sitq("status", str(db), "--json").stdout)
    assert overview["counts"] == {"waiting": 0, "pending": 1, "running": 0, "success": 1, "failed": 1, "cancelled": 1}
    assert [f["id"] for f in overview["failures"]] == [ids["boom"]]
    assert overview["queues"]["default"]["success"] == 1


def test_a_worker_takes_queue_names_and_refuses_bad_ones(db_path):
    assert sitq("worker", str(db_path), "--queue", "a,,b").returncode == 2
    assert "queue name" in sitq("worker", str(db_path), "--queue", "a b").stderr


@pytest.mark.skipif(shutil.which("tmux") is None, reason="the live board is driven in tmux, which is not installed")
def test_status_watch_redraws_as_tasks_move(db_path):
    with SyncTaskQueue(db_path) as queue:
        queue.enqueue(taskfuncs.add, 1, 1)
    session = f"sitq-watch-{uuid.uuid4().hex[:8]}"
    command = " ".join(sitq_command("status", str(db_path), "--watch", "--interval", "0.1"))
    env = " ".join(f"{k}={v}" for k, v in worker_env().items() if k == "PYTHONPATH")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "40", f"env {env} {command}"],
                   check=True)

    def screen():
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout

    def wait_for(text):
        deadline = time.monotonic() + 30
        while text not in (shown := screen()):
            assert time.monotonic() < deadline, shown
            time.sleep(0.05)
        return shown

    try:
        wait_for("pending 1")
        assert sitq("worker", str(db_path), "--drain").returncode == 0
        shown = wait_for("success 1")
        assert "pending 0" in shown and "watching" in shown
        assert max(len(line.rstrip()) for line in shown.splitlines()) <= 80
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
