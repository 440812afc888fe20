"""Statements a PostgreSQL session sends together in one round trip (a worker's outcomes and its
next claim): each is its own transaction, in order, and a failing one leaves the session usable."""

import asyncio

import pytest
from backends import POSTGRES_DSN, postgres_unavailable

from sitq.backends.postgres.driver import AsyncSession, DriverError


@pytest.fixture
def session_factory():
    reason = postgres_unavailable()
    if reason:
        pytest.skip(reason)
    return lambda: AsyncSession.connect(POSTGRES_DSN, read_only=False)


def test_each_statement_sees_the_ones_before_it_and_commits_on_its_own(session_factory):
    async def go():
        db = await session_factory()
        try:
            await db.execute("CREATE TEMP TABLE t (n integer)")
            done = await db.fetch_in_turn([("INSERT INTO t VALUES (1), (2) RETURNING n", None),
                                           ("SELECT count(*) FROM t", None)])
            with pytest.raises(DriverError, match="division by zero"):
                await db.fetch_in_turn([("INSERT INTO t VALUES (3)", None), ("SELECT 1 / 0", None),
                                        ("INSERT INTO t VALUES (4)", None)])
            after = await db.fetch("SELECT n FROM t ORDER BY n")
            return done, after
        finally:
            await db.close()

    done, after = asyncio.run(go())
    assert done == [[(1,), (2,)], [(2,)]]
    assert after == [(1,), (2,), (3,)]  # the first committed; the one after the failure never ran
