"""Retries: how many attempts a task gets, when each one runs, and what its Result says."""

import asyncio
import contextlib
import datetime as dt
import gc
import re

import pytest
import taskfuncs
from conftest import worker_running

import sitq
from sitq import InvalidTaskError, TaskOptions, TaskQueue, Worker

QUICK = {"retry_delay": 0.01, "jitter": False}
FLAKY = {"sync": taskfuncs.flaky, "async": taskfuncs.async_flaky}


async def outcome(store, func, *args, timeout=30, **kwargs):
    """Enqueue one call, run it to its end, and return (queue, Result)."""
    queue = TaskQueue(store)
    async with worker_running(store):
        task_id = await queue.enqueue(func, *args, **kwargs)
        result = await queue.get_result(task_id, timeout=timeout)
    assert result is not None, "the task did not finish in time"
    return queue, result


# -- the policy --------------------------------------------------------------------


def test_delays_grow_by_backoff_up_to_max_delay():
    options = TaskOptions(retries=5, retry_delay=1.0, backoff=2.0, max_delay=5.0, jitter=False)
    delays = [options.retry_after(attempt, ValueError()) for attempt in range(1, 7)]
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0, None]  # no sixth retry: 6 attempts in all


def test_jitter_waits_between_half_and_all_of_the_delay():
    options = TaskOptions(retries=1, retry_delay=8.0)
    delays = {options.retry_after(1, ValueError()) for _ in range(200)}
    assert all(4.0 <= d <= 8.0 for d in delays)
    assert len(delays) > 100  # spread out, not one fixed value


def test_retry_on_and_retry_requests_in_the_policy():
    options = TaskOptions(retries=3, retry_on=KeyError, **QUICK)
    assert options.retry_on == (KeyError,)
    assert options.retry_after(1, KeyError()) == 0.01
    assert options.retry_after(1, ValueError()) is None
    assert options.retry_after(1, sitq.Retry("again")) == 0.01  # asked for: retried whatever retry_on says
    assert options.retry_after(1, sitq.Retry("again", delay=7)) == 7
    assert options.retry_after(4, sitq.Retry("again", delay=7)) is None  # no attempts left


# -- retries in a worker -------------------------------------------------------------


@pytest.mark.parametrize("kind", FLAKY)
def test_success_after_two_failures_reflects_the_final_attempt(store, tmp_path, kind, run):
    calls = tmp_path / "calls"
    queue, result = run(outcome(store, sitq.task(FLAKY[kind], retries=2, **QUICK), str(calls), 2))
    assert result.status == "success" and queue.deserialize_result(result) == 3
    assert result.attempts == 3
    assert result.error is None and result.traceback is None  # the failures before it are gone
    assert len(taskfuncs.call_times(calls)) == 3


@pytest.mark.parametrize("kind", FLAKY)
def test_failure_after_all_attempts_keeps_the_last_error(store, tmp_path, kind, run):
    calls = tmp_path / "calls"
    _, result = run(outcome(store, sitq.task(FLAKY[kind], retries=2, **QUICK), str(calls), 10))
    assert result.status == "failed" and result.attempts == 3
    assert result.error == "ValueError: failure 3"
    assert "in flaky" in result.traceback
    assert len(taskfuncs.call_times(calls)) == 3  # and not one more


def test_without_options_a_task_runs_once(store, tmp_path, run):
    calls = tmp_path / "calls"
    _, result = run(outcome(store, taskfuncs.flaky, str(calls), 1))
    assert result.status == "failed" and result.attempts == 1 and result.error == "ValueError: failure 1"


def test_attempts_wait_longer_and_longer(store, tmp_path, run):
    calls = tmp_path / "calls"
    task = sitq.task(taskfuncs.flaky, retries=3, retry_delay=0.05, backoff=3.0, jitter=False)
    _, result = run(outcome(store, task, str(calls), 3))
    assert result.status == "success" and result.attempts == 4
    times = taskfuncs.call_times(calls)
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    # an attempt never starts before its delay is over: 0.05, 0.15, 0.45 s
    assert [gap >= expected for gap, expected in zip(gaps, (0.05, 0.15, 0.45), strict=True)] == [True] * 3


