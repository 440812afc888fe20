"""Workers that die or stall, with real processes on a real shared store (each backend of
tests/backends.py that other processes can open): no task is lost, and only a dead worker's
tasks run twice.

The worker processes are ``sitq worker`` commands; the tests list the running tasks to see
which worker holds which (a worker's id contains its pid). One test plays the dying worker
through the backend itself, to reach the lost-worker limit quickly: it runs on every backend.
"""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter, defaultdict

import pytest
import taskfuncs
from backends import wait_until_server_forgets
from conftest import sitq_command, worker_env

import sitq
from sitq import SyncTaskQueue, TaskQueue
from sitq.backends.rules import LOST_WORKER_LIMIT

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and SIGSTOP are POSIX signals")


class Workers:
    """``sitq worker`` processes, each with its stderr in a file; all are ended when the test ends."""

    def __init__(self, target, folder):
        self.target = target
        self.folder = folder
        self.procs = []

    def start(self, *options):
        number = len(self.procs)
        stderr = open(self.folder / f"worker-{number}.err", "w")
        proc = subprocess.Popen(
            sitq_command("worker", self.target, "--quiet", "--poll-interval", "0.2", *options),
            env=worker_env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        stderr.close()
        proc.stderr_path = self.folder / f"worker-{number}.err"
        self.procs.append(proc)
        return proc

    def stop(self, proc):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr_path.read_text()

    def end_all(self):
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.wait(timeout=30)

    def stderr(self, proc):
        return proc.stderr_path.read_text()


@pytest.fixture
def workers(shared_target, tmp_path):
    pool = Workers(shared_target, tmp_path)
    yield pool
    pool.end_all()


def wait_until(condition, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)
    return value


def held_by(queue, pid):
    """Ids of the tasks running under the worker process ``pid``."""
    return {t.task_id for t in queue.list_tasks("running", limit=10_000) if f":{pid}:" in (t.worker_id or "")}


def log_entries(log):
    """(event, task number, pid) for each line of a run_logged log."""
    if not log.exists():
        return []
    return [(event, int(x), int(pid)) for event, x, pid in (line.split() for line in log.read_text().splitlines())]


def test_killed_workers_tasks_are_rerun_and_only_those(workers, tmp_path):
    log = tmp_path / "runs.log"
    per_round, rounds, lease = 100, 3, "1.0"
    queue = SyncTaskQueue(workers.target)
    ids, killed = [], set()
    in_flight = Counter()  # task id -> how many times its worker was killed under it
    for _ in range(rounds):
        ids += queue.map(taskfuncs.run_logged, [str(log)] * per_round, range(len(ids), len(ids) + per_round),
                         [0.01, 0.02] * (per_round // 2))
        victim, survivor = (workers.start("--concurrency", "2", "--lease", lease) for _ in range(2))
        ended_before = sum(event == "end" for event, _, _ in log_entries(log))

        def victim_busy(victim=victim, ended_before=ended_before):
            ended = sum(event == "end" for event, _, _ in log_entries(log))
            return ended >= ended_before + 30 and held_by(queue, victim.pid)

        wait_until(victim_busy, "the victim is running tasks")
        victim.kill()  # SIGKILL, mid-task
        victim.wait(timeout=30)
        wait_until_server_forgets(workers.target, victim.pid)  # a server may commit its last claim yet
        killed.add(victim.pid)
        caught = held_by(queue, victim.pid)  # its lease has not run out yet: these were in flight
        in_flight.update(caught)
        # the survivor carries on, and takes the dead worker's tasks back once their lease runs out
        wait_until(lambda victim=victim: not held_by(queue, victim.pid), "the dead worker's tasks are requeued")
        workers.stop(survivor)
        assert "Traceback" not in workers.stderr(survivor)
    drain = subprocess.run(
        sitq_command("worker", workers.target, "--drain", "--quiet", "--concurrency", "4"),
        env=worker_env(), capture_output=True, text=True, timeout=120,
    )
    assert drain.returncode == 0 and "Traceback" not in drain.stderr, drain.stderr

    results = [queue.get_result(task_id, timeout=0) for task_id in ids]
    queue.close()
    assert [r.status for r in results].count("success") == len(ids)  # none lost, none failed
    assert [queue.deserialize_result(r) for r in results] == list(range(len(ids)))
    assert in_flight, "no task was in flight when a worker was killed; the test proved nothing"

    runs = defaultdict(list)
    for event, x, pid in log_entries(log):
        runs[ids[x]].append((event, pid))
    for result in results:
        mine = runs[result.task_id]
        starts = Counter(pid for event, pid in mine if event == "start")
        ends = Counter(pid for event, pid in mine if event == "end")
        if not in_flight[result.task_id]:
            # no worker died under it: it ran exactly once, on its first attempt
            assert result.attempts == 1 and len(mine) == 2 and starts == ends, (result.task_id, mine)
            continue
        # claimed once more for each worker that died under it (a dead worker may not have started it yet)
        assert result.attempts == 1 + in_flight[result.task_id], (result.task_id, mine)
        assert sum(starts.values()) <= result.attempts, (result.task_id, mine)
        assert set(starts - ends) <= killed, (result.task_id, mine)  # only dead workers left runs unfinished
        assert mine[-1][0] == "end", (result.task_id, mine)  # and the last run, whose result is stored, ended
    assert sum(in_flight.values()) == sum(r.attempts - 1 for r in results)


def test_a_task_longer_than_its_lease_is_not_taken_over_while_its_worker_lives(workers, tmp_path):
    with SyncTaskQueue(workers.target) as queue:
        task_id = queue.enqueue(taskfuncs.pid_after, 2.0)  # four leases long
        owner = workers.start("--lease", "0.5")
        wait_until(lambda: held_by(queue, owner.pid), "the task runs")
        other = workers.start("--lease", "0.5")  # sweeping for expired leases all the while
        result = queue.get_result(task_id, timeout=60)
        workers.stop(owner)
        workers.stop(other)
    assert result.status == "success" and result.attempts == 1
    assert queue.deserialize_result(result) == owner.pid


def stop_outside_a_write(proc, target):
    """SIGSTOP ``proc``, but not while it holds a SQLite file's write lock (that would stall every
    other process). A store without one store-wide lock (a server) is stopped as it is."""
    if not os.path.isfile(target):
        os.kill(proc.pid, signal.SIGSTOP)
        return
    conn = sqlite3.connect(target, timeout=0, isolation_level=None)
    try:
        while True:
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:  # it was stopped mid-write: let it finish and try again
                os.kill(proc.pid, signal.SIGCONT)
                time.sleep(0.005)
                continue
            conn.execute("ROLLBACK")
            return
    finally:
        conn.close()


def test_a_paused_worker_cannot_overwrite_the_outcome_of_the_worker_that_took_over(workers):
    with SyncTaskQueue(workers.target) as queue:
        task_id = queue.enqueue(taskfuncs.pid_after, 1.5)
        paused = workers.start("--lease", "0.5")
        wait_until(lambda: held_by(queue, paused.pid), "the first worker runs the task")
        stop_outside_a_write(paused, workers.target)  # paused mid-task, past its lease
        taker = workers.start("--lease", "0.5")
        result = queue.get_result(task_id, timeout=60)
        assert queue.deserialize_result(result) == taker.pid and result.attempts == 2

        os.kill(paused.pid, signal.SIGCONT)  # it wakes up, finishes its run and tries to store it
        wait_until(lambda: "lost its claim" in workers.stderr(paused), "the paused worker notices")
        workers.stop(paused)
        workers.stop(taker)
        after = queue.get_result(task_id, timeout=0)
    assert after == result  # the taking-over worker's outcome stands
    assert queue.deserialize_result(after) == taker.pid


def test_a_task_that_keeps_losing_its_worker_fails_in_the_end(store, run):
    """A task that kills every worker that runs it (a segfault, the OOM killer) must not loop forever."""

    async def go():
        backend = store
        queue = TaskQueue(backend)
        task_id = await queue.enqueue(sitq.task(taskfuncs.add, retries=1), 1, 2)
        for _ in range(100):
            now = time.time()
            if not await backend.claim("doomed-worker", 1, now, now - 1):  # claimed, then the worker died
                break
            await backend.requeue_expired(now)
        result = await queue.get_result(task_id, timeout=0)
        await queue.close()
        return result

    result = run(go())
    assert result.status == "failed"
    # lost workers have their own budget: retries are for what the task raises
    assert result.attempts == LOST_WORKER_LIMIT
    assert result.error.startswith("WorkerLostError: ")


PRODUCER = """
import sys
import taskfuncs
from backends import wait_until_server_forgets
from sitq import SyncTaskQueue

target, producer, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with SyncTaskQueue(target) as queue:
    for i in range(count):
        print(queue.enqueue(taskfuncs.echo, (producer, i)), producer, i)
"""


def test_four_producers_and_two_workers_on_one_store(workers, tmp_path):
    count = 250
    script = tmp_path / "producer.py"
    script.write_text(PRODUCER)
    consumers = [workers.start("--concurrency", "2") for _ in range(2)]
    producers = [
        subprocess.Popen(
            [sys.executable, str(script), workers.target, str(p), str(count)],
            env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for p in range(4)
    ]
    expected = {}
    for proc in producers:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "locked" not in err, err
        for line in out.splitlines():
            task_id, producer, i = line.split()
            expected[task_id] = (int(producer), int(i))
    assert len(expected) == 4 * count

    with SyncTaskQueue(workers.target) as queue:
        wait_until(lambda: queue.overview(0).counts["success"] == len(expected), "every task has run", timeout=120)
        for proc in consumers:
            workers.stop(proc)
            assert "locked" not in workers.stderr(proc) and "Traceback" not in workers.stderr(proc)
        assert {task_id: queue.value(task_id, timeout=0) for task_id in expected} == expected


def test_a_draining_worker_reruns_the_tasks_of_a_dead_worker(workers):
    with SyncTaskQueue(workers.target) as queue:
        task_id = queue.enqueue(taskfuncs.pid_after, 1.0)
        dead = workers.start("--lease", "0.3")
        wait_until(lambda: held_by(queue, dead.pid), "the task runs")
        dead.kill()
        dead.wait(timeout=30)
        # it had renewed its lease for 0.3 s at most when it died
        lease_over = time.time() + 0.3
        wait_until(lambda: time.time() > lease_over, "the dead worker's lease is over")
        drain = subprocess.run(
            sitq_command("worker", workers.target, "--drain", "--quiet", "--lease", "0.3"),
            env=worker_env(), capture_output=True, text=True, timeout=60,
        )
        assert drain.returncode == 0, drain.stderr
        result = queue.get_result(task_id, timeout=0)
    assert result is not None and result.status == "success" and result.attempts == 2
