"""The seam between the PostgreSQL backend and its driver, psycopg 3: the only module that imports it.

The backend and its statements see four things: an :class:`AsyncSession` (statements on the
event loop), a :class:`SideSession` (a blocking connection for a thread: LISTEN and lease
renewals), the errors :class:`Lost` (the connection is gone: reconnect and try again) and
:class:`Conflict` (a unique key is taken), and :func:`conninfo` (a DSN as libpq takes it). A
second driver (asyncpg, say) is a second module with the same names; placeholders are
psycopg's ``%s`` and ``%(name)s``.

libpq reads ``PGPASSWORD``, ``~/.pgpass``, ``PGHOST`` and the other ``PG*`` variables itself,
as ``psql`` does; nothing here reads them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from typing import Any

import psycopg
import psycopg.errors
from psycopg import conninfo as libpq_conninfo

__all__ = ["AsyncSession", "SideSession", "Lost", "Conflict", "DriverError", "conninfo", "translate"]

DriverError = psycopg.Error
IDLE_IN_TRANSACTION = "60s"

# Inside a transaction: its commit returns without waiting for the WAL flush (fetch_in_turn's unflushed).
_UNFLUSHED = "SET LOCAL synchronous_commit = off"

# SQLSTATEs that mean the server went away under a connection (shut down, restarted, starting up).
_LOST_STATES = ("57P01", "57P02", "57P03")


class Lost(Exception):
    """The connection to the server was lost (or could not be made): reconnect and try again."""


class Conflict(Exception):
    """A statement hit a unique key that is already taken (a task id stored twice)."""


def conninfo(dsn: str, application_name: str) -> str:
    """``dsn`` as libpq reads it, with ``application_name`` set unless the DSN sets one.

    Raises ``ValueError`` naming the problem for a DSN libpq cannot parse.
    """
    try:
        params = libpq_conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ValueError(f"cannot read this PostgreSQL address: {exc}") from exc
    params.setdefault("application_name", application_name)
    return libpq_conninfo.make_conninfo("", **params)


def _is_lost(exc: BaseException, conn: psycopg.BaseConnection[Any] | None) -> bool:
    """Whether ``exc``, or an error it was raised while handling, says the connection is gone. Leaving a
    pipeline whose server went away mid-way raises "cannot exit pipeline mode while busy" (no
    SQLSTATE) over the server's own error, which is left as its context."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, psycopg.OperationalError):
            if conn is None or conn.closed or conn.broken:
                return True
            state = seen.sqlstate or ""
            if state.startswith("08") or state in _LOST_STATES:
                return True
        seen = seen.__cause__ or seen.__context__
    return False


def translate(exc: BaseException, conn: psycopg.BaseConnection[Any] | None) -> BaseException:
    """The driver's error as one of this module's (``Lost``, ``Conflict``), or as it is."""
    if _is_lost(exc, conn):
        return Lost(str(exc).strip() or type(exc).__name__)
    if isinstance(exc, psycopg.errors.UniqueViolation):
        return Conflict(str(exc).strip())
    return exc


