"""How get_result, deserialize_result and the status calls behave, on a real SQLite file."""

import asyncio
import datetime as dt

import pytest
import taskfuncs

from sitq import (
    InvalidTaskError,
    SQLiteBackend,
    TaskCancelledError,
    TaskFailedError,
    TaskQueue,
    Worker,
)


@pytest.fixture
def backend(db_path):
    return SQLiteBackend(db_path)


def test_unknown_id_returns_none_at_once_whatever_the_timeout(backend, run):
    async def go():
        async with TaskQueue(backend) as queue:
            assert await asyncio.wait_for(queue.get_result("no-such-task"), 2) is None
            assert await asyncio.wait_for(queue.get_result("no-such-task", timeout=60), 2) is None

    run(go())


def test_pending_task_times_out_with_none(backend, run):
    async def go():
        async with TaskQueue(backend) as queue:
            task_id = await queue.enqueue(taskfuncs.add, 1, 2)
            assert await queue.get_result(task_id, timeout=0) is None
            assert await queue.get_result(task_id, timeout=0.05) is None
            assert (await queue.status(task_id)).status == "pending"

    run(go())


def test_get_result_waits_for_a_worker_and_returns_the_value(backend, run):
    async def go():
        queue = TaskQueue(backend)
        worker = Worker(backend, poll_interval=5)
        task_id = await queue.enqueue(taskfuncs.add, "Hello, ", "World!")
        waiting = asyncio.ensure_future(queue.get_result(task_id))
        running = asyncio.ensure_future(worker.start())
        result = await asyncio.wait_for(waiting, 10)
        await worker.stop()
        await running
        assert result.status == "success"
        assert isinstance(result.value, bytes)
        assert queue.deserialize_result(result) == "Hello, World!"
        assert result.error is None and result.traceback is None
        assert result.attempts == 1
        for stamp in (result.enqueued_at, result.started_at, result.finished_at):
            assert stamp.tzinfo is dt.timezone.utc
        assert result.enqueued_at <= result.started_at <= result.finished_at
        await queue.close()

    run(go())


def test_failed_task_carries_error_and_remote_traceback(backend, run):
    async def go():
        queue = TaskQueue(backend)
        task_id = await queue.enqueue(taskfuncs.divide, 1, 0)
        await Worker(backend).drain()
        result = await queue.get_result(task_id, timeout=0)
        assert result.status == "failed"
        assert result.error == "ZeroDivisionError: division by zero"
        assert result.value is None
        assert "in divide" in result.traceback and "return a / b" in result.traceback
        assert "sitq/worker/" not in result.traceback  # the runner's own frame is dropped
        with pytest.raises(TaskFailedError) as caught:
            queue.deserialize_result(result)
        assert caught.value.error == result.error and "return a / b" in str(caught.value)
        await queue.close()

    run(go())


def test_deserialize_result_rejects_what_is_not_a_result(backend):
    queue = TaskQueue(backend)
    with pytest.raises(InvalidTaskError, match="got None"):
        queue.deserialize_result(None)


def test_task_id_must_be_a_string(backend, run):
    async def go():
        async with TaskQueue(backend) as queue:
            for bad in (42, None, b"abc"):
                with pytest.raises(InvalidTaskError, match="task ids are strings"):
                    await queue.get_result(bad)
                with pytest.raises(InvalidTaskError, match="task ids are strings"):
                    await queue.status(bad)

    run(go())


def test_timeout_must_be_a_non_negative_number(backend, run):
    async def go():
        async with TaskQueue(backend) as queue:
            task_id = await queue.enqueue(taskfuncs.add, 1, 2)
            for bad in (-1, "5", float("nan"), True):
                with pytest.raises(InvalidTaskError, match="timeout"):
                    await queue.get_result(task_id, timeout=bad)

    run(go())


def test_status_calls_report_state_progress_and_attempts(backend, run):
    async def go():
        queue = TaskQueue(backend)
        done_id = await queue.enqueue(taskfuncs.report_progress, 4)
        later_id = await queue.enqueue(taskfuncs.add, 1, 1, eta=dt.timedelta(hours=1))
        await Worker(backend).drain()
        info = await queue.status(done_id)
        assert (info.status, info.attempts, info.progress_done, info.progress_total) == ("success", 1, 4.0, 4.0)
        assert info.progress_message == "step 4"
        assert await queue.status("nope") is None
        many = await queue.statuses([done_id, later_id, "nope"])
        assert {k: v.status for k, v in many.items()} == {done_id: "success", later_id: "pending"}
        overview = await queue.overview(limit=1)
        assert overview.counts["success"] == 1 and overview.counts["pending"] == 1
        assert [i.task_id for i in overview.recent] == [later_id]
        with pytest.raises(InvalidTaskError):
            await queue.statuses("not-a-list")
        await queue.close()

    run(go())


