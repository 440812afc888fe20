"""A worker that runs its tasks in processes (``Worker(..., processes=N)``, ``sitq worker --processes N``,
``%sitq start --processes N``), with real child processes on a real SQLite file.

States are true (a task is running only while a process runs it), a stopped task has its
process terminated and the next task gets a fresh one, a process that dies fails only its
own task, and whatever a task raises reads as it does in a thread.
"""

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import taskfuncs
from conftest import sitq_command, worker_env, worker_running
from notebook_support import wait_until

import sitq
from sitq import SQLiteBackend, TaskQueue, Worker

pytestmark = pytest.mark.timeout(120)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited: it only waits to be reaped
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def read_pid(path, timeout=60):
    deadline = asyncio.get_running_loop().time() + timeout
    while not (path.exists() and path.read_text()):
        assert asyncio.get_running_loop().time() < deadline, "the task never started in its process"
        await asyncio.sleep(0.01)
    return int(path.read_text())


def test_with_processes_the_worker_runs_one_task_per_process():
    with pytest.raises(sitq.InvalidTaskError, match="one task per process"):
        Worker(":memory:", max_concurrency=4, processes=2)
    with pytest.raises(sitq.InvalidTaskError, match="processes must be a whole number"):
        Worker(":memory:", processes=0)
    assert Worker(":memory:", processes=3).max_concurrency == 3
    assert Worker(":memory:", max_concurrency=2, processes=2).max_concurrency == 2


def test_tasks_waiting_for_a_free_process_are_pending_not_running(db_path, tmp_path, run):
    """With 2 processes and 6 tasks of 0.3 s, at most 2 are ever running, and each task's
    recorded duration is its own run time, not time spent waiting for a process."""
    log = tmp_path / "intervals"

    async def go():
        backend = SQLiteBackend(db_path)
        queue = TaskQueue(backend)
        ids = [await queue.enqueue(taskfuncs.note_interval, str(log), 0.3) for _ in range(6)]
        most_running = 0
        async with worker_running(backend, processes=2) as worker:
            while True:
                infos = await queue.statuses(ids)
                running = sum(1 for i in infos.values() if i.status == "running")
                most_running = max(most_running, running, worker.active)
                if all(i.finished for i in infos.values()):
                    break
                await asyncio.sleep(0.005)
        return most_running, [await queue.get_result(i, timeout=0) for i in ids]

    most_running, results = run(go())
    assert most_running == 2
    assert all(r.status == "success" for r in results)
    assert all(r.duration < 0.3 + 0.25 for r in results), [r.duration for r in results]
    assert len({TaskQueue(":memory:").deserialize_result(r) for r in results}) == 2  # two processes did it all


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_a_stopped_task_has_its_process_terminated_and_the_next_task_gets_a_fresh_one(db_path, tmp_path, how, run):
    pid_file = tmp_path / "pid"
    func = taskfuncs.write_pid_and_wait
    if how == "timeout":
        func = sitq.task(func, timeout=1.0)

    async def go():
        backend = SQLiteBackend(db_path)
        queue = TaskQueue(backend)
        async with worker_running(backend, processes=1):
            task_id = await queue.enqueue(func, str(pid_file))
            pid = await read_pid(pid_file)
            if how == "cancel":
                assert await queue.cancel(task_id) == "requested"
            stopped = await queue.get_result(task_id, timeout=30)
            await asyncio.to_thread(wait_until, lambda: not alive(pid))
            after = await queue.get_result(await queue.enqueue(taskfuncs.child_pid), timeout=60)
            return pid, stopped, queue.deserialize_result(after)

    pid, stopped, next_pid = run(go())
    if how == "cancel":
        assert stopped.status == "cancelled"
    else:
        assert stopped.status == "failed" and stopped.error.startswith("TaskTimeoutError: ")
    assert pid != os.getpid() and not alive(pid)
    assert next_pid not in (pid, os.getpid())  # the only process was replaced


