"""Opening a file: check before changing anything, read-only looks, upgrades, and racing creators.

Real files and real processes: another application's database must come out of a
sitq open byte for byte the same, ``sitq status`` must never write, an older sitq's
file is upgraded in place with its tasks, and processes that open one brand-new
file at the same moment all succeed.
"""

import hashlib
import multiprocessing
import sqlite3
import subprocess

import pytest
import taskfuncs
from conftest import sitq_command, worker_env

from sitq import BackendError, SQLiteBackend, TaskQueue
from sitq.backends.sqlite import APPLICATION_ID, SCHEMA_VERSION


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_beside(path) -> list:
    return sorted(p.name for p in path.parent.iterdir())


def foreign_database(path, *, application_id=0):
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.execute("INSERT INTO notes VALUES ('keep me')")
    if application_id:
        conn.execute(f"PRAGMA application_id = {application_id}")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("application_id", [0, 0x12345678], ids=["no-app-id", "other-app-id"])
def test_a_foreign_file_comes_out_unchanged(db_path, run, application_id):
    foreign_database(db_path, application_id=application_id)
    before = digest(db_path)

    async def open_it():
        async with TaskQueue(SQLiteBackend(db_path)) as queue:
            await queue.enqueue(taskfuncs.add, 1, 2)

    with pytest.raises(BackendError, match="did not create|another application"):
        run(open_it())
    status = subprocess.run(sitq_command("status", str(db_path)), capture_output=True, text=True, env=worker_env())
    assert status.returncode == 1
    assert "did not create" in status.stderr or "another application" in status.stderr
    assert digest(db_path) == before
    assert files_beside(db_path) == ["tasks.db"]  # no -wal or -shm: it was never switched to WAL
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    conn.close()


def test_status_never_writes_to_a_sitq_file(db_path, run):
    async def fill():
        async with TaskQueue(SQLiteBackend(db_path)) as queue:
            return await queue.map(taskfuncs.add, range(5), range(5))

    ids = run(fill())
    before = digest(db_path)
    db_path.chmod(0o400)  # even a file nobody may write to can be looked at
    try:
        status = subprocess.run(
            sitq_command("status", str(db_path)), capture_output=True, text=True, env=worker_env()
        )
    finally:
        db_path.chmod(0o600)
    assert status.returncode == 0, status.stderr
    assert "5 tasks" in status.stdout and ids[-1][-8:] in status.stdout
    assert digest(db_path) == before


def test_status_of_a_missing_file_creates_nothing(tmp_path):
    target = tmp_path / "typo.db"
    status = subprocess.run(sitq_command("status", str(target)), capture_output=True, text=True, env=worker_env())
    assert status.returncode == 1 and "no sitq database" in status.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_backend_refuses_writes_with_a_clear_error(db_path, run):
    async def go():
        async with TaskQueue(SQLiteBackend(db_path)) as queue:
            await queue.enqueue(taskfuncs.add, 1, 2)
        async with TaskQueue(SQLiteBackend(db_path, read_only=True)) as queue:
            assert (await queue.overview()).counts["pending"] == 1
            await queue.enqueue(taskfuncs.add, 3, 4)

    with pytest.raises(BackendError, match="read-only"):
        run(go())


# An sitq 0.1 file (schema version 1), as that release wrote it.
VERSION_1_SCHEMA = """
CREATE TABLE sitq_tasks (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, name TEXT NOT NULL, status TEXT NOT NULL,
    func BLOB NOT NULL, args BLOB NOT NULL, signature BLOB, max_attempts INTEGER NOT NULL DEFAULT 1,
    cancel_requested INTEGER NOT NULL DEFAULT 0, eta REAL NOT NULL, enqueued_at REAL NOT NULL,
    started_at REAL, finished_at REAL, attempts INTEGER NOT NULL DEFAULT 0, worker_id TEXT,
    lease_until REAL, value BLOB, error TEXT, traceback TEXT, output TEXT, progress_done REAL,
    progress_total REAL, progress_message TEXT
);
CREATE INDEX sitq_tasks_state ON sitq_tasks (status, eta, seq);
CREATE INDEX sitq_tasks_leases ON sitq_tasks (worker_id, lease_until) WHERE status = 'running';
"""


