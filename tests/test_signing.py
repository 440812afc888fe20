"""Signed payloads: a worker with a key unpickles only what a holder of the key enqueued."""

import os
import sqlite3
import subprocess

import pytest
import taskfuncs
from conftest import sitq_command, worker_env

from sitq import InvalidTaskError, SQLiteBackend, TaskQueue, Worker

KEY = "correct horse battery staple"
OTHER_KEY = b"another key, also long enough"


@pytest.fixture(autouse=True)
def no_key_in_environment(monkeypatch):
    monkeypatch.delenv("SITQ_SECRET_KEY", raising=False)


def stored(db_path, task_id, column):
    with sqlite3.connect(db_path) as conn:
        (value,) = conn.execute(f"SELECT {column} FROM sitq_tasks WHERE id = ?", (task_id,)).fetchone()
    conn.close()
    return value


def overwrite(db_path, task_id, column, value):
    with sqlite3.connect(db_path) as conn:
        conn.execute(f"UPDATE sitq_tasks SET {column} = ? WHERE id = ?", (value, task_id))
    conn.close()


def run_all(db_path, run, enqueue, *, queue_key=None, worker_key=None, tamper=None):
    """Enqueue with one key, optionally change the stored rows, drain with another; return the Results."""

    async def go():
        backend = SQLiteBackend(db_path)
        queue = TaskQueue(backend, secret_key=queue_key)
        ids = await enqueue(queue)
        if tamper is not None:
            tamper(ids)
        await Worker(backend, secret_key=worker_key).drain()
        results = [await queue.get_result(i, timeout=0) for i in ids]
        await queue.close()
        return queue, results

    return run(go())


def log_lines(path):
    return path.read_text().split("\n")[:-1] if path.exists() else []


def test_signed_tasks_run_on_a_worker_with_the_same_key(db_path, run):
    async def enqueue(queue):
        return [await queue.enqueue(taskfuncs.add, 1, 2)] + await queue.map(taskfuncs.echo, range(3))

    queue, results = run_all(db_path, run, enqueue, queue_key=KEY, worker_key=KEY)
    assert [queue.deserialize_result(r) for r in results] == [3, 0, 1, 2]
    assert all(len(stored(db_path, r.task_id, "signature")) == 32 for r in results)  # HMAC-SHA256


def test_without_a_key_nothing_is_signed(db_path, run):
    async def enqueue(queue):
        return [await queue.enqueue(taskfuncs.add, 1, 2)]

    queue, (result,) = run_all(db_path, run, enqueue)
    assert queue.deserialize_result(result) == 3 and stored(db_path, result.task_id, "signature") is None


@pytest.mark.parametrize("column, old, new", [("args", b"task-b", b"evil-b"), ("func", b"record", b"divide")])
def test_a_tampered_payload_is_refused_and_the_others_run(db_path, tmp_path, column, old, new, run):
    log = tmp_path / "ran.log"

    async def enqueue(queue):
        return [await queue.enqueue(taskfuncs.record, str(log), f"task-{x}") for x in "abc"]

    def tamper(ids):
        payload = stored(db_path, ids[1], column)
        assert payload.count(old) == 1
        overwrite(db_path, ids[1], column, payload.replace(old, new))  # still a valid pickle

    queue, (a, b, c) = run_all(db_path, run, enqueue, queue_key=KEY, worker_key=KEY, tamper=tamper)
    assert b.status == "failed" and b.attempts == 1
    assert b.error.startswith("SignatureError: refused to unpickle this task: its signature does not match")
    assert [queue.deserialize_result(r) for r in (a, c)] == ["task-a", "task-c"]
    assert [line.split()[0] for line in log_lines(log)] == ["task-a", "task-c"]


def test_a_signature_removed_from_the_store_is_refused(db_path, tmp_path, run):
    async def enqueue(queue):
        return [await queue.enqueue(taskfuncs.record, str(tmp_path / "ran.log"), "x")]

    def tamper(ids):
        overwrite(db_path, ids[0], "signature", None)

    _, (result,) = run_all(db_path, run, enqueue, queue_key=KEY, worker_key=KEY, tamper=tamper)
    assert result.status == "failed" and "it is not signed" in result.error
    assert not (tmp_path / "ran.log").exists()


