"""The database file deleted or replaced under a running worker: it stops, and writes to no file.

An open SQLite connection keeps writing to a file that was deleted or renamed over, where no
one will ever see the writes. The worker notices on its periodic schedule and stops with a
clear error instead. These tests run real ``sitq worker`` processes on real files.
"""

import os
import sqlite3
import subprocess
import sys
import time

import pytest
import taskfuncs
from conftest import sitq_command, worker_env

from sitq import SQLiteBackend, SyncTaskQueue

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="Windows does not let an open file be replaced")


def wait_until(condition, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)
    return value


def running(db):
    conn = sqlite3.connect(db, timeout=30)
    try:
        return conn.execute("SELECT count(*) FROM sitq_tasks WHERE status = 'running'").fetchone()[0]
    finally:
        conn.close()


@pytest.mark.parametrize("how", ["deleted", "moved", "replaced"])
def test_a_worker_stops_when_its_database_file_is_deleted_moved_or_replaced(tmp_path, how):
    db = tmp_path / "tasks.db"
    with SyncTaskQueue(SQLiteBackend(db)) as queue:
        queue.map(taskfuncs.sleep_then, [600, 600])  # busy until stopped
    other, moved = tmp_path / "other.db", tmp_path / "old.db"
    with SyncTaskQueue(SQLiteBackend(other)) as queue:
        waiting = queue.enqueue(taskfuncs.add, 1, 2)
    before = other.read_bytes()

    stderr_path = tmp_path / "worker.err"
    with open(stderr_path, "w") as stderr:
        worker = subprocess.Popen(
            sitq_command("worker", str(db), "--concurrency", "3", "--poll-interval", "0.05"),
            env=worker_env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        wait_until(lambda: running(db) == 2, "the worker runs both tasks")
        if how == "deleted":
            os.remove(db)  # rm tasks.db
        elif how == "moved":
            os.rename(db, moved)  # mv tasks.db old.db
        else:
            os.replace(other, db)  # mv other.db tasks.db
        code = worker.wait(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(timeout=30)
    stderr = stderr_path.read_text()
    assert code == 1, stderr
    assert "Traceback" not in stderr, stderr
    what = "replaced by another file" if how == "replaced" else "deleted (or moved away)"
    assert f"sitq: the database file {str(db)!r} was {what} while this worker ran; it stopped" in stderr
    assert "restart it on the file you mean" in stderr

    if how == "replaced":
        # The worker, with a free slot, wrote nothing to the file now at the path: not a byte
        # changed, and the old file's WAL, still named after the path, was emptied so that SQLite
        # does not lay the old file's pages over this one.
        assert db.read_bytes() == before
        with SyncTaskQueue(SQLiteBackend(db)) as queue:
            info = queue.status(waiting)
        assert info.status == "pending" and info.attempts == 0 and info.worker_id is None
    else:
        assert not db.exists()  # and it made no new one
    if how == "moved":  # the file moved away has everything, its tasks still claimed until their lease ends
        with SyncTaskQueue(SQLiteBackend(moved)) as queue:
            overview = queue.overview()
        assert overview.counts["running"] == 2 and all(info.attempts == 1 for info in overview.recent)
