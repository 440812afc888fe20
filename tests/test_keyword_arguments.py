"""Keywords named like sitq's own parameters (func=, self=, ...) reach the task as its own.

sitq's parameters are positional-only wherever a caller's keywords are forwarded to a task;
``eta`` is the one keyword enqueue keeps (docs/quickstart.md).
"""

import subprocess

import taskfuncs
from conftest import sitq_command, worker_env

import sitq
import sitq.notebook as sn
from sitq import SQLiteBackend, SyncTaskQueue, TaskQueue

KEYWORDS = {"func": "f", "self": "s", "args": (1,), "kwargs": {"k": 2}, "iterables": [3]}


def drain(db):
    done = subprocess.run(
        sitq_command("worker", str(db), "--drain", "--quiet"), env=worker_env(), capture_output=True, text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def test_enqueue_passes_keywords_named_like_its_own_parameters_to_the_task(db_path, run):
    async def enqueue():
        async with TaskQueue(SQLiteBackend(db_path)) as queue:
            return await queue.enqueue(taskfuncs.arguments, 1, **KEYWORDS)

    task_id = run(enqueue())
    with SyncTaskQueue(SQLiteBackend(db_path)) as queue:
        blocking = queue.enqueue(taskfuncs.arguments, **KEYWORDS)
        decorated = queue.enqueue(sitq.task(taskfuncs.arguments, retries=1), 2, **KEYWORDS)
        drain(db_path)
        assert queue.value(task_id) == ((1,), KEYWORDS)
        assert queue.value(blocking) == ((), KEYWORDS)
        assert queue.value(decorated) == ((2,), KEYWORDS)


def test_the_notebook_submit_passes_them_too(tmp_path):
    sn.start_worker(tmp_path / "nb.db", concurrency=1)
    try:
        assert sn.submit(taskfuncs.arguments, **KEYWORDS).result(timeout=60) == ((), KEYWORDS)
    finally:
        sn.stop_worker(timeout=10)


def test_wrappers_that_call_the_task_pass_them_on():
    assert sitq.task(taskfuncs.arguments)(**KEYWORDS) == ((), KEYWORDS)


def test_a_process_worker_passes_them_on(db_path, run):
    async def go():
        backend = SQLiteBackend(db_path)
        queue = TaskQueue(backend)
        task_id = await queue.enqueue(taskfuncs.arguments, 1, **KEYWORDS)
        await sitq.Worker(backend, processes=1).drain()
        return queue.deserialize_result(await queue.get_result(task_id, timeout=0))

    assert run(go()) == ((1,), KEYWORDS)

