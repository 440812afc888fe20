"""Timeouts and cancellation, for coroutines (stopped) and functions in threads (abandoned, outcome discarded)."""

import asyncio
import os
import time
import uuid

import pytest
import taskfuncs
from conftest import worker_running

import sitq
from sitq import InvalidTaskError, TaskCancelledError, TaskQueue, Worker


@pytest.fixture
def gate():
    """A fresh gate for a thread task to wait at; opened at the end whatever happens."""
    name = uuid.uuid4().hex
    opened, ended = taskfuncs.gate(name)
    yield name, opened, ended
    opened.set()
    ended.wait(10)
    taskfuncs.GATES.pop(name, None)


async def wait_for_status(queue, task_id, status, timeout=30):
    deadline = asyncio.get_running_loop().time() + timeout
    while (info := await queue.status(task_id)).status != status:
        assert asyncio.get_running_loop().time() < deadline, f"task never became {status}: {info}"
        await asyncio.sleep(0.01)
    return info


async def worker_turned(queue):
    """Run one more task through the worker: everything it was handed before has been dealt with."""
    result = await queue.get_result(await queue.enqueue(taskfuncs.add, 1, 1), timeout=30)
    assert result is not None and result.status == "success"


# -- timeouts --------------------------------------------------------------------


def test_a_coroutine_past_its_timeout_is_cancelled_and_fails(store, run):
    name = uuid.uuid4().hex
    task = sitq.task(taskfuncs.async_wait_noting_cancel, timeout=0.2)

    async def go():
        queue = TaskQueue(store)
        async with worker_running(store):
            return await queue.get_result(await queue.enqueue(task, name, 60), timeout=30)

    result = run(go())
    assert result.status == "failed" and result.attempts == 1 and result.value is None
    assert result.error.startswith("TaskTimeoutError: ")
    assert "timeout of 0.2 s" in result.error
    assert name in taskfuncs.COROUTINES_CANCELLED  # the coroutine itself was cancelled
    assert 0.2 <= result.duration < 30


def test_a_thread_past_its_timeout_fails_and_its_late_value_is_discarded(store, gate, run):
    name, opened, ended = gate
    task = sitq.task(taskfuncs.wait_at_gate, timeout=0.2)

    async def go():
        queue = TaskQueue(store)
        async with worker_running(store, max_concurrency=1):
            slow = await queue.enqueue(task, name, "too late")
            timed_out = await queue.get_result(slow, timeout=30)
            assert not ended.is_set()  # failed at its deadline, while the function still runs
            # the abandoned thread does not hold the worker's only slot
            quick = await queue.get_result(await queue.enqueue(taskfuncs.add, 2, 3), timeout=30)
            assert not ended.is_set()
            opened.set()
            assert await asyncio.to_thread(ended.wait, 30)  # the thread returns "too late" ...
            await worker_turned(queue)  # ... and the worker has had it back
            return queue, timed_out, quick, await queue.get_result(slow, timeout=0)

    queue, timed_out, quick, final = run(go())
    assert timed_out.status == "failed" and timed_out.error.startswith("TaskTimeoutError: ")
    assert queue.deserialize_result(quick) == 5
    assert final == timed_out and final.value is None  # the late value changed nothing


def test_a_timed_out_attempt_is_retried_like_any_failure(store, run):
    task = sitq.task(taskfuncs.async_sleep_then, timeout=0.1, retries=1, retry_delay=0.01, jitter=False)

    async def go():
        queue = TaskQueue(store)
        async with worker_running(store):
            return await queue.get_result(await queue.enqueue(task, 60), timeout=30)

    result = run(go())
    assert result.status == "failed" and result.attempts == 2 and result.error.startswith("TaskTimeoutError")


def test_a_task_within_its_timeout_is_not_disturbed(store, run):
    async def go():
        queue = TaskQueue(store)
        async with worker_running(store, max_concurrency=2):
            ids = [
                await queue.enqueue(sitq.task(taskfuncs.sleep_then, timeout=30), 0.05, "thread"),
                await queue.enqueue(sitq.task(taskfuncs.async_sleep_then, timeout=30), 0.05, "coroutine"),
            ]
            return queue, [await queue.get_result(i, timeout=30) for i in ids]

    queue, results = run(go())
    assert [queue.deserialize_result(r) for r in results] == ["thread", "coroutine"]


# -- cancellation ----------------------------------------------------------------


def test_cancelling_a_pending_task_means_it_never_runs(store, tmp_path, run):
    log = tmp_path / "ran.log"

    async def go():
        queue = TaskQueue(store)
        doomed = await queue.enqueue(taskfuncs.record, str(log), "doomed")
        kept = await queue.enqueue(taskfuncs.record, str(log), "kept")
        answer = await queue.cancel(doomed)
        await Worker(store).drain()
        return queue, answer, await queue.get_result(doomed, timeout=0), await queue.get_result(kept, timeout=0)

    queue, answer, doomed, kept = run(go())
    assert answer == "cancelled"
    assert doomed.status == "cancelled" and doomed.attempts == 0 and doomed.started_at is None
    assert doomed.finished_at is not None
    assert kept.status == "success"
    assert log.read_text().split() == ["kept", str(os.getpid())]  # doomed never ran
    with pytest.raises(TaskCancelledError, match="was cancelled"):
        queue.deserialize_result(doomed)


