"""sitq on PostgreSQL, used only through its public API and default settings.

The producer is a `TaskQueue` on the ``postgresql://`` URL; a drain worker process opens the
store with `open_backend`, connects, waits for the release and runs ``Worker(backend).drain()``
(concurrency 1, the plain function `f` in the worker's threads); the round trip's worker is the
``sitq worker URL`` command in another process, and results come back with ``get_result`` and
``deserialize_result``.
"""

import asyncio
import subprocess
import sys
import time

from benchmarks.common import check_stored, latency
from benchmarks.postgres.server import ConnectionSampler, drain_with, ready_then_wait, report_done
from benchmarks.tasks import f
from sitq import TaskQueue, Worker, open_backend


def available():
    """None if sitq can open ``postgresql://`` stores here, else why not."""
    try:
        import sitq.backends.postgres  # noqa: F401
    except ImportError as exc:
        return f"sitq's PostgreSQL backend is not importable ({exc})"
    return None


def enqueue(dsn, n):
    """W1: `n` sequential ``await queue.enqueue(f, i)``; throughput and per-call latency."""
    async def main():
        async with TaskQueue(dsn) as queue:
            await queue.status("0" * 32)  # connect, and make the schema, before the clock starts
            samples = []
            start_at = time.perf_counter()
            for i in range(n):
                t = time.perf_counter()
                await queue.enqueue(f, i)
                samples.append(time.perf_counter() - t)
            return {"tasks_s": n / (time.perf_counter() - start_at), **latency(samples, "us", 50, 99)}
    return asyncio.run(main())


def bulk(dsn, n):
    """W5: one ``await queue.map(f, range(n))``; throughput."""
    async def main():
        async with TaskQueue(dsn) as queue:
            await queue.status("0" * 32)
            start_at = time.perf_counter()
            await queue.map(f, range(n))
            return {"tasks_s": n / (time.perf_counter() - start_at)}
    return asyncio.run(main())


def drain(dsn, n, workers):
    """W2: `n` mapped tasks drained by `workers` processes, each ``Worker(backend).drain()``."""
    async def fill():
        async with TaskQueue(dsn) as queue:
            return await queue.map(f, range(n))

    async def count(ids):
        async with TaskQueue(dsn) as queue:
            results = await queue.get_results(ids)
            return sum(results[tid].status == "success" and queue.deserialize_result(results[tid]) == i
                       for i, tid in enumerate(ids) if tid in results)

    ids = asyncio.run(fill())
    seconds, _, connections = drain_with("sitq", dsn, workers)
    return {"tasks_s": n / seconds, "stored": check_stored(asyncio.run(count(ids)), n, "sitq"),
            "connections": connections}


def work(dsn):
    """A drain worker process: connect, wait for the release, run tasks until none is left."""
    async def main():
        backend = open_backend(dsn)
        await backend.connect()
        await asyncio.to_thread(ready_then_wait)
        await Worker(backend).drain()
        finished_at = time.monotonic()
        await backend.close()
        return finished_at
    report_done(-1, asyncio.run(main()))


def round_trip(dsn, n):
    """W3: `n` times enqueue one task and ``await get_result``, ``sitq worker`` in another process."""
    async def main():
        async with TaskQueue(dsn) as queue:
            proc = subprocess.Popen([sys.executable, "-m", "sitq", "worker", dsn, "--quiet"])
            try:
                with ConnectionSampler([proc.pid], dsn) as sampler:
                    samples = []
                    for i in range(-5, n):  # 5 untimed round trips first; the first waits for the worker
                        t = time.perf_counter()
                        result = await queue.get_result(await queue.enqueue(f, i), timeout=60)
                        if result is None or queue.deserialize_result(result) != i:
                            raise RuntimeError(f"sitq: task {i} came back as {result!r}")
                        if i >= 0:
                            samples.append(time.perf_counter() - t)
            finally:
                proc.terminate()
                proc.wait()
        return {**latency(samples, "ms", 50, 99), "connections": sampler.most()}
    return asyncio.run(main())
