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


def test_an_unflushed_commit_skips_the_wait_for_its_own_transaction_only(session_factory):
    async def go():
        db = await session_factory()
        try:
            await db.execute("CREATE TEMP TABLE t (n integer)")
            setting = "SELECT current_setting('synchronous_commit')"
            before = await db.fetch(setting)
            inside = await db.fetch_in_turn([(f"INSERT INTO t VALUES (1) RETURNING ({setting})", None),
                                             (f"INSERT INTO t VALUES (2) RETURNING ({setting})", None)],
                                            unflushed=(1,))
            alone = await db.fetch_unflushed(f"INSERT INTO t VALUES (3) RETURNING ({setting})")
            after = await db.fetch(setting)
            rows = await db.fetch("SELECT n FROM t ORDER BY n")
            return before, inside, alone, after, rows
        finally:
            await db.close()

    before, inside, alone, after, rows = asyncio.run(go())
    assert inside == [before, [("off",)]]
    assert alone == [("off",)]
    assert after == before  # SET LOCAL: the session's own setting is back once the transaction ends
    assert rows == [(1,), (2,), (3,)]  # committed all the same


def test_a_pipeline_left_as_its_server_goes_away_counts_as_a_lost_connection(session_factory):
    # psycopg raises "cannot exit pipeline mode while busy" (no SQLSTATE) over the server's own error
    # when the server shuts down mid-pipeline; that one must still read as lost (reconnect, check, retry).
    import psycopg
    import psycopg.errors

    from sitq.backends.postgres.driver import Lost, translate

    try:
        try:
            raise psycopg.errors.AdminShutdown("terminating connection due to administrator command")
        finally:
            raise psycopg.OperationalError("cannot exit pipeline mode while busy")
    except psycopg.OperationalError as exc:
        assert isinstance(translate(exc, None), Lost)
        with psycopg.connect(POSTGRES_DSN) as conn:  # a live connection: only the cause decides
            assert isinstance(translate(exc, conn), Lost)
            assert not isinstance(translate(psycopg.OperationalError("busy"), conn), Lost)
