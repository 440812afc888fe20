"""The notebook's process pool, driven as ``%sitq start --processes N`` drives it: a worker in
this process runs each task's function in a spawned child.

A stopped task (timeout, cancel) has its child terminated and the next task
gets a fresh one; a child that dies fails only the task it ran.
"""

import asyncio
import os
import threading

import pytest
import taskfuncs
from conftest import worker_running
from notebook_support import wait_until

import sitq
from sitq import SQLiteBackend, TaskQueue
from sitq.notebook.processes import InProcess, ProcessPool


@pytest.fixture
def pool(request):
    """A pool of ``request.param`` children (1 unless parametrized), shut down after the test."""
    pool = ProcessPool(getattr(request, "param", 1))
    yield pool
    pool.shutdown()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def read_pid(path, timeout=60):
    deadline = asyncio.get_running_loop().time() + timeout
    while not (path.exists() and path.read_text()):
        assert asyncio.get_running_loop().time() < deadline, "the task never started in its process"
        await asyncio.sleep(0.01)
    return int(path.read_text())


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_a_stopped_task_has_its_process_terminated_and_the_next_task_gets_a_fresh_one(
    db_path, tmp_path, pool, how, run
):
    pid_file = tmp_path / "pid"
    func = taskfuncs.write_pid_and_wait
    if how == "timeout":
        func = sitq.task(func, timeout=1.0)
    func = InProcess.around(func)  # as the notebook wraps what it is given

    async def go():
        backend = SQLiteBackend(db_path)
        queue = TaskQueue(backend)
        async with worker_running(backend, max_concurrency=2):
            task_id = await queue.enqueue(func, str(pid_file))
            pid = await read_pid(pid_file)
            if how == "cancel":
                assert await queue.cancel(task_id) == "requested"
            stopped = await queue.get_result(task_id, timeout=30)
            await asyncio.to_thread(wait_until, lambda: not alive(pid))
            after = await queue.get_result(await queue.enqueue(InProcess(taskfuncs.child_pid)), timeout=60)
            return queue, pid, stopped, queue.deserialize_result(after)

    queue, pid, stopped, next_pid = run(go())
    if how == "cancel":
        assert stopped.status == "cancelled"
    else:
        assert stopped.status == "failed" and stopped.error.startswith("TaskTimeoutError: ")
    assert pid != os.getpid() and not alive(pid)
    assert next_pid not in (pid, os.getpid())  # the pool's only child was replaced


@pytest.mark.parametrize("pool", [4], indirect=True)
@pytest.mark.parametrize("death", ["exit", "segfault"])
def test_a_process_that_dies_fails_only_its_own_task(db_path, tmp_path, pool, death, run):
    folder = tmp_path / "meeting"
    folder.mkdir()
    func = InProcess(taskfuncs.meet_then)

    async def go():
        backend = SQLiteBackend(db_path)
        queue = TaskQueue(backend)
        async with worker_running(backend, max_concurrency=4):
            # all four run side by side, then one of them takes its process down
            culprit = await queue.enqueue(func, str(folder), "culprit", 4, death)
            innocent = [await queue.enqueue(func, str(folder), f"innocent-{i}", 4) for i in range(3)]
            results = [await queue.get_result(i, timeout=60) for i in [culprit, *innocent]]
            # the pool goes on with a full set of processes
            again = [await queue.enqueue(InProcess(taskfuncs.add), i, i) for i in range(8)]
            return queue, results, [await queue.get_result(i, timeout=60) for i in again]

    queue, (culprit, *innocent), again = run(go())
    assert culprit.status == "failed" and culprit.attempts == 1
    how = "exited with status 7" if death == "exit" else "killed by SIGSEGV"
    assert culprit.error.startswith(f"ProcessDiedError: its process died: {how}"), culprit.error
    assert [r.status for r in innocent] == ["success"] * 3
    pids = {queue.deserialize_result(r) for r in innocent}
    assert len(pids) == 3 and os.getpid() not in pids
    assert [queue.deserialize_result(r) for r in again] == [2 * i for i in range(8)]