def test_results_survive_reopening_the_file(db_path, run):
    async def first():
        backend = SQLiteBackend(db_path)
        queue = TaskQueue(backend)
        task_id = await queue.enqueue(taskfuncs.echo, {"kept": [1, 2]})
        await Worker(backend).drain()
        await queue.close()
        return task_id

    async def second(task_id):
        async with TaskQueue(SQLiteBackend(f"sqlite:///{db_path}")) as queue:
            result = await queue.get_result(task_id, timeout=0)
            return queue.deserialize_result(result)

    task_id = run(first())
    assert run(second(task_id)) == {"kept": [1, 2]}


def test_cancelled_results_raise_on_deserialize(backend):
    from sitq.core import Result

    now = dt.datetime.now(dt.timezone.utc)
    result = Result("t", "f", "cancelled", None, None, None, now, None, now, 0)
    with pytest.raises(TaskCancelledError):
        TaskQueue(backend).deserialize_result(result)


def test_statuses_are_task_status_members_that_equal_their_strings(db_path, run):
    import json

    from sitq import TaskStatus

    async def go():
        async with TaskQueue(SQLiteBackend(db_path)) as queue:
            task_id = await queue.enqueue(taskfuncs.add, 1, 2)
            pending = await queue.status(task_id)
            await Worker(queue.backend).drain()
            return pending, await queue.get_result(task_id, timeout=5), await queue.overview()

    pending, result, overview = run(go())
    assert pending.status is TaskStatus.PENDING and not pending.status.finished
    assert result.status is TaskStatus.SUCCESS and result.status.finished
    assert result.status == "success" and f"{result.status}" == "success" and str(result.status) == "success"
    assert json.dumps({"status": result.status}) == '{"status": "success"}'
    assert overview.counts["success"] == 1 and overview.counts[TaskStatus.SUCCESS] == 1


def test_result_waiters_wake_for_finishes_and_not_for_claims(backend, run):
    # A waiter for a result is woken when a task may have finished, not when one starts: in one
    # process, a claim moves the change token (workers, live views) but not the finish token.
    import time

    from sitq.core import Outcome, OutcomeKind

    async def go():
        async with TaskQueue(backend) as queue:
            task_id = await queue.enqueue(taskfuncs.add, 1, 2)
            changes, finishes = backend.change_token, backend.finish_token
            now = time.time()
            [claimed] = await backend.claim("w1", 1, now, now + 60)
            assert backend.change_token > changes and backend.finish_token == finishes
            waiting = asyncio.ensure_future(queue.get_result(task_id, timeout=10))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            outcome = Outcome(task_id, claimed.handle, claimed.attempts, OutcomeKind.SUCCESS, time.time(),
                              queue.serializer.dumps(3), None, None, None, None, None, None)
            assert await backend.finish("w1", [outcome]) == [True]
            assert backend.finish_token > finishes
            result = await asyncio.wait_for(waiting, 5)
            assert queue.deserialize_result(result) == 3

    run(go())


def test_a_waiter_in_the_process_reads_its_value_before_the_worker_claims_again(backend, run):
    # With a result awaited on the worker's own backend, the worker stores an outcome, lets the
    # waiter read it, and only then claims the next task: the value is not held back behind a
    # claim (of up to 64 tasks, each unpickled on the loop). The statements show the order.
    async def go():
        async with TaskQueue(backend) as queue:
            first = await queue.enqueue(taskfuncs.sleep_then, 0.05, "first")
            second = await queue.enqueue(taskfuncs.add, 1, 2)
            statements = []
            backend._connection().set_trace_callback(statements.append)
            worker = Worker(backend, max_concurrency=1, poll_interval=5)
            running = asyncio.ensure_future(worker.start())
            result = await asyncio.wait_for(queue.get_result(first), 10)
            assert queue.deserialize_result(result) == "first"
            assert queue.deserialize_result(await asyncio.wait_for(queue.get_result(second), 10)) == 3
            await worker.stop()
            await running
            backend._connection().set_trace_callback(None)

        def first_after(start, predicate):
            return next(i for i, s in enumerate(statements) if i > start and predicate(" ".join(s.split())))

        # The first task is the first to succeed; its waiter's read names its id.
        stored = first_after(-1, lambda s: s.startswith("UPDATE sitq_tasks SET status = 'success'"))
        read = first_after(stored, lambda s: s.startswith("SELECT") and first in s)
        claimed_second = first_after(stored, lambda s: s.startswith("UPDATE sitq_tasks SET status = 'running'"))
        assert stored < read < claimed_second

    run(go())