def test_a_version_1_file_is_upgraded_with_its_tasks(db_path, run):
    import pickle
    import time

    conn = sqlite3.connect(db_path)
    conn.executescript(VERSION_1_SCHEMA)
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute("PRAGMA user_version = 1")
    args = pickle.dumps(((2, 3), {}))
    conn.execute(
        "INSERT INTO sitq_tasks (id, name, status, func, args, eta, enqueued_at) VALUES (?, ?, 'pending', ?, ?, ?, ?)",
        ("old-task", "add", pickle.dumps(taskfuncs.add), args, time.time(), time.time()),
    )
    conn.commit()
    conn.close()

    status = subprocess.run(sitq_command("status", str(db_path)), capture_output=True, text=True, env=worker_env())
    assert status.returncode == 0 and "old-task" in status.stdout  # read as it is ...
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA user_version").fetchone() == (1,)  # ... and not upgraded by a look
    conn.close()

    drained = subprocess.run(
        sitq_command("worker", str(db_path), "--drain", "--quiet"), capture_output=True, text=True, env=worker_env()
    )
    assert drained.returncode == 0, drained.stderr

    async def result():
        async with TaskQueue(SQLiteBackend(db_path)) as queue:
            found = await queue.get_result("old-task", timeout=0)
            return found.status, queue.deserialize_result(found)

    assert run(result()) == ("success", 5)
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    conn.close()


def test_a_version_3_file_is_read_as_it_is_and_gets_its_index_when_written_to(db_path, run):
    async def enqueue():
        async with TaskQueue(SQLiteBackend(db_path)) as queue:
            return await queue.enqueue(taskfuncs.add, 2, 3)

    task_id = run(enqueue())
    conn = sqlite3.connect(db_path)
    conn.execute("DROP INDEX sitq_loose")
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()

    def version_and_index():
        conn = sqlite3.connect(db_path)
        try:
            return conn.execute("PRAGMA user_version").fetchone()[0], conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE name = 'sitq_loose'").fetchone()[0]
        finally:
            conn.close()

    status = subprocess.run(sitq_command("status", str(db_path)), capture_output=True, text=True, env=worker_env())
    assert status.returncode == 0 and task_id[-8:] in status.stdout
    assert version_and_index() == (3, 0)  # a look changes nothing
    run(enqueue())
    assert version_and_index() == (SCHEMA_VERSION, 1)


def race_to_create(folder, rounds, barrier, errors):
    """In a process of its own: each round, open the same new file together with the other racers."""
    import asyncio

    async def enqueue(path):
        async with TaskQueue(SQLiteBackend(path)) as queue:
            await queue.enqueue(taskfuncs.add, 1, 2)

    for round_number in range(rounds):
        barrier.wait(timeout=60)
        try:
            asyncio.run(enqueue(f"{folder}/race-{round_number}.db"))
        except Exception as exc:
            errors.put(f"round {round_number}: {exc}")


def test_processes_creating_one_new_file_at_once_all_succeed(tmp_path):
    """Journal mode and schema set-up wait for each other like any other lock (before, about
    one open in twelve failed with "database is locked" in this race)."""
    context = multiprocessing.get_context("spawn")
    racers, rounds = 4, 60
    barrier, errors = context.Barrier(racers), context.Queue()
    processes = [
        context.Process(target=race_to_create, args=(str(tmp_path), rounds, barrier, errors)) for _ in range(racers)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=100)
    assert [process.exitcode for process in processes] == [0] * racers
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert failures == []
    for round_number in range(rounds):
        conn = sqlite3.connect(tmp_path / f"race-{round_number}.db")
        assert conn.execute("SELECT count(*) FROM sitq_tasks").fetchone() == (racers,)
        conn.close()
