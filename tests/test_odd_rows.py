"""Rows sitq did not write: a worker fails just those tasks, naming the column; readers show them.

SQLite lets any value into any column. These tests put such values into rows with the sqlite3
module, as a hand edit or another program would, then run real ``sitq worker`` and ``sitq
status`` processes on the file.
"""

import signal
import sqlite3
import subprocess
import time

import pytest
import taskfuncs
from conftest import sitq_command, worker_env

from sitq import SQLiteBackend, SyncTaskQueue
from sitq.errors import BackendError, SerializationError
from sitq.notebook.render import board_html, result_html, task_html
from sitq.notebook.rows import task_row

KEY = "a key of at least sixteen bytes"
NOT_SITQS = "it was not written by sitq, or was changed by hand"

# How each bad row is made (the SET clause of an UPDATE) and what its task's error must say.
BAD_ROWS = {
    "signature stored as text": (
        "signature = 'not bytes'",
        "has text 'not bytes' in column 'signature' where sitq stores bytes (or NULL)",
    ),
    "signature stored as a number": ("signature = 7", "has the number 7 in column 'signature'"),
    "function stored as text": ("func = 'print'", "has text 'print' in column 'func' where sitq stores bytes;"),
    "arguments stored as a number": ("args = 2.5", "has the number 2.5 in column 'args'"),
    "id stored as bytes": ("id = x'0102'", "has bytes in column 'id' where sitq stores text;"),
    "name that is not UTF-8": ("name = CAST(x'ff' AS TEXT)", "has text that is not valid UTF-8 in column 'name'"),
    "name stored as bytes": ("name = x'6162'", "has bytes in column 'name'"),
    "eta stored as text": ("eta = 'tomorrow'", "has text 'tomorrow' in column 'eta' where sitq stores a time"),
    "eta stored as bytes": ("eta = x'00'", "has bytes in column 'eta'"),
}


def edit(db, sql, *params):
    """Change the file as a hand edit would, with the sqlite3 module."""
    conn = sqlite3.connect(db, timeout=30)
    try:
        with conn:
            conn.execute(sql, params)
    finally:
        conn.close()


def query(db, sql, *params):
    conn = sqlite3.connect(db, timeout=30)
    conn.text_factory = bytes  # read back whatever is there, valid UTF-8 or not
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def seq_of(db, task_id):
    return query(db, "SELECT seq FROM sitq_tasks WHERE id = ?", task_id)[0][0]


def sitq(*args, env=None, timeout=120):
    return subprocess.run(
        sitq_command(*args), env=env or worker_env(), capture_output=True, text=True, timeout=timeout
    )


def wait_until(condition, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)
    return value


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_a_worker_fails_only_the_rows_sitq_did_not_write_and_names_their_columns(tmp_path, signed):
    db = tmp_path / "tasks.db"
    good, bad = {}, {}
    with SyncTaskQueue(SQLiteBackend(db), secret_key=KEY if signed else None) as queue:
        for i, shape in enumerate(BAD_ROWS):  # good and bad tasks interleaved, so they are claimed together
            good[queue.enqueue(taskfuncs.add, i, i)] = 2 * i
            bad[shape] = seq_of(db, queue.enqueue(taskfuncs.add, 1, 1))
        more = queue.map(taskfuncs.add, range(10), range(10))
        good.update((task_id, 2 * i) for i, task_id in enumerate(more))
    for shape, seq in bad.items():
        edit(db, f"UPDATE sitq_tasks SET {BAD_ROWS[shape][0]} WHERE seq = ?", seq)

    env = worker_env()
    env.pop("SITQ_SECRET_KEY", None)
    if signed:
        env["SITQ_SECRET_KEY"] = KEY
    drain = sitq("worker", str(db), "--drain", "--quiet", "--concurrency", "4", env=env)
    assert drain.returncode == 0, drain.stderr
    assert "Traceback" not in drain.stderr, drain.stderr

    for shape, seq in bad.items():
        ((status, error),) = query(db, "SELECT status, error FROM sitq_tasks WHERE seq = ?", seq)
        error = error.decode()
        assert status == b"failed", shape
        assert error.startswith("BackendError: the stored row of this task "), (shape, error)
        assert BAD_ROWS[shape][1] in error and NOT_SITQS in error, (shape, error)
    with SyncTaskQueue(SQLiteBackend(db), secret_key=KEY if signed else None) as queue:
        assert {task_id: queue.value(task_id, timeout=0) for task_id in good} == good
    assert query(db, "SELECT count(*) FROM sitq_tasks WHERE status IN ('pending', 'running')") == [(0,)]

    status = sitq("status", str(db), "--limit", "50")
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
    assert f"failed {len(BAD_ROWS)}" in status.stdout and f"success {len(good)}" in status.stdout


# Values readers meet (the SET clause of an UPDATE), none of which a worker ever reads.
ODD_VALUES = {
    "unknown status": "status = 'archived'",
    "status that looks like markup": "status = '[red]oops'",
    "status stored as bytes": "status = x'01'",
    "progress that is not a number": (
        "status = 'running', progress_done = 'half', progress_total = x'00', progress_message = x'02'"
    ),
    "times that are not times": "status = 'success', enqueued_at = 'monday', started_at = x'03', finished_at = 1e300",
    "attempts that are not a number": "status = 'failed', attempts = 'many'",
    "error that is not UTF-8": "status = 'failed', error = CAST(x'ff' AS TEXT), traceback = x'04', output = x'05'",
    "value stored as text": "status = 'success', value = 'not a pickle'",
    "name and id that look like markup": "name = '[bold]x[/bold]', id = '[/]'",
}


