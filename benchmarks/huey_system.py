"""huey with `SqliteHuey`, used only through huey's own API.

Storage keeps huey's defaults (WAL, SQLite's default ``synchronous=FULL``, one connection
behind a lock). Only polling is tuned, to the same `POLL` as the other systems: huey's
consumer otherwise starts at 0.1 s and backs off to 10 s when idle, and ``Result.get``
starts at 50 ms. Workers are huey's own `Consumer` with threads in this process, or the
``huey_consumer`` command for the cross-process round trip; completion is counted with
huey's ``SIGNAL_COMPLETE``, which fires after the result is stored.
"""

import os
import subprocess
import sys
import threading
import time
import uuid

from huey import SqliteHuey, signals

from benchmarks.common import POLL, check_stored, latency, peak_rss_mb
from benchmarks.tasks import f


class Completed:
    """Counts huey's ``SIGNAL_COMPLETE`` from every consumer thread."""

    def __init__(self):
        self.count, self.changed = 0, threading.Condition()

    def __call__(self, signal, task):
        with self.changed:
            self.count += 1
            self.changed.notify_all()

    def wait_for(self, target, timeout=600):
        """Block until `target` tasks have completed."""
        with self.changed:
            if not self.changed.wait_for(lambda: self.count >= target, timeout):
                raise TimeoutError(f"huey: {self.count} of {target} tasks done after {timeout} s")


def app(db):
    """Return a huey instance on `db`, its task wrapping `f`, and its completion counter."""
    huey, completed = SqliteHuey(name="bench", filename=db), Completed()
    huey.signal(signals.SIGNAL_COMPLETE)(completed)
    return huey, huey.task()(f), completed


def __getattr__(name):
    """Build ``benchmarks.huey_system.huey`` on demand for ``huey_consumer``, on $BENCH_HUEY_DB."""
    if name == "huey":
        return app(os.environ["BENCH_HUEY_DB"])[0]
    raise AttributeError(name)


def consumer(huey, workers):
    """Start huey's consumer with `workers` threads in this process."""
    c = huey.create_consumer(workers=workers, worker_type="thread", periodic=False,
                             initial_delay=POLL, max_delay=POLL, check_worker_health=False)
    c.start()
    return c


def enqueue(db, n):
    """W1: `n` sequential task calls; throughput and per-call latency."""
    _, task, _ = app(db)
    samples = []
    start = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        task(i)
        samples.append(time.perf_counter() - t)
    return {"tasks_s": n / (time.perf_counter() - start), **latency(samples, "us", 50, 99)}


def drain(db, n, concurrency):
    """W2: drain `n` queued tasks with a `concurrency`-thread consumer; throughput."""
    huey, task, completed = app(db)
    results = [task(i) for i in range(n)]
    start = time.perf_counter()
    c = consumer(huey, concurrency)
    completed.wait_for(n)
    rate = n / (time.perf_counter() - start)
    c.stop(graceful=True)
    got = sum(r.get(preserve=True) == i for i, r in enumerate(results))
    return {"tasks_s": rate, "stored": check_stored(got, n, "huey")}


def round_trip(db, n, cross_process):
    """W3: `n` times call the task and block on ``Result.get``, consumer in-process or not."""
    huey, task, _ = app(db)
    if cross_process:
        proc = subprocess.Popen(
            [sys.executable, "-m", "huey.bin.huey_consumer", "benchmarks.huey_system.huey", "-w", "1",
             "-k", "thread", "-n", "-d", str(POLL), "-m", str(POLL), "-q"],
            env={**os.environ, "BENCH_HUEY_DB": db})
    else:
        c = consumer(huey, 1)
    for i in range(5):  # warm up and wait for the consumer to start
        task(i).get(blocking=True, timeout=60, max_delay=POLL)
    samples = []
    for i in range(n):
        t = time.perf_counter()
        assert task(i).get(blocking=True, timeout=60, max_delay=POLL) == i
        samples.append(time.perf_counter() - t)
    if cross_process:
        proc.terminate()
        proc.wait()
    else:
        c.stop(graceful=True)
    figures = latency(samples, "ms", 50, 95, 99)
    return figures | ({"rss_mb": peak_rss_mb(children=True)} if cross_process else {})


def mixed(db, n, producers):
    """W4: `producers` threads call the task `n` times each while a 1-thread consumer runs."""
    huey, task, completed = app(db)

    def produce():
        for i in range(n):
            task(i)

    start = time.perf_counter()
    c = consumer(huey, 1)
    makers = [threading.Thread(target=produce) for _ in range(producers)]
    for t in makers:
        t.start()
    for t in makers:
        t.join()
    completed.wait_for(n * producers)
    wall = time.perf_counter() - start
    c.stop(graceful=True)
    return {"wall_s": wall, "stored": check_stored(huey.result_count(), n * producers, "huey")}


def bulk(db, n):
    """W5: one ``task.map`` call (huey enqueues each item in its own transaction); throughput."""
    _, task, _ = app(db)
    start = time.perf_counter()
    task.map(range(n))
    return {"tasks_s": n / (time.perf_counter() - start)}


def prefill(db, n):
    """Store `n` unread results, which is all a finished task leaves behind in huey."""
    huey, _, _ = app(db)
    value = huey.serializer.serialize(0)
    with huey.storage.db(commit=True) as cursor:
        cursor.executemany("INSERT INTO kv (queue, key, value) VALUES (?, ?, ?)",
                           (("bench", uuid.uuid4().hex, value) for _ in range(n)))
    huey.storage.close()
    return {}
