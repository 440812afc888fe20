"""The embedded SQLite backend.

Small statements (an enqueue, a worker's finish-and-claim, a result) run on
the calling thread, under a lock, with SQLite's busy timeout set to zero: a
statement that finds the database locked by another process gives up at
once, the lock is released and the coroutine sleeps (1 ms, doubling to
50 ms) before it tries again. So the event loop is never blocked waiting for
a lock, and a statement costs what SQLite costs, with no hop to a helper
thread (aiosqlite's hop alone costs more than the statement). Writes that
belong together (a worker's finished outcomes and its next claim, or a bulk
enqueue) share one transaction. ``docs/performance.md`` has the measurements
behind this design.

Nothing may block the caller's event loop for long, so three kinds of work
run on helper threads, each with a connection of its own, started on first
use and stopped by ``close()``:

- work that grows with the data: a bulk enqueue of more than ``OFFLOAD_ROWS``
  tasks (still one transaction), ``overview()`` (its counts scan the table)
  and ``fetch_info()`` for many ids, with the building of their records;
- WAL checkpoints: the loop's connection never checkpoints (SQLite would do
  it inside a COMMIT, which can take a second on a busy disk); a helper runs
  a PASSIVE checkpoint once ``CHECKPOINT_ROWS`` rows changed;
- lease renewal (``start_heartbeat``), so that a stalled loop, a slow
  statement or a checkpoint cannot let a healthy worker's leases expire.

A helper that finds the database locked sleeps in its own thread and tries
again, as the loop's statements do. An in-memory store has one connection
only: helpers use it under the lock, and the loop waits for the lock without
blocking.

Other processes' writes are noticed by a small thread that checks
``PRAGMA data_version`` (a counter read from shared memory) every millisecond
while someone is waiting, backing off to 25 ms after a quiet second.

SQLite lets any value into any column, so a row may hold what sitq never wrote
(a hand edit, another program). Reading never fails on such a row: a claimed
one comes back with ``ClaimedTask.problem`` naming the column, for the worker to
fail that task alone; readers get what can be shown (see ``sitq.core``); text
that is not UTF-8 is read with replacement characters instead of failing the
whole statement.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import queue
import random
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, overload

from sitq.backends.base import Backend
from sitq.backends.rules import LOST_WORKER_LIMIT, CancelOutcome, lost_worker_error
from sitq.core import (
    STATES,
    ClaimedTask,
    NewTask,
    NewTaskBatch,
    Outcome,
    OutcomeKind,
    QueueOverview,
    Result,
    TaskInfo,
    TaskStatus,
    to_datetime,
)
from sitq.errors import BackendError, SchemaVersionError

__all__ = ["SQLiteBackend"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
APPLICATION_ID = 0x73697471  # "sitq"

SCHEMA = """
CREATE TABLE sitq_tasks (
    seq              INTEGER PRIMARY KEY,
    id               TEXT    NOT NULL UNIQUE,
    name             TEXT    NOT NULL,
    status           TEXT    NOT NULL,
    func             BLOB    NOT NULL,
    args             BLOB    NOT NULL,
    signature        BLOB,
    max_attempts     INTEGER NOT NULL DEFAULT 1,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    eta              REAL    NOT NULL,
    enqueued_at      REAL    NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    worker_id        TEXT,
    lease_until      REAL,
    value            BLOB,
    error            TEXT,
    traceback        TEXT,
    output           TEXT,
    progress_done    REAL,
    progress_total   REAL,
    progress_message TEXT,
    lost             INTEGER NOT NULL DEFAULT 0,
    value_signature  BLOB
);
-- Facts about the store itself, such as whether its payloads must be signed.
CREATE TABLE sitq_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- One index serves the claim (pending, oldest eta first), the next eta, and the counts per state;
-- each index costs every insert about as much as the insert itself, so there are few.
CREATE INDEX sitq_tasks_state ON sitq_tasks (status, eta, seq);
CREATE INDEX sitq_tasks_leases ON sitq_tasks (worker_id, lease_until) WHERE status = 'running';
CREATE INDEX sitq_tasks_suspects ON sitq_tasks (eta, seq) WHERE status = 'pending' AND lost > 0;
"""

# Each step takes a file from the version before it to the next one, in one transaction.
MIGRATIONS = {
    1: """
ALTER TABLE sitq_tasks ADD COLUMN lost INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sitq_tasks ADD COLUMN value_signature BLOB;
CREATE TABLE sitq_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE INDEX sitq_tasks_suspects ON sitq_tasks (eta, seq) WHERE status = 'pending' AND lost > 0;
""",
}

INSERT_TASK = """
INSERT INTO sitq_tasks (id, name, status, func, args, signature, max_attempts, eta, enqueued_at)
VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?)
"""

# A big batch is first written to a private temporary table, then copied in one statement:
# the write lock, which every other process's writes and every worker's lease renewal wait
# for, is held for the copy alone: about half as long as inserting row by row.
STAGE_TABLE = """
CREATE TEMP TABLE IF NOT EXISTS sitq_new (id, name, func, args, signature, max_attempts, eta, enqueued_at)
"""

STAGE_TASK = "INSERT INTO temp.sitq_new VALUES (?, ?, ?, ?, ?, ?, ?, ?)"

UNSTAGE = "DELETE FROM temp.sitq_new"

INSERT_STAGED = """
INSERT INTO main.sitq_tasks (id, name, status, func, args, signature, max_attempts, eta, enqueued_at)
SELECT id, name, 'pending', func, args, signature, max_attempts, eta, enqueued_at FROM temp.sitq_new ORDER BY rowid
"""

CLAIM_TASKS = """
UPDATE sitq_tasks
SET status = 'running', worker_id = ?, started_at = ?, lease_until = ?, attempts = attempts + 1,
    progress_done = NULL, progress_total = NULL, progress_message = NULL
WHERE seq IN (
    SELECT seq FROM sitq_tasks INDEXED BY sitq_tasks_state
    WHERE status = 'pending' AND eta <= ? AND lost = 0 ORDER BY eta, seq LIMIT ?
)
RETURNING seq, id, name, func, args, signature, attempts, lost
"""

# A task that lost its worker before runs alone: only a worker with nothing running claims it.
CLAIM_SUSPECT = """
UPDATE sitq_tasks
SET status = 'running', worker_id = ?, started_at = ?, lease_until = ?, attempts = attempts + 1,
    progress_done = NULL, progress_total = NULL, progress_message = NULL
WHERE seq IN (
    SELECT seq FROM sitq_tasks INDEXED BY sitq_tasks_suspects
    WHERE status = 'pending' AND lost > 0 AND eta <= ? ORDER BY eta, seq LIMIT 1
)
RETURNING seq, id, name, func, args, signature, attempts, lost
"""

SUSPECTS_WAITING = """
SELECT 1 FROM sitq_tasks INDEXED BY sitq_tasks_suspects WHERE status = 'pending' AND lost > 0 AND eta <= ? LIMIT 1
"""

FINISH_TASK = """
UPDATE sitq_tasks
SET status = ?, finished_at = ?, value = ?, value_signature = ?, error = ?, traceback = ?, output = ?,
    lease_until = NULL,
    progress_done = coalesce(?, progress_done), progress_total = coalesce(?, progress_total),
    progress_message = coalesce(?, progress_message)