@pytest.mark.parametrize(
    "raised, retry_on, attempts",
    [
        (KeyError, KeyError, 3),
        (ValueError, KeyError, 1),
        (ConnectionResetError, ConnectionError, 3),  # subclasses count
        (ValueError, (KeyError, ValueError), 3),
        (KeyError, (ConnectionError, TimeoutError), 1),
    ],
)
def test_retry_on_limits_which_exceptions_are_retried(store, tmp_path, raised, retry_on, attempts, run):
    task = sitq.task(taskfuncs.flaky, retries=2, retry_on=retry_on, **QUICK)
    _, result = run(outcome(store, task, str(tmp_path / "calls"), 10, raised))
    assert result.status == "failed" and result.attempts == attempts
    assert result.error.startswith(raised.__name__)


def test_a_task_can_ask_for_a_retry_with_a_delay(store, tmp_path, run):
    calls = tmp_path / "calls"
    # Retry's own delay wins over retry_delay, and retry_on does not stop it
    task = sitq.task(taskfuncs.asks_for_retry, retries=1, retry_delay=60, retry_on=KeyError)
    queue, result = run(outcome(store, task, str(calls), 1, 0.3))
    assert result.status == "success" and queue.deserialize_result(result) == 2 and result.attempts == 2
    first, second = taskfuncs.call_times(calls)
    assert 0.3 <= second - first < 30  # its own 0.3 s, not retry_delay's 60 s


@pytest.mark.parametrize("retries", [0, 2])
def test_asking_for_a_retry_with_no_attempts_left_fails(store, tmp_path, retries, run):
    calls = tmp_path / "calls"
    task = sitq.task(taskfuncs.asks_for_retry, retries=retries, **QUICK)
    _, result = run(outcome(store, task, str(calls), 100, 0.01))
    assert result.status == "failed" and result.attempts == retries + 1
    assert result.error == f"Retry: not ready at call {retries + 1}"


def test_asking_for_a_retry_without_options_fails_at_once(store, tmp_path, run):
    _, result = run(outcome(store, taskfuncs.asks_for_retry, str(tmp_path / "calls"), 1))
    assert result.status == "failed" and result.attempts == 1 and result.error.startswith("Retry: ")


def test_a_retry_with_a_bad_delay_fails_the_task_instead_of_hanging(store, run):
    async def go():
        queue = TaskQueue(store)
        task = sitq.task(taskfuncs.async_asks_for_retry_badly, retries=1, **QUICK)
        task_id = await queue.enqueue(task, "soon")
        worker = Worker(store, poll_interval=0.05)
        running = asyncio.ensure_future(worker.start())
        result = await queue.get_result(task_id, timeout=3)
        running.cancel()  # a worker with a task that never settles cannot be stopped politely
        with contextlib.suppress(asyncio.CancelledError):
            await running
        return result

    result = run(go())
    # The stuck coroutine's unretrieved exception is logged when it is collected; collect it now,
    # not in the middle of pytest's report (CPython 3.11's ast.parse cannot take that).
    gc.collect()
    assert result is not None and result.status == "failed"
    assert "delay" in result.error


def test_status_shows_attempts_so_far_and_when_the_next_is_due(store, tmp_path, run):
    async def go():
        queue = TaskQueue(store)
        task = sitq.task(taskfuncs.flaky, retries=1, retry_delay=1.5, jitter=False)
        async with worker_running(store):
            task_id = await queue.enqueue(task, str(tmp_path / "calls"), 1)
            deadline = asyncio.get_running_loop().time() + 30
            while (info := await queue.status(task_id)).attempts < 1 or info.status != "pending":
                assert asyncio.get_running_loop().time() < deadline, f"never saw the wait between attempts: {info}"
                await asyncio.sleep(0.01)
            seen_at = dt.datetime.now(dt.timezone.utc)
            assert await queue.get_result(task_id, timeout=0) is None  # not finished yet
            result = await queue.get_result(task_id, timeout=30)
        return info, seen_at, result

    info, seen_at, result = run(go())
    assert info.status == "pending" and not info.finished
    assert info.attempts == 1 and info.error == "ValueError: failure 1"
    # the first attempt failed between its start and the moment we looked; the next is due 1.5 s later
    delay = dt.timedelta(seconds=1.5)
    assert info.started_at + delay <= info.eta <= seen_at + delay
    assert result.status == "success" and result.attempts == 2 and result.error is None
    assert result.started_at >= info.eta  # the second attempt waited until it was due


