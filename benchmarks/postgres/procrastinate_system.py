"""procrastinate, used as its documentation shows: an `App` on a `PsycopgConnector`, the no-op
`f` registered with ``app.task``, ``defer_async`` for one job, ``batch_defer_async`` for many,
``apply_schema_async`` for the schema, and ``run_worker_async`` for workers (``wait=False`` to
drain: it returns once it has caught up with the queue).

Its arguments are JSON keyword arguments (``x=i``), not cloudpickle; that is its design. It
keeps no result and sends no completion notification, so the round trip's producer polls
``job_manager.get_job_status_async`` every `POLL` seconds until the job has succeeded.
"""

import asyncio
import time

from procrastinate import App, PsycopgConnector
from procrastinate.jobs import Status

from benchmarks.common import POLL, check_stored, latency
from benchmarks.postgres.server import (
    ConnectionSampler,
    drain_with,
    ready_then_wait,
    report_done,
    start,
    worker_command,
)
from benchmarks.tasks import f


def make_app(dsn):
    """An App on `dsn` with `f` as its task named ``f``."""
    app = App(connector=PsycopgConnector(conninfo=dsn))
    return app, app.task(name="f")(f)


async def opened(dsn, schema=False):
    """An opened App and its task; with `schema`, procrastinate's schema is applied first."""
    app, task = make_app(dsn)
    await app.open_async()
    if schema:
        await app.schema_manager.apply_schema_async()
    return app, task


def enqueue(dsn, n):
    """W1: `n` sequential ``await task.defer_async(x=i)``; throughput and per-call latency."""
    async def main():
        app, task = await opened(dsn, schema=True)
        samples = []
        start_at = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            await task.defer_async(x=i)
            samples.append(time.perf_counter() - t)
        rate = n / (time.perf_counter() - start_at)
        await app.close_async()
        return {"tasks_s": rate, **latency(samples, "us", 50, 99)}
    return asyncio.run(main())


def bulk(dsn, n):
    """W5: one ``await task.batch_defer_async(...)`` of `n` jobs; throughput."""
    async def main():
        app, task = await opened(dsn, schema=True)
        start_at = time.perf_counter()
        await task.batch_defer_async(*({"x": i} for i in range(n)))
        rate = n / (time.perf_counter() - start_at)
        await app.close_async()
        return {"tasks_s": rate}
    return asyncio.run(main())


async def succeeded(dsn):
    """How many jobs have succeeded."""
    app, _ = await opened(dsn)
    try:
        return (await app.connector.execute_query_one_async(
            "SELECT count(*) AS n FROM procrastinate_jobs WHERE status = 'succeeded'"))["n"]
    finally:
        await app.close_async()


def drain(dsn, n, workers):
    """W2: `n` deferred jobs drained by `workers` processes, each ``run_worker_async(wait=False)``."""
    async def fill():
        app, task = await opened(dsn, schema=True)
        await task.batch_defer_async(*({"x": i} for i in range(n)))
        await app.close_async()

    asyncio.run(fill())
    seconds, _, connections = drain_with("procrastinate", dsn, workers)
    done = asyncio.run(succeeded(dsn))
    return {"tasks_s": n / seconds, "stored": check_stored(done, n, "procrastinate"), "connections": connections}


def work(dsn):
    """A drain worker process: open the app, wait for the release, work until caught up."""
    async def main():
        app, _ = await opened(dsn)
        await asyncio.to_thread(ready_then_wait)
        await app.run_worker_async(wait=False)
        finished_at = time.monotonic()
        await app.close_async()
        return finished_at
    report_done(-1, asyncio.run(main()))


def serve(dsn):
    """The round trip's worker process: ``run_worker_async()`` with its defaults until killed."""
    async def main():
        app, _ = await opened(dsn)
        print("ready", flush=True)
        await app.run_worker_async()
    asyncio.run(main())


def round_trip(dsn, n):
    """W3: `n` times defer one job and poll its status until it has succeeded (no value exists)."""
    async def main():
        app, task = await opened(dsn, schema=True)
        proc = start(worker_command("serve", "procrastinate", dsn))
        try:
            if (await asyncio.to_thread(proc.stdout.readline)).strip() != "ready":
                raise RuntimeError(f"procrastinate worker did not start (exit status {proc.wait()})")
            samples = []
            with ConnectionSampler([proc.pid], dsn) as sampler:
                for i in range(-5, n):  # 5 untimed round trips first
                    t = time.perf_counter()
                    job_id = await task.defer_async(x=i)
                    deadline = time.monotonic() + 60
                    while await app.job_manager.get_job_status_async(job_id) != Status.SUCCEEDED:
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"procrastinate: job {job_id} not done after 60 s")
                        await asyncio.sleep(POLL)
                    if i >= 0:
                        samples.append(time.perf_counter() - t)
        finally:
            proc.kill()
            proc.wait()
            await app.close_async()
        return {**latency(samples, "ms", 50, 99), "connections": sampler.most()}
    return asyncio.run(main())