WHERE seq = ? AND attempts = ? AND status = 'running' AND worker_id = ?
"""

RETRY_TASK = """
UPDATE sitq_tasks
SET status = CASE cancel_requested WHEN 1 THEN 'cancelled' ELSE 'pending' END,
    finished_at = CASE cancel_requested WHEN 1 THEN ? ELSE NULL END,
    eta = ?, error = ?, traceback = ?, output = ?, worker_id = NULL, lease_until = NULL
WHERE seq = ? AND attempts = ? AND status = 'running' AND worker_id = ?
"""

CANCEL_PENDING = """
UPDATE sitq_tasks SET status = 'cancelled', finished_at = ? WHERE id = ? AND status = 'pending'
"""

REQUEST_CANCEL = """
UPDATE sitq_tasks SET cancel_requested = 1 WHERE id = ? AND status = 'running'
"""

SELECT_CANCEL_REQUESTS = """
SELECT id FROM sitq_tasks WHERE worker_id = ? AND status = 'running' AND cancel_requested = 1
"""

TASK_EXISTS = "SELECT 1 FROM sitq_tasks WHERE id = ?"

RENEW_LEASES = """
UPDATE sitq_tasks SET lease_until = ? WHERE worker_id = ? AND status = 'running'
"""

# Tasks whose worker stopped renewing the lease: cancelled if that was asked for, failed on
# their LOST_WORKER_LIMIT-th lost worker (a task that kills its worker must not loop), else
# claimable again as suspects, which run alone: the rules of sitq.backends.rules, in SQL.
EXPIRED_CANCELLED = """
UPDATE sitq_tasks SET status = 'cancelled', finished_at = ?, lease_until = NULL
WHERE status = 'running' AND lease_until < ? AND cancel_requested = 1
"""

EXPIRED_TOO_OFTEN = """
UPDATE sitq_tasks SET status = 'failed', finished_at = ?, lease_until = NULL, error = ?, traceback = NULL
WHERE status = 'running' AND lease_until < ? AND lost + 1 >= ?
"""

EXPIRED_REQUEUED = """
UPDATE sitq_tasks SET status = 'pending', worker_id = NULL, lease_until = NULL, lost = lost + 1
WHERE status = 'running' AND lease_until < ?
"""

SET_PROGRESS = """
UPDATE sitq_tasks SET progress_done = ?, progress_total = ?, progress_message = ?
WHERE seq = ? AND attempts = ? AND status = 'running' AND worker_id = ?
"""

NEXT_ETA = "SELECT min(eta) FROM sitq_tasks INDEXED BY sitq_tasks_state WHERE status = 'pending'"

SELECT_RESULT = """
SELECT id, name, status, value, error, traceback, enqueued_at, started_at, finished_at, attempts, output,
    value_signature
FROM sitq_tasks WHERE id = ?
"""

INFO_COLUMNS = """
id, name, status, enqueued_at, eta, started_at, finished_at, attempts, worker_id,
progress_done, progress_total, progress_message, error
"""

SELECT_INFO = f"SELECT {INFO_COLUMNS} FROM sitq_tasks WHERE id IN (SELECT value FROM json_each(?))"

SELECT_RECENT = f"SELECT {INFO_COLUMNS} FROM sitq_tasks ORDER BY seq DESC LIMIT ?"

COUNT_BY_STATUS = "SELECT status, count(*) FROM sitq_tasks GROUP BY status"

SELECT_META = "SELECT value FROM sitq_meta WHERE key = ?"

INSERT_META_IF_ABSENT = "INSERT INTO sitq_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING"

# Rows sitq did not write. SQLite orders text and bytes after every number, so a pending task
# whose eta is not a number is never due, and a running one whose lease is not a number never
# expires. The first are failed, naming the column; the second count as long expired, so the
# usual rules for expired leases take them on. Both statements look at the end of an index
# range (or at the few running rows), which is empty unless someone wrote such a row.
FAIL_UNREADABLE_ETA = """
UPDATE sitq_tasks SET status = 'failed', finished_at = ?, error = 'BackendError: the stored row of this task has '
    || CASE typeof(eta) WHEN 'text' THEN 'text ' || quote(substr(eta, 1, 40)) ELSE 'bytes' END
    || ' in column ''eta'' where sitq stores a time (POSIX seconds); it was not written by sitq, or was '
    || 'changed by hand'
