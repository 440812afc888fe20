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


# -- batching fairness and retention (sitq only) --------------------------------------------------


def _workers(db, count, *options):
    """Start `count` ``sitq worker`` processes on `db` with default settings plus `options`."""
    return [subprocess.Popen([sys.executable, "-m", "sitq", "worker", str(db), *options],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(count)]


def _stop(procs):
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait()


# Seconds between the workers' first tasks and the measured burst. Not 1 s: that is when an idle
# process's change watcher slows from 1 ms to 25 ms between looks (ChangeWatcher.QUIET_AFTER), so
# at 1 s each worker woke 1 or 25 ms late at random, and F1 and F0 differed by that chance rather
# than by batching. After 2 s every watcher is in its quiet pace in both rows, as after a pause.
SETTLE = 2.0


def fairness(db, n, tiny):
    """F: two ``sitq worker`` processes; `tiny` no-ops, then `n` tasks of 50 ms, submitted at once.

    The time from submitting the slow tasks to the first of their values, and to the last:
    batching of the tiny tasks must not hold results back or leave a worker idle. F0 (tiny=0)
    is the same run without the tiny tasks, the reference.
    """
    from benchmarks.tasks import nap

    async def main():
        procs = _workers(db, 2)
        try:
            async with TaskQueue(backend=SQLiteBackend(db)) as queue:
                for i in range(4):  # both workers up (they start in well under a second)
                    await queue.get_result(await queue.enqueue(f, i), timeout=60)
                await asyncio.sleep(SETTLE)
                start = time.perf_counter()
                if tiny:
                    await queue.map(f, range(tiny))
                ids = await queue.map(nap, range(n))
                waits = [asyncio.ensure_future(queue.get_result(i, timeout=120)) for i in ids]
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                first = time.perf_counter() - start
                results = await asyncio.gather(*waits)
                total = time.perf_counter() - start
                values = [queue.deserialize_result(r) for r in results]
                return {"first_s": first, "total_s": total, "stored": check_stored(
                    sum(v == i for i, v in enumerate(values)), n, "sitq")}
        finally:
            _stop(procs)
    return asyncio.run(main())


def _store_mb(db):
    """The store's size on disk: the file and its write-ahead log."""
    import os

    return sum(os.path.getsize(p) for p in (str(db), f"{db}-wal") if os.path.exists(p)) / 2**20


def retention(db, n):
    """R: `n` tasks through one ``sitq worker`` with a 1 s retention and pruning every second.

    The producer keeps at most two chunks queued. Throughput of the first and the last tenth
    of the run (their ratio shows whether it stays flat as tasks expire and are deleted), the
    largest and the final store size, and how many tasks are left at the end.
    """
    import datetime as dt

    chunk = max(1, min(20_000, n // 20))

    async def main():
        procs = _workers(db, 1, "--prune-interval", "1")
        sizes, marks = [], []
        try:
            async with TaskQueue(backend=SQLiteBackend(db), retention=dt.timedelta(seconds=1)) as queue:
                start = time.perf_counter()
                last_ids = []
                for first in range(0, n, chunk):
                    ids = await queue.map(f, range(first, min(first + chunk, n)))
                    if last_ids:  # wait for the chunk before this one: at most two are queued
                        await queue.get_result(last_ids[-1], timeout=300)
                        marks.append((first, time.perf_counter()))
                    sizes.append(_store_mb(db))
                    last_ids = ids
                await queue.get_result(last_ids[-1], timeout=300)
                marks.append((n, time.perf_counter()))
                wall = time.perf_counter() - start
                await asyncio.sleep(2.5)  # a retention and a prune later
                left = (await queue.overview(0)).total
        finally:
            _stop(procs)
        tenth = max(1, len(marks) // 10)

        def rate(part):
            (n0, t0), (n1, t1) = part[0], part[-1]
            return (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan")

        return {"tasks_s": n / wall, "first_tasks_s": rate(marks[:tenth + 1]), "last_tasks_s": rate(marks[-tenth - 1:]),
                "max_mb": max(sizes), "final_mb": _store_mb(db), "left": left}
    return asyncio.run(main())