class AsyncSession:
    """One connection for statements on an event loop, in autocommit mode: a statement outside
    :meth:`transaction` is its own transaction. Used by one caller at a time (the backend's lock)."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._conn = conn

    @classmethod
    async def connect(cls, info: str, read_only: bool) -> AsyncSession:
        try:
            conn = await psycopg.AsyncConnection.connect(info, autocommit=True)
            # A process stopped (SIGSTOP, a debugger) in the middle of a transaction must not hold its
            # locks for ever: the server ends such a session, and sitq connects again.
            await conn.execute(f"SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION}'")
            if read_only:
                await conn.execute("SET default_transaction_read_only = on")
        except psycopg.Error as exc:
            raise translate(exc, None) from exc
        return cls(conn)

    @property
    def pid(self) -> int:
        """The server process serving this connection (NOTIFY names it)."""
        return self._conn.info.backend_pid

    @property
    def usable(self) -> bool:
        return not (self._conn.closed or self._conn.broken)

    async def fetch(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """The rows ``sql`` returns (none for a statement that returns none)."""
        try:
            cur = await self._conn.execute(sql, params)
            return await cur.fetchall() if cur.description is not None else []
        except psycopg.Error as exc:
            raise translate(exc, self._conn) from exc

    async def fetchone(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> tuple[Any, ...] | None:
        rows = await self.fetch(sql, params)
        return rows[0] if rows else None

    async def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> int:
        """Run ``sql``; returns how many rows it changed."""
        try:
            cur = await self._conn.execute(sql, params)
            return cur.rowcount
        except psycopg.Error as exc:
            raise translate(exc, self._conn) from exc

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            async with self._conn.cursor() as cur:
                await cur.executemany(sql, rows)
        except psycopg.Error as exc:
            raise translate(exc, self._conn) from exc

    async def fetch_in_turn(
        self, statements: Sequence[tuple[str, Sequence[Any] | dict[str, Any] | None]], *,
        unflushed: Collection[int] = (),
    ) -> list[list[tuple[Any, ...]]]:
        """The rows of each statement, each run and committed in its own transaction, in order (each
        sees what the ones before it did), all sent together in a pipeline: one round trip. What a
        statement's commit notifies goes out before the next one runs.

        The commits of the statements at the positions in ``unflushed`` do not wait for the server to
        flush them to disk (``synchronous_commit`` off for that transaction): visible to everyone at
        once, but a server crash (not a clean restart) may undo the last of them. The next commit that
        does wait, this session's or anyone's, flushes them too."""
        conn = self._conn
        try:
            try:
                async with conn.pipeline():
                    cursors = []
                    for i, (sql, params) in enumerate(statements):
                        await conn.execute("BEGIN")
                        if i in unflushed:
                            await conn.execute(_UNFLUSHED)
                        cursors.append(await conn.execute(sql, params))
                        await conn.execute("COMMIT")
            except psycopg.Error:
                # A statement failed: the ones after it were skipped, and its transaction is open and aborted.
                if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
                    await conn.execute("ROLLBACK")
                raise
            return [await cur.fetchall() if cur.description is not None else [] for cur in cursors]
        except psycopg.Error as exc:
            raise translate(exc, conn) from exc

    async def fetch_unflushed(
        self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        """The rows of ``sql``, run in a transaction of its own whose commit does not wait for the disk
        (see :meth:`fetch_in_turn`'s ``unflushed``); one round trip."""
        return (await self.fetch_in_turn([(sql, params)], unflushed=(0,)))[0]

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """A transaction around the block: committed at its end, rolled back if it raises."""
        try:
            async with self._conn.transaction():
                yield
        except psycopg.Error as exc:
            raise translate(exc, self._conn) from exc

    def abandon(self) -> None:
        """Close the connection now, from any thread or loop, without waiting for the server."""
        with contextlib.suppress(Exception):
            self._conn.pgconn.finish()

    async def close(self) -> None:
        with contextlib.suppress(psycopg.Error):
            await self._conn.close()


class SideSession:
    """A blocking connection for a thread of its own: it LISTENs, and renews leases between waits."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    @classmethod
    def connect(cls, info: str, connect_timeout: float) -> SideSession:
        try:
            conn = psycopg.connect(info, autocommit=True, connect_timeout=max(1, round(connect_timeout)))
        except psycopg.Error as exc:
            raise translate(exc, None) from exc
        return cls(conn)

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> int:
        try:
            return self._conn.execute(sql, params).rowcount
        except psycopg.Error as exc:
            raise translate(exc, self._conn) from exc

    def listen(self, channel: str) -> None:
        self.execute(f'LISTEN "{channel}"')

    def wait(self, timeout: float, handle: Callable[[int, str], None]) -> None:
        """Call ``handle(pid, payload)`` for each notification as it arrives, for ``timeout`` seconds."""
        try:
            for notice in self._conn.notifies(timeout=timeout):
                handle(notice.pid, notice.payload)
        except psycopg.Error as exc:
            raise translate(exc, self._conn) from exc

    def close(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self._conn.close()