WHERE status = 'pending' AND eta >= ''
"""

END_UNREADABLE_LEASES = """
UPDATE sitq_tasks SET lease_until = 0 WHERE status = 'running' AND (lease_until IS NULL OR lease_until >= '')
"""

CHECKPOINT = "PRAGMA wal_checkpoint(PASSIVE)"

T = TypeVar("T")
# A job for a helper thread: called with the helper's connection and its stop event.
_Job = Callable[[sqlite3.Connection, threading.Event], Any]

MEMORY = ":memory:"
NO_PROGRESS = (None, None, None)
# Work on more rows than this runs on a helper thread: at a few microseconds a row, the loop
# would otherwise be blocked for longer than a few milliseconds.
OFFLOAD_ROWS = 500
# The most rows a worker's finish-and-claim touches in one transaction, and the most tasks
# it claims at once: about 2 ms of statements, and of unpickling what it claimed.
BATCH_ROWS = 128
# A checkpoint is due once the loop's connection changed this many rows since the last one
# (SQLite's own automatic checkpoint, off here, comes every 1,000 pages written).
CHECKPOINT_ROWS = 1000
# A heartbeat renews leases this many times per lease: with a 1 s lease, a renewal that another
# process's write transaction holds up for 0.8 s still comes in time.
RENEWALS_PER_LEASE = 5


class SQLiteBackend(Backend):
    """Tasks and results in one SQLite file (WAL mode), shared safely by many processes.

    ``path`` is a file path (``str`` or ``Path``), a ``sqlite:///`` URL, or
    ``":memory:"`` for a store private to this backend object (a queue and a
    worker in one process can share it by sharing the object). New files are
    created readable and writable by their owner only.

    ``lock_timeout`` is how long a statement keeps retrying while another
    process holds the write lock before sitq gives up with ``BackendError``;
    ``change_check_interval`` is the fastest rate at which other processes'
    writes are looked for while something waits. With ``read_only`` the file
    must exist and is never written, created, upgraded or switched to WAL
    (``sitq status`` opens it so); writes then fail with ``BackendError``.

    Before changing anything in a file, sitq checks that the file is its own
    (or new and empty): another application's database is left exactly as it was.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lock_timeout: float = 60.0,
        change_check_interval: float = 0.001,
        read_only: bool = False,
    ) -> None:
        super().__init__()
        self.path = _parse_path(path)
        self.read_only = bool(read_only)
        if self.read_only and self.path == MEMORY:
            raise ValueError("a ':memory:' store cannot be opened read-only: it starts empty")
        self.lock_timeout = lock_timeout
        self.change_check_interval = change_check_interval
        self._lock = threading.RLock()  # guards the loop's connection
        self._conn: sqlite3.Connection | None = None
        self._opened: tuple[str, int, int] | None = None  # (absolute path, device, inode) of the file at open
        self._watcher: _ChangeWatcher | None = None
        self._threads_lock = threading.Lock()  # guards the helpers and heartbeats below
        self._helpers: dict[str, _Helper] = {}
        self._heartbeats: set[_Heartbeat] = set()
        self._checkpoint_mark = 0  # the loop connection's total_changes at the last checkpoint request
        self._checkpoint_queued = False

    def __repr__(self) -> str:
        mode = ", read_only=True" if self.read_only else ""
        return f"SQLiteBackend({self.path!r}{mode})"

    @property
    def is_memory(self) -> bool:
        """Whether this is a ``:memory:`` store, private to this backend object."""
        return self.path == MEMORY

    # -- lifecycle ---------------------------------------------------------

    async def connect(self) -> None:
        """Open the file and check, create or upgrade its schema. Safe to call twice.

        Another process setting up the same new file at the same moment holds a lock
        for a moment; sitq waits for it as for any lock, without blocking the loop.
        """
        if self._conn is None:
            await self._retry_while_busy(self._open_once)

    def _connection(self) -> sqlite3.Connection:
        """The loop's connection, for code that runs after ``connect()``."""
        conn = self._conn
        if conn is None:
            raise BackendError(
                f"the sitq backend for {self.path!r} is not connected (or was closed); await connect() first"
            )
        return conn

    def _open_once(self) -> None:
        with self._lock:
            if self._conn is None:
                self._conn = _open(self.path, self.read_only)
                self._opened = _file_identity(self.path)

    async def close(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.stop()
        with self._threads_lock:
            heartbeats, self._heartbeats = self._heartbeats, set()
        for heartbeat in heartbeats:
            heartbeat.stop()
        # The offload helper first: its last write may still ask the checkpointer for a checkpoint.
        for kind in ("offload", "checkpoint"):
            with self._threads_lock:
                helper = self._helpers.pop(kind, None)
            if helper is not None:
                helper.stop()
                await asyncio.wrap_future(helper.exited)  # a statement in progress runs to its end
        with self._lock:
            conn, self._conn = self._conn, None
            self._opened = None
            self._checkpoint_mark = 0
            if conn is not None:
                conn.close()

    async def ensure_same_store(self) -> None:
        """One ``os.stat``: raise ``BackendError`` if the file at the path is not the one opened."""
        what = self._moved()
        if what is not None:
            self._empty_wal()
            opened = self._opened[0] if self._opened else self.path  # set: it was found moved
            raise BackendError(
                f"the database file {opened!r} was {what} while this worker ran; it stopped so "
                "that it does not write to a file no one can see; restart it on the file you mean. Tasks "
                "it was running stay claimed in the old file until their lease expires."
            )

    def _empty_wal(self) -> None:
        """Copy the WAL into the file this connection still holds, and empty the WAL.

        The WAL is named after the path, so it now pairs with whatever file took the path,
        and SQLite would lay these pages over that file when it next opens it. Emptied, it
        cannot; and a file moved away (``mv tasks.db old.db``) keeps all it had. Best effort:
        another process reading the WAL makes SQLite give up, and that process then does it.
        """
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                except sqlite3.Error:
                    pass

    def _moved(self) -> str | None:
        """How the file at the path stopped being the one opened, or None if it did not (or cannot tell)."""
        opened = self._opened
        if opened is None:  # ':memory:' has no file; a closed backend has nothing open
            return None
        path, device, inode = opened
        try:
            now = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return "deleted (or moved away)"
        except OSError:
            return None  # cannot look just now (a network file system, say); the next look decides
        return None if (now.st_dev, now.st_ino) == (device, inode) else "replaced by another file"

    async def _retry_while_busy(self, attempt: Callable[[], T]) -> T:
        """Call ``attempt()`` until it does not fail with SQLite's busy error, sleeping between tries."""
        delay = 0.001
        deadline = None
        while True:
            try:
                return attempt()
            except sqlite3.Error as exc:
                if not _is_busy(exc):
                    raise _translate(exc, self.path) from exc
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.lock_timeout
            elif now >= deadline:
                raise self._locked_error()
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.05)

    def _locked_error(self) -> BackendError:
        return BackendError(
            f"the sitq database {self.path!r} stayed locked by another process for "
            f"{self.lock_timeout:g} s; a process may be stuck holding a write transaction "
            "(look for it with `fuser`), or raise lock_timeout"
        )

    @overload
    async def _run(self, fn: Callable[..., T], *args: Any) -> T: ...

    @overload
    async def _run(self, fn: Callable[..., tuple[T, bool]], *args: Any, write: Literal[True]) -> T: ...

    async def _run(self, fn: Callable[..., Any], *args: Any, write: bool = False) -> Any:
        """Run ``fn(conn, *args)`` under the lock, retrying while another process holds the lock."""
        if self._conn is None:
            await self.connect()
        conn = self._connection()
        lock = self._lock
        delay = 0.001
        deadline = None
        while True:
            # Never block the loop for the lock: a helper thread may hold it (in-memory stores),
            # or another loop's thread sharing this backend; then wait as for another process.
            if lock.acquire(blocking=False):
                try:
                    result = fn(conn, *args)
                    if write:
                        result, changed = result
                        if changed:  # a write that changed nothing must not wake anyone, or idle workers spin
                            self.changes.mark()
                            if conn.total_changes - self._checkpoint_mark >= CHECKPOINT_ROWS:
                                self._checkpoint_mark = conn.total_changes
                                self._request_checkpoint()
                    break
                except sqlite3.Error as exc:
                    if conn.in_transaction:
                        conn.rollback()
                    if not _is_busy(exc):
                        raise _translate(exc, self.path, self.read_only) from exc
                except BaseException:
                    if conn.in_transaction:
                        conn.rollback()
                    raise
                finally:
                    lock.release()
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.lock_timeout
            elif now >= deadline:
                raise self._locked_error()
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.05)
        if write:  # a read must not wake anyone: two waiters in one process would wake each other forever
            self.changes.wake()
        return result

    async def _write(self, fn: Callable[..., tuple[T, bool]], *args: Any) -> T:
        """Run ``fn(conn, *args) -> (result, changed)`` as ``_run`` does, and move the change
        token (waking waiters) if it changed anything."""
        return await self._run(fn, *args, write=True)

    # -- helper threads ----------------------------------------------------

    async def _offload(self, job: Callable[[sqlite3.Connection, threading.Event], T]) -> T:
        """Run ``job(conn, stopped)`` on the helper thread and await its result; the loop stays free.

        The job gets the helper's connection and its stop event, for ``_call_here``.
        """
        if self._conn is None:
            await self.connect()  # the file is opened and checked by the loop's connection first
        return await asyncio.wrap_future(self._helper("offload").submit(job))

    def _helper(self, kind: str) -> _Helper:
        with self._threads_lock:
            helper = self._helpers.get(kind)
            if helper is None:
                helper = self._helpers[kind] = _Helper(self, kind)
                helper.start()
            return helper

    def _side_connection(self) -> sqlite3.Connection:
        """A connection for a helper thread: no waiting inside SQLite, no automatic checkpoints.

        It opens the file the loop's connection opened (by its path as resolved then: a task
        may have changed the working folder), never creates one, and a read-only backend's
        helpers are read-only too. An in-memory store has only the loop's connection;
        ``_call_here`` takes the lock for it.
        """
        if self.is_memory:
            return self._connection()
        opened = self._opened
        if opened is None:
            # Closed (or never opened): nothing checked the file at the path, and after a close it
            # may be another file by now; a helper opening it would read this store's WAL into it.
            raise BackendError(f"the sitq backend for {self.path!r} is not open")
        try:
            conn = _connect(opened[0], self.read_only, create=False)
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from exc
        # Before the first statement reads anything: if another file has the path now, a statement
        # would read this store's WAL (named after the path) as that file's, and closing would lay
        # its pages over that file.
        moved = self._moved()
        if moved is not None:
            conn.close()
            raise BackendError(f"the database file {self.path!r} was {moved} while sitq had it open")
        try:
            conn.execute("PRAGMA busy_timeout = 0")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            conn.execute("PRAGMA temp_store = MEMORY")  # a big map is staged in a temporary table
        except sqlite3.Error as exc:
            conn.close()
            raise _translate(exc, self.path) from exc
        return conn

    def _release_side_connection(self, conn: sqlite3.Connection | None) -> None:
        if conn is not None and conn is not self._conn:
            conn.close()

    def _call_here(
        self,
        conn: sqlite3.Connection,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        stopped: threading.Event,
        *,
        write: bool = False,
        slowest: float = 0.05,
    ) -> Any:
        """Run ``fn(conn, *args)`` on this helper thread, sleeping here while another process
        holds the lock, up to ``lock_timeout``; ``stopped`` ends the waiting early."""
        shared = conn is self._conn  # an in-memory store's only connection
        delay = 0.001
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                with self._lock if shared else contextlib.nullcontext():
                    try:
                        result = fn(conn, *args)
                    except BaseException:
                        if conn.in_transaction:
                            conn.rollback()
                        raise
            except sqlite3.Error as exc:
                if not _is_busy(exc):
                    raise _translate(exc, self.path) from exc
            else:
                if write:
                    result, changed = result
                    if changed:
                        self.notify_change()
                return result
            if time.monotonic() >= deadline:
                raise self._locked_error()
            if stopped.wait(delay * (0.5 + random.random())):
                raise BackendError(f"the sitq backend for {self.path!r} was closed while it waited for a lock")
            delay = min(delay * 2, slowest)

    def _request_checkpoint(self) -> None:
        """Have the checkpoint helper copy the WAL into the database, unless it is about to."""
        if self.is_memory or self._checkpoint_queued:
            return
        self._checkpoint_queued = True
        try:
            self._helper("checkpoint").submit(self._checkpoint).add_done_callback(_log_failure)
        except BackendError:  # closing
            self._checkpoint_queued = False

    def _checkpoint(self, conn: sqlite3.Connection, stopped: threading.Event) -> None:
        self._checkpoint_queued = False
        if self._moved() is not None:
            return  # the WAL is named after the path: it must not meet another file there
        # PASSIVE: copies what no reader still needs, without waiting for or blocking anyone.
        # Another process checkpointing at the same time is not an error (it reports busy).
        conn.execute(CHECKPOINT).fetchall()

    def start_heartbeat(self, worker_id: str, lease: float, clock: Callable[[], float] = time.time) -> _Heartbeat:
        self._connection()
        heartbeat = _Heartbeat(self, worker_id, lease, clock)
        with self._threads_lock:
            self._heartbeats.add(heartbeat)
        heartbeat.start()
        return heartbeat

    # -- producers ---------------------------------------------------------

    async def enqueue(self, tasks: Sequence[NewTask]) -> None:
        if len(tasks) <= OFFLOAD_ROWS:
            await self._write(_insert, tasks)
            return

        def job(conn: sqlite3.Connection, stopped: threading.Event) -> None:  # one statement: all tasks or none
            self._call_here(conn, _stage, (tasks,), stopped)
            try:
                self._call_here(conn, _insert_staged, (), stopped, write=True)
            finally:
                self._call_here(conn, _execute_count, (UNSTAGE, ()), stopped)
            self._request_checkpoint()

        await self._offload(job)

    # -- workers -----------------------------------------------------------

    async def claim(
        self, worker_id: str, limit: int, now: float, lease_until: float, *, alone: bool = True
    ) -> list[ClaimedTask]:
        return (await self.finish_and_claim(worker_id, (), limit, now, lease_until, alone=alone))[1]

    async def finish(self, worker_id: str, outcomes: Sequence[Outcome]) -> list[bool]:
        return (await self.finish_and_claim(worker_id, outcomes, 0, 0.0, 0.0))[0]

    async def finish_and_claim(
        self,
        worker_id: str,
        outcomes: Sequence[Outcome],
        limit: int,
        now: float,
        lease_until: float,
        *,
        alone: bool = True,
    ) -> tuple[list[bool], list[ClaimedTask]]:
        # At most BATCH_ROWS rows per transaction, and as many tasks claimed (the worker claims
        # more on its next round): at concurrency 8, runs of short tasks would otherwise finish
        # and claim 512 tasks at once, blocking the loop for tens of milliseconds for the
        # statements and for unpickling what was claimed. A bigger batch goes in slices, each
        # its own transaction, with the loop running in between.
        limit = min(limit, BATCH_ROWS)
        if len(outcomes) + limit <= BATCH_ROWS:
            return await self._write(_finish_and_claim, worker_id, outcomes, limit, now, lease_until, alone)
        stored: list[bool] = []
        for first in range(0, len(outcomes), BATCH_ROWS):
            await asyncio.sleep(0)
            batch = outcomes[first : first + BATCH_ROWS]
            stored += (await self._write(_finish_and_claim, worker_id, batch, 0, now, 0, False))[0]
        claimed: list[ClaimedTask] = []
        if limit > 0:
            await asyncio.sleep(0)
            claimed = (await self._write(_finish_and_claim, worker_id, (), limit, now, lease_until, alone))[1]
        return stored, claimed

    async def suspects_waiting(self, now: float) -> bool:
        return await self._run(_fetch_one, SUSPECTS_WAITING, (now,)) is not None

    async def next_eta(self) -> float | None:
        eta = (await self._run(_fetch_one, NEXT_ETA, ()))[0]
        # Numbers sort first, so anything else means only tasks with unreadable etas are pending.
        return eta if isinstance(eta, (int, float)) else None

    async def renew(self, worker_id: str, lease_until: float) -> int:
        return await self._run(_execute_count, RENEW_LEASES, (lease_until, worker_id))

    async def requeue_expired(self, now: float) -> int:
        return await self._write(_requeue_expired, now)

    async def cancel(self, task_id: str, now: float) -> CancelOutcome | None:
        return await self._write(_cancel, task_id, now)

    async def cancel_requests(self, worker_id: str) -> list[str]:
        return [row[0] for row in await self._run(_fetch_all, SELECT_CANCEL_REQUESTS, (worker_id,))]

    async def set_progress(
        self, worker_id: str, progress: Sequence[tuple[Any, int, float | None, float | None, str | None]]
    ) -> None:
        rows = [
            (done, total, message, handle, attempts, worker_id) for handle, attempts, done, total, message in progress
        ]
        await self._write(_execute_many, SET_PROGRESS, rows)

    # -- readers -----------------------------------------------------------

    async def fetch_result(self, task_id: str) -> Result | None:
        row = await self._run(_fetch_result, task_id)
        return None if row is None else _result(row)

    async def fetch_info(self, task_ids: Sequence[str]) -> dict[str, TaskInfo]:
        if len(task_ids) <= OFFLOAD_ROWS:
            return _infos(await self._run(_fetch_all, SELECT_INFO, (json.dumps(list(task_ids)),)))

        def job(conn: sqlite3.Connection, stopped: threading.Event) -> dict[str, TaskInfo]:
            rows = self._call_here(conn, _fetch_all, (SELECT_INFO, (json.dumps(list(task_ids)),)), stopped)
            return _infos(rows, share_gil=True)

        return await self._offload(job)

    async def overview(self, limit: int) -> QueueOverview:
        def job(conn: sqlite3.Connection, stopped: threading.Event) -> QueueOverview:  # a table scan: off the loop
            counts, rows = self._call_here(conn, _overview, (limit,), stopped)
            full: dict[str, int] = dict.fromkeys(STATES, 0)
            for status, count in counts:
                status = TaskStatus.read(_text(status))  # one sitq does not know is counted under its own name
                full[status] = full.get(status, 0) + count
            return QueueOverview(counts=full, recent=[_info(row) for row in rows])

        return await self._offload(job)

    # -- facts about the store -------------------------------------------------

    async def get_meta(self, key: str) -> str | None:
        return await self._run(_get_meta, key)

    async def set_meta_if_absent(self, key: str, value: str) -> str:
        return await self._write(_set_meta_if_absent, key, value)

    # -- change notification -------------------------------------------------

    def _on_watch(self) -> None:
        if self.is_memory:
            return  # nobody outside this object can write to it
        watcher = self._watcher
        if watcher is None:
            with self._lock:
                if self._watcher is None:
                    self._watcher = _ChangeWatcher(self)
                    self._watcher.start()
                watcher = self._watcher
        watcher.wanted.set()


