"""One way to open a store: paths and URLs become backends, for the queue, the worker and the CLI alike."""

import subprocess

import pytest
import taskfuncs
from conftest import sitq_command, worker_env

import sitq
from sitq import BackendError, SQLiteBackend, SyncTaskQueue, TaskQueue, Worker, open_backend
from sitq.backends import describe_target


def test_paths_and_sqlite_urls_open_sqlite(tmp_path):
    for target in (tmp_path / "a.db", str(tmp_path / "a.db"), f"sqlite:///{tmp_path}/a.db"):
        backend = open_backend(target)
        assert isinstance(backend, SQLiteBackend) and backend.path == str(tmp_path / "a.db")
    assert open_backend(str(tmp_path / "b.db"), read_only=True).read_only
    same = SQLiteBackend(tmp_path / "c.db")
    assert open_backend(same) is same
    with pytest.raises(TypeError, match="apply to a target string"):
        open_backend(same, read_only=True)


def test_postgres_urls_name_the_extra_they_need_when_it_is_missing():
    try:
        import psycopg  # noqa: F401

        import sitq.backends.postgres  # noqa: F401
    except ImportError:
        with pytest.raises(BackendError, match=r"pip install 'sitq\[postgres\]'"):
            open_backend("postgresql://sitq:secret@localhost/test")
    else:
        pytest.skip("the postgres extra is installed: its tests live with the PostgreSQL backend")


def test_a_password_in_a_url_is_never_shown():
    assert describe_target("postgresql://ann:s3cret@db.example/q") == "postgresql://ann:***@db.example/q"
    assert describe_target("postgresql://ann@db.example/q") == "postgresql://ann@db.example/q"
    assert describe_target("tasks.db") == "tasks.db"


def test_queue_worker_and_blocking_face_take_a_path(db_path, run):
    async def go():
        async with TaskQueue(str(db_path)) as queue:
            task_id = await queue.enqueue(taskfuncs.add, 2, 3)
            await Worker(str(db_path)).drain()
            return queue.deserialize_result(await queue.get_result(task_id, timeout=5))

    assert run(go()) == 5
    with SyncTaskQueue(db_path) as queue:
        assert queue.statuses(queue.map(taskfuncs.add, [1], [1])) != {}


def test_the_command_line_takes_a_sqlite_url(db_path):
    with SyncTaskQueue(db_path) as queue:
        task_id = queue.enqueue(taskfuncs.add, 20, 22)
    url = f"sqlite:///{db_path}"
    drained = subprocess.run(
        sitq_command("worker", url, "--drain", "-q"), env=worker_env(), capture_output=True, text=True
    )
    assert drained.returncode == 0, drained.stderr
    status = subprocess.run(sitq_command("status", url), env=worker_env(), capture_output=True, text=True)
    assert status.returncode == 0 and task_id[-8:] in status.stdout and "success 1" in status.stdout


def test_open_backend_is_public():
    assert sitq.open_backend is open_backend
