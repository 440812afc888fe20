"""A PostgreSQL backend used from one event loop after another (``asyncio.run`` per call, as scripts
and tests do): a call left unfinished when its loop closed does not hold the connection for ever."""

import asyncio

import pytest
from backends import new_tasks

from sitq import open_backend

NOW = 1_700_000_000.0


@pytest.fixture
def target(postgres_target):
    return postgres_target


def _stuck_call(backend):
    """A statement sent and not answered yet on a loop that then stops running (a held-back notice
    sent while asyncio.run shuts down does this): its caller never runs again, so it never gives
    the connection back. Returns the loop and the call's task."""
    ended = asyncio.new_event_loop()
    stuck = ended.create_task(backend._call(lambda db, retrying: db.fetch("SELECT pg_sleep(0.3)")))
    ended.run_until_complete(asyncio.sleep(0.05))
    assert not stuck.done()
    return ended, stuck


def test_a_call_whose_loop_closed_mid_statement_does_not_block_the_next_loop(target):
    backend = open_backend(target)
    asyncio.run(backend.enqueue(new_tasks(2, NOW)))
    ended, stuck = _stuck_call(backend)
    ended.close()

    async def later():
        try:
            return (await asyncio.wait_for(backend.overview(0), 20)).total
        finally:
            await backend.close()

    assert asyncio.run(later()) == 2


def test_closing_after_a_call_whose_loop_closed_mid_statement_returns(target):
    backend = open_backend(target)
    asyncio.run(backend.enqueue(new_tasks(1, NOW)))
    ended, stuck = _stuck_call(backend)
    backend._trailing_tasks.add(stuck)  # as a held-back notice sent while asyncio.run shut down would be
    ended.close()
    asyncio.run(asyncio.wait_for(backend.close(), 20))
    assert asyncio.run(asyncio.wait_for(backend.overview(0), 20)).total == 1
    asyncio.run(backend.close())
