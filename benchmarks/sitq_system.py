"""sitq with its SQLite backend, used only through its public API and default settings.

The in-process queue and worker share one `SQLiteBackend`, as an application would; the
plain function `f` runs in the worker's threads. Results are read back with
``get_result`` and ``deserialize_result``.
"""

import asyncio
import statistics
import subprocess
import sys
import time

from benchmarks.common import StallTicker, check_stored, latency, peak_rss_mb
from benchmarks.tasks import f
from sitq import SQLiteBackend, TaskQueue, Worker


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


# -- event-loop stalls: a ticker on the same loop records the longest delay (S rows) ------------


def stall_idle(db, n):
    """S0: the ticker alone for `n` ms, the noise floor of this machine at this moment."""
    async def main():
        async with StallTicker() as ticker:
            await asyncio.sleep(n / 1000)
        return {"stall_ms": ticker.longest_ms}
    return asyncio.run(main())


def stall_map(db, n):
    """S1: one ``map`` of `n` calls; the longest stall and the throughput."""
    async def main():
        async with TaskQueue(backend=SQLiteBackend(db)) as queue:
            async with StallTicker() as ticker:
                start = time.perf_counter()
                await queue.map(f, range(n))
                rate = n / (time.perf_counter() - start)
        return {"stall_ms": ticker.longest_ms, "tasks_s": rate}
    return asyncio.run(main())


def stall_drain(db, n, concurrency):
    """S2: ``drain()`` of `n` queued tasks; the longest stall and the throughput."""
    async def main():
        backend = SQLiteBackend(db)
        async with TaskQueue(backend=backend) as queue:
            ids = await queue.map(f, range(n))
            async with StallTicker() as ticker:
                start = time.perf_counter()
                await Worker(backend, max_concurrency=concurrency).drain()
                rate = n / (time.perf_counter() - start)
            return {"stall_ms": ticker.longest_ms, "tasks_s": rate,
                    "stored": check_stored(await stored(queue, ids), n, "sitq")}
    return asyncio.run(main())


async def _timed_calls(n, call):
    """Await `call()` `n` times under a ticker; the longest stall and the median ms per call."""
    samples = []
    async with StallTicker() as ticker:
        for _ in range(n):
            start = time.perf_counter()
            await call()
            samples.append(time.perf_counter() - start)
            await asyncio.sleep(0.01)  # as a dashboard does between refreshes
    return {"stall_ms": ticker.longest_ms, "call_ms": statistics.median(samples) * 1e3}


def stall_overview(db, n):
    """S3: `n` times ``overview()`` of a big store (counts per state and the 20 newest tasks)."""
    async def main():
        async with TaskQueue(backend=SQLiteBackend(db)) as queue:
            return await _timed_calls(n, queue.overview)
    return asyncio.run(main())


def stall_statuses(db, n):
    """S4: 5 times ``statuses()`` of the `n` newest task ids in a big store."""
    async def main():
        async with TaskQueue(backend=SQLiteBackend(db)) as queue:
            wanted = [info.task_id for info in (await queue.overview(n)).recent]
            return await _timed_calls(5, lambda: queue.statuses(wanted))
    return asyncio.run(main())


class _View:
    """Stands in for a notebook widget: takes what the refresher shows and draws nothing."""

    selected = None
    task_id = None

    def show(self, *rows):
        self.rows = rows

    def finish(self, result, deserialize=None):
        self.result = result


def stall_refresh(db, n):
    """S5: `n` refreshes of the notebook's live views (a board and 20 task views) over a big store."""
    from sitq.notebook.refresher import Refresher
    from sitq.sync import LoopThread

    async def main():
        async with TaskQueue(backend=SQLiteBackend(db)) as queue:
            refresher = Refresher(queue, LoopThread())
            refresher._add_board(_View(), 20)
            for info in (await queue.overview(20)).recent:
                view = _View()
                view.task_id = info.task_id
                refresher._add_task(view)
            return await _timed_calls(n, refresher.refresh)
    return asyncio.run(main())
