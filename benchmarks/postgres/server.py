"""The PostgreSQL server the benchmark runs on: a fresh database per cell, worker processes
started ready and released together, and a count of each worker process's connections.

A cell's database is made with ``CREATE DATABASE`` on the server the DSN names and dropped
with ``DROP DATABASE ... WITH (FORCE)`` after, so no system sees another's tables or rows.
"""

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from urllib.parse import urlsplit

import psycopg

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def default_dsn():
    """The server to measure on: ``SITQ_TEST_POSTGRES``, else the local trust-auth default."""
    return os.environ.get("SITQ_TEST_POSTGRES") or DEFAULT_DSN


def check_dsn(dsn):
    """Return `dsn` if it is a ``postgresql://`` URL naming a database, else raise ValueError."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres") or not parts.path.strip("/"):
        raise ValueError(f"give the server as a postgresql://user@host:port/database URL, not {dsn!r}")
    return dsn


def with_database(dsn, name):
    """`dsn` pointing at database `name` instead (the query string, if any, is kept)."""
    return urlsplit(dsn)._replace(path="/" + name).geturl()


def reachable(dsn, timeout=3):
    """None if the server at `dsn` accepts a connection, else the reason it does not."""
    try:
        with psycopg.connect(dsn, connect_timeout=timeout):
            return None
    except (psycopg.Error, ValueError) as exc:
        return f"{type(exc).__name__}: {str(exc).strip()}"


@contextlib.contextmanager
def fresh_database(dsn, system):
    """Create an empty database for one cell on `dsn`'s server, yield its DSN, drop it after.

    Its name starts with ``sitq_bench_<pid of the benchmark run>_`` (the cell's parent process).
    """
    name = f"sitq_bench_{os.getppid()}_{system}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(dsn, name)
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def server_settings(dsn):
    """The server version and the settings that decide commit cost, as one line."""
    names = ("synchronous_commit", "fsync", "wal_level", "shared_buffers", "max_connections")
    with psycopg.connect(dsn) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
        values = {n: conn.execute(f"SHOW {n}").fetchone()[0] for n in names}
    return f"PostgreSQL {version} ({', '.join(f'{k}={v}' for k, v in values.items())})"


def connections_of(pid, dsn):
    """How many TCP connections process `pid` has open to the server `dsn` names (Linux /proc)."""
    port = urlsplit(dsn).port or 5432
    try:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        count = 0
        for table in ("tcp", "tcp6"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as lines:
                next(lines)
                for line in lines:
                    fields = line.split()
                    remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                    if remote_port == port and fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
                        count += 1
        return count
    except FileNotFoundError:  # the process has exited
        return 0


class ConnectionSampler:
    """Samples the connections of some processes every `period` seconds; keeps each one's peak."""

    def __init__(self, pids, dsn, period=0.02):
        self.pids, self.dsn, self.period = list(pids), dsn, period
        self.peak = dict.fromkeys(self.pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while True:
            for pid in self.pids:
                self.peak[pid] = max(self.peak[pid], connections_of(pid, self.dsn))
            if self._stop.wait(self.period):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()

    def most(self):
        """The largest peak of any sampled process."""
        return max(self.peak.values(), default=0)


# -- worker processes: started, ready, released together, each reporting when it finished --------


def worker_command(mode, system, dsn, *args):
    """The command line of one worker process of `system` on `dsn`: mode ``work`` drains once
    released (see `drain_with`), mode ``serve`` runs until killed (for the round trip)."""
    return [sys.executable, "-m", "benchmarks.postgres.cell", mode, system, dsn, *map(str, args)]


def start(command, env=None):
    """Start one process with pipes on its stdin and stdout."""
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def drain_with(system, dsn, count, *args, timeout=600):
    """Start `count` workers of `system`, wait until each is connected, release them together
    and wait until each has drained the queue.

    Returns (seconds from the release to the last worker's last task, tasks each worker ran,
    the most connections one worker process had open while it ran).
    """
    procs = [start(worker_command("work", system, dsn, *args)) for _ in range(count)]
    try:
        for proc in procs:
            line = proc.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"{system} worker did not start: {line!r} (exit status {proc.wait()})")
        with ConnectionSampler([p.pid for p in procs], dsn) as sampler:
            go = time.monotonic()
            for proc in procs:
                proc.stdin.write("go\n")
                proc.stdin.flush()
            reports = [json.loads(proc.communicate(timeout=timeout)[0].strip().splitlines()[-1]) for proc in procs]
        if any(proc.returncode for proc in procs):
            raise RuntimeError(f"{system} worker exit statuses {[p.returncode for p in procs]}")
        return max(r["finished"] for r in reports) - go, [r["ran"] for r in reports], sampler.most()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def ready_then_wait():
    """In a worker process: say ``ready`` to the parent and block until it says ``go``."""
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        sys.exit("the benchmark parent went away before releasing this worker")


def report_done(ran, finished=None):
    """In a worker process: tell the parent how many tasks it ran and when it finished them.

    `finished` is ``time.monotonic()`` (one clock for every process on Linux) after the last task.
    """
    print(json.dumps({"ran": ran, "finished": time.monotonic() if finished is None else finished}), flush=True)