def test_a_decorated_function_keeps_its_options(store, tmp_path, run):
    @sitq.task(retries=1, name="twice at most", **QUICK)
    async def shaky(path):
        return await taskfuncs.async_flaky(path, 1)

    assert isinstance(shaky, sitq.Task) and shaky.__name__ == "shaky"
    queue, result = run(outcome(store, shaky, str(tmp_path / "calls")))
    assert result.name == "twice at most" and result.attempts == 2 and queue.deserialize_result(result) == 2


def test_options_changes_one_call_and_leaves_the_task_alone(store, tmp_path, run):
    task = sitq.task(taskfuncs.flaky, retries=3, **QUICK)
    once = task.options(retries=0)
    assert task.task_options.retries == 3 and once.task_options.retries == 0
    assert once.task_options.retry_delay == 0.01  # the other options carry over
    _, result = run(outcome(store, once, str(tmp_path / "calls"), 1))
    assert result.status == "failed" and result.attempts == 1


# -- options are checked when they are given, and never mix with the function's own ---------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"retries": -1}, "retries must be a whole number >= 0, not -1"),
        ({"retries": 1.5}, "retries must be a whole number >= 0, not 1.5"),
        ({"retries": True}, "retries must be a whole number >= 0, not True"),
        ({"retries": "3"}, "retries must be a whole number >= 0, not '3'"),
        ({"timeout": 0}, "timeout must be a number of seconds > 0, not 0"),
        ({"timeout": -5}, "timeout must be a number of seconds > 0, not -5"),
        ({"timeout": "10"}, "timeout must be a number of seconds > 0, not '10'"),
        ({"timeout": float("nan")}, "timeout must be a number of seconds > 0, not nan"),
        ({"retry_delay": -1}, "retry_delay must be a number of seconds >= 0"),
        ({"backoff": None}, "backoff must be a number of seconds >= 0, not None"),
        ({"retry_on": "ValueError"}, "retry_on takes exception classes"),
        ({"retry_on": (ValueError, 3)}, "retry_on takes exception classes"),
        ({"name": 42}, "task name must be a string, not int"),
    ],
)
def test_bad_option_values_are_refused_when_given(options, message):
    with pytest.raises(InvalidTaskError, match=re.escape(message)):
        sitq.task(taskfuncs.add, **options)
    with pytest.raises(InvalidTaskError, match="must|takes"):
        sitq.task(**options)  # the decorator form checks before it sees the function
    with pytest.raises(InvalidTaskError, match="must|takes"):
        sitq.task(taskfuncs.add).options(**options)


def test_an_unknown_option_names_the_known_ones():
    with pytest.raises(InvalidTaskError, match="retry.*task options are: name, retries, .*timeout"):
        sitq.task(taskfuncs.add, retry=3)


def test_an_unknown_option_in_options_names_the_known_ones():
    with pytest.raises(InvalidTaskError, match="task options are: name, retries"):
        sitq.task(taskfuncs.add).options(retry=3)


def test_wrapping_needs_a_callable():
    with pytest.raises(InvalidTaskError, match="wraps a callable"):
        sitq.task(42)


def test_task_options_never_collide_with_the_functions_own_keywords(store, run):
    async def go():
        queue = TaskQueue(store)
        mine = {"retries": -7, "timeout": "never", "name": "not a task name"}  # invalid as options
        plain = await queue.enqueue(taskfuncs.own_options, **mine)
        wrapped = await queue.enqueue(sitq.task(taskfuncs.own_options, name="shown", timeout=30), **mine)
        await Worker(store).drain()
        return queue, [await queue.get_result(i, timeout=0) for i in (plain, wrapped)]

    queue, (plain, wrapped) = run(go())
    expected = {"retries": -7, "timeout": "never", "name": "not a task name"}
    assert queue.deserialize_result(plain) == expected and plain.name == "taskfuncs.own_options"
    assert queue.deserialize_result(wrapped) == expected and wrapped.name == "shown"


def test_calling_a_task_calls_the_function():
    task = sitq.task(taskfuncs.add, retries=2)
    assert task(1, 2) == 3
    rewrapped = sitq.task(task, timeout=5)  # wrapping a task replaces its options
    assert rewrapped.func is taskfuncs.add and rewrapped.task_options.retries == 0
    assert repr(task).startswith("<sitq.Task add ") and "retries=2" in repr(task)
