"""The connections a process holds to a PostgreSQL queue: a worker that opened the queue from its
address closes them, and its listening thread, when it returns."""

import asyncio
import threading
import time
import uuid

import pytest
from backends import POSTGRES_DSN

import sitq
from sitq import TaskQueue, Worker

NAME = f"sitq-test-{uuid.uuid4().hex[:12]}"  # the sessions of this module's backends, and no others


@pytest.fixture
def target(postgres_target):
    return f"{postgres_target}&application_name={NAME}"


def own_connections(until_none=False):
    """How many sessions the backends opened on ``target`` hold on the server; with ``until_none``,
    after waiting up to 10 s for them to go (the server lists a closed session a moment longer)."""
    import psycopg

    with psycopg.connect(POSTGRES_DSN, autocommit=True, application_name="sitq test") as conn:
        deadline = time.monotonic() + 10
        while True:
            n = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                             (NAME,)).fetchone()[0]
            if n == 0 or not until_none or time.monotonic() > deadline:
                return n
            time.sleep(0.05)


def listeners():
    return [t.name for t in threading.enumerate() if t.name.startswith("sitq-listen")]


def test_a_worker_opened_from_an_address_closes_its_connections_when_drain_returns(target):
    async def go():
        async with TaskQueue(target) as queue:
            task_id = await queue.enqueue(abs, -3)
        worker = Worker(target)
        await worker.drain()
        async with TaskQueue(target) as queue:
            return worker.processed, queue.deserialize_result(await queue.get_result(task_id, timeout=0))

    assert asyncio.run(go()) == (1, 3)
    assert listeners() == []
    assert own_connections(until_none=True) == 0


def test_a_backend_passed_to_a_worker_stays_open_for_its_owner(target):
    async def go():
        backend = sitq.open_backend(target)
        await Worker(backend).drain()
        try:
            return await asyncio.to_thread(own_connections)
        finally:
            await backend.close()

    assert asyncio.run(go()) >= 1
