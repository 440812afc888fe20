"""A task that kills its own worker is found out, and only it is charged.

Every task claimed beside it loses its worker too, so after a lost worker each of them is a
suspect that runs alone: the innocent ones finish, and only the culprit keeps killing its
worker until its ``LOST_WORKER_LIMIT``-th loss fails it. Real ``sitq worker`` processes on a
real shared store, restarted as a supervisor would restart them; the claims of suspects and a
worker making room for one run in this process, on every backend.
"""

import subprocess
import time

import taskfuncs
from conftest import sitq_command, worker_env, worker_running

from sitq import SyncTaskQueue, TaskQueue
from sitq.backends.rules import LOST_WORKER_LIMIT


def log_lines(log):
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def test_only_the_task_that_kills_its_worker_fails(shared_target, tmp_path):
    log = tmp_path / "runs.log"
    queue = SyncTaskQueue(shared_target)
    innocent = [queue.enqueue(taskfuncs.run_logged, str(log), x, 0.8) for x in (0, 1)]
    culprit = queue.enqueue(taskfuncs.kill_own_worker, str(log), 2, 0.3)
    innocent.append(queue.enqueue(taskfuncs.run_logged, str(log), 3, 0.8))
    ids = innocent + [culprit]

    started, exit_codes = 0, []
    deadline = time.monotonic() + 90
    while not all(info.finished for info in queue.statuses(ids).values()):
        assert time.monotonic() < deadline, f"not settled: {queue.statuses(ids)}"
        worker = subprocess.Popen(
            sitq_command("worker", shared_target, "--concurrency", "4", "--lease", "1", "--poll-interval", "0.1", "-q"),
            env=worker_env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        started += 1
        # a supervisor: let it run until it dies or everything has settled
        while worker.poll() is None and not all(info.finished for info in queue.statuses(ids).values()):
            time.sleep(0.05)
        if worker.poll() is None:
            worker.terminate()
        _, err = worker.communicate(timeout=30)
        exit_codes.append(worker.returncode)
        assert "Traceback" not in err, err

    results = {task_id: queue.get_result(task_id, timeout=0) for task_id in ids}
    queue.close()
    for task_id, x in zip(innocent, (0, 1, 3), strict=True):
        assert results[task_id].status == "success", results[task_id]
        assert queue.deserialize_result(results[task_id]) == x
    assert results[culprit].status == "failed"
    assert results[culprit].error.startswith("WorkerLostError: ")
    assert results[culprit].attempts == LOST_WORKER_LIMIT

    lines = log_lines(log)
    culprit_runs = [line for line in lines if line[1] == "2"]
    assert len(culprit_runs) == LOST_WORKER_LIMIT and exit_codes.count(70) == LOST_WORKER_LIMIT
    for x in ("0", "1", "3"):
        ends = [i for i, line in enumerate(lines) if line[0] == "end" and line[1] == x]
        assert len(ends) == 1  # finished exactly once ...
        end = ends[0]
        pid = lines[end][2]
        start = max(i for i, line in enumerate(lines[:end]) if line[:3] == ["start", x, pid])
        # ... and alone: nothing else started in its process while it ran
        beside = [line for line in lines[start + 1 : end] if line[2] == pid]
        assert beside == [], f"task {x} ran beside {beside}"
    # and the first round did run them together: without isolation all four would have been charged
    first_pid = lines[0][2]
    assert len({line[1] for line in lines if line[2] == first_pid}) == 4


def test_suspects_are_claimed_alone_and_only_by_an_empty_worker(store, run):
    async def go():
        backend = store
        queue = TaskQueue(backend)
        ids = await queue.map(taskfuncs.add, range(4), range(4))
        now = time.time()
        lost = await backend.claim("dead", 2, now, now - 1)  # two claimed; then the worker died
        assert await backend.requeue_expired(now) == 2
        assert await backend.suspects_waiting(now)
        busy = await backend.claim("busy", 10, now, now + 30, alone=False)
        assert sorted(t.task_id for t in busy) == sorted(ids[2:])  # the suspects are left for an empty worker
        assert all(t.lost == 0 for t in busy)
        first = await backend.claim("empty", 10, now, now + 30, alone=True)
        assert [(t.task_id, t.lost) for t in first] == [(lost[0].task_id, 1)]  # one suspect, nothing beside it
        second = await backend.claim("empty-2", 10, now, now + 30, alone=True)
        assert [t.task_id for t in second] == [lost[1].task_id]
        assert not await backend.suspects_waiting(now)
        await queue.close()

    run(go())


def test_a_busy_worker_empties_itself_for_a_waiting_suspect(store, run):
    """A suspect that becomes ready while a worker is busy with a stream of work gets run alone,
    before the stream ends (no starvation), and nothing runs beside it."""

    async def go():
        backend = store
        queue = TaskQueue(backend)
        suspect = await queue.enqueue(taskfuncs.sleep_then, 0.1, "suspect")
        now = time.time()
        # claimed by a worker that dies: the task becomes a suspect when its lease runs out,
        # once the worker below is busy (it deals with expired leases as it runs)
        await backend.claim("dead", 1, now, now + 0.3)
        stream = await queue.map(taskfuncs.sleep_then, [0.05] * 30, range(30))
        async with worker_running(backend, max_concurrency=2, lease=0.3):
            results = [await queue.get_result(task_id, timeout=30) for task_id in [suspect, *stream]]
        await queue.close()
        return results

    suspect, *stream = run(go())
    assert suspect.status == "success" and suspect.attempts == 2
    assert all(r.status == "success" for r in stream)
    assert any(r.started_at > suspect.finished_at for r in stream)  # it did not wait for the whole stream
    beside = [r for r in stream if r.started_at < suspect.finished_at and r.finished_at > suspect.started_at]
    assert beside == []