def test_a_cancelled_task_queued_behind_others_in_a_run_never_runs(db_path, tmp_path, run):
    """Short tasks travel to a process in runs; one cancelled before its turn is skipped there."""
    log = tmp_path / "calls"

    async def go():
        backend = SQLiteBackend(db_path)
        queue = TaskQueue(backend)
        async with worker_running(backend, processes=1) as worker:
            warm = await queue.map(taskfuncs.count_call, [str(log)] * 200)  # teaches it that these are short
            await queue.get_result(warm[-1], timeout=60)
            gate = tmp_path / "gate"
            first = await queue.enqueue(taskfuncs.print_slowly, 0, 0, str(gate))
            rest = await queue.map(taskfuncs.count_call, [str(log)] * 20)
            await asyncio.to_thread(wait_until, lambda: worker.active > 0)
            cancelled = await queue.cancel(rest[5])
            assert (await queue.get_result(rest[5], timeout=30)).status == "cancelled"  # before its turn came
            assert not (await queue.status(rest[6])).finished
            gate.touch()
            results = [await queue.get_result(i, timeout=60) for i in [first, *rest]]
        return cancelled, results

    cancelled, results = run(go())
    assert cancelled in ("cancelled", "requested")
    assert [r.status for r in results] == ["success"] * 6 + ["cancelled"] + ["success"] * 14
    assert len(log.read_text().splitlines()) == 200 + 19  # the cancelled one never ran


@pytest.mark.parametrize("death", ["exit", "segfault"])
def test_a_process_that_dies_fails_only_its_own_task(db_path, tmp_path, death, run):
    folder = tmp_path / "meeting"
    folder.mkdir()

    async def go():
        backend = SQLiteBackend(db_path)
        queue = TaskQueue(backend)
        async with worker_running(backend, processes=4):
            # all four run side by side, then one of them takes its process down
            culprit = await queue.enqueue(taskfuncs.meet_then, str(folder), "culprit", 4, death)
            innocent = [await queue.enqueue(taskfuncs.meet_then, str(folder), f"innocent-{i}", 4) for i in range(3)]
            results = [await queue.get_result(i, timeout=60) for i in [culprit, *innocent]]
            # the worker goes on with a full set of processes
            again = [await queue.enqueue(taskfuncs.add, i, i) for i in range(8)]
            return queue, results, [await queue.get_result(i, timeout=60) for i in again]

    queue, (culprit, *innocent), again = run(go())
    assert culprit.status == "failed" and culprit.attempts == 1 and culprit.traceback is None
    how = "exited with status 7" if death == "exit" else "killed by SIGSEGV"
    assert culprit.error.startswith(f"ProcessDiedError: its process died: {how}"), culprit.error
    assert [r.status for r in innocent] == ["success"] * 3
    pids = {queue.deserialize_result(r) for r in innocent}
    assert len(pids) == 3 and os.getpid() not in pids
    assert [queue.deserialize_result(r) for r in again] == [2 * i for i in range(8)]


def test_whatever_a_task_raises_in_its_process_reads_as_in_a_thread(db_path, run):
    kinds = sorted(taskfuncs.MISBEHAVIOURS)

    async def go():
        backend = SQLiteBackend(db_path)
        queue = TaskQueue(backend)
        async with worker_running(backend, processes=2):
            ids = {kind: await queue.enqueue(taskfuncs.misbehave, kind) for kind in kinds}
            ids["async"] = await queue.enqueue(taskfuncs.async_misbehave, "keyboard-interrupt")
            ids["divide"] = await queue.enqueue(taskfuncs.divide, 1, 0)
            results = {kind: await queue.get_result(i, timeout=60) for kind, i in ids.items()}
            good = await queue.get_result(await queue.enqueue(taskfuncs.add, 2, 3), timeout=60)
            return queue, results, queue.deserialize_result(good)

    queue, results, good = run(go())
    for kind in kinds:
        assert results[kind].status == "failed", kind
        assert results[kind].error.startswith(taskfuncs.MISBEHAVIOURS[kind][1]), (kind, results[kind].error)
    assert results["async"].error == "KeyboardInterrupt: pressed in a task"
    assert good == 5
    # the user's traceback only: no frame of sitq's, no chained section from the process
    for result in (results["keyboard-interrupt"], results["async"], results["divide"]):
        text = result.traceback
        assert text.startswith("Traceback (most recent call last):\n"), text
        assert "sitq" not in text.replace(str(taskfuncs.__file__), ""), text
        assert "direct cause" not in text and "asyncio" not in text, text
    assert results["divide"].traceback.splitlines()[1].startswith(f'  File "{taskfuncs.__file__}", line ')
    assert "in async_misbehave" in results["async"].traceback