POOL_ERRORS = {
    **{kind: error for kind, (_, error) in taskfuncs.MISBEHAVIOURS.items()},
    "unpicklable-exception": "HoldsLock: holds a lock (sitq could not send this exception back from the task's "
                             "process as it is: TypeError: cannot pickle '_thread.lock' object)",
    "unrebuildable-exception": "NeedsDetail: failed with code 3 (sitq could not send this exception back from the "
                               "task's process as it is: TypeError: NeedsDetail.__init__() missing 1 required "
                               "positional argument: 'detail')",
    "unpicklable-value": "SerializationError: cannot send the return value, a lock, back from the task's process: "
                         "TypeError: cannot pickle '_thread.lock' object",
    "value-pickling-interrupts": "SerializationError: cannot send the return value, a ReduceInterrupts, back from "
                                 "the task's process: KeyboardInterrupt: pickling interrupted",
}


@pytest.mark.parametrize("pool", [2], indirect=True)
def test_whatever_a_task_raises_in_its_process_ends_as_a_failed_task(db_path, pool, run):
    kinds = sorted(taskfuncs.MISBEHAVIOURS)

    async def go():
        backend = SQLiteBackend(db_path)
        queue = TaskQueue(backend)
        async with worker_running(backend, max_concurrency=2):
            ids = {kind: await queue.enqueue(InProcess(taskfuncs.misbehave), kind) for kind in kinds}
            ids["async"] = await queue.enqueue(InProcess(taskfuncs.async_misbehave), "keyboard-interrupt")
            ids["unrebuildable-value"] = await queue.enqueue(InProcess(taskfuncs.unrebuildable_value))
            results = {kind: await queue.get_result(i, timeout=60) for kind, i in ids.items()}
            good = await queue.get_result(await queue.enqueue(InProcess(taskfuncs.add), 2, 3), timeout=60)
            return queue, results, queue.deserialize_result(good)

    queue, results, good = run(go())
    for kind in kinds:
        assert results[kind].status == "failed", kind
        assert results[kind].error.startswith(POOL_ERRORS[kind]), (kind, results[kind].error)
    assert results["async"].error == "KeyboardInterrupt: pressed in a task"
    assert results["unrebuildable-value"].error.startswith(
        "SerializationError: cannot rebuild the return value of the task outside its process: TypeError: "
    )
    # the child's traceback travels with the error
    assert "in misbehave" in results["keyboard-interrupt"].traceback
    assert good == 5


def test_progress_and_output_come_back_from_the_process(db_path, pool, run):
    async def go():
        backend = SQLiteBackend(db_path)
        queue = TaskQueue(backend)
        async with worker_running(backend):
            result = await queue.get_result(await queue.enqueue(InProcess(taskfuncs.chatty), "hello"), timeout=60)
            task_id = await queue.enqueue(InProcess(taskfuncs.report_progress), 3)
            await queue.get_result(task_id, timeout=60)
            return result, await queue.status(task_id)

    result, info = run(go())
    assert result.status == "success" and result.output == "hello\nto stderr\n"
    assert (info.progress_done, info.progress_total, info.progress_message) == (3.0, 3.0, "step 3")


def test_shutting_the_pool_down_ends_its_processes(tmp_path):
    pool = ProcessPool(1)
    pid_file = tmp_path / "pid"
    errors = []

    def call():
        try:
            pool.call(taskfuncs.write_pid_and_wait, (str(pid_file),), {})
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text())
        pid = int(pid_file.read_text())
    finally:
        pool.shutdown()
    thread.join(30)
    assert not thread.is_alive() and not alive(pid)
    assert len(errors) == 1 and "its process died: killed by SIGTERM" in str(errors[0])


def test_without_a_pool_the_function_runs_in_the_calling_thread():
    assert InProcess(taskfuncs.child_pid)() == os.getpid()


def test_a_task_keeps_its_options_around_the_process_runner():
    wrapped = InProcess.around(sitq.task(taskfuncs.add, timeout=5, retries=2))
    assert isinstance(wrapped, sitq.Task) and isinstance(wrapped.func, InProcess)
    assert (wrapped.task_options.timeout, wrapped.task_options.retries) == (5, 2)
    assert wrapped.func.func is taskfuncs.add and wrapped(1, 2) == 3
