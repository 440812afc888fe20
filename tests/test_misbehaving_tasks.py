"""Tasks that raise what no task should, or return what cannot be stored, end as failed tasks.

Whatever a task raises (KeyboardInterrupt, SystemExit, GeneratorExit, a
user's BaseException subclass, an exception whose str() raises) and whatever
goes wrong while the worker records it, the task ends failed with a readable
error and the worker keeps its threads, its slots and its ability to stop.
"""

import asyncio
import signal
import subprocess
import threading
import uuid

import pytest
import taskfuncs
from conftest import sitq_command, worker_env, worker_running

import sitq
from sitq import InvalidTaskError, SQLiteBackend, SyncTaskQueue, TaskQueue, Worker

KINDS = sorted(taskfuncs.MISBEHAVIOURS)
FORMS = {"thread": taskfuncs.misbehave, "coroutine": taskfuncs.async_misbehave}


def expected_error(kind):
    return taskfuncs.MISBEHAVIOURS[kind][1]


async def enqueue_all(queue):
    """Every misbehaviour in both forms, then a well-behaved task behind them."""
    ids = {(form, kind): await queue.enqueue(func, kind) for form, func in FORMS.items() for kind in KINDS}
    return ids, await queue.enqueue(taskfuncs.add, 2, 3)


def raises(kind):
    return isinstance(taskfuncs.MISBEHAVIOURS[kind][0](), BaseException)


def assert_all_failed_readably(results):
    for (form, kind), result in results.items():
        assert result.status == "failed", (form, kind, result)
        assert result.error.startswith(expected_error(kind)), (form, kind, result.error)
        assert result.attempts == 1
        if raises(kind):  # the traceback leads to the line that raised
            assert "in misbehave" in result.traceback, (form, kind, result.traceback)


# -- real worker processes -------------------------------------------------------


def test_a_draining_worker_process_fails_each_misbehaving_task_and_ends(db_path, run):
    async def enqueue():
        async with TaskQueue(SQLiteBackend(db_path)) as queue:
            return await enqueue_all(queue)

    ids, good = run(enqueue())
    worker = subprocess.Popen(
        sitq_command("worker", str(db_path), "--drain", "--concurrency", "2", "--quiet"),
        env=worker_env(), stderr=subprocess.PIPE, text=True,
    )
    try:
        _, stderr = worker.communicate(timeout=90)
    finally:
        worker.kill()
    assert worker.returncode == 0, stderr
    with SyncTaskQueue(SQLiteBackend(db_path)) as queue:
        assert_all_failed_readably({key: queue.get_result(task_id, timeout=0) for key, task_id in ids.items()})
        assert queue.value(good, timeout=0) == 5


def test_sigterm_still_stops_a_worker_process_that_ran_misbehaving_tasks(db_path, run):
    worker = subprocess.Popen(
        sitq_command("worker", str(db_path), "--concurrency", "2", "--quiet", "--poll-interval", "0.05"),
        env=worker_env(), stderr=subprocess.PIPE, text=True,
    )
    try:
        async def go():
            async with TaskQueue(SQLiteBackend(db_path)) as queue:
                ids, good = await enqueue_all(queue)
                results = {key: await queue.get_result(task_id, timeout=60) for key, task_id in ids.items()}
                return results, queue.deserialize_result(await queue.get_result(good, timeout=60))

        results, good = run(go())
        assert worker.poll() is None  # a coroutine raising KeyboardInterrupt did not end the worker
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=30)
    finally:
        worker.kill()
    assert worker.returncode == 0, stderr
    assert_all_failed_readably(results)
    assert good == 5


# -- retry rules -----------------------------------------------------------------


@pytest.mark.parametrize("form", sorted(FORMS))
def test_retry_on_decides_about_base_exceptions_like_any_other(db_path, form, run):
    func = FORMS[form]
    not_retried = sitq.task(func, retries=2, retry_delay=0, jitter=False)  # retry_on=(Exception,)
    retried = sitq.task(func, retries=1, retry_delay=0, jitter=False, retry_on=taskfuncs.Interrupt)

    async def go():
        backend = SQLiteBackend(db_path)
        queue = TaskQueue(backend)
        async with worker_running(backend):
            ids = [
                await queue.enqueue(not_retried, "keyboard-interrupt"),
                await queue.enqueue(not_retried, "base-exception"),
                await queue.enqueue(retried, "base-exception"),
                await queue.enqueue(not_retried, "unpicklable-value"),  # a SerializationError is an Exception
            ]
            return [await queue.get_result(i, timeout=30) for i in ids]

    interrupt, base, base_retried, unpicklable = run(go())
    assert (interrupt.status, interrupt.attempts) == ("failed", 1)
    assert interrupt.error == "KeyboardInterrupt: pressed in a task"
    assert (base.status, base.attempts) == ("failed", 1)
    assert (base_retried.status, base_retried.attempts) == ("failed", 2)
    assert base_retried.error == "Interrupt: my own BaseException"
    assert (unpicklable.status, unpicklable.attempts) == ("failed", 3)


