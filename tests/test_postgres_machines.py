"""Workers on many "machines" (processes) sharing one PostgreSQL queue, against a real server.

Three ``sitq worker postgresql://...`` processes drain a queue: every task runs exactly once;
with one of them killed by SIGKILL mid-run, every task still finishes and only the tasks it
held run again; with the server restarted mid-run, nothing is lost. The restart happens on a
private server this module starts in a temporary folder (``initdb``, ``pg_ctl``), so that other
users of the shared server are not cut off. Also here: the command line on a PostgreSQL queue,
and a DSN's password, which never shows.
"""

import contextlib
import datetime
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import taskfuncs
from backends import postgres_unavailable, wait_until_server_forgets
from conftest import sitq_command, worker_env

from sitq import SyncTaskQueue, open_backend
from sitq.errors import BackendError


@pytest.fixture
def target(postgres_target):
    return postgres_target


class Machines:
    """``sitq worker`` processes, each standing for a machine; all are ended when the test ends."""

    def __init__(self, target, folder):
        self.target, self.folder, self.procs = target, folder, []

    def start(self, *options):
        err = self.folder / f"worker-{len(self.procs)}.err"
        with err.open("w") as stderr:  # the child has its own copy
            proc = subprocess.Popen(sitq_command("worker", self.target, *options), env=worker_env(),
                                    stdout=subprocess.DEVNULL, stderr=stderr)
        proc.err_path = err
        self.procs.append(proc)
        return proc

    def wait_ready(self, proc):
        wait_until(lambda: "concurrency" in proc.err_path.read_text(), "the worker has started")

    def stop(self, proc):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)

    def end_all(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)

    def stderr(self, proc):
        return proc.err_path.read_text()


@pytest.fixture
def machines(target, tmp_path):
    pool = Machines(target, tmp_path)
    yield pool
    pool.end_all()


def wait_until(condition, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)
    return value


def runs(log):
    """task number -> [(event, pid)] from a run_logged log."""
    found = defaultdict(list)
    if log.exists():
        for line in log.read_text().splitlines():
            event, x, pid = line.split()
            found[int(x)].append((event, int(pid)))
    return found


def held_by(queue, pid):
    return {t.task_id for t in queue.list_tasks("running", limit=10_000) if f":{pid}:" in (t.worker_id or "")}


def successes(queue):
    return queue.overview(0).counts["success"]


def test_three_machines_drain_two_thousand_tasks_each_exactly_once(machines, tmp_path):
    log = tmp_path / "runs.log"
    procs = [machines.start("--concurrency", "4") for _ in range(3)]
    for proc in procs:
        machines.wait_ready(proc)
    with SyncTaskQueue(machines.target) as queue:
        ids = queue.map(taskfuncs.run_logged, [str(log)] * 2000, range(2000), [0.001] * 2000)
        wait_until(lambda: successes(queue) == 2000, "every task has run", timeout=180)
        for proc in procs:
            machines.stop(proc)
            assert "Traceback" not in machines.stderr(proc), machines.stderr(proc)
        results = queue.get_results(ids)
        assert [queue.deserialize_result(results[i]) for i in ids] == list(range(2000))
        assert {r.attempts for r in results.values()} == {1}
    seen = runs(log)
    assert sorted(seen) == list(range(2000))
    for x, events in seen.items():
        assert sorted(e for e, _ in events) == ["end", "start"], (x, events)  # once, to its end
    by_machine = Counter(pid for events in seen.values() for _, pid in events)
    assert set(by_machine) == {proc.pid for proc in procs}  # all three took part