def test_an_unsigned_task_is_refused_by_a_worker_with_a_key(db_path, tmp_path, run):
    log = tmp_path / "ran.log"

    async def enqueue(queue):
        return [await queue.enqueue(taskfuncs.record, str(log), "unsigned")]

    _, (result,) = run_all(db_path, run, enqueue, queue_key=None, worker_key=KEY)
    assert result.status == "failed"
    assert result.error.startswith("SignatureError: refused to unpickle this task: it is not signed")
    assert "SITQ_SECRET_KEY" in result.error  # says how to fix it
    assert not log.exists()


def test_a_task_signed_with_another_key_is_refused(db_path, run):
    async def enqueue(queue):
        return [await queue.enqueue(taskfuncs.add, 1, 2)]

    _, (result,) = run_all(db_path, run, enqueue, queue_key=KEY, worker_key=OTHER_KEY)
    assert result.status == "failed" and "signed with another key" in result.error


def test_a_worker_without_a_key_does_not_check(db_path, run):
    """Signing protects the workers that hold the key; a worker without one runs what it finds."""

    async def enqueue(queue):
        return [await queue.enqueue(taskfuncs.add, 1, 2)]

    queue, (result,) = run_all(db_path, run, enqueue, queue_key=KEY, worker_key=None)
    assert queue.deserialize_result(result) == 3


def test_the_key_can_come_from_the_environment(db_path, monkeypatch, run):
    monkeypatch.setenv("SITQ_SECRET_KEY", KEY)

    async def enqueue(queue):
        return [await queue.enqueue(taskfuncs.add, 1, 2)]

    queue, (result,) = run_all(db_path, run, enqueue)  # no secret_key arguments at all
    assert queue.deserialize_result(result) == 3
    assert stored(db_path, result.task_id, "signature") is not None

    # an explicit key wins over the environment's
    _, (refused,) = run_all(db_path, run, enqueue, worker_key=OTHER_KEY)
    assert refused.status == "failed" and "signed with another key" in refused.error


def test_a_worker_process_takes_its_key_from_the_environment(db_path, run):
    async def enqueue():
        async with TaskQueue(SQLiteBackend(db_path), secret_key=KEY) as signed:
            good = await signed.enqueue(taskfuncs.add, 2, 3)
        async with TaskQueue(SQLiteBackend(db_path)) as unsigned:
            bad = await unsigned.enqueue(taskfuncs.add, 2, 3)
        return good, bad

    good, bad = run(enqueue())
    env = dict(worker_env(), SITQ_SECRET_KEY=KEY)
    subprocess.run(sitq_command("worker", str(db_path), "--drain", "--quiet"), env=env, check=True, timeout=60)

    async def collect():
        async with TaskQueue(SQLiteBackend(db_path)) as queue:
            return [await queue.get_result(i, timeout=0) for i in (good, bad)]

    good_result, bad_result = run(collect())
    assert good_result.status == "success"
    assert bad_result.status == "failed" and "it is not signed" in bad_result.error


@pytest.mark.parametrize("key", ["short", b"fifteen bytes!!", ""])
def test_a_short_key_is_refused(db_path, key):
    for make in (TaskQueue, Worker):
        with pytest.raises(InvalidTaskError, match="at least 16 bytes"):
            make(SQLiteBackend(db_path), secret_key=key)


def test_a_short_key_in_the_environment_is_refused(db_path, monkeypatch):
    monkeypatch.setenv("SITQ_SECRET_KEY", "short")
    with pytest.raises(InvalidTaskError, match="at least 16 bytes"):
        TaskQueue(SQLiteBackend(db_path))


def test_a_key_must_be_text_or_bytes(db_path):
    with pytest.raises(InvalidTaskError, match="secret_key must be str or bytes, not int"):
        Worker(SQLiteBackend(db_path), secret_key=1234567890123456789)


def test_the_key_is_not_shown(db_path):
    queue = TaskQueue(SQLiteBackend(db_path), secret_key=KEY)
    worker = Worker(SQLiteBackend(db_path), secret_key=KEY)
    assert KEY not in repr(queue) + repr(worker) + repr(vars(queue)) + repr(vars(worker))
    assert os.path.exists(db_path) is False  # constructing touches nothing