# -- the worker's own steps ------------------------------------------------------


@pytest.mark.parametrize("form", sorted(FORMS))
def test_a_failure_while_recording_the_outcome_fails_the_task_and_the_slot_survives(db_path, form, run):
    broken = sitq.task(FORMS[form], retries=1, retry_on=taskfuncs.BrokenRetryRule)

    async def go():
        backend = SQLiteBackend(db_path)
        queue = TaskQueue(backend)
        async with worker_running(backend, max_concurrency=1):
            bad = await queue.get_result(await queue.enqueue(broken, "bad-str"), timeout=30)
            good = await queue.get_result(await queue.enqueue(taskfuncs.async_double, 21), timeout=30)
            return queue, bad, good

    queue, bad, good = run(go())
    assert bad.status == "failed" and bad.attempts == 1
    assert bad.error == (
        "SitqError: sitq could not record the outcome of this task: RuntimeError: broken isinstance check"
    )
    assert queue.deserialize_result(good) == 42


def test_a_coroutine_raising_cancelled_error_by_itself_fails(db_path, run):
    async def go():
        backend = SQLiteBackend(db_path)
        queue = TaskQueue(backend)
        async with worker_running(backend, max_concurrency=1):
            bad = await queue.get_result(await queue.enqueue(taskfuncs.async_raise_cancelled), timeout=30)
            good = await queue.get_result(await queue.enqueue(taskfuncs.async_double, 4), timeout=30)
            return queue, bad, good

    queue, bad, good = run(go())
    assert bad.status == "failed" and bad.error == "CancelledError"
    assert "async_raise_cancelled" in bad.traceback
    assert queue.deserialize_result(good) == 8


def test_a_thread_of_the_worker_survives_an_error_in_sitq_itself():
    from notebook_support import wait_until

    from sitq.worker.runners import _Threads

    threads = _Threads("test")
    ran_in = []
    done = threading.Event()

    def broken():
        ran_in.append(threading.current_thread())
        raise SystemExit("a bug in sitq")

    def fine():
        ran_in.append(threading.current_thread())
        done.set()

    try:
        threads.submit(broken)
        wait_until(lambda: threads._idle == 1)  # the thread is back, waiting for work
        threads.submit(fine)
        assert done.wait(30)
        assert ran_in[0] is ran_in[1] and threads._count == 1
    finally:
        threads.shutdown()


# -- coroutines that ignore their cancellation -----------------------------------