def test_a_machine_killed_mid_run_costs_only_its_own_tasks_a_second_run(machines, tmp_path):
    log = tmp_path / "runs.log"
    victim, *others = procs = [machines.start("--concurrency", "4", "--lease", "1") for _ in range(3)]
    for proc in procs:
        machines.wait_ready(proc)
    with SyncTaskQueue(machines.target) as queue:
        ids = queue.map(taskfuncs.run_logged, [str(log)] * 2000, range(2000), [0.002] * 2000)

        def victim_busy():
            done = sum(1 for events in runs(log).values() for e, pid in events if e == "end" and pid == victim.pid)
            return done >= 100 and held_by(queue, victim.pid)

        wait_until(victim_busy, "the victim is running tasks")
        victim.kill()  # SIGKILL, mid-task
        victim.wait(timeout=30)
        wait_until_server_forgets(machines.target, victim.pid)  # the server may still commit its last claim
        caught = held_by(queue, victim.pid)
        assert caught, "the victim held no task when it was killed: the test proved nothing"
        wait_until(lambda: successes(queue) == 2000, "every task has run", timeout=180)
        for proc in others:
            machines.stop(proc)
            assert "Traceback" not in machines.stderr(proc), machines.stderr(proc)
        results = queue.get_results(ids)
    assert [r.status for r in results.values()].count("success") == 2000
    seen = runs(log)
    for x, task_id in enumerate(ids):
        events, result = seen[x], results[task_id]
        if task_id in caught:  # the victim held it (it may have run it, but not stored it): run again elsewhere
            assert result.attempts == 2 and len([e for e in events if e[0] == "start"]) <= 2, (x, events)
            assert any(e == "end" and pid != victim.pid for e, pid in events), (x, events)
        else:  # never held by a dead worker: exactly once
            assert result.attempts == 1 and sorted(e for e, _ in events) == ["end", "start"], (x, events)


# -- a private server, to restart ----------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin():
    root = Path("/usr/lib/postgresql")
    versions = sorted((p for p in root.glob("*/bin/initdb")), key=lambda p: int(p.parent.parent.name)) \
        if root.exists() else []
    return versions[-1].parent if versions else None


