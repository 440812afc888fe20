"""The floor on PostgreSQL: a queue written the plain way with psycopg 3, the least work any
PostgreSQL-backed queue has to do.

One table; a task is one ``INSERT`` of a cloudpickled ``(func, args)`` payload in its own
transaction (bulk: ``executemany`` in one transaction); a worker claims the oldest ready rows
with ``SELECT ... FOR UPDATE SKIP LOCKED``, runs them, stores each result with an ``UPDATE``
and commits, one transaction per claim of `batch` tasks. For the round trip the producer
inserts and sends ``NOTIFY task`` in one transaction; the worker, listening on its own
connection, claims, runs, stores the result and sends ``NOTIFY done, '<id>'`` with that commit;
the producer wakes on the notification and reads the result back.
"""

import time

import cloudpickle
import psycopg

from benchmarks.common import check_stored, latency
from benchmarks.postgres.server import (
    ConnectionSampler,
    drain_with,
    ready_then_wait,
    report_done,
    start,
    worker_command,
)
from benchmarks.tasks import f

SCHEMA = """
CREATE TABLE IF NOT EXISTS task (id bigserial PRIMARY KEY, status smallint NOT NULL DEFAULT 0,
                                 payload bytea NOT NULL, result bytea);
CREATE INDEX IF NOT EXISTS task_ready ON task (id) WHERE status = 0
"""
INSERT = "INSERT INTO task (payload) VALUES (%s) RETURNING id"
INSERT_MANY = "INSERT INTO task (payload) VALUES (%s)"
CLAIM = "SELECT id, payload FROM task WHERE status = 0 ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED"
STORE = "UPDATE task SET status = 2, result = %s WHERE id = %s"
RESULT = "SELECT result FROM task WHERE id = %s AND status = 2"


def connect(dsn, autocommit=True):
    """Open a connection (autocommit: every statement is its own transaction) and make the table."""
    conn = psycopg.connect(dsn, autocommit=autocommit)
    with conn.transaction():
        for statement in SCHEMA.split(";"):
            conn.execute(statement)
    return conn


def payload(i):
    """The bytes of the task ``f(i)``."""
    return cloudpickle.dumps((f, (i,)))


def run_batch(conn, batch, notify=False):
    """Claim up to `batch` ready tasks, run them, store their results, commit; return how many."""
    with conn.transaction():
        rows = conn.execute(CLAIM, (batch,)).fetchall()
        if rows:
            results = []
            for tid, data in rows:
                func, args = cloudpickle.loads(data)
                results.append((cloudpickle.dumps(func(*args)), tid))
            conn.cursor().executemany(STORE, results)
            if notify:
                conn.execute("SELECT pg_notify('done', %s)", (",".join(str(tid) for _, tid in results),))
    return len(rows)


def stored(conn, n):
    """How many finished tasks hold the value of their argument (ids are 1..n, argument id - 1)."""
    rows = conn.execute("SELECT id, result FROM task WHERE status = 2").fetchall()
    return sum(cloudpickle.loads(result) == tid - 1 for tid, result in rows if tid <= n)


def enqueue(dsn, n):
    """W1: `n` tasks, one INSERT and one commit each; throughput and per-call latency."""
    with connect(dsn) as conn:
        samples = []
        start_at = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            conn.execute(INSERT, (payload(i),)).fetchone()
            samples.append(time.perf_counter() - t)
        return {"tasks_s": n / (time.perf_counter() - start_at), **latency(samples, "us", 50, 99)}


def bulk(dsn, n):
    """W5: `n` tasks with one ``executemany`` in one transaction; throughput."""
    with connect(dsn) as conn:
        start_at = time.perf_counter()
        with conn.transaction():
            conn.cursor().executemany(INSERT_MANY, [(payload(i),) for i in range(n)])
        return {"tasks_s": n / (time.perf_counter() - start_at)}


def drain(dsn, n, workers, batch=1):
    """W2: `n` queued tasks drained by `workers` processes claiming `batch` at a time."""
    with connect(dsn) as conn:
        with conn.transaction():
            conn.cursor().executemany(INSERT_MANY, [(payload(i),) for i in range(n)])
        seconds, ran, connections = drain_with("floor", dsn, workers, batch)
        if sum(ran) != n:
            raise RuntimeError(f"floor: workers ran {sum(ran)} tasks of {n}")
        return {"tasks_s": n / seconds, "stored": check_stored(stored(conn, n), n, "floor"),
                "connections": connections}


def work(dsn, batch):
    """A drain worker process: connect, wait for the release, claim `batch` at a time until empty."""
    conn, batch, ran = connect(dsn, autocommit=False), int(batch), 0
    conn.commit()
    ready_then_wait()
    while done := run_batch(conn, batch):
        ran += done
    report_done(ran)
    conn.close()


def serve(dsn):
    """The round trip's worker process: LISTEN on its own connection, run what is ready on each
    notification (and once a second in case one was missed), NOTIFY each result's id."""
    conn, listener = connect(dsn, autocommit=False), connect(dsn)
    conn.commit()
    listener.execute("LISTEN task")
    print("ready", flush=True)
    while True:
        while run_batch(conn, 1, notify=True):
            pass
        for _ in listener.notifies(timeout=1.0, stop_after=1):
            pass


def wait_for_id(listener, tid, timeout=60):
    """Block until a ``done`` notification names task `tid`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for note in listener.notifies(timeout=deadline - time.monotonic(), stop_after=1):
            if str(tid) in note.payload.split(","):
                return
    raise TimeoutError(f"floor: no notification for task {tid} after {timeout} s")


def round_trip(dsn, n):
    """W3: `n` times insert a task with NOTIFY, wait for the worker's NOTIFY, read the result."""
    with connect(dsn) as conn, connect(dsn) as listener:
        listener.execute("LISTEN done")
        proc = start(worker_command("serve", "floor", dsn))
        try:
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"floor worker did not start (exit status {proc.wait()})")
            samples = []
            with ConnectionSampler([proc.pid], dsn) as sampler:
                for i in range(-5, n):  # 5 untimed round trips first
                    t = time.perf_counter()
                    with conn.transaction():
                        tid = conn.execute(INSERT, (payload(i),)).fetchone()[0]
                        conn.execute("NOTIFY task")
                    wait_for_id(listener, tid)
                    value = cloudpickle.loads(conn.execute(RESULT, (tid,)).fetchone()[0])
                    if value != i:
                        raise RuntimeError(f"floor: task {tid} returned {value!r}, not {i}")
                    if i >= 0:
                        samples.append(time.perf_counter() - t)
        finally:
            proc.kill()
            proc.wait()
        return {**latency(samples, "ms", 50, 99), "connections": sampler.most()}