def test_cancelling_a_running_coroutine_stops_it(store, run):
    name = uuid.uuid4().hex

    async def go():
        queue = TaskQueue(store)
        async with worker_running(store):
            task_id = await queue.enqueue(taskfuncs.async_wait_noting_cancel, name, 60)
            await wait_for_status(queue, task_id, "running")
            answer = await queue.cancel(task_id)
            asked = time.monotonic()
            result = await queue.get_result(task_id, timeout=30)
            return answer, result, time.monotonic() - asked

    answer, result, waited = run(go())
    assert answer == "requested"
    assert result.status == "cancelled" and result.value is None and result.attempts == 1
    assert name in taskfuncs.COROUTINES_CANCELLED
    assert waited < 30  # promptly: the coroutine would have slept 60 s


def test_cancelling_a_running_thread_discards_its_outcome(store, gate, run):
    name, opened, ended = gate

    async def go():
        queue = TaskQueue(store)
        async with worker_running(store, max_concurrency=1):
            task_id = await queue.enqueue(taskfuncs.wait_at_gate, name, "finished anyway")
            await wait_for_status(queue, task_id, "running")
            answer = await queue.cancel(task_id)
            cancelled = await queue.get_result(task_id, timeout=30)
            assert not ended.is_set()  # cancelled while the thread still runs
            quick = await queue.get_result(await queue.enqueue(taskfuncs.add, 2, 2), timeout=30)
            opened.set()
            assert await asyncio.to_thread(ended.wait, 30)
            await worker_turned(queue)
            return queue, answer, cancelled, quick, await queue.get_result(task_id, timeout=0)

    queue, answer, cancelled, quick, final = run(go())
    assert answer == "requested"
    assert cancelled.status == "cancelled" and cancelled.value is None
    assert queue.deserialize_result(quick) == 4  # the slot was freed
    assert final == cancelled  # what the thread returned later was discarded


@pytest.mark.parametrize("func, args, status", [(taskfuncs.add, (1, 2), "success"), (taskfuncs.fail, (), "failed")])
def test_cancelling_a_finished_task_changes_nothing(store, func, args, status, run):
    async def go():
        queue = TaskQueue(store)
        task_id = await queue.enqueue(func, *args)
        await Worker(store).drain()
        before = await queue.get_result(task_id, timeout=0)
        answer = await queue.cancel(task_id)
        return before, answer, await queue.get_result(task_id, timeout=0)

    before, answer, after = run(go())
    assert before.status == status
    assert answer == "finished" and after == before


def test_cancelling_twice_says_finished_the_second_time(store, run):
    async def go():
        queue = TaskQueue(store)
        task_id = await queue.enqueue(taskfuncs.add, 1, 2)
        return await queue.cancel(task_id), await queue.cancel(task_id)

    assert run(go()) == ("cancelled", "finished")


def test_cancelling_an_unknown_task_says_so(store, run):
    async def go():
        queue = TaskQueue(store)
        await queue.enqueue(taskfuncs.add, 1, 2)
        answer = await queue.cancel("0" * 32)
        with pytest.raises(InvalidTaskError, match="task ids are strings"):
            await queue.cancel(42)
        return answer, await queue.overview(0)

    answer, overview = run(go())
    assert answer is None and overview.counts["pending"] == 1 and overview.counts["cancelled"] == 0


def test_cancelling_between_retries_stops_the_retries(store, tmp_path, run):
    calls = tmp_path / "calls"
    task = sitq.task(taskfuncs.flaky, retries=3, retry_delay=60, jitter=False)

    async def go():
        queue = TaskQueue(store)
        async with worker_running(store):
            task_id = await queue.enqueue(task, str(calls), 10)
            deadline = asyncio.get_running_loop().time() + 30
            while (info := await queue.status(task_id)).attempts < 1 or info.status != "pending":
                assert asyncio.get_running_loop().time() < deadline, f"never saw the wait between attempts: {info}"
                await asyncio.sleep(0.01)
            return await queue.cancel(task_id), await queue.get_result(task_id, timeout=30)

    answer, result = run(go())
    assert answer == "cancelled"
    assert result.status == "cancelled" and result.attempts == 1
    assert len(taskfuncs.call_times(calls)) == 1


def test_a_cancel_requested_during_a_failing_attempt_stops_the_retries(store, gate, tmp_path, run):
    name, opened, ended = gate
    calls = tmp_path / "calls"
    task = sitq.task(taskfuncs.fail_at_gate_once, retries=2, retry_delay=0.01, jitter=False)

    async def go():
        queue = TaskQueue(store)
        # the worker looks for cancel requests only every 30 s: the attempt fails before it does
        async with worker_running(store, progress_interval=30, lease=90):
            task_id = await queue.enqueue(task, name, str(calls))
            await wait_for_status(queue, task_id, "running")
            answer = await queue.cancel(task_id)
            opened.set()
            return answer, await queue.get_result(task_id, timeout=30)

    answer, result = run(go())
    assert answer == "requested"
    assert result.status == "cancelled"  # as cancel() promised, and without running again
    assert len(taskfuncs.call_times(calls)) == 1


def test_a_cancel_requested_for_a_dead_workers_task_is_honoured(store, run):
    """The worker died before it saw the request: once the lease runs out, the task is cancelled, not rerun."""

    async def go():
        queue = TaskQueue(store)
        task_id = await queue.enqueue(taskfuncs.add, 1, 2)
        now = time.time()
        (claimed,) = await store.claim("dead-worker", 1, now, now + 0.2)  # and then it died
        assert claimed.task_id == task_id
        answer = await queue.cancel(task_id)
        async with worker_running(store, lease=0.3):
            result = await queue.get_result(task_id, timeout=30)
        return answer, result

    answer, result = run(go())
    assert answer == "requested"
    assert result.status == "cancelled" and result.attempts == 1
