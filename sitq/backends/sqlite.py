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
import threading
import time
from itertools import repeat
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from sitq.backends.base import Backend
from sitq.core import (
    PENDING,
    STATES,
    ClaimedTask,
    NewTask,
    NewTaskBatch,
    Outcome,
    QueueOverview,
    Result,
    TaskInfo,
    to_datetime,
)
from sitq.errors import BackendError, SchemaVersionError

__all__ = ["SQLiteBackend"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
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
    progress_message TEXT
);
-- One index serves the claim (pending, oldest eta first), the next eta, and the counts per state;
-- each index costs every insert about as much as the insert itself, so there are few.
CREATE INDEX sitq_tasks_state ON sitq_tasks (status, eta, seq);
CREATE INDEX sitq_tasks_leases ON sitq_tasks (worker_id, lease_until) WHERE status = 'running';
"""

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
    WHERE status = 'pending' AND eta <= ? ORDER BY eta, seq LIMIT ?
)
RETURNING seq, id, name, func, args, signature, attempts
"""

FINISH_TASK = """
UPDATE sitq_tasks
SET status = ?, finished_at = ?, value = ?, error = ?, traceback = ?, output = ?, lease_until = NULL,
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
SELECT seq FROM sitq_tasks WHERE worker_id = ? AND status = 'running' AND cancel_requested = 1
"""

TASK_EXISTS = "SELECT 1 FROM sitq_tasks WHERE id = ?"

RENEW_LEASES = """
UPDATE sitq_tasks SET lease_until = ? WHERE worker_id = ? AND status = 'running'
"""

# Tasks whose worker stopped renewing the lease: cancelled if that was asked for, failed
# once they have been lost too often (a task that kills its worker must not loop), else
# claimable again.
EXPIRED_CANCELLED = """
UPDATE sitq_tasks SET status = 'cancelled', finished_at = ?, lease_until = NULL
WHERE status = 'running' AND lease_until < ? AND cancel_requested = 1
"""

EXPIRED_TOO_OFTEN = """
UPDATE sitq_tasks SET status = 'failed', finished_at = ?, lease_until = NULL, error = ?, traceback = NULL
WHERE status = 'running' AND lease_until < ? AND attempts >= max_attempts + ?
"""

EXPIRED_REQUEUED = """
UPDATE sitq_tasks SET status = 'pending', worker_id = NULL, lease_until = NULL
WHERE status = 'running' AND lease_until < ?
"""

SET_PROGRESS = """
UPDATE sitq_tasks SET progress_done = ?, progress_total = ?, progress_message = ?
WHERE seq = ? AND attempts = ? AND status = 'running' AND worker_id = ?
"""

NEXT_ETA = "SELECT min(eta) FROM sitq_tasks INDEXED BY sitq_tasks_state WHERE status = 'pending'"

SELECT_RESULT = """
SELECT id, name, status, value, error, traceback, enqueued_at, started_at, finished_at, attempts, output
FROM sitq_tasks WHERE id = ?
"""

INFO_COLUMNS = """
id, name, status, enqueued_at, eta, started_at, finished_at, attempts, worker_id,
progress_done, progress_total, progress_message, error
"""

SELECT_INFO = f"SELECT {INFO_COLUMNS} FROM sitq_tasks WHERE id IN (SELECT value FROM json_each(?))"

SELECT_RECENT = f"SELECT {INFO_COLUMNS} FROM sitq_tasks ORDER BY seq DESC LIMIT ?"

COUNT_BY_STATUS = "SELECT status, count(*) FROM sitq_tasks GROUP BY status"

CHECKPOINT = "PRAGMA wal_checkpoint(PASSIVE)"

