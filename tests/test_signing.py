"""Signing the round trip: with a key, nothing is unpickled that a holder of the key did not write.

Payloads are signed by the queue and checked by the worker; values are signed by the worker and
checked by whoever unpickles them; each signature is bound to its task. A store used with a key
records it, so parties without the key, or with another one, refuse it. Real files throughout,
and real ``sitq worker`` processes wherever a worker decides something.
"""

import hashlib
import linecache
import os
import pickle
import sqlite3
import subprocess
from pathlib import Path

import pytest
import taskfuncs
from conftest import sitq_command, worker_env
from notebook_support import visible_text

from sitq import InvalidTaskError, SignatureError, SQLiteBackend, SyncTaskQueue, TaskQueue, Worker
from sitq.notebook.render import result_html
from sitq.signing import STORE_KEY_RECORD, Signer

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


def copy_columns(db_path, source_id, target_id, columns):
    """What someone who can write the file, but has no key, can do: move signed bytes between rows."""
    for column in columns:
        overwrite(db_path, target_id, column, stored(db_path, source_id, column))


def recorded_key(db_path):
    with sqlite3.connect(db_path) as conn:
        row = conn.execute("SELECT value FROM sitq_meta WHERE key = ?", (STORE_KEY_RECORD,)).fetchone()
    conn.close()
    return None if row is None else row[0]


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


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


def enqueue_calls(db_path, run, calls, key=KEY):
    """Store ``(func, *args)`` calls with a queue holding ``key``; return their ids."""

    async def go():
        async with TaskQueue(SQLiteBackend(db_path), secret_key=key) as queue:
            return [await queue.enqueue(func, *args) for func, *args in calls]

    return run(go())


def drain_in_process(db_path, key=KEY):
    """``sitq worker --drain`` in its own process, with ``key`` in its environment (or none)."""
    env = worker_env()
    env.pop("SITQ_SECRET_KEY", None)
    if key is not None:
        env["SITQ_SECRET_KEY"] = key if isinstance(key, str) else key.decode()
    return subprocess.run(
        sitq_command("worker", str(db_path), "--drain", "--quiet"), env=env, capture_output=True, text=True, timeout=60
    )


def fetch(db_path, run, ids, key=KEY):
    async def go():
        async with TaskQueue(SQLiteBackend(db_path), secret_key=key) as queue:
            return queue, [await queue.get_result(i, timeout=0) for i in ids]

    return run(go())


def log_lines(path):
    return path.read_text().split("\n")[:-1] if path.exists() else []


