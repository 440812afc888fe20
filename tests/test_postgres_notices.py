"""Change notices between processes on PostgreSQL: a notice held back by the rate limit still goes
out when nothing follows it, so a waiter elsewhere wakes without its periodic look."""

import asyncio

import pytest
from backends import new_tasks

from sitq.backends.postgres import PostgresBackend

NOW = 1_700_000_000.0


@pytest.fixture
def target(postgres_target):
    return postgres_target


def test_a_held_back_notice_is_sent_when_no_statement_follows(target):
    async def go():
        writer = PostgresBackend(target, notify_interval=0.5)
        reader = PostgresBackend(target, check_interval=3600)  # no periodic look: only a notice wakes it
        try:
            await writer.enqueue(new_tasks(1, NOW))  # carries a notice
            token = reader.change_token
            await reader.wait_for_change(token, 30)  # returns once the reader listens (it then looks again)
            token = reader.change_token
            await writer.enqueue(new_tasks(1, NOW))  # within the interval: its notice is held back
            await reader.wait_for_change(token, 30)
            return reader.change_token != token, (await reader.overview(0)).total
        finally:
            await writer.close()
            await reader.close()

    assert asyncio.run(go()) == (True, 2)