# -- statements run under the backend's lock ---------------------------------


def _task_rows(tasks: Sequence[NewTask]) -> Iterable[tuple[Any, ...]]:
    """The INSERT's parameters; for a batch, made one at a time from its columns."""
    if isinstance(tasks, NewTaskBatch):
        n = len(tasks)
        t = tasks
        return zip(t.task_ids, repeat(t.name, n), repeat(t.func, n), t.args, t.signatures, repeat(t.max_attempts, n),
                   repeat(t.eta, n), repeat(t.enqueued_at, n), strict=False)
    return [(t.task_id, t.name, t.func, t.args, t.signature, t.max_attempts, t.eta, t.enqueued_at) for t in tasks]


def _insert(conn: sqlite3.Connection, tasks: Sequence[NewTask]) -> tuple[None, bool]:
    rows = _task_rows(tasks)
    if len(tasks) == 1:
        conn.execute(INSERT_TASK, next(iter(rows)))
        return None, True
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(INSERT_TASK, rows)
    conn.execute("COMMIT")
    return None, True


def _stage(conn: sqlite3.Connection, tasks: Sequence[NewTask]) -> None:
    conn.execute(STAGE_TABLE)
    conn.execute("BEGIN")  # the temporary database only: takes no lock on the shared file
    conn.executemany(STAGE_TASK, _task_rows(tasks))
    conn.execute("COMMIT")