MEMORY = ":memory:"
# How many times a task may lose its worker (beyond its retries) before it fails.
LOST_WORKER_LIMIT = 5
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
    writes are looked for while something waits.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        *,
        lock_timeout: float = 60.0,
        change_check_interval: float = 0.001,
    ) -> None:
        super().__init__()
        self.path = _parse_path(path)
        self.lock_timeout = lock_timeout
        self.change_check_interval = change_check_interval
        self._lock = threading.RLock()  # guards the loop's connection
        self._conn: Optional[sqlite3.Connection] = None
        self._watcher: Optional[_ChangeWatcher] = None
        self._threads_lock = threading.Lock()  # guards the helpers and heartbeats below
        self._helpers: dict[str, _Helper] = {}
        self._heartbeats: set[_Heartbeat] = set()
        self._checkpoint_mark = 0  # the loop connection's total_changes at the last checkpoint request
        self._checkpoint_queued = False

    def __repr__(self) -> str:
        return f"SQLiteBackend({self.path!r})"

    @property
    def is_memory(self) -> bool:
        return self.path == MEMORY

    # -- lifecycle ---------------------------------------------------------

    async def connect(self) -> None:
        self._connection()

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
            self._checkpoint_mark = 0
            if conn is not None:
                conn.close()

    def _connection(self) -> sqlite3.Connection:
        conn = self._conn
        if conn is None:
            with self._lock:
                if self._conn is None:
                    self._conn = _open(self.path)
                conn = self._conn
        return conn

    async def _run(self, fn, *args, write: bool = False):
        """Run ``fn(conn, *args)`` under the lock, retrying while another process holds the lock."""
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
                            self._mark_changed()
                            if conn.total_changes - self._checkpoint_mark >= CHECKPOINT_ROWS:
                                self._checkpoint_mark = conn.total_changes
                                self._request_checkpoint()
                    break
                except sqlite3.Error as exc:
                    if conn.in_transaction:
                        conn.rollback()
                    if not _is_busy(exc):
                        raise _translate(exc, self.path) from exc
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
            self._wake_watchers()
        return result

    def _locked_error(self) -> BackendError:
        return BackendError(
            f"the sitq database {self.path!r} stayed locked by another process for "
            f"{self.lock_timeout:g} s; a process may be stuck holding a write transaction "
            "(look for it with `fuser`), or raise lock_timeout"
        )

    async def _write(self, fn, *args):
        """Run ``fn(conn, *args) -> (result, changed)`` as ``_run`` does, and move the change
        token (waking waiters) if it changed anything."""
        return await self._run(fn, *args, write=True)

    # -- helper threads ----------------------------------------------------

    async def _offload(self, job: Callable[[sqlite3.Connection, threading.Event], object]):
        """Run ``job(conn, stopped)`` on the helper thread and await its result; the loop stays free.

        The job gets the helper's connection and its stop event, for ``_call_here``.
        """
        self._connection()  # the file is opened and checked by the loop's connection first
        return await asyncio.wrap_future(self._helper("offload").submit(job))

    def _helper(self, kind: str) -> "_Helper":
        with self._threads_lock:
            helper = self._helpers.get(kind)
            if helper is None:
                helper = self._helpers[kind] = _Helper(self, kind)
                helper.start()
            return helper

    def _side_connection(self) -> sqlite3.Connection:
        """A connection for a helper thread: no waiting inside SQLite, no automatic checkpoints.

        An in-memory store has only the loop's connection; ``_call_here`` takes the lock for it.
        """
        if self.is_memory:
            return self._connection()
        try:
            conn = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from exc
        try:
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            conn.execute("PRAGMA temp_store = MEMORY")  # a big map is staged in a temporary table
        except sqlite3.Error as exc:
            conn.close()
            raise _translate(exc, self.path) from exc
        return conn

    def _release_side_connection(self, conn: Optional[sqlite3.Connection]) -> None:
        if conn is not None and conn is not self._conn:
            conn.close()

    def _call_here(self, conn, fn, args, stopped: threading.Event, *, write=False, slowest=0.05):
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
        # PASSIVE: copies what no reader still needs, without waiting for or blocking anyone.
        # Another process checkpointing at the same time is not an error (it reports busy).
        conn.execute(CHECKPOINT).fetchall()

    def start_heartbeat(self, worker_id: str, lease: float, clock: Callable[[], float] = time.time) -> "_Heartbeat":
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

        def job(conn, stopped):  # still one statement: all tasks are stored or none is
            self._call_here(conn, _stage, (tasks,), stopped)
            try:
                self._call_here(conn, _insert_staged, (), stopped, write=True)
            finally:
                self._call_here(conn, _execute_count, (UNSTAGE, ()), stopped)
            self._request_checkpoint()

        await self._offload(job)

    # -- workers -----------------------------------------------------------

    async def claim(self, worker_id, limit, now, lease_until):
        return (await self.finish_and_claim(worker_id, (), limit, now, lease_until))[1]

    async def finish(self, worker_id, outcomes):
        return (await self.finish_and_claim(worker_id, outcomes, 0, 0.0, 0.0))[0]

    async def finish_and_claim(self, worker_id, outcomes, limit, now, lease_until):
        # At most BATCH_ROWS rows per transaction, and as many tasks claimed (the worker claims
        # more on its next round): at concurrency 8, runs of short tasks would otherwise finish
        # and claim 512 tasks at once, blocking the loop for tens of milliseconds for the
        # statements and for unpickling what was claimed. A bigger batch goes in slices, each
        # its own transaction, with the loop running in between.
        limit = min(limit, BATCH_ROWS)
        if len(outcomes) + limit <= BATCH_ROWS:
            return await self._write(_finish_and_claim, worker_id, outcomes, limit, now, lease_until)
        stored: list[bool] = []
        for first in range(0, len(outcomes), BATCH_ROWS):
            await asyncio.sleep(0)
            stored += (await self._write(_finish_and_claim, worker_id, outcomes[first : first + BATCH_ROWS], 0, now, 0))[0]
        claimed: list[ClaimedTask] = []
        if limit > 0:
            await asyncio.sleep(0)
            claimed = (await self._write(_finish_and_claim, worker_id, (), limit, now, lease_until))[1]
        return stored, claimed

    async def next_eta(self):
        return (await self._run(_fetch_one, NEXT_ETA, ()))[0]

    async def renew(self, worker_id, lease_until):
        return await self._run(_execute_count, RENEW_LEASES, (lease_until, worker_id))

    async def requeue_expired(self, now):
        return await self._write(_requeue_expired, now)

    async def cancel(self, task_id, now):
        return await self._write(_cancel, task_id, now)

    async def cancel_requests(self, worker_id):
        return [row[0] for row in await self._run(_fetch_all, SELECT_CANCEL_REQUESTS, (worker_id,))]

    async def set_progress(self, worker_id, progress):
        rows = [(done, total, message, seq, attempts, worker_id) for seq, attempts, done, total, message in progress]
        await self._write(_execute_many, SET_PROGRESS, rows)

    # -- readers -----------------------------------------------------------

    async def fetch_result(self, task_id):
        row = await self._run(_fetch_one, SELECT_RESULT, (task_id,))
        return None if row is None else _result(row)

    async def fetch_info(self, task_ids):
        if len(task_ids) <= OFFLOAD_ROWS:
            return _infos(await self._run(_fetch_all, SELECT_INFO, (json.dumps(list(task_ids)),)))

        def job(conn, stopped):
            rows = self._call_here(conn, _fetch_all, (SELECT_INFO, (json.dumps(list(task_ids)),)), stopped)
            return _infos(rows, share_gil=True)

        return await self._offload(job)

    async def overview(self, limit):
        def job(conn, stopped):  # the counts scan the whole table: never on the loop
            counts, rows = self._call_here(conn, _overview, (limit,), stopped)
            full = dict.fromkeys(STATES, 0)
            full.update(counts)
            return QueueOverview(counts=full, recent=[_info(row) for row in rows])

        return await self._offload(job)

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