@pytest.fixture
def private_server():
    """A PostgreSQL server of its own (trust auth, user postgres) on a free port; yields
    ``(url, restart)`` and removes it afterwards."""
    reason = postgres_unavailable()
    if reason:
        pytest.skip(reason)
    bindir = _pg_bin()
    if bindir is None or os.geteuid() != 0 or shutil.which("runuser") is None:
        problem = "a private server needs PostgreSQL's initdb and pg_ctl, and root to run them as user postgres"
        if os.environ.get("SITQ_REQUIRE_POSTGRES") == "1":
            pytest.fail(problem)
        pytest.skip(problem)
    folder = Path(tempfile.mkdtemp(prefix="sitq-pg-"))
    shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", _free_port()

    def as_postgres(*command):
        subprocess.run(["runuser", "-u", "postgres", "--", *map(str, command)], check=True, capture_output=True,
                       timeout=120)

    def pg_ctl(*command):
        as_postgres(bindir / "pg_ctl", "-D", data, "-l", folder / "log", "-w", "-t", "60", *command)

    as_postgres(bindir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
    pg_ctl("-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres", lambda: pg_ctl("-m", "fast", "restart")
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            pg_ctl("-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def test_a_server_restart_mid_run_loses_nothing(private_server, tmp_path):
    url, restart = private_server
    log = tmp_path / "runs.log"
    pool = Machines(url, tmp_path)
    try:
        procs = [pool.start("--concurrency", "4") for _ in range(3)]
        for proc in procs:
            pool.wait_ready(proc)
        with SyncTaskQueue(url) as queue:
            ids = queue.map(taskfuncs.run_logged, [str(log)] * 1000, range(1000), [0.003] * 1000)
            wait_until(lambda: successes(queue) >= 200, "a fifth of the tasks have run")
            restart()  # every connection is cut; workers and this queue connect again
            wait_until(lambda: successes(queue) == 1000, "every task has run after the restart", timeout=180)
            for proc in procs:
                assert proc.poll() is None, pool.stderr(proc)  # they rode it out
                pool.stop(proc)
                assert "Traceback" not in pool.stderr(proc), pool.stderr(proc)
            assert any("connected again" in pool.stderr(proc) for proc in procs)
            results = queue.get_results(ids)
        assert [queue.deserialize_result(results[i]) for i in ids] == list(range(1000))
        seen = runs(log)
        assert all(any(e == "end" for e, _ in seen[x]) for x in range(1000))
    finally:
        pool.end_all()


# -- the command line, and passwords ---------------------------------------------------


def sitq(*args, check=True):
    done = subprocess.run(sitq_command(*args), env=worker_env(), capture_output=True, text=True, timeout=120)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def test_the_command_line_works_on_a_postgres_queue(target):
    with SyncTaskQueue(target) as queue:
        good = queue.enqueue(taskfuncs.add, 2, 3)
        bad = queue.enqueue(taskfuncs.fail, "no good")
        later = queue.enqueue(taskfuncs.add, 1, 1, eta=datetime.timedelta(hours=1))
        sitq("worker", target, "--drain", "--quiet")
        status = sitq("status", target).stdout
        assert "success" in status and "failed" in status and "no good" in status
        assert "5" in sitq("result", target, good).stdout
        shown = sitq("result", target, bad, check=False)
        assert shown.returncode != 0 and "ValueError: no good" in shown.stdout + shown.stderr
        assert "cancelled" in sitq("cancel", target, later).stdout
        assert queue.get_result(later, timeout=0).status == "cancelled"
        assert "retried" in sitq("retry", target, bad).stdout
        assert queue.get_result(bad, timeout=0) is None  # pending again
        assert "1" in sitq("purge", target, "--status", "success").stdout
        assert queue.get_results([good]) == {}


PASSWORD = "pw-S3cr3t-never-shown"


def test_a_password_in_the_dsn_never_shows(target, tmp_path):
    # The server trusts local connections, so any password works: it must show nowhere.
    with_password = target.replace("postgres@", f"postgres:{PASSWORD}@", 1)
    assert with_password != target
    backend = open_backend(with_password)
    assert PASSWORD not in repr(backend) and PASSWORD not in backend.target
    with SyncTaskQueue(with_password) as queue:
        assert PASSWORD not in repr(queue)
        queue.enqueue(taskfuncs.fail, "boom")
    worker = sitq("worker", with_password, "--drain")
    assert PASSWORD not in worker.stdout + worker.stderr and "postgres:***@" in worker.stderr
    status = sitq("status", with_password)
    assert PASSWORD not in status.stdout + status.stderr and "postgres:***@" in status.stdout
    nowhere = with_password.replace(":5432/", ":1/") if ":5432/" in with_password else None
    if nowhere is not None:  # a server that is not there: the error names the address, not the password
        refused = sitq("status", nowhere, check=False)
        assert refused.returncode != 0 and PASSWORD not in refused.stdout + refused.stderr
        assert "postgres:***@" in refused.stdout + refused.stderr
        with pytest.raises(BackendError) as caught:
            with SyncTaskQueue(nowhere):
                pass
        assert PASSWORD not in str(caught.value) and "***" in str(caught.value)


def test_the_postgres_workers_use_at_most_two_connections_each(target):
    import psycopg
    from backends import POSTGRES_DSN

    with SyncTaskQueue(target) as queue:
        queue.map(taskfuncs.pid_after, [0.2] * 8)
        proc = subprocess.Popen(sitq_command("worker", target, "--concurrency", "4", "--quiet"), env=worker_env(),
                                stderr=subprocess.PIPE, text=True)
        try:
            with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
                def connections():
                    return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                                        (f"sitq {proc.pid}",)).fetchone()[0]

                wait_until(lambda: connections() == 2, "the worker has its two connections")
                most = 0
                deadline = time.monotonic() + 1.5
                while time.monotonic() < deadline:
                    most = max(most, connections())
                    time.sleep(0.01)
                assert most == 2
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)