def _insert_staged(conn: sqlite3.Connection) -> tuple[None, bool]:
    conn.execute(INSERT_STAGED)
    return None, True


def _finish_and_claim(
    conn: sqlite3.Connection,
    worker_id: str,
    outcomes: Sequence[Outcome],
    limit: int,
    now: float,
    lease_until: float,
    alone: bool,
) -> tuple[tuple[list[bool], list[ClaimedTask]], bool]:
    batch = bool(outcomes) and limit > 0 or len(outcomes) > 1
    if batch:
        conn.execute("BEGIN IMMEDIATE")
    stored = [conn.execute(*_outcome_statement(o, worker_id)).rowcount == 1 for o in outcomes]
    claimed: list[ClaimedTask] = []
    if limit > 0:
        rows: list[Any] = []
        if alone:
            rows = _claimed_rows(conn, conn.execute(CLAIM_SUSPECT, (worker_id, now, lease_until, now)))
        if not rows:
            rows = _claimed_rows(conn, conn.execute(CLAIM_TASKS, (worker_id, now, lease_until, now, limit)))
        claimed = sorted(map(_claimed, rows), key=lambda t: t.handle)
    if batch:
        conn.execute("COMMIT")
    return (stored, claimed), any(stored) or bool(claimed)


def _outcome_statement(o: Outcome, worker_id: str) -> tuple[str, tuple[Any, ...]]:
    if o.kind is OutcomeKind.RETRY:  # another attempt is due at o.retry_at (or cancelled: rules.after_retry)
        return RETRY_TASK, (o.finished_at, o.retry_at, o.error, o.traceback, o.output, o.handle, o.attempts, worker_id)
    progress = o.progress or NO_PROGRESS
    return FINISH_TASK, (
        o.kind.value, o.finished_at, o.value, o.value_signature, o.error, o.traceback, o.output, *progress,
        o.handle, o.attempts, worker_id,
    )


def _requeue_expired(conn: sqlite3.Connection, now: float) -> tuple[int, bool]:
    lost = lost_worker_error(LOST_WORKER_LIMIT)
    conn.execute("BEGIN IMMEDIATE")
    _settle_unreadable_times(conn, now)
    count = conn.execute(EXPIRED_CANCELLED, (now, now)).rowcount
    count += conn.execute(EXPIRED_TOO_OFTEN, (now, lost, now, LOST_WORKER_LIMIT)).rowcount
    count += conn.execute(EXPIRED_REQUEUED, (now,)).rowcount
    conn.execute("COMMIT")
    return count, count > 0


def _settle_unreadable_times(conn: sqlite3.Connection, now: float) -> None:
    failed = conn.execute(FAIL_UNREADABLE_ETA, (now,)).rowcount
    ended = conn.execute(END_UNREADABLE_LEASES).rowcount
    if failed:
        log.warning("failed %d pending task(s) whose stored eta is not a time (a row sitq did not write)", failed)
    if ended:
        log.warning("%d running task(s) had a stored lease that is not a time (a row sitq did not write); "
                    "it counts as expired", ended)


