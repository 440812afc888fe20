"""SQLite reads that take several statements see other processes' commits between them.

Outside a transaction each statement reads its own snapshot, so a task seen pending by one
statement may be claimed by another worker before the next one runs. These tests make that
interleaving happen on a real file, with a second connection standing in for the other worker.
"""

import asyncio
import sqlite3

import taskfuncs

from sitq import SQLiteBackend, TaskQueue
from sitq.backends.sqlite import statements as sql


class ClaimedBetween:
    """A connection that lets another connection claim every pending task right after the
    statement that found the first pending priority, as a worker in another process could."""

    def __init__(self, conn: sqlite3.Connection, db: str) -> None:
        self.conn, self.db = conn, db

    def execute(self, statement, *params):
        cursor = self.conn.execute(statement, *params)
        if statement is sql.FIRST_PRIORITY:
            rows = cursor.fetchall()
            other = sqlite3.connect(self.db, timeout=30)
            with other:
                other.execute("UPDATE sitq_tasks SET status = 'running' WHERE status = 'pending'")
            other.close()
            return _Rows(rows)
        return cursor


class _Rows:
    """The rows the statement read before the other connection's commit."""

    def __init__(self, rows):
        self.rows = rows

    def fetchone(self):
        return self.rows[0] if self.rows else None


def test_next_eta_of_a_queue_emptied_between_its_reads_is_none(tmp_path):
    db = str(tmp_path / "q.db")

    async def fill():
        async with TaskQueue(SQLiteBackend(db)) as queue:
            await queue.enqueue(taskfuncs.add, 1, 2)

    asyncio.run(fill())
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        assert sql.next_eta(conn, ["default"]) is not None  # the pending task is there to find
        conn.execute("UPDATE sitq_tasks SET status = 'pending'")
        assert sql.next_eta(ClaimedBetween(conn, db), ["default"]) is None
        assert sql.next_eta(conn, ["default"]) is None
    finally:
        conn.close()