def _task_rows(tasks: Sequence[NewTask]):
    """The INSERT's parameters; for a batch, made one at a time from its columns."""
    if isinstance(tasks, NewTaskBatch):
        n = len(tasks)
        t = tasks
        return zip(t.task_ids, repeat(t.name, n), repeat(t.func, n), t.args, t.signatures, repeat(t.max_attempts, n),
                   repeat(t.eta, n), repeat(t.enqueued_at, n))
    return [(t.task_id, t.name, t.func, t.args, t.signature, t.max_attempts, t.eta, t.enqueued_at) for t in tasks]


def _insert(conn: sqlite3.Connection, tasks: Sequence[NewTask]) -> tuple:
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


def _insert_staged(conn: sqlite3.Connection) -> tuple:
    conn.execute(INSERT_STAGED)
    return None, True


def _finish_and_claim(conn, worker_id, outcomes, limit, now, lease_until):
    batch = bool(outcomes) and limit > 0 or len(outcomes) > 1
    if batch:
        conn.execute("BEGIN IMMEDIATE")
    stored = [conn.execute(*_outcome_statement(o, worker_id)).rowcount == 1 for o in outcomes]
    claimed = []
    if limit > 0:
        rows = conn.execute(CLAIM_TASKS, (worker_id, now, lease_until, now, limit)).fetchall()
        claimed = sorted((ClaimedTask(*row) for row in rows), key=lambda t: t.seq)
    if batch:
        conn.execute("COMMIT")
    return (stored, claimed), any(stored) or bool(claimed)