def _cancel(conn: sqlite3.Connection, task_id: str, now: float) -> tuple[CancelOutcome | None, bool]:
    conn.execute("BEGIN IMMEDIATE")
    if conn.execute(CANCEL_PENDING, (now, task_id)).rowcount:
        state = CancelOutcome.CANCELLED
    elif conn.execute(REQUEST_CANCEL, (task_id,)).rowcount:
        state = CancelOutcome.REQUESTED
    elif conn.execute(TASK_EXISTS, (task_id,)).fetchone():
        state = CancelOutcome.FINISHED
    else:
        state = None
    conn.execute("COMMIT")
    return state, state in (CancelOutcome.CANCELLED, CancelOutcome.REQUESTED)


def _fetch_result(conn: sqlite3.Connection, task_id: str) -> Any:
    try:
        return _fetch_one(conn, SELECT_RESULT, (task_id,))
    except sqlite3.OperationalError as exc:
        if "no such column: value_signature" not in str(exc):
            raise
    # A version 1 file opened read-only (nothing upgrades it): it never had signed values.
    return _fetch_one(conn, SELECT_RESULT.replace("value_signature", "NULL"), (task_id,))


def _get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    try:
        row = conn.execute(SELECT_META, (key,)).fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None  # a version 1 file opened read-only: it has no meta table, so no facts
        raise
    value: str | None = None if row is None else row[0]
    return value


def _set_meta_if_absent(conn: sqlite3.Connection, key: str, value: str) -> tuple[str, bool]:
    conn.execute("BEGIN IMMEDIATE")
    added = conn.execute(INSERT_META_IF_ABSENT, (key, value)).rowcount == 1
    (recorded,) = conn.execute(SELECT_META, (key,)).fetchone()
    conn.execute("COMMIT")
    return recorded, added


