"""The statements the backend runs, as named SQL strings, and the functions that run them.

Each function takes a connection and runs under the backend's lock (on the event
loop's thread) or on a helper thread with a connection of its own; a write
returns ``(result, changed)`` so that only writes that changed something wake
waiters.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from typing import Any

from sitq.backends.rules import LOST_WORKER_LIMIT, CancelOutcome, lost_worker_error
from sitq.backends.sqlite import rows as readers
from sitq.core import ClaimedTask, NewTask, NewTaskBatch, Outcome, OutcomeKind

log = logging.getLogger("sitq.backends.sqlite")

NO_PROGRESS = (None, None, None)

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


def task_rows(tasks: Sequence[NewTask]) -> Iterable[tuple[Any, ...]]:
    """The INSERT's parameters; for a batch, made one at a time from its columns."""
    if isinstance(tasks, NewTaskBatch):
        n = len(tasks)
        t = tasks
        return zip(t.task_ids, repeat(t.name, n), repeat(t.func, n), t.args, t.signatures, repeat(t.max_attempts, n),
                   repeat(t.eta, n), repeat(t.enqueued_at, n), strict=False)
    return [(t.task_id, t.name, t.func, t.args, t.signature, t.max_attempts, t.eta, t.enqueued_at) for t in tasks]


def insert(conn: sqlite3.Connection, tasks: Sequence[NewTask]) -> tuple[None, bool]:
    rows = task_rows(tasks)
    if len(tasks) == 1:
        conn.execute(INSERT_TASK, next(iter(rows)))
        return None, True
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(INSERT_TASK, rows)
    conn.execute("COMMIT")
    return None, True


def stage(conn: sqlite3.Connection, tasks: Sequence[NewTask]) -> None:
    conn.execute(STAGE_TABLE)
    conn.execute("BEGIN")  # the temporary database only: takes no lock on the shared file
    conn.executemany(STAGE_TASK, task_rows(tasks))
    conn.execute("COMMIT")


def insert_staged(conn: sqlite3.Connection) -> tuple[None, bool]:
    conn.execute(INSERT_STAGED)
    return None, True


def finish_and_claim(
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
    stored = [conn.execute(*outcome_statement(o, worker_id)).rowcount == 1 for o in outcomes]
    claimed: list[ClaimedTask] = []
    if limit > 0:
        rows: list[Any] = []
        if alone:
            rows = readers.claimed_rows(conn, conn.execute(CLAIM_SUSPECT, (worker_id, now, lease_until, now)))
        if not rows:
            rows = readers.claimed_rows(conn, conn.execute(CLAIM_TASKS, (worker_id, now, lease_until, now, limit)))
        claimed = sorted(map(readers.claimed, rows), key=lambda t: t.handle)
    if batch:
        conn.execute("COMMIT")
    return (stored, claimed), any(stored) or bool(claimed)


def outcome_statement(o: Outcome, worker_id: str) -> tuple[str, tuple[Any, ...]]:
    if o.kind is OutcomeKind.RETRY:  # another attempt is due at o.retry_at (or cancelled: rules.after_retry)
        return RETRY_TASK, (o.finished_at, o.retry_at, o.error, o.traceback, o.output, o.handle, o.attempts, worker_id)
    progress = o.progress or NO_PROGRESS
    return FINISH_TASK, (
        o.kind.value, o.finished_at, o.value, o.value_signature, o.error, o.traceback, o.output, *progress,
        o.handle, o.attempts, worker_id,
    )


def requeue_expired(conn: sqlite3.Connection, now: float) -> tuple[int, bool]:
    lost = lost_worker_error(LOST_WORKER_LIMIT)
    conn.execute("BEGIN IMMEDIATE")
    settle_unreadable_times(conn, now)
    count = conn.execute(EXPIRED_CANCELLED, (now, now)).rowcount
    count += conn.execute(EXPIRED_TOO_OFTEN, (now, lost, now, LOST_WORKER_LIMIT)).rowcount
    count += conn.execute(EXPIRED_REQUEUED, (now,)).rowcount
    conn.execute("COMMIT")
    return count, count > 0


def settle_unreadable_times(conn: sqlite3.Connection, now: float) -> None:
    failed = conn.execute(FAIL_UNREADABLE_ETA, (now,)).rowcount
    ended = conn.execute(END_UNREADABLE_LEASES).rowcount
    if failed:
        log.warning("failed %d pending task(s) whose stored eta is not a time (a row sitq did not write)", failed)
    if ended:
        log.warning("%d running task(s) had a stored lease that is not a time (a row sitq did not write); "
                    "it counts as expired", ended)


def cancel(conn: sqlite3.Connection, task_id: str, now: float) -> tuple[CancelOutcome | None, bool]:
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


def fetch_result(conn: sqlite3.Connection, task_id: str) -> Any:
    try:
        return fetch_one(conn, SELECT_RESULT, (task_id,))
    except sqlite3.OperationalError as exc:
        if "no such column: value_signature" not in str(exc):
            raise
    # A version 1 file opened read-only (nothing upgrades it): it never had signed values.
    return fetch_one(conn, SELECT_RESULT.replace("value_signature", "NULL"), (task_id,))


def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    try:
        row = conn.execute(SELECT_META, (key,)).fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None  # a version 1 file opened read-only: it has no meta table, so no facts
        raise
    value: str | None = None if row is None else row[0]
    return value


def set_meta_if_absent(conn: sqlite3.Connection, key: str, value: str) -> tuple[str, bool]:
    conn.execute("BEGIN IMMEDIATE")
    added = conn.execute(INSERT_META_IF_ABSENT, (key, value)).rowcount == 1
    (recorded,) = conn.execute(SELECT_META, (key,)).fetchone()
    conn.execute("COMMIT")
    return recorded, added


def execute_count(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> int:
    return conn.execute(sql, params).rowcount


def execute_many(conn: sqlite3.Connection, sql: str, rows: Sequence[Sequence[Any]]) -> tuple[None, bool]:
    if not rows:
        return None, False
    before = conn.total_changes
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(sql, rows)
    conn.execute("COMMIT")
    return None, conn.total_changes > before


def fetch_one(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> Any:
    return readers.read(conn, lambda: conn.execute(sql, params).fetchone())


def fetch_all(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[Any]:
    return readers.read(conn, lambda: conn.execute(sql, params).fetchall())


def overview(conn: sqlite3.Connection, limit: int) -> tuple[list[Any], list[Any]]:
    conn.execute("BEGIN")  # one snapshot for counts and rows
    try:
        counts = readers.read(conn, lambda: conn.execute(COUNT_BY_STATUS).fetchall())
        rows = readers.read(conn, lambda: conn.execute(SELECT_RECENT, (limit,)).fetchall())
    finally:
        conn.execute("COMMIT")
    return counts, rows


def renew(conn: sqlite3.Connection, worker_id: str, lease: float, clock: Callable[[], float]) -> int:
    return conn.execute(RENEW_LEASES, (clock() + lease, worker_id)).rowcount
