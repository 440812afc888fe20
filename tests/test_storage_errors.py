"""A database that cannot be used gives a clear error naming the path, and harms nothing stored."""

import os
import sqlite3
import stat

import pytest
import taskfuncs

from sitq import BackendError, SchemaVersionError, SQLiteBackend, TaskQueue
from sitq.backends.sqlite import APPLICATION_ID


def enqueue(path, run):
    async def go():
        async with TaskQueue(SQLiteBackend(path)) as queue:
            return await queue.enqueue(taskfuncs.add, 1, 2)

    return run(go())


def test_missing_folder_is_named(tmp_path, run):
    path = tmp_path / "no" / "such" / "tasks.db"
    with pytest.raises(BackendError, match=r"folder .*no/such' does not exist"):
        enqueue(path, run)
    assert not (tmp_path / "no").exists()


def test_folder_that_is_a_file_is_named(tmp_path, run):
    (tmp_path / "plain").write_text("x")
    with pytest.raises(BackendError, match="is not a folder"):
        enqueue(tmp_path / "plain" / "tasks.db", run)


def test_folder_that_cannot_be_written_is_named(tmp_path, run):
    if os.geteuid() == 0:
        target = "/proc/sitq-test.db"  # even root cannot create files in /proc
    else:
        folder = tmp_path / "locked"
        folder.mkdir()
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
        target = str(folder / "tasks.db")
    with pytest.raises(BackendError, match=r"cannot open the sitq database .* for writing"):
        enqueue(target, run)


def test_new_files_are_private_to_their_owner(db_path, run):
    async def go():
        async with TaskQueue(SQLiteBackend(db_path)) as queue:
            await queue.enqueue(taskfuncs.add, 1, 2)
            # the write-ahead log and shared-memory files exist while a connection is open
            return {p.name: stat.S_IMODE(p.stat().st_mode) for p in db_path.parent.glob("tasks.db*")}

    assert run(go()) == {"tasks.db": 0o600, "tasks.db-wal": 0o600, "tasks.db-shm": 0o600}


def test_file_that_is_not_a_database(db_path, run):
    db_path.write_bytes(b"this is a text file, not SQLite" * 100)
    with pytest.raises(BackendError, match="not a SQLite database or it is damaged"):
        enqueue(db_path, run)
    assert db_path.read_bytes().startswith(b"this is a text file")  # left as it was


def test_someone_elses_sqlite_database_is_left_alone(db_path, run):
    with sqlite3.connect(db_path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        conn.execute("INSERT INTO invoices (total) VALUES (9.5)")
    conn.close()
    with pytest.raises(BackendError, match="sitq did not create"):
        enqueue(db_path, run)
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT total FROM invoices").fetchall() == [(9.5,)]
        assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name LIKE 'sitq%'").fetchone() == (0,)
    conn.close()


def test_database_from_a_newer_sitq(db_path, run):
    task_id = enqueue(db_path, run)
    with sqlite3.connect(db_path) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(SchemaVersionError, match="newer sitq .*upgrade sitq"):
        enqueue(db_path, run)
    with sqlite3.connect(db_path) as conn:  # the stored task is still there
        assert conn.execute("SELECT id FROM sitq_tasks").fetchall() == [(task_id,)]
        assert conn.execute("PRAGMA application_id").fetchone() == (APPLICATION_ID,)
    conn.close()


def test_sqlite_urls_and_paths(tmp_path):
    assert SQLiteBackend(f"sqlite:///{tmp_path}/a.db").path == f"{tmp_path}/a.db"
    assert SQLiteBackend("sqlite:///rel.db").path == "rel.db"
    assert SQLiteBackend("sqlite:///:memory:").is_memory
    assert SQLiteBackend(tmp_path / "b.db").path == str(tmp_path / "b.db")
    with pytest.raises(ValueError, match="sqlite:///"):
        SQLiteBackend("sqlite://host/x.db")
    with pytest.raises(TypeError, match="needs a path"):
        SQLiteBackend(42)