def _execute_count(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> int:
    return conn.execute(sql, params).rowcount


def _execute_many(conn: sqlite3.Connection, sql: str, rows: Sequence[Sequence[Any]]) -> tuple[None, bool]:
    if not rows:
        return None, False
    before = conn.total_changes
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(sql, rows)
    conn.execute("COMMIT")
    return None, conn.total_changes > before


def _fetch_one(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> Any:
    return _read(conn, lambda: conn.execute(sql, params).fetchone())


def _fetch_all(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[Any]:
    return _read(conn, lambda: conn.execute(sql, params).fetchall())


def _overview(conn: sqlite3.Connection, limit: int) -> tuple[list[Any], list[Any]]:
    conn.execute("BEGIN")  # one snapshot for counts and rows
    try:
        counts = _read(conn, lambda: conn.execute(COUNT_BY_STATUS).fetchall())
        rows = _read(conn, lambda: conn.execute(SELECT_RECENT, (limit,)).fetchall())
    finally:
        conn.execute("COMMIT")
    return counts, rows


def _renew(conn: sqlite3.Connection, worker_id: str, lease: float, clock: Callable[[], float]) -> int:
    return conn.execute(RENEW_LEASES, (clock() + lease, worker_id)).rowcount


def _infos(rows: Iterable[Any], share_gil: bool = False) -> dict[str, TaskInfo]:
    """The records keyed by id. On a helper thread (``share_gil``), let the event loop's thread
    take the GIL every few hundred records instead of waiting out Python's 5 ms switch interval."""
    if not share_gil:
        return {row[0]: _info(row) for row in rows}
    infos = {}
    for i, row in enumerate(rows, 1):
        infos[row[0]] = _info(row)
        if i % 256 == 0:
            time.sleep(0)
    return infos


def _result(row: Sequence[Any]) -> Result:
    task_id, name, status, value, error, tb, enqueued, started, finished, attempts, output, value_signature = row
    return Result(
        task_id=task_id if type(task_id) is str else cast(str, _text(task_id)),  # NOT NULL: never None
        name=name if type(name) is str else cast(str, _text(name)),
        status=TaskStatus.read(status if type(status) is str else _text(status)),
        value=value,  # as stored: deserialize_result names it if it is not bytes
        error=_text(error),
        traceback=_text(tb),
        enqueued_at=to_datetime(enqueued),
        started_at=to_datetime(started),
        finished_at=to_datetime(finished),
        attempts=attempts if type(attempts) is int else _whole(attempts),
        output=_text(output),
        value_signature=value_signature if isinstance(value_signature, bytes) else None,
    )


def _info(row: Sequence[Any]) -> TaskInfo:
    (task_id, name, status, enqueued, eta, started, finished, attempts, worker_id, done, total, message, error) = row
    # The inline checks keep the usual row, which holds only what sitq writes, fast.
    return TaskInfo(
        task_id=task_id if type(task_id) is str else cast(str, _text(task_id)),  # NOT NULL: never None
        name=name if type(name) is str else cast(str, _text(name)),
        status=TaskStatus.read(status if type(status) is str else _text(status)),
        enqueued_at=to_datetime(enqueued),
        eta=to_datetime(eta),
        started_at=to_datetime(started),
        finished_at=to_datetime(finished),
        attempts=attempts if type(attempts) is int else _whole(attempts),
        worker_id=worker_id if type(worker_id) is str else _text(worker_id),
        progress_done=done if done is None or type(done) is float else _number(done),
        progress_total=total if total is None or type(total) is float else _number(total),
        progress_message=message if message is None else _text(message),
        error=error if error is None else _text(error),
    )


# -- rows sitq did not write ---------------------------------------------------

# The columns a claim returns after seq, with the Python type sitq stores in each and whether NULL is one.
CLAIMED_COLUMNS = (
    ("id", str, False),
    ("name", str, False),
    ("func", bytes, False),
    ("args", bytes, False),
    ("signature", bytes, True),
    ("attempts", int, False),
)
_KINDS = {str: "text", bytes: "bytes", int: "a whole number"}


class _UndecodableText(str):
    """Stored text that is not UTF-8, read with replacement characters; only a row sitq did not write holds it."""


def _lenient_text(data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        return _UndecodableText(data.decode("utf-8", "replace"))


def _is_undecodable(exc: sqlite3.Error) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "Could not decode to UTF-8" in str(exc)


def _read(conn: sqlite3.Connection, read: Callable[[], T]) -> T:
    """``read()``; if some stored text is not UTF-8, ``read()`` again with text read leniently.

    The lenient reader costs a Python call per text value, so it is used only when needed.
    """
    try:
        return read()
    except sqlite3.OperationalError as exc:
        if not _is_undecodable(exc):
            raise
    conn.text_factory = _lenient_text
    try:
        return read()
    finally:
        conn.text_factory = str


def _claimed_rows(conn: sqlite3.Connection, cursor: sqlite3.Cursor) -> list[Any]:
    """The rows a claim returns. The claim has happened by now, so it cannot be run again: after
    text that is not UTF-8, reading resumes at the row that failed, with text read leniently."""
    rows: list[Any] = []
    try:
        rows.extend(cursor)  # keeps the rows read before a failure
    except sqlite3.OperationalError as exc:
        if not _is_undecodable(exc):
            raise
        conn.text_factory = _lenient_text
        try:
            rows.extend(cursor)
        finally:
            conn.text_factory = str
    return rows


def _claimed(row: Sequence[Any]) -> ClaimedTask:
    task = ClaimedTask(*row)
    _, task_id, name, func, args, signature, attempts, *_ = row
    if (
        type(task_id) is str
        and type(name) is str
        and type(func) is bytes
        and type(args) is bytes
        and (signature is None or type(signature) is bytes)
        and type(attempts) is int
    ):
        return task
    for (column, kind, nullable), value in zip(CLAIMED_COLUMNS, row[1:], strict=False):
        if type(value) is not kind and not (nullable and value is None):
            expected = _KINDS[kind] + (" (or NULL)" if nullable else "")
            task.problem = (
                f"the stored row of this task has {_describe(value)} in column {column!r} where sitq "
                f"stores {expected}; it was not written by sitq, or was changed by hand"
            )
            break
    return task


def _describe(value: object) -> str:
    """What a stored value is, for messages: ``text 'abc'``, ``bytes``, ``NULL``, ``the number 2.5``."""
    if value is None:
        return "NULL"
    if isinstance(value, _UndecodableText):
        return "text that is not valid UTF-8"
    if isinstance(value, str):
        return f"text {value[:40]!r}" + ("..." if len(value) > 40 else "")
    if isinstance(value, bytes):
        return "bytes"
    return f"the number {value!r}"


def _text(value: object) -> str | None:
    """Stored text as it is; anything else in a text column as a short description of it."""
    if type(value) is str or value is None:
        return value
    if isinstance(value, str):
        return str(value)  # read leniently: already shown with replacement characters
    if isinstance(value, bytes):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    return str(value)


def _number(value: object) -> float | None:
    """A stored number as a float; None for anything else."""
    return float(value) if type(value) is float or type(value) is int else None


def _whole(value: object) -> int | None:
    """A stored whole number; None for anything else."""
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer():
        return int(value)
    return None


# -- opening and checking the file -------------------------------------------


def _parse_path(path: str | os.PathLike[str]) -> str:
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"SQLiteBackend needs a path, a sqlite:/// URL or ':memory:', not {type(path).__name__}")
    if path.startswith("sqlite://"):
        rest = path[len("sqlite://") :]
        if not rest.startswith("/"):
            raise ValueError(f"cannot read the SQLite URL {path!r}: write sqlite:///relative.db or sqlite:////abs.db")
        path = rest[1:] or MEMORY
    if not path:
        raise ValueError("SQLiteBackend needs a file path; use ':memory:' for a store in memory")
    return path


def _connect(path: str, read_only: bool, create: bool = True) -> sqlite3.Connection:
    """A raw connection: read-only ones cannot write to the file, create it, or change its mode;
    with ``create=False`` a missing file is an error rather than a new empty database."""
    if (read_only or not create) and path != MEMORY:
        mode = "ro" if read_only else "rw"
        return sqlite3.connect(
            Path(path).resolve().as_uri() + f"?mode={mode}", uri=True, isolation_level=None, check_same_thread=False
        )
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False)


def _open(path: str, read_only: bool) -> sqlite3.Connection:
    """Open the store, check that it is sitq's before changing anything, then set it up.

    A busy error (another process holds a lock, for example while it sets up the same new
    file) is raised as it is, for the caller to wait and try again; other errors are
    translated into messages that say what to do.
    """
    if path != MEMORY:
        if read_only:
            if not os.path.exists(path):
                raise BackendError(f"there is no sitq database at {path!r}; check the path")
        else:
            _create_private_file(path)
    try:
        conn = _connect(path, read_only)
    except sqlite3.Error as exc:
        raise _translate(exc, path) from exc
    try:
        conn.execute("PRAGMA busy_timeout = 0")  # never wait inside SQLite: sitq's retry waits without blocking
        _ensure_schema(conn, path, read_only)
        if path != MEMORY and not read_only:
            conn.execute("PRAGMA journal_mode = WAL")  # only now that the file is known to be sitq's
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # a helper checkpoints, off the event loop
    except sqlite3.Error as exc:
        conn.close()
        if _is_busy(exc):
            raise
        raise _translate(exc, path) from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _create_private_file(path: str) -> None:
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise BackendError(
            f"cannot open the sitq database {path!r}: its folder {str(folder)!r} {what}; "
            "create the folder first or choose another path"
        )
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise BackendError(
            f"cannot open the sitq database {path!r} for writing: {exc.strerror}; "
            "check the permissions of the file and its folder, or choose another path"
        ) from exc
    os.close(fd)


def _ensure_schema(conn: sqlite3.Connection, path: str, read_only: bool) -> None:
    """Create the schema in a new file, or upgrade an older sitq's file, in one transaction.

    Only reads happen until the file is known to be sitq's (or new and empty): a file that
    belongs to another application is left exactly as it was.
    """
    version = _schema_version(conn, path)
    if version == SCHEMA_VERSION:
        return
    if read_only:
        if version == 0:
            raise BackendError(f"{path!r} is empty: no sitq queue has been stored there yet")
        return  # an older sitq's file is read as it is; the next worker or queue upgrades it
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = _schema_version(conn, path)  # another process may have set it up meanwhile
        if version == 0:
            _execute_script(conn, SCHEMA)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        else:
            for step in range(version, SCHEMA_VERSION):
                _execute_script(conn, MIGRATIONS[step])
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise


def _schema_version(conn: sqlite3.Connection, path: str) -> int:
    """The sitq schema version of the file, 0 for a new empty file; raises for anyone else's file."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if app_id == APPLICATION_ID:
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{path!r} was written by a newer sitq (schema version {version}; this sitq reads up "
                f"to {SCHEMA_VERSION}); upgrade sitq (pip install -U sitq) to use it"
            )
        return version
    if app_id != 0:
        raise BackendError(
            f"{path!r} belongs to another application (SQLite application_id {app_id:#x}); "
            "give sitq a path of its own"
        )
    if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
        raise BackendError(
            f"{path!r} is a SQLite database that sitq did not create; it holds other "
            "tables, so sitq leaves it alone. Give sitq a path of its own."
        )
    return 0


def _file_identity(path: str) -> tuple[str, int, int] | None:
    """(absolute path, device, inode) of the file just opened; absolute because a task may chdir."""
    if path == MEMORY:
        return None
    absolute = os.path.abspath(path)
    try:
        st = os.stat(absolute)
    except OSError:
        return None
    return absolute, st.st_dev, st.st_ino


def _execute_script(conn: sqlite3.Connection, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11 on, as are the constants
    if code is not None and sys.version_info >= (3, 11):
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    text = str(exc)
    return "database is locked" in text or "database table is locked" in text


def _translate(exc: sqlite3.Error, path: str, read_only: bool = False) -> BackendError:
    """One place that turns SQLite's errors into messages that say what to do."""
    text = str(exc)
    if read_only and "readonly" in text:
        advice = "this backend opened the file read-only (read_only=True); open it without read_only to write"
    elif "file is not a database" in text or "malformed" in text:
        advice = (
            "it is not a SQLite database or it is damaged; if it is a copy, restore it, "
            "otherwise give sitq a new path (sqlite3's .recover can save what is left)"
        )
    elif "readonly" in text or "read-only" in text:
        advice = "the file or its folder is read-only; sitq needs to write the database and its -wal file"
    elif "disk is full" in text or "database or disk is full" in text:
        advice = "the disk is full; free some space and try again (nothing already stored was lost)"
    elif "unable to open" in text:
        advice = "check that the folder exists and can be written"
    else:
        advice = "SQLite reported an unexpected error"
    return BackendError(f"sitq database {path!r}: {text}: {advice}")


class _ChangeWatcher(threading.Thread):
    """Notices commits by other connections while something waits for a change.

    It asks the loop's own connection when it can (``data_version`` moves for every
    connection's commits but that connection's own), so the backend's own writes, which
    woke their waiters already, do not wake them a second time a moment later; its side
    connection only while the loop's is closed.
    """

    QUIET_AFTER = 1.0
    SLOWEST = 0.025

    def __init__(self, backend: SQLiteBackend) -> None:
        super().__init__(name=f"sitq-watch-{Path(backend.path).name}", daemon=True)
        self.backend = backend
        self.wanted = threading.Event()
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()
        self.wanted.set()
        if self is not threading.current_thread():
            self.join(timeout=5)

    def run(self) -> None:
        backend = self.backend
        try:
            conn = backend._side_connection()
        except BackendError:
            return  # the main connection reports the problem; waiters fall back to their timeouts
        if backend._moved() is not None:  # SQLite reads nothing before the first statement
            conn.close()
            return
        try:
            # No baseline: a write that landed after a waiter read its token but before this
            # connection first looked must still wake it, so the first look always notifies.
            last = None
            last_change = time.monotonic()
            while not self._stopped.is_set():
                if not backend.changes.has_watchers:
                    self.wanted.clear()
                    if not backend.changes.has_watchers:
                        self.wanted.wait()
                    continue
                quiet = time.monotonic() - last_change > self.QUIET_AFTER
                self._stopped.wait(self.SLOWEST if quiet else backend.change_check_interval)
                try:
                    version = self._version(conn)
                except sqlite3.Error:
                    continue  # busy or being recovered; look again next round
                if version is None:
                    continue  # the loop is using its connection; look again next round
                if version != last:
                    last, last_change = version, time.monotonic()
                    backend.notify_change()
        finally:
            conn.close()

    def _version(self, side: sqlite3.Connection) -> int | None:
        """The store's ``data_version`` as the loop's connection sees it (None if it is busy now)."""
        backend = self.backend
        main = backend._conn
        if main is None:
            version: int = side.execute("PRAGMA data_version").fetchone()[0]
            return version
        if not backend._lock.acquire(blocking=False):
            return None
        try:
            version = main.execute("PRAGMA data_version").fetchone()[0]
            return version
        finally:
            backend._lock.release()


class _Helper(threading.Thread):
    """A thread with a connection of its own, for work the event loop must not wait for.

    Jobs run one at a time, in the order given. ``stop()`` lets the job in progress end
    (a job waiting for another process's lock gives up at once) and fails the ones not
    started; ``exited`` resolves when the thread is gone.
    """

    def __init__(self, backend: SQLiteBackend, kind: str) -> None:
        super().__init__(name=f"sitq-{kind}-{Path(backend.path).name}", daemon=True)
        self.backend = backend
        self.stopped = threading.Event()
        self.exited: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._jobs: queue.SimpleQueue[tuple[_Job, concurrent.futures.Future[Any]] | None] = queue.SimpleQueue()
        self._closing = threading.Lock()
        self._closed = False

    def submit(self, job: Callable[[sqlite3.Connection, threading.Event], T]) -> concurrent.futures.Future[T]:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._closing:
            if self._closed:
                raise BackendError(f"the sitq backend for {self.backend.path!r} is closing")
            self._jobs.put((job, fut))
        return fut

    def stop(self) -> None:
        self.stopped.set()
        self._jobs.put(None)

    def _serve(
        self, job: _Job, fut: concurrent.futures.Future[Any], conn: sqlite3.Connection | None
    ) -> sqlite3.Connection | None:
        if not fut.set_running_or_notify_cancel():
            return conn  # its caller gave up before it started
        try:
            if conn is None:
                conn = self.backend._side_connection()
            result = job(conn, self.stopped)
        except BaseException as exc:  # delivered to the caller, who decides
            fut.set_exception(exc)
        else:
            fut.set_result(result)
        return conn

    def run(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while (item := self._jobs.get()) is not None:
                conn = self._serve(*item, conn)
                del item  # a job may hold a whole batch: free it now, not when the next job comes
        finally:
            with self._closing:
                self._closed = True
            with contextlib.suppress(queue.Empty):
                while True:
                    item = self._jobs.get_nowait()
                    if item is not None and item[1].set_running_or_notify_cancel():
                        item[1].set_exception(BackendError(f"the sitq backend for {self.backend.path!r} was closed"))
            self.backend._release_side_connection(conn)
            self.exited.set_result(None)


class _Heartbeat(threading.Thread):
    """Renews a worker's leases every ``lease / RENEWALS_PER_LEASE`` seconds, from its own thread
    and connection, so neither the worker's event loop nor its statements can hold a renewal up."""

    def __init__(self, backend: SQLiteBackend, worker_id: str, lease: float, clock: Callable[[], float]) -> None:
        super().__init__(name=f"sitq-heartbeat-{worker_id}", daemon=True)
        self.backend = backend
        self.worker_id = worker_id
        self.lease = lease
        self.clock = clock
        self.interval = lease / RENEWALS_PER_LEASE
        self._stopped = threading.Event()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped.is_set() else "running"
        return f"<sitq heartbeat of {self.worker_id} every {self.interval:g} s, {state}>"

    def stop(self) -> None:
        """Stop renewing; returns once a renewal in progress has ended."""
        self._stopped.set()
        if self is not threading.current_thread() and self.is_alive():
            self.join()
        with self.backend._threads_lock:
            self.backend._heartbeats.discard(self)

    def run(self) -> None:
        backend = self.backend
        conn: sqlite3.Connection | None = None
        failing = False
        try:
            while not self._stopped.is_set():
                try:
                    if conn is None:
                        conn = backend._side_connection()
                    # Poll the lock every few ms: when a long write elsewhere ends, be first in.
                    args = (self.worker_id, self.lease, self.clock)
                    backend._call_here(conn, _renew, args, self._stopped, slowest=0.002)
                except Exception as exc:  # the thread must outlive a bad moment: keep trying
                    if self._stopped.is_set():
                        break
                    if not failing:
                        log.warning(
                            "worker %s: could not renew its leases (%s); trying again every %g s. If this "
                            "goes on, other workers take its tasks over once their leases run out",
                            self.worker_id, exc, self.interval,
                        )
                    failing = True
                else:
                    if failing:
                        log.warning("worker %s: renewing its leases works again", self.worker_id)
                    failing = False
                self._stopped.wait(self.interval)
        finally:
            backend._release_side_connection(conn)


def _log_failure(fut: concurrent.futures.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("sitq: a WAL checkpoint failed (%s); the next one tries again", fut.exception())