def test_retries_options_and_coroutines_work_in_processes(db_path, tmp_path, run):
    async def go():
        backend = SQLiteBackend(db_path)
        queue = TaskQueue(backend)
        async with worker_running(backend, processes=2):
            flaky = await queue.enqueue(sitq.task(taskfuncs.flaky, retries=2, retry_delay=0.01),
                                        str(tmp_path / "flaky"), 2)
            coroutine = await queue.enqueue(taskfuncs.async_double, 21)
            return [queue.deserialize_result(await queue.get_result(i, timeout=60)) for i in (flaky, coroutine)]

    assert run(go()) == [3, 42]  # the third call succeeded


def test_progress_and_output_come_back_from_the_process_while_it_runs(db_path, tmp_path, run):
    gate = tmp_path / "gate"

    async def go():
        backend = SQLiteBackend(db_path)
        queue = TaskQueue(backend)
        async with worker_running(backend, processes=1) as worker:
            result = await queue.get_result(await queue.enqueue(taskfuncs.chatty, "hello"), timeout=60)
            steps = await queue.enqueue(taskfuncs.report_progress, 3)
            await queue.get_result(steps, timeout=60)
            printing = await queue.enqueue(taskfuncs.print_slowly, 3, 0.05, str(gate))
            # what it printed is there before it ends (it waits for the gate)
            await asyncio.to_thread(wait_until, lambda: "line 2" in (worker.live_output(printing) or ""))
            running = (await queue.status(printing)).status
            gate.touch()
            printed = await queue.get_result(printing, timeout=60)
            return result, await queue.status(steps), running, printed

    result, info, running, printed = run(go())
    assert result.status == "success" and result.output == "hello\nto stderr\n"
    assert (info.progress_done, info.progress_total, info.progress_message) == (3.0, 3.0, "step 3")
    assert running == "running"
    assert printed.output == "line 0\nline 1\nline 2\n"


def test_sitq_worker_runs_tasks_in_processes_from_the_command_line(db_path, run):
    async def enqueue():
        async with TaskQueue(SQLiteBackend(db_path)) as queue:
            return [await queue.enqueue(taskfuncs.child_pid) for _ in range(4)]

    ids = run(enqueue())
    done = subprocess.run(sitq_command("worker", str(db_path), "--processes", "2", "--drain", "--quiet"),
                          env=worker_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with sitq.SyncTaskQueue(SQLiteBackend(db_path)) as queue:
        pids = {queue.value(i, timeout=0) for i in ids}
    assert pids and os.getpid() not in pids


def test_the_processes_end_with_the_worker_and_with_its_process(db_path, tmp_path):
    """Stopping the worker ends its processes; so does killing the worker's own process,
    even while a child is in the middle of a task."""
    pid_file = tmp_path / "pid"
    with sitq.SyncTaskQueue(SQLiteBackend(db_path)) as queue:
        queue.enqueue(taskfuncs.write_pid_and_wait, str(pid_file))
    worker = subprocess.Popen(sitq_command("worker", str(db_path), "--processes", "1", "--quiet"), env=worker_env())
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text(), timeout=60)
        child = int(pid_file.read_text())
        assert alive(child)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
    wait_until(lambda: not alive(child), timeout=10)
    started = time.monotonic()
    idle = subprocess.Popen(sitq_command("worker", str(db_path), "--processes", "2", "--quiet",
                                         "--lease", "1"), env=worker_env())
    try:
        wait_until(lambda: len(_children(idle.pid)) == 2, timeout=60)
        children = _children(idle.pid)
    finally:
        idle.send_signal(signal.SIGTERM)
    assert idle.wait(30) == 0, "the worker stops on SIGTERM"
    assert time.monotonic() - started < 60
    assert not [(c, Path(f"/proc/{c}/cmdline").read_text()) for c in children if alive(c)]


def _children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found