class Planted:
    """A pickle whose loading runs code: it creates ``marker``. What a forged value would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


# -- payloads ------------------------------------------------------------------


def test_signed_tasks_and_their_values_round_trip_with_the_same_key(db_path, run):
    async def enqueue(queue):
        return [await queue.enqueue(taskfuncs.add, 1, 2)] + await queue.map(taskfuncs.echo, range(3))

    queue, results = run_all(db_path, run, enqueue, queue_key=KEY, worker_key=KEY)
    assert [queue.deserialize_result(r) for r in results] == [3, 0, 1, 2]
    assert all(len(stored(db_path, r.task_id, "signature")) == 32 for r in results)  # HMAC-SHA256
    assert all(len(r.value_signature) == 32 for r in results)  # the worker signed each value


def test_without_a_key_nothing_is_signed_and_nothing_is_recorded(db_path, run):
    async def enqueue(queue):
        return [await queue.enqueue(taskfuncs.add, 1, 2)]

    queue, (result,) = run_all(db_path, run, enqueue)
    assert queue.deserialize_result(result) == 3
    assert stored(db_path, result.task_id, "signature") is None and result.value_signature is None
    assert recorded_key(db_path) is None


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


def test_a_payload_signed_with_another_key_is_refused(db_path, tmp_path, run):
    """A row forged by someone holding a different key (the store's record says which key counts)."""
    log = tmp_path / "ran.log"

    async def enqueue(queue):
        return [await queue.enqueue(taskfuncs.record, str(log), "forged")]

    def tamper(ids):
        func, args = stored(db_path, ids[0], "func"), stored(db_path, ids[0], "args")
        overwrite(db_path, ids[0], "signature", Signer(OTHER_KEY).sign_task(ids[0], func, args))

    _, (result,) = run_all(db_path, run, enqueue, queue_key=KEY, worker_key=KEY, tamper=tamper)
    assert result.status == "failed" and "signed with another key" in result.error
    assert not log.exists()


def test_a_payload_copied_into_another_row_is_refused_by_a_worker_process(db_path, tmp_path, run):
    """Copying a signed payload (function, arguments and signature) into another task's row
    does not make it run again: the signature names the task it was made for."""
    log = tmp_path / "ran.log"
    first, second, third = enqueue_calls(
        db_path, run, [(taskfuncs.record, str(log), name) for name in ("transfer", "harmless", "other")]
    )
    copy_columns(db_path, first, second, ("func", "args", "signature"))

    worker = drain_in_process(db_path)
    assert worker.returncode == 0, worker.stderr
    queue, (a, b, c) = fetch(db_path, run, [first, second, third])
    assert (a.status, b.status, c.status) == ("success", "failed", "success")
    assert b.error.startswith("SignatureError: refused to unpickle this task: its signature does not match")
    assert "copied from another task" in b.error
    assert [line.split()[0] for line in log_lines(log)] == ["transfer", "other"]  # each ran once


def test_a_payload_signature_and_a_value_signature_never_stand_for_each_other():
    """They sign differently labelled messages, so a value the worker signed cannot pass for a
    payload, even one laid out byte for byte like a payload's signed message."""
    signer = Signer(KEY.encode())
    func, args = b"f" * 5, b"a" * 7
    as_value = len(func).to_bytes(8, "big") + func + args
    assert signer.sign_value("t1", as_value) != signer.sign_task("t1", func, args)
    with pytest.raises(SignatureError, match="does not match"):
        signer.verify_task("t1", func, args, signer.sign_value("t1", as_value))
    with pytest.raises(SignatureError, match="does not match"):
        signer.verify_task("t2", func, args, signer.sign_task("t1", func, args))
    signer.verify_task("t1", func, args, signer.sign_task("t1", func, args))  # the real one passes


# -- values --------------------------------------------------------------------


def test_a_planted_value_is_refused_before_it_is_unpickled(db_path, tmp_path, run):
    """A value replaced in the store with a pickle that runs code is refused unread, by the async
    queue, the blocking face and the notebook views; the untouched value still loads."""
    marker = tmp_path / "planted-code-ran"
    good, victim = enqueue_calls(db_path, run, [(taskfuncs.echo, "fine"), (taskfuncs.echo, "victim")])
    assert drain_in_process(db_path).returncode == 0
    overwrite(db_path, victim, "value", pickle.dumps(Planted(str(marker))))

    queue, (fine, planted) = fetch(db_path, run, [good, victim])
    assert queue.deserialize_result(fine) == "fine"
    with pytest.raises(SignatureError, match=f"refused to unpickle the value of task {victim}.*does not match"):
        queue.deserialize_result(planted)
    with SyncTaskQueue(SQLiteBackend(db_path), secret_key=KEY) as blocking:
        assert blocking.value(good, timeout=0) == "fine"
        with pytest.raises(SignatureError, match="changed or copied from another task"):
            blocking.value(victim, timeout=0)
    shown = visible_text(result_html(planted, queue.deserialize_result))
    assert "value cannot be loaded here: SignatureError" in shown
    assert not marker.exists()


def test_a_value_copied_into_another_row_is_refused(db_path, run):
    winner, loser = enqueue_calls(db_path, run, [(taskfuncs.echo, "winner"), (taskfuncs.echo, "loser")])
    assert drain_in_process(db_path).returncode == 0
    copy_columns(db_path, winner, loser, ("value", "value_signature"))

    queue, (a, b) = fetch(db_path, run, [winner, loser])
    assert queue.deserialize_result(a) == "winner"
    with pytest.raises(SignatureError, match=f"value of task {loser} .*copied from another task"):
        queue.deserialize_result(b)


def test_a_value_whose_signature_was_removed_is_refused(db_path, run):
    (task_id,) = enqueue_calls(db_path, run, [(taskfuncs.echo, "x")])
    assert drain_in_process(db_path).returncode == 0
    overwrite(db_path, task_id, "value_signature", None)
    queue, (result,) = fetch(db_path, run, [task_id])
    with pytest.raises(SignatureError, match="it is not signed"):
        queue.deserialize_result(result)


def test_a_signed_value_of_a_notebook_defined_class_shows_in_the_views(db_path, monkeypatch, run):
    """The function and the class exist only in the notebook: a worker process rebuilds them, signs
    the value, and the views show it checked and loaded through sitq's serializer."""
    source = (
        "class Point:\n"
        "    def __init__(self, x, y):\n"
        "        self.x, self.y = x, y\n"
        "    def __repr__(self):\n"
        "        return f'Point({self.x}, {self.y})'\n"
        "def make_point(x, y):\n"
        "    return Point(x, y)\n"
    )
    filename = "<ipython-input-3-9a8b7c6d>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    cell = {"__name__": "__main__"}
    exec(compile(source, filename, "exec"), cell)
    point, other = enqueue_calls(db_path, run, [(cell["make_point"], 3, 4), (cell["make_point"], 5, 6)])
    assert drain_in_process(db_path).returncode == 0

    queue, (result, _) = fetch(db_path, run, [point, other])
    assert "Point(3, 4)" in visible_text(result_html(result, queue.deserialize_result))
    monkeypatch.setenv("SITQ_SECRET_KEY", KEY)  # a view without the queue checks with the key it finds
    assert "Point(3, 4)" in visible_text(result_html(result))
    monkeypatch.delenv("SITQ_SECRET_KEY")
    assert "without the secret key" in visible_text(result_html(result))

    copy_columns(db_path, other, point, ("value", "value_signature"))
    queue, (moved, _) = fetch(db_path, run, [point, other])
    assert "SignatureError" in visible_text(result_html(moved, queue.deserialize_result))


# -- what a store records, and who it refuses -------------------------------------


def test_a_store_records_a_fingerprint_of_its_key_never_the_key(db_path, run):
    enqueue_calls(db_path, run, [(taskfuncs.add, 1, 2)])
    fingerprint = recorded_key(db_path)
    assert fingerprint == Signer(KEY.encode()).fingerprint != Signer(OTHER_KEY).fingerprint
    assert fingerprint.startswith("hmac-sha256:")
    contents = b"".join(p.read_bytes() for p in db_path.parent.iterdir() if p.name.startswith("tasks.db"))
    assert KEY.encode() not in contents


def test_a_worker_process_without_the_key_refuses_a_signed_store(db_path, tmp_path, run):
    log = tmp_path / "ran.log"
    (task_id,) = enqueue_calls(db_path, run, [(taskfuncs.record, str(log), "x")])

    worker = drain_in_process(db_path, key=None)
    assert worker.returncode == 1
    message = worker.stderr.strip()
    assert message.startswith("sitq: ") and "set up for signed tasks" in message
    assert "secret_key=" in message and "SITQ_SECRET_KEY" in message  # says how to supply it
    assert "Traceback" not in worker.stderr
    assert not log.exists() and stored(db_path, task_id, "status") == "pending"  # nothing run, nothing lost

    # sitq status, read-only and without the key, still shows the rows, and writes nothing
    before = digest(db_path)
    env = worker_env()
    status = subprocess.run(sitq_command("status", str(db_path)), capture_output=True, text=True, env=env)
    assert status.returncode == 0, status.stderr
    assert "1 tasks" in status.stdout and task_id[-8:] in status.stdout
    assert digest(db_path) == before

    assert drain_in_process(db_path).returncode == 0  # with the key it runs
    assert log_lines(log)[0].startswith("x ")


def test_a_worker_process_with_another_key_is_told_the_key_does_not_match(db_path, run):
    (task_id,) = enqueue_calls(db_path, run, [(taskfuncs.add, 1, 2)])
    worker = drain_in_process(db_path, key=OTHER_KEY)
    assert worker.returncode == 1
    assert "does not match the one" in worker.stderr and "was set up with" in worker.stderr
    assert stored(db_path, task_id, "status") == "pending"
    assert recorded_key(db_path) == Signer(KEY.encode()).fingerprint  # the first key stays the store's


def test_a_refused_worker_is_left_stopped_and_ran_nothing(db_path, run):
    enqueue_calls(db_path, run, [(taskfuncs.add, 1, 2)])

    async def go():
        worker = Worker(SQLiteBackend(db_path))
        with pytest.raises(SignatureError, match="has no key"):
            await worker.drain()
        assert not worker.is_running
        return worker.processed

    assert run(go()) == 0


def test_a_queue_without_the_key_refuses_to_enqueue_or_read_results(db_path, run):
    (task_id,) = enqueue_calls(db_path, run, [(taskfuncs.add, 1, 2)])
    assert drain_in_process(db_path).returncode == 0
    _, (signed_result,) = fetch(db_path, run, [task_id])

    async def go():
        async with TaskQueue(SQLiteBackend(db_path)) as keyless:
            for attempt in (keyless.enqueue(taskfuncs.add, 1, 2), keyless.map(taskfuncs.echo, [1, 2])):
                with pytest.raises(SignatureError, match="secret_key=.*SITQ_SECRET_KEY"):
                    await attempt
            with pytest.raises(SignatureError, match="set up for signed tasks"):
                await keyless.get_result(task_id, timeout=0)
            with pytest.raises(SignatureError, match="without the secret key"):
                keyless.deserialize_result(signed_result)
            # looking at the tasks is not reading what they carry
            assert (await keyless.status(task_id)).status == "success"
            assert (await keyless.overview()).total == 1

    run(go())
    with SyncTaskQueue(SQLiteBackend(db_path)) as blocking:
        with pytest.raises(SignatureError, match="SITQ_SECRET_KEY"):
            blocking.value(task_id, timeout=0)
        with pytest.raises(SignatureError, match="SITQ_SECRET_KEY"):
            blocking.enqueue(taskfuncs.add, 1, 2)
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM sitq_tasks").fetchone() == (1,)  # nothing added
    conn.close()


def test_a_queue_with_another_key_is_told_the_key_does_not_match(db_path, run):
    enqueue_calls(db_path, run, [(taskfuncs.add, 1, 2)])

    async def go():
        async with TaskQueue(SQLiteBackend(db_path), secret_key=OTHER_KEY) as queue:
            await queue.enqueue(taskfuncs.add, 1, 2)

    with pytest.raises(SignatureError, match="does not match the one .* was set up with"):
        run(go())


def test_a_key_holder_takes_over_an_unsigned_store_and_its_old_tasks_are_refused(db_path, tmp_path, run):
    """The documented choice: the first key used with a store becomes its key, and what was stored
    unsigned before is not trusted by anyone who holds it."""
    log = tmp_path / "ran.log"
    (old_done,) = enqueue_calls(db_path, run, [(taskfuncs.echo, "old value")], key=None)
    assert drain_in_process(db_path, key=None).returncode == 0
    (old_pending,) = enqueue_calls(db_path, run, [(taskfuncs.record, str(log), "old")], key=None)
    assert recorded_key(db_path) is None

    (new,) = enqueue_calls(db_path, run, [(taskfuncs.record, str(log), "new")])
    assert recorded_key(db_path) == Signer(KEY.encode()).fingerprint
    assert drain_in_process(db_path).returncode == 0
    queue, (done, refused, ran) = fetch(db_path, run, [old_done, old_pending, new])
    assert refused.status == "failed" and "it is not signed" in refused.error
    assert queue.deserialize_result(ran) == "new" and [line.split()[0] for line in log_lines(log)] == ["new"]
    with pytest.raises(SignatureError, match="value of task .* it is not signed"):
        queue.deserialize_result(done)


def test_the_key_can_come_from_the_environment(db_path, monkeypatch, run):
    monkeypatch.setenv("SITQ_SECRET_KEY", KEY)

    async def enqueue(queue):
        return [await queue.enqueue(taskfuncs.add, 1, 2)]

    queue, (result,) = run_all(db_path, run, enqueue)  # no secret_key arguments at all
    assert queue.deserialize_result(result) == 3
    assert stored(db_path, result.task_id, "signature") is not None

    # an explicit key wins over the environment's
    with pytest.raises(SignatureError, match="does not match"):
        run_all(db_path, run, enqueue, queue_key=KEY, worker_key=OTHER_KEY)


def test_a_worker_process_takes_its_key_from_the_environment(db_path, run):
    (unsigned,) = enqueue_calls(db_path, run, [(taskfuncs.add, 2, 3)], key=None)  # before signing began
    (signed,) = enqueue_calls(db_path, run, [(taskfuncs.add, 2, 3)])
    assert drain_in_process(db_path).returncode == 0
    _, (good, bad) = fetch(db_path, run, [signed, unsigned])
    assert good.status == "success"
    assert bad.status == "failed" and "it is not signed" in bad.error


# -- the key itself ----------------------------------------------------------------


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


def test_a_version_1_file_read_without_upgrading_has_no_key_and_unsigned_values(db_path, run):
    """A file from before values were signed, looked at read-only (so not upgraded), still reads."""
    from test_opening_files import VERSION_1_SCHEMA

    from sitq.backends.sqlite import APPLICATION_ID

    conn = sqlite3.connect(db_path)
    conn.executescript(VERSION_1_SCHEMA)
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO sitq_tasks (id, name, status, func, args, eta, enqueued_at, value) "
        "VALUES ('old', 'add', 'success', x'00', x'00', 0, 0, ?)",
        (pickle.dumps(5),),
    )
    conn.commit()
    conn.close()
    before = digest(db_path)

    async def go():
        async with TaskQueue(SQLiteBackend(db_path, read_only=True)) as queue:
            assert await queue.backend.get_meta(STORE_KEY_RECORD) is None
            return queue.deserialize_result(await queue.get_result("old", timeout=0))

    assert run(go()) == 5
    assert digest(db_path) == before
