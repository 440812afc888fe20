"""pgqueuer, used as its README shows: an asyncpg connection in an `AsyncpgDriver`, a
`QueueManager` with an async entrypoint, `Queries.enqueue` with scalars for one job and with
lists for a batch, and `CompletionWatcher` to wait for a job to finish. (Its `PsycopgDriver`
is not used: it shares one connection between queries and a LISTEN loop that holds the
connection for up to a second at a time, which made every system look slow but the floor.)

Its defaults are kept: workers dequeue 10 jobs at a time and write completions through a buffer
flushed when 10 are done or every 0.1 s; the watcher coalesces notifications over 50 ms. A job
leaves a status, not a value: there is no result to read back. A drain worker runs with
``mode=QueueExecutionMode.drain``, which returns once the queue is empty and its buffers flushed.
"""

import asyncio
import time

import asyncpg
import cloudpickle
from pgqueuer import AsyncpgDriver, Queries, QueueManager
from pgqueuer.core.completion import CompletionWatcher
from pgqueuer.domain.types import QueueExecutionMode

from benchmarks.common import check_stored, latency
from benchmarks.postgres.floor import payload
from benchmarks.postgres.server import (
    ConnectionSampler,
    drain_with,
    ready_then_wait,
    report_done,
    start,
    worker_command,
)


async def driver(dsn, install=False):
    """A pgqueuer driver on a new asyncpg connection; with `install`, create pgqueuer's schema."""
    conn = await asyncpg.connect(dsn)
    driver = AsyncpgDriver(conn)
    if install:
        await Queries(driver).install()
    return conn, driver


def manager(driver):
    """A QueueManager running ``f`` from each job's cloudpickled payload."""
    qm = QueueManager(Queries(driver))

    @qm.entrypoint("f")
    async def run_f(job):
        func, args = cloudpickle.loads(job.payload)
        func(*args)

    return qm


async def successful(dsn):
    """How many jobs ended successful, from pgqueuer's log table."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'")
    finally:
        await conn.close()


async def fill(dsn, n):
    """Install pgqueuer's schema and enqueue `n` jobs in one call."""
    conn, drv = await driver(dsn, install=True)
    await Queries(drv).enqueue(["f"] * n, [payload(i) for i in range(n)], [0] * n)
    await conn.close()


def enqueue(dsn, n):
    """W1: `n` sequential ``await queries.enqueue("f", payload)``; throughput and per-call latency."""
    async def main():
        conn, drv = await driver(dsn, install=True)
        queries, samples = Queries(drv), []
        start_at = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            await queries.enqueue("f", payload(i))
            samples.append(time.perf_counter() - t)
        rate = n / (time.perf_counter() - start_at)
        await conn.close()
        return {"tasks_s": rate, **latency(samples, "us", 50, 99)}
    return asyncio.run(main())


def bulk(dsn, n):
    """W5: one ``await queries.enqueue([...], [...], [...])`` of `n` jobs; throughput."""
    async def main():
        conn, drv = await driver(dsn, install=True)
        start_at = time.perf_counter()
        await Queries(drv).enqueue(["f"] * n, [payload(i) for i in range(n)], [0] * n)
        rate = n / (time.perf_counter() - start_at)
        await conn.close()
        return {"tasks_s": rate}
    return asyncio.run(main())


def drain(dsn, n, workers):
    """W2: `n` queued jobs drained by `workers` processes, each a QueueManager in drain mode."""
    asyncio.run(fill(dsn, n))
    seconds, _, connections = drain_with("pgqueuer", dsn, workers)
    done = asyncio.run(successful(dsn))
    return {"tasks_s": n / seconds, "stored": check_stored(done, n, "pgqueuer"), "connections": connections}


def work(dsn):
    """A drain worker process: connect, wait for the release, run until the queue is empty."""
    async def main():
        conn, drv = await driver(dsn)
        qm = manager(drv)
        await asyncio.to_thread(ready_then_wait)
        await qm.run(mode=QueueExecutionMode.drain)
        finished_at = time.monotonic()
        await conn.close()
        return finished_at
    report_done(-1, asyncio.run(main()))


def serve(dsn):
    """The round trip's worker process: a QueueManager with default settings until killed."""
    async def main():
        _, drv = await driver(dsn)
        qm = manager(drv)
        print("ready", flush=True)
        await qm.run()
    asyncio.run(main())


def round_trip(dsn, n):
    """W3: `n` times enqueue one job and await its `CompletionWatcher` future (a status, no value)."""
    async def main():
        conn, drv = await driver(dsn, install=True)
        queries = Queries(drv)
        proc = start(worker_command("serve", "pgqueuer", dsn))
        try:
            if (await asyncio.to_thread(proc.stdout.readline)).strip() != "ready":
                raise RuntimeError(f"pgqueuer worker did not start (exit status {proc.wait()})")
            samples = []
            with ConnectionSampler([proc.pid], dsn) as sampler:
                async with CompletionWatcher(drv, queries=queries) as watcher:
                    for i in range(-5, n):  # 5 untimed round trips first
                        t = time.perf_counter()
                        (job_id,) = await queries.enqueue("f", payload(i))
                        status = await asyncio.wait_for(watcher.wait_for(job_id), 60)
                        if status != "successful":
                            raise RuntimeError(f"pgqueuer: job {job_id} ended {status}")
                        if i >= 0:
                            samples.append(time.perf_counter() - t)
        finally:
            proc.kill()
            proc.wait()
            await conn.close()
        return {**latency(samples, "ms", 50, 99), "connections": sampler.most()}
    return asyncio.run(main())