def _outcome_statement(o: Outcome, worker_id: str) -> tuple:
    if o.status == PENDING:  # another attempt is due at o.retry_at
        return RETRY_TASK, (o.finished_at, o.retry_at, o.error, o.traceback, o.output, o.seq, o.attempts, worker_id)
    progress = o.progress or NO_PROGRESS
    return FINISH_TASK, (o.status, o.finished_at, o.value, o.error, o.traceback, o.output, *progress) + (
        o.seq,
        o.attempts,
        worker_id,
    )


def _requeue_expired(conn, now) -> int:
    lost = (
        f"WorkerLostError: the worker running this task stopped renewing its lease too often "
        f"(more than {LOST_WORKER_LIMIT} times beyond its retries); it may crash its worker, so "
        "it is not run again"
    )
    conn.execute("BEGIN IMMEDIATE")
    count = conn.execute(EXPIRED_CANCELLED, (now, now)).rowcount
    count += conn.execute(EXPIRED_TOO_OFTEN, (now, lost, now, LOST_WORKER_LIMIT)).rowcount
    count += conn.execute(EXPIRED_REQUEUED, (now,)).rowcount
    conn.execute("COMMIT")
    return count, count > 0


def _cancel(conn, task_id, now):
    conn.execute("BEGIN IMMEDIATE")
    if conn.execute(CANCEL_PENDING, (now, task_id)).rowcount:
        state = "cancelled"
    elif conn.execute(REQUEST_CANCEL, (task_id,)).rowcount:
        state = "requested"
    elif conn.execute(TASK_EXISTS, (task_id,)).fetchone():
        state = "finished"
    else:
        state = None
    conn.execute("COMMIT")
    return state, state in ("cancelled", "requested")


def _execute_count(conn, sql, params) -> int:
    return conn.execute(sql, params).rowcount


def _execute_many(conn, sql, rows) -> tuple:
    if not rows:
        return None, False
    before = conn.total_changes
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(sql, rows)
    conn.execute("COMMIT")
    return None, conn.total_changes > before


def _fetch_one(conn, sql, params):
    return conn.execute(sql, params).fetchone()


def _fetch_all(conn, sql, params):
    return conn.execute(sql, params).fetchall()


def _overview(conn, limit):
    conn.execute("BEGIN")  # one snapshot for counts and rows
    try:
        counts = dict(conn.execute(COUNT_BY_STATUS).fetchall())
        rows = conn.execute(SELECT_RECENT, (limit,)).fetchall()
    finally:
        conn.execute("COMMIT")
    return counts, rows


def _renew(conn, worker_id, lease, clock) -> int:
    return conn.execute(RENEW_LEASES, (clock() + lease, worker_id)).rowcount


def _infos(rows, share_gil: bool = False) -> dict:
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


