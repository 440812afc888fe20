"""The physical floor: the least work any SQLite-backed queue has to do, written with `sqlite3`.

One table in WAL mode with ``synchronous=NORMAL``; a task is one INSERT of a cloudpickled
``(func, args)`` payload, a claim is one ``UPDATE ... RETURNING`` on the oldest pending row
(found through a partial index, so finished rows cost nothing), and a result is one
``UPDATE``, each in its own transaction. Threads of one process share a lock around writes
instead of meeting SQLite's busy handler. An idle worker or a result waiter looks again as soon
as a thread of its own process commits, and every `POLL` seconds for other processes.
"""

import sqlite3
import subprocess
import sys
import threading
import time

import cloudpickle

from benchmarks.common import POLL, check_stored, latency, peak_rss_mb
from benchmarks.tasks import f

SCHEMA = """
CREATE TABLE IF NOT EXISTS task (id INTEGER PRIMARY KEY, status INTEGER NOT NULL DEFAULT 0,
                                 payload BLOB NOT NULL, result BLOB);
CREATE INDEX IF NOT EXISTS task_pending ON task (id) WHERE status = 0;
"""
INSERT = "INSERT INTO task (payload) VALUES (?)"
CLAIM = ("UPDATE task SET status = 1 WHERE id = (SELECT id FROM task WHERE status = 0 "
         "ORDER BY id LIMIT 1) RETURNING id, payload")
STORE = "UPDATE task SET status = 2, result = ? WHERE id = ?"
WRITE_LOCK = threading.Lock()
CHANGED = threading.Condition()  # notified after every commit in this process


def connect(db):
    """Open an autocommit connection (every statement commits) and create the schema."""
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(SCHEMA)
    return conn


def write(conn, sql, params):
    """Run one statement in its own transaction, wake this process's waiters, return the row id."""
    with WRITE_LOCK:
        rowid = conn.execute(sql, params).lastrowid
    with CHANGED:
        CHANGED.notify_all()
    return rowid


def put(conn, func, *args):
    """Enqueue one task and return its id."""
    return write(conn, INSERT, (cloudpickle.dumps((func, args)),))


def work(db, stop):
    """Claim, run and store tasks until the queue is empty and `stop()` is true."""
    conn = connect(db)
    while True:
        finished = stop()  # read before the claim, so nothing enqueued before `stop` is missed
        with CHANGED:
            with WRITE_LOCK:
                rows = conn.execute(CLAIM).fetchall()  # fetchall finishes the statement, so it commits
            if not rows:
                if finished:
                    break
                CHANGED.wait(POLL)
                continue
        tid, payload = rows[0]
        func, args = cloudpickle.loads(payload)
        write(conn, STORE, (cloudpickle.dumps(func(*args)), tid))
    conn.close()


def wait(conn, tid, timeout=60):
    """Wait until task `tid` has a result and return it."""
    deadline = time.monotonic() + timeout
    with CHANGED:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT result FROM task WHERE id = ? AND status = 2", (tid,)).fetchone()
            if row:
                return cloudpickle.loads(row[0])
            CHANGED.wait(POLL)
    raise TimeoutError(f"task {tid} not finished after {timeout} s")


def threads(db, count, stop):
    """Start `count` worker threads and return them."""
    started = [threading.Thread(target=work, args=(db, stop)) for _ in range(count)]
    for t in started:
        t.start()
    return started


def stored(conn, ids):
    """Count the results readable for `ids`, checking each value against its argument."""
    first = min(ids)
    rows = conn.execute("SELECT id, result FROM task WHERE id >= ? AND status = 2", (first,))
    values = dict(rows.fetchall())
    return sum(cloudpickle.loads(values[t]) == i for i, t in enumerate(ids) if t in values)


def enqueue(db, n):
    """W1: `n` sequential enqueues; throughput and per-call latency."""
    conn, samples = connect(db), []
    start = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        put(conn, f, i)
        samples.append(time.perf_counter() - t)
    return {"tasks_s": n / (time.perf_counter() - start), **latency(samples, "us", 50, 99)}


def drain(db, n, concurrency):
    """W2: drain `n` queued tasks with `concurrency` worker threads; throughput."""
    conn = connect(db)
    ids = [put(conn, f, i) for i in range(n)]
    start = time.perf_counter()
    for t in threads(db, concurrency, stop=lambda: True):
        t.join()
    rate = n / (time.perf_counter() - start)
    return {"tasks_s": rate, "stored": check_stored(stored(conn, ids), n, "floor")}


def round_trip(db, n, cross_process):
    """W3: `n` times enqueue one task and wait for it, the worker in a thread or another process."""
    conn, done = connect(db), threading.Event()
    if cross_process:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.cell", "serve", "floor", db])
    else:
        workers = threads(db, 1, stop=done.is_set)
    for i in range(5):  # warm up and wait for the worker to start
        wait(conn, put(conn, f, i))
    samples = []
    for i in range(n):
        t = time.perf_counter()
        assert wait(conn, put(conn, f, i)) == i
        samples.append(time.perf_counter() - t)
    if cross_process:
        proc.terminate()
        proc.wait()
    else:
        done.set()
        workers[0].join()
    figures = latency(samples, "ms", 50, 95, 99)
    return figures | ({"rss_mb": peak_rss_mb(children=True)} if cross_process else {})


def mixed(db, n, producers):
    """W4: `producers` threads enqueue `n` tasks each while one worker thread drains; wall time."""
    conn, produced = connect(db), threading.Event()

    def produce():
        own = connect(db)
        for i in range(n):
            put(own, f, i)
        own.close()

    start = time.perf_counter()
    workers = threads(db, 1, stop=produced.is_set)
    makers = [threading.Thread(target=produce) for _ in range(producers)]
    for t in makers:
        t.start()
    for t in makers:
        t.join()
    produced.set()
    workers[0].join()
    wall = time.perf_counter() - start
    count = conn.execute("SELECT count(*) FROM task WHERE status = 2").fetchone()[0]
    return {"wall_s": wall, "stored": check_stored(count, n * producers, "floor")}


def bulk(db, n):
    """W5: enqueue `n` tasks in one transaction; throughput."""
    conn = connect(db)
    start = time.perf_counter()
    with WRITE_LOCK:
        conn.execute("BEGIN")
        conn.executemany(INSERT, ((cloudpickle.dumps((f, (i,))),) for i in range(n)))
        conn.execute("COMMIT")
    return {"tasks_s": n / (time.perf_counter() - start)}


def prefill(db, n):
    """Insert `n` finished tasks straight into the table."""
    conn = connect(db)
    done = cloudpickle.dumps(0)
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO task (status, payload, result) VALUES (2, ?, ?)",
                     ((cloudpickle.dumps((f, (i,))), done) for i in range(n)))
    conn.execute("COMMIT")
    conn.close()
    return {}


def serve(db):
    """Run one worker until the process is terminated."""
    work(db, stop=lambda: False)
