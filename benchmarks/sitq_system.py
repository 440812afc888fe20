"""sitq with its SQLite backend, used only through its public API and default settings.

The in-process queue and worker share one `SQLiteBackend`, as an application would; the
plain function `f` runs in the worker's threads. Results are read back with
``get_result`` and ``deserialize_result``.
"""

import asyncio
import subprocess
import sys
import time

from sitq import SQLiteBackend, TaskQueue, Worker

from benchmarks.common import check_stored, latency, peak_rss_mb
from benchmarks.tasks import f


async def stored(queue, ids):
    """Count the results readable for `ids`, checking each value against its argument."""
    count = 0
    for i, tid in enumerate(ids):
        result = await queue.get_result(tid, timeout=0)
        count += result is not None and queue.deserialize_result(result) == i
    return count


def enqueue(db, n):
    """W1: `n` sequential ``await queue.enqueue(f, i)``; throughput and per-call latency."""
    async def main():
        async with TaskQueue(backend=SQLiteBackend(db)) as queue:
            samples = []
            start = time.perf_counter()
            for i in range(n):
                t = time.perf_counter()
                await queue.enqueue(f, i)
                samples.append(time.perf_counter() - t)
            return {"tasks_s": n / (time.perf_counter() - start), **latency(samples, "us", 50, 99)}
    return asyncio.run(main())


def drain(db, n, concurrency):
    """W2: ``worker.drain()`` over `n` queued tasks with ``max_concurrency=concurrency``; throughput."""
    async def main():
        backend = SQLiteBackend(db)
        async with TaskQueue(backend=backend) as queue:
            ids = await queue.map(f, range(n))
            start = time.perf_counter()
            await Worker(backend, max_concurrency=concurrency).drain()
            rate = n / (time.perf_counter() - start)
            return {"tasks_s": rate, "stored": check_stored(await stored(queue, ids), n, "sitq")}
    return asyncio.run(main())


def round_trip(db, n, cross_process):
    """W3: `n` times enqueue one task and ``await get_result``, worker on this loop or not."""
    async def main():
        backend = SQLiteBackend(db)
        async with TaskQueue(backend=backend) as queue:
            if cross_process:
                proc = subprocess.Popen([sys.executable, "-m", "benchmarks.cell", "serve", "sitq", db])
            else:
                worker = Worker(backend)
                running = asyncio.create_task(worker.start())
            for i in range(5):  # warm up and wait for the worker to start
                await queue.get_result(await queue.enqueue(f, i), timeout=60)
            samples = []
            for i in range(n):
                t = time.perf_counter()
                result = await queue.get_result(await queue.enqueue(f, i), timeout=60)
                assert queue.deserialize_result(result) == i
                samples.append(time.perf_counter() - t)
            if cross_process:
                proc.terminate()
                proc.wait()
            else:
                await worker.stop()
                await running
        figures = latency(samples, "ms", 50, 95, 99)
        return figures | ({"rss_mb": peak_rss_mb(children=True)} if cross_process else {})
    return asyncio.run(main())


def mixed(db, n, producers):
    """W4: `producers` coroutines enqueue `n` tasks each while one worker runs; wall time.

    When the producers are done the worker is stopped and drains what is left, so the
    clock stops when every result is stored.
    """
    async def main():
        backend = SQLiteBackend(db)
        async with TaskQueue(backend=backend) as queue:
            async def produce():
                return [await queue.enqueue(f, i) for i in range(n)]

            start = time.perf_counter()
            worker = Worker(backend)
            running = asyncio.create_task(worker.start())
            batches = await asyncio.gather(*(produce() for _ in range(producers)))
            await worker.stop()
            await running
            await worker.drain()
            wall = time.perf_counter() - start
            count = sum([await stored(queue, ids) for ids in batches])
            return {"wall_s": wall, "stored": check_stored(count, n * producers, "sitq")}
    return asyncio.run(main())


def bulk(db, n):
    """W5: one ``await queue.map(f, range(n))``; throughput."""
    async def main():
        async with TaskQueue(backend=SQLiteBackend(db)) as queue:
            start = time.perf_counter()
            await queue.map(f, range(n))
            return {"tasks_s": n / (time.perf_counter() - start)}
    return asyncio.run(main())


def prefill(db, n, chunk=100_000):
    """Leave `n` finished tasks behind: ``map`` them in chunks and drain each with 8 threads."""
    async def main():
        backend = SQLiteBackend(db)
        async with TaskQueue(backend=backend) as queue:
            for first in range(0, n, chunk):
                await queue.map(f, range(first, min(first + chunk, n)))
                await Worker(backend, max_concurrency=8).drain()
        return {}
    return asyncio.run(main())


def serve(db):
    """Run a worker with default settings until the process is terminated."""
    asyncio.run(Worker(SQLiteBackend(db)).start())