async def wait_for_file(path, timeout=60):
    deadline = asyncio.get_running_loop().time() + timeout
    while not path.exists():
        assert asyncio.get_running_loop().time() < deadline, f"{path.name} never appeared"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_a_coroutine_that_swallows_its_cancel_is_abandoned_after_the_grace_period(db_path, tmp_path, how, run):
    name = uuid.uuid4().hex
    func = taskfuncs.async_swallow_cancel
    if how == "timeout":
        func = sitq.task(func, timeout=0.1)

    async def go():
        backend = SQLiteBackend(db_path)
        queue = TaskQueue(backend)
        async with worker_running(backend, max_concurrency=1, cancel_grace=0.2) as worker:
            task_id = await queue.enqueue(func, name, "keep-running", str(tmp_path / "started"))
            await wait_for_file(tmp_path / "started")  # a cancel before this would stop it before it starts
            if how == "cancel":
                assert await queue.cancel(task_id) == "requested"
            stopped = await queue.get_result(task_id, timeout=30)
            # the worker's only slot runs the next task while the abandoned coroutine goes on
            good = await queue.get_result(await queue.enqueue(taskfuncs.add, 1, 2), timeout=30)
            notes_before_stop = list(taskfuncs.SWALLOWED[name])
            abandoned = set(worker._runner._coroutines.abandoned)
        return queue, stopped, good, notes_before_stop, abandoned, await queue.get_result(task_id, timeout=0)

    queue, stopped, good, notes_before_stop, abandoned, final = run(go())
    if how == "cancel":
        assert stopped.status == "cancelled"
    else:
        assert stopped.status == "failed" and stopped.error.startswith("TaskTimeoutError: ")
    assert queue.deserialize_result(good) == 3
    assert notes_before_stop == ["swallowed"]  # still running when the next task ran
    assert len(abandoned) == 1
    assert taskfuncs.SWALLOWED.pop(name) == ["swallowed", "cancelled again"]  # the worker's stop cancelled it
    assert all(task.done() for task in abandoned)
    assert final == stopped  # nothing it did later changed the outcome


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_a_coroutine_that_swallows_its_cancel_and_returns_is_not_a_success(db_path, tmp_path, how, run):
    name = uuid.uuid4().hex
    func = taskfuncs.async_swallow_cancel
    if how == "timeout":
        func = sitq.task(func, timeout=0.1)

    async def go():
        backend = SQLiteBackend(db_path)
        queue = TaskQueue(backend)
        async with worker_running(backend, cancel_grace=30):
            task_id = await queue.enqueue(func, name, "return", str(tmp_path / "started"))
            await wait_for_file(tmp_path / "started")  # a cancel before this would stop it before it starts
            if how == "cancel":
                await queue.cancel(task_id)
            return await queue.get_result(task_id, timeout=30)

    result = run(go())
    assert taskfuncs.SWALLOWED.pop(name) == ["swallowed"]
    assert result.value is None
    if how == "cancel":
        assert result.status == "cancelled"
    else:
        assert result.status == "failed" and result.error.startswith("TaskTimeoutError: ")


def test_a_worker_process_abandons_a_coroutine_that_swallows_its_cancel(db_path, run):
    """The default grace (5 s) in a real worker: the cancel is recorded, the slot is freed, SIGTERM stops it."""
    worker = subprocess.Popen(
        sitq_command("worker", str(db_path), "--concurrency", "1", "--quiet", "--poll-interval", "0.05"),
        env=worker_env(), stderr=subprocess.PIPE, text=True,
    )
    try:
        async def go():
            async with TaskQueue(SQLiteBackend(db_path)) as queue:
                started = db_path.parent / "started"
                task_id = await queue.enqueue(
                    taskfuncs.async_swallow_cancel, "in a worker", "keep-running", str(started)
                )
                await wait_for_file(started)
                await queue.cancel(task_id)
                cancelled = await queue.get_result(task_id, timeout=60)
                good = await queue.get_result(await queue.enqueue(taskfuncs.add, 1, 1), timeout=60)
                return cancelled, queue.deserialize_result(good)

        cancelled, good = run(go())
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=30)
    finally:
        worker.kill()
    assert cancelled.status == "cancelled" and good == 2
    assert worker.returncode == 0, stderr
    assert "caught the CancelledError of its cancel" in stderr  # the worker says what it did


def test_a_worker_process_stops_even_with_a_coroutine_that_ignores_every_cancel(db_path, run):
    worker = subprocess.Popen(
        sitq_command("worker", str(db_path), "--quiet", "--poll-interval", "0.05", "--cancel-grace", "0.2"),
        env=worker_env(), stderr=subprocess.PIPE, text=True,
    )
    try:
        async def go():
            async with TaskQueue(SQLiteBackend(db_path)) as queue:
                started = db_path.parent / "started"
                task_id = await queue.enqueue(taskfuncs.async_ignore_every_cancel, str(started))
                await wait_for_file(started)
                await queue.cancel(task_id)
                return await queue.get_result(task_id, timeout=60)

        cancelled = run(go())
        worker.send_signal(signal.SIGTERM)  # once: no need to insist
        _, stderr = worker.communicate(timeout=30)
    finally:
        worker.kill()
    assert cancelled.status == "cancelled"
    assert worker.returncode == 0, stderr
    assert "ignore cancellation" in stderr


@pytest.mark.parametrize("grace", [0, -1, "5", True, float("nan")])
def test_cancel_grace_must_be_a_positive_number_of_seconds(db_path, grace):
    with pytest.raises(InvalidTaskError, match="cancel_grace must be a number of seconds > 0"):
        Worker(SQLiteBackend(db_path), cancel_grace=grace)