def test_readers_show_odd_values_and_never_fail_on_them(tmp_path):
    db = tmp_path / "tasks.db"
    with SyncTaskQueue(SQLiteBackend(db)) as queue:
        seqs = {shape: seq_of(db, queue.enqueue(taskfuncs.add, 1, 2)) for shape in ODD_VALUES}
    for shape, seq in seqs.items():
        edit(db, f"UPDATE sitq_tasks SET {ODD_VALUES[shape]} WHERE seq = ?", seq)
    ids = {
        shape: query(db, "SELECT id FROM sitq_tasks WHERE seq = ?", seq)[0][0].decode() for shape, seq in seqs.items()
    }

    status = sitq("status", str(db), "--limit", "50", env={**worker_env(), "COLUMNS": "250"})
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
    for shown in ("archived 1", "[red]oops 1", "b'\\x01' 1", "[bold]x[/bold]", "[/]"):
        assert shown in status.stdout, (shown, status.stdout)

    with SyncTaskQueue(SQLiteBackend(db)) as queue:
        overview = queue.overview(50)
        assert overview.counts["archived"] == 1 and overview.counts["[red]oops"] == 1 and overview.total == len(seqs)
        infos = queue.statuses(list(ids.values()))
        assert set(infos) == set(ids.values())
        progress = infos[ids["progress that is not a number"]]
        assert (progress.progress_done, progress.progress_total, progress.progress_message) == (None, None, "b'\\x02'")
        times = infos[ids["times that are not times"]]
        assert times.enqueued_at is None and times.started_at is None and times.finished_at is None
        assert infos[ids["attempts that are not a number"]].attempts is None
        assert infos[ids["error that is not UTF-8"]].error == "\ufffd"

        for shape in ("unknown status", "status that looks like markup", "status stored as bytes"):
            with pytest.raises(BackendError, match="in column 'status', a status sitq does not write"):
                queue.get_result(ids[shape])  # no timeout: it must not wait for ever
        with pytest.raises(BackendError, match="has 'archived' in column 'status'"):
            queue.value(ids["unknown status"], timeout=0)
        with pytest.raises(SerializationError, match="has text in column 'value' where sitq stores bytes"):
            queue.value(ids["value stored as text"])
        shapes = ("times that are not times", "error that is not UTF-8")
        results = [queue.get_result(ids[shape], timeout=0) for shape in shapes]

    # the notebook's views draw them too
    html = board_html(overview.counts, [task_row(info) for info in overview.recent])
    assert "archived" in html and "[red]oops" in html
    assert all(task_html(task_row(info)) for info in infos.values())
    assert all("sitq-result" in result_html(result) for result in results)


@pytest.mark.parametrize("lease", ["'never'", "NULL", "x'00'"])
def test_a_running_task_whose_lease_is_not_a_time_is_taken_over(tmp_path, lease):
    """A task marked running by hand, with no lease that ever expires, would wait for ever."""
    db = tmp_path / "tasks.db"
    with SyncTaskQueue(SQLiteBackend(db)) as queue:
        task_id = queue.enqueue(taskfuncs.add, 2, 3)
    edit(
        db,
        f"UPDATE sitq_tasks SET status = 'running', worker_id = 'gone:1:abc', attempts = 1, "
        f"started_at = eta, lease_until = {lease} WHERE id = ?",
        task_id,
    )
    drain = sitq("worker", str(db), "--drain", "--quiet")
    assert drain.returncode == 0 and "Traceback" not in drain.stderr, drain.stderr
    with SyncTaskQueue(SQLiteBackend(db)) as queue:
        result = queue.get_result(task_id, timeout=0)
        assert result.status == "success" and result.attempts == 2
        assert queue.deserialize_result(result) == 5
    assert "had a stored lease that is not a time" in drain.stderr


def test_a_running_worker_outlives_a_task_that_is_never_due(tmp_path):
    """A pending task whose eta is not a time used to stop a waiting worker (it asks for the next eta)."""
    db = tmp_path / "tasks.db"
    with SyncTaskQueue(SQLiteBackend(db)) as queue:
        never = queue.enqueue(taskfuncs.add, 1, 1)
        edit(db, "UPDATE sitq_tasks SET eta = 'someday' WHERE id = ?", never)
        stderr_path = tmp_path / "worker.err"
        with open(stderr_path, "w") as stderr:
            worker = subprocess.Popen(
                sitq_command("worker", str(db), "--quiet", "--poll-interval", "0.05", "--lease", "0.6"),
                env=worker_env(),
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        try:
            result = queue.get_result(never, timeout=60)
            assert result is not None and result.status == "failed"
            assert "has text 'someday' in column 'eta'" in result.error
            later = queue.enqueue(taskfuncs.add, 20, 22)
            assert queue.value(later, timeout=60) == 42  # the worker is still there
        finally:
            worker.send_signal(signal.SIGTERM)
            code = worker.wait(timeout=30)
        assert code == 0, stderr_path.read_text()
        assert "Traceback" not in stderr_path.read_text()