def _result(row) -> Result:
    task_id, name, status, value, error, tb, enqueued, started, finished, attempts, output = row
    return Result(
        task_id=task_id,
        name=name,
        status=status,
        value=value,
        error=error,
        traceback=tb,
        enqueued_at=to_datetime(enqueued),
        started_at=to_datetime(started),
        finished_at=to_datetime(finished),
        attempts=attempts,
        output=output,
    )


def _info(row) -> TaskInfo:
    (task_id, name, status, enqueued, eta, started, finished, attempts, worker_id, done, total, message, error) = row
    return TaskInfo(
        task_id=task_id,
        name=name,
        status=status,
        enqueued_at=to_datetime(enqueued),
        eta=to_datetime(eta),
        started_at=to_datetime(started),
        finished_at=to_datetime(finished),
        attempts=attempts,
        worker_id=worker_id,
        progress_done=done,
        progress_total=total,
        progress_message=message,
        error=error,
    )


# -- opening and checking the file -------------------------------------------


def _parse_path(path: Union[str, os.PathLike]) -> str:
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


def _open(path: str) -> sqlite3.Connection:
    if path != MEMORY:
        _create_private_file(path)
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise _translate(exc, path) from exc
    try:
        conn.execute("PRAGMA busy_timeout = 5000")  # setup only; statements later never wait inside SQLite
        if path != MEMORY:
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # a helper checkpoints, off the event loop
        _ensure_schema(conn, path)
        conn.execute("PRAGMA busy_timeout = 0")
    except sqlite3.Error as exc:
        conn.close()
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


def _ensure_schema(conn: sqlite3.Connection, path: str) -> None:
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if app_id == APPLICATION_ID and version == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if app_id == 0:
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables:
                raise BackendError(
                    f"{path!r} is a SQLite database that sitq did not create; it holds other "
                    "tables, so sitq leaves it alone. Give sitq a path of its own."
                )
        elif app_id != APPLICATION_ID:
            raise BackendError(
                f"{path!r} belongs to another application (SQLite application_id {app_id:#x}); "
                "give sitq a path of its own"
            )
        elif version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{path!r} was written by a newer sitq (schema version {version}; this sitq reads up "
                f"to {SCHEMA_VERSION}); upgrade sitq (pip install -U sitq) to use it"
            )
        if app_id == 0:  # a new, empty file: create the schema
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    text = str(exc)
    return "database is locked" in text or "database table is locked" in text


def _translate(exc: sqlite3.Error, path: str) -> BackendError:
    """One place that turns SQLite's errors into messages that say what to do."""
    text = str(exc)
    if "file is not a database" in text or "malformed" in text:
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
    """Notices commits by other connections while something waits for a change."""

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
        try:
            # No baseline: a write that landed after a waiter read its token but before this
            # connection first looked must still wake it, so the first look always notifies.
            last = None
            last_change = time.monotonic()
            while not self._stopped.is_set():
                if not backend.has_watchers:
                    self.wanted.clear()
                    if not backend.has_watchers:
                        self.wanted.wait()
                    continue
                quiet = time.monotonic() - last_change > self.QUIET_AFTER
                self._stopped.wait(self.SLOWEST if quiet else backend.change_check_interval)
                try:
                    version = conn.execute("PRAGMA data_version").fetchone()[0]
                except sqlite3.Error:
                    continue  # busy or being recovered; look again next round
                if version != last:
                    last, last_change = version, time.monotonic()
                    backend.notify_change()
        finally:
            conn.close()


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
        self.exited: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = threading.Lock()
        self._closed = False

    def submit(self, job: Callable) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._closing:
            if self._closed:
                raise BackendError(f"the sitq backend for {self.backend.path!r} is closing")
            self._jobs.put((job, fut))
        return fut

    def stop(self) -> None:
        self.stopped.set()
        self._jobs.put(None)

    def _serve(self, job: Callable, fut: concurrent.futures.Future, conn: Optional[sqlite3.Connection]):
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
        conn = None
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
        conn = None
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


def _log_failure(fut: concurrent.futures.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("sitq: a WAL checkpoint failed (%s); the next one tries again", fut.exception())
