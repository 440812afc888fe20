"""The statements the backend runs, as named SQL strings, and the functions that run them.

Each function takes a connection and runs under the backend's lock (on the event
loop's thread) or on a helper thread with a connection of its own; a write
returns ``(result, changed)`` so that only writes that changed something wake
waiters.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from typing import Any

from sitq.backends.rules import (
    LOST_WORKER_LIMIT,
    CancelOutcome,
    DependencyFate,
    RetryOutcome,
    dependency_error,
    dependency_finished,
    expires_at,
    initial_state,
    keyed_enqueue,
    lost_worker_error,
    retry,
)
from sitq.backends.sqlite import rows as readers
from sitq.core import (
    CANCELLED,
    STATES,
    WAITING,
    ClaimedTask,
    Enqueued,
    GroupInfo,
    NewTask,
    NewTaskBatch,
    Outcome,
    OutcomeKind,
    QueueOverview,
    Schedule,
    TaskInfo,
    TaskStatus,
)
from sitq.errors import InvalidTaskError

log = logging.getLogger("sitq.backends.sqlite")

NO_PROGRESS = (None, None, None)
# States whose partial index is in enqueue order (success has none: it is most rows, read newest first).
SORTED_BY_INDEX = ("failed", "cancelled", "success")
FINISHED = "('success', 'failed', 'cancelled')"
# The bytes a row keeps, as purges and prunes report them.
ROW_SIZE = """length(func) + length(args) + coalesce(length(signature), 0) + coalesce(length(value), 0)
    + coalesce(length(value_signature), 0) + coalesce(length(CAST(error AS BLOB)), 0)
    + coalesce(length(CAST(traceback AS BLOB)), 0) + coalesce(length(CAST(output AS BLOB)), 0)"""

# -- enqueue ---------------------------------------------------------------------

NEW_COLUMNS = "id, name, func, args, signature, max_attempts, eta, enqueued_at, queue, priority, retention, group_id"

# The plain path: a task with no key and no dependencies is pending.
INSERT_TASK = f"""
INSERT INTO sitq_tasks (status, {NEW_COLUMNS}) VALUES ('pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

# A big plain batch is first written to a private temporary table, then copied in one statement:
# the write lock, which every other process's writes and every worker's lease renewal wait
# for, is held for the copy alone: about half as long as inserting row by row.
STAGE_TABLE = f"CREATE TEMP TABLE IF NOT EXISTS sitq_new ({NEW_COLUMNS})"

STAGE_TASK = "INSERT INTO temp.sitq_new VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"

UNSTAGE = "DELETE FROM temp.sitq_new"

INSERT_STAGED = f"""
INSERT INTO main.sitq_tasks (status, {NEW_COLUMNS})
SELECT 'pending', {NEW_COLUMNS} FROM temp.sitq_new ORDER BY rowid
"""

# A batch of one function (map) stages only what differs from task to task; the rest, the
# function's bytes among it (kilobytes for a notebook's function), is bound once.
STAGE_BATCH_TASK = "INSERT INTO temp.sitq_new (id, args, signature) VALUES (?, ?, ?)"
INSERT_STAGED_BATCH = f"""
INSERT INTO main.sitq_tasks (status, {NEW_COLUMNS})
SELECT 'pending', id, :name, :func, args, signature, :max_attempts, :eta, :enqueued_at, :queue, :priority,
       :retention, :group_id
FROM temp.sitq_new ORDER BY rowid
"""

# The full path: keyed tasks, dependencies, and tasks cancelled at once (rules.initial_state).
FULL_COLUMNS = f"status, {NEW_COLUMNS}, key, waiting, error, finished_at, expires_at"

INSERT_FULL = f"INSERT INTO sitq_tasks ({FULL_COLUMNS}) VALUES ({', '.join('?' * 18)})"

INSERT_IF_ABSENT = INSERT_FULL + " ON CONFLICT (id) DO NOTHING"

SELECT_KEYED = "SELECT seq, status, expires_at FROM sitq_tasks WHERE id = ?"

# A keyed task enqueued again that had failed, was cancelled or expired (rules.keyed_enqueue) runs
# again in its place, with the new payload: its id, and so every handle on it, stays the same.
RESET_KEYED = """
UPDATE sitq_tasks SET status = ?, name = ?, func = ?, args = ?, signature = ?, max_attempts = ?, eta = ?,
    enqueued_at = ?, queue = ?, priority = ?, retention = ?, group_id = ?, key = ?, waiting = ?, error = ?,
    finished_at = ?, expires_at = ?, started_at = NULL, attempts = 0, worker_id = NULL, lease_until = NULL,
    value = NULL, value_signature = NULL, traceback = NULL, output = NULL, progress_done = NULL,
    progress_total = NULL, progress_message = NULL, lost = 0, cancel_requested = 0
WHERE seq = ?
"""

DROP_OWN_EDGES = "DELETE FROM sitq_deps WHERE task = ?"

SELECT_DEPENDENCIES = "SELECT seq, id, name, status FROM sitq_tasks WHERE id IN (SELECT value FROM json_each(?))"

ADD_EDGE = "INSERT OR IGNORE INTO sitq_deps (dep, task) VALUES (?, ?)"

COUNT_DEPENDENT = "UPDATE sitq_tasks SET dependents = dependents + 1 WHERE seq = ?"

ADD_GROUP = "INSERT INTO sitq_groups (id, name, created_at) VALUES (?, ?, ?) ON CONFLICT (id) DO NOTHING"

# What an insert adds to the counts the triggers keep for moves (see the schema).
COUNT_IN_GROUP = """
INSERT INTO sitq_group_counts VALUES (?, ?, ?) ON CONFLICT (group_id, status) DO UPDATE SET n = n + excluded.n
"""

COUNT_INSERTED = "INSERT INTO sitq_totals VALUES (?, ?, ?) ON CONFLICT (queue, status) DO UPDATE SET n = n + excluded.n"

# -- claims ------------------------------------------------------------------------

# A write returns what it changed with its result: nothing (False), something that may have
# finished a task (True), or only tasks that stay unfinished (NONE_FINISHED: claims, releases,
# progress), which wakes workers and live views but not the waiters for results.
NONE_FINISHED = 2

CLAIMED = """
SET status = 'running', worker_id = :worker, started_at = :now, lease_until = :lease, attempts = attempts + 1,
    progress_done = NULL, progress_total = NULL, progress_message = NULL
"""

CLAIM_RETURNING = "RETURNING seq, id, name, func, args, signature, attempts, lost"

# One queue's candidates, in claim order (rules: priority, then eta, then enqueue order).
CANDIDATES = """
SELECT seq, priority, eta FROM sitq_tasks INDEXED BY sitq_ready
WHERE status = 'pending' AND queue = :q{i} AND eta <= :now AND lost = 0 ORDER BY priority DESC, eta, seq LIMIT :limit
"""

# A task that lost its worker before runs alone: only a worker with nothing running claims it.
# Suspects are few (the index holds only them), so sorting them in claim order costs little.
SUSPECTS = """
SELECT seq FROM sitq_tasks INDEXED BY sitq_tasks_suspects
WHERE status = 'pending' AND lost > 0 AND eta <= :now {queues} ORDER BY priority DESC, eta, seq LIMIT 1
"""

IN_QUEUES = "AND queue IN (SELECT value FROM json_each(:queues))"

# Queues with pending tasks, one index seek each (a worker that serves every queue claims from these).
FIRST_QUEUE = "SELECT queue FROM sitq_tasks INDEXED BY sitq_ready WHERE status = 'pending' ORDER BY queue LIMIT 1"
NEXT_QUEUE = (
    "SELECT queue FROM sitq_tasks INDEXED BY sitq_ready WHERE status = 'pending' AND queue > ? ORDER BY queue LIMIT 1"
)
# The queues with pending tasks, in one statement (the seeks of FIRST_QUEUE and NEXT_QUEUE).
PENDING_QUEUES = f"""
WITH RECURSIVE queues(name) AS (
    SELECT ({FIRST_QUEUE})
    UNION ALL
    SELECT ({NEXT_QUEUE.replace("?", "queues.name")}) FROM queues WHERE queues.name IS NOT NULL
)
SELECT name FROM queues WHERE name IS NOT NULL
"""
# What a claim looks at first, in one statement: those queues, and one NULL row if a suspect is
# due (SUSPECTS' index holds only them).
LOOK = f"""{PENDING_QUEUES}
UNION ALL
SELECT NULL WHERE EXISTS (SELECT 1 FROM sitq_tasks INDEXED BY sitq_tasks_suspects
                          WHERE status = 'pending' AND lost > 0 AND eta <= :now)
"""
# The same for a worker of named queues: only whether a suspect of theirs is due.
LOOK_IN_QUEUES = f"""
SELECT NULL WHERE EXISTS (SELECT 1 FROM sitq_tasks INDEXED BY sitq_tasks_suspects
                          WHERE status = 'pending' AND lost > 0 AND eta <= :now {IN_QUEUES})
"""
FIRST_PRIORITY = """
SELECT priority FROM sitq_tasks INDEXED BY sitq_ready WHERE status = 'pending' AND queue = ?
ORDER BY priority DESC LIMIT 1
"""
NEXT_PRIORITY = """
SELECT priority FROM sitq_tasks INDEXED BY sitq_ready WHERE status = 'pending' AND queue = ? AND priority < ?
ORDER BY priority DESC LIMIT 1
"""
EARLIEST_ETA = """
SELECT eta FROM sitq_tasks INDEXED BY sitq_ready WHERE status = 'pending' AND queue = ? AND priority = ?
ORDER BY eta LIMIT 1
"""

# -- outcomes ----------------------------------------------------------------------

FINISH_TASK = """
UPDATE sitq_tasks
SET status = ?, finished_at = ?, expires_at = ? + retention, value = ?, value_signature = ?, error = ?,
    traceback = ?, output = ?, lease_until = NULL,
    progress_done = coalesce(?, progress_done), progress_total = coalesce(?, progress_total),
    progress_message = coalesce(?, progress_message)
WHERE seq = ? AND attempts = ? AND status = 'running' AND worker_id = ?
RETURNING dependents
"""

# Many outcomes in one statement (a run's worth): staged in a temporary table, then one UPDATE
# joined to it, guarded row by row as FINISH_TASK is. A third less work per task than one
# statement each, which a worker draining short tasks spends much of its time on.
STAGE_OUTCOMES = """
CREATE TEMP TABLE IF NOT EXISTS sitq_outcomes (
    seq INTEGER PRIMARY KEY, attempts, status, finished_at, value, value_signature, error, traceback, output,
    progress_done, progress_total, progress_message
)
"""
STAGE_OUTCOME = "INSERT INTO temp.sitq_outcomes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
FINISH_STAGED = """
UPDATE main.sitq_tasks AS t
SET status = o.status, finished_at = o.finished_at, expires_at = o.finished_at + t.retention, value = o.value,
    value_signature = o.value_signature, error = o.error, traceback = o.traceback, output = o.output,
    lease_until = NULL, progress_done = coalesce(o.progress_done, t.progress_done),
    progress_total = coalesce(o.progress_total, t.progress_total),
    progress_message = coalesce(o.progress_message, t.progress_message)
FROM temp.sitq_outcomes AS o
WHERE t.seq = o.seq AND t.attempts = o.attempts AND t.status = 'running' AND t.worker_id = ?
RETURNING seq, dependents
"""
UNSTAGE_OUTCOMES = "DELETE FROM temp.sitq_outcomes"
FINISH_IN_ONE = 4  # outcomes from which staging them costs less than a statement each

# Another attempt is due: pending again, or cancelled if a cancel was asked for meanwhile (rules.after_retry).
RETRY_TASK = """
UPDATE sitq_tasks
SET status = CASE cancel_requested WHEN 1 THEN 'cancelled' ELSE 'pending' END,
    finished_at = CASE cancel_requested WHEN 1 THEN ? ELSE NULL END,
    expires_at = CASE cancel_requested WHEN 1 THEN ? + retention ELSE NULL END,
    eta = ?, error = ?, traceback = ?, output = ?, worker_id = NULL, lease_until = NULL
WHERE seq = ? AND attempts = ? AND status = 'running' AND worker_id = ?
RETURNING dependents
"""

# Handed back unstarted: pending as if never claimed (the attempt does not count).
RELEASE_TASK = """
UPDATE sitq_tasks SET status = 'pending', worker_id = NULL, lease_until = NULL, started_at = NULL,
    attempts = attempts - 1
WHERE seq = ? AND attempts = ? AND status = 'running' AND worker_id = ?
"""

# -- dependencies (rules.dependency_finished) ---------------------------------------

UNSETTLED = f"""
SELECT seq, id, name, status, finished_at FROM sitq_tasks INDEXED BY sitq_unsettled
WHERE dependents > 0 AND status IN {FINISHED} LIMIT 100
"""

RELEASE_DEPENDENTS = """
UPDATE sitq_tasks SET waiting = waiting - 1, status = CASE WHEN waiting <= 1 THEN 'pending' ELSE 'waiting' END
WHERE seq IN (SELECT task FROM sitq_deps WHERE dep = ?) AND status = 'waiting'
"""

CANCEL_DEPENDENTS = """
UPDATE sitq_tasks SET status = 'cancelled', finished_at = ?, expires_at = ? + retention, error = ?
WHERE seq IN (SELECT task FROM sitq_deps WHERE dep = ?) AND status = 'waiting'
"""

DROP_EDGES = "DELETE FROM sitq_deps WHERE dep = ?"

SETTLED = "UPDATE sitq_tasks SET dependents = 0 WHERE seq = ?"

# -- cancel and retry by hand ------------------------------------------------------

CANCEL_PENDING = """
UPDATE sitq_tasks SET status = 'cancelled', finished_at = ?, expires_at = ? + retention
WHERE id = ? AND status IN ('pending', 'waiting')
"""

REQUEST_CANCEL = """
UPDATE sitq_tasks SET cancel_requested = 1 WHERE id = ? AND status = 'running'
"""

# A whole group at once (Backend.cancel_group): the members of each state found in sitq_members.
CANCEL_GROUP_PENDING = """
UPDATE sitq_tasks SET status = 'cancelled', finished_at = ?, expires_at = ? + retention
WHERE group_id = ? AND status IN ('pending', 'waiting')
"""

REQUEST_GROUP_CANCEL = """
UPDATE sitq_tasks SET cancel_requested = 1 WHERE group_id = ? AND status = 'running'
"""

SELECT_CANCEL_REQUESTS = """
SELECT id FROM sitq_tasks WHERE worker_id = ? AND status = 'running' AND cancel_requested = 1
"""

SELECT_STATUS = "SELECT status FROM sitq_tasks WHERE id = ?"

# rules.retry: a failed or cancelled task runs once more.
RETRY_BY_HAND = """
UPDATE sitq_tasks SET status = 'pending', eta = ?, max_attempts = attempts + 1, finished_at = NULL,
    expires_at = NULL, worker_id = NULL, lease_until = NULL, value = NULL, value_signature = NULL, error = NULL,
    traceback = NULL, output = NULL, lost = 0, cancel_requested = 0, waiting = 0
WHERE id = ? AND status IN ('failed', 'cancelled')
"""

# -- leases ------------------------------------------------------------------------

RENEW_LEASES = """
UPDATE sitq_tasks SET lease_until = ? WHERE worker_id = ? AND status = 'running'
"""

# Tasks whose worker stopped renewing the lease: cancelled if that was asked for, failed on
# their LOST_WORKER_LIMIT-th lost worker (a task that kills its worker must not loop), else
# claimable again as suspects, which run alone: the rules of sitq.backends.rules, in SQL.
EXPIRED_CANCELLED = """
UPDATE sitq_tasks SET status = 'cancelled', finished_at = ?, expires_at = ? + retention, lease_until = NULL
WHERE status = 'running' AND lease_until < ? AND cancel_requested = 1
"""

EXPIRED_TOO_OFTEN = """
UPDATE sitq_tasks SET status = 'failed', finished_at = ?, expires_at = ? + retention, lease_until = NULL, error = ?,
    traceback = NULL
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

# -- readers -----------------------------------------------------------------------

SELECT_RESULT = """
SELECT id, name, status, value, error, traceback, enqueued_at, started_at, finished_at, attempts, output,
    value_signature
FROM sitq_tasks WHERE id = ?
"""

SELECT_RESULTS = SELECT_RESULT.replace("WHERE id = ?", "WHERE id IN (SELECT value FROM json_each(?))")

INFO_COLUMNS = """
id, name, status, enqueued_at, eta, started_at, finished_at, attempts, worker_id,
progress_done, progress_total, progress_message, error, queue, priority, group_id, key
"""

SELECT_INFO = f"SELECT {INFO_COLUMNS} FROM sitq_tasks WHERE id IN (SELECT value FROM json_each(?))"

SELECT_RECENT = f"SELECT {INFO_COLUMNS} FROM sitq_tasks ORDER BY seq DESC LIMIT ?"

# The running rows are found in their partial index and sorted (a scan of the table newest first,
# which the planner would otherwise pick to avoid the sort, reads every finished row).
SELECT_RUNNING = f"""
SELECT {INFO_COLUMNS} FROM sitq_tasks WHERE seq IN (SELECT seq FROM sitq_tasks WHERE status = 'running')
ORDER BY seq DESC LIMIT ?
"""

SELECT_FAILURES = f"SELECT {INFO_COLUMNS} FROM sitq_tasks WHERE status = 'failed' ORDER BY seq DESC LIMIT ?"

# Counts: the finished (and odd) states are kept in sitq_totals; the unfinished ones are counted in
# their partial indexes, which hold only unfinished rows.
SELECT_TOTALS = "SELECT queue, status, n FROM sitq_totals WHERE n != 0"

COUNT_UNFINISHED = """
SELECT queue, 'pending', count(*) FROM sitq_tasks WHERE status = 'pending' GROUP BY queue
UNION ALL SELECT queue, 'waiting', count(*) FROM sitq_tasks WHERE status = 'waiting' GROUP BY queue
UNION ALL SELECT queue, 'running', count(*) FROM sitq_tasks WHERE status = 'running' GROUP BY queue
"""

# The tasks of no group per state, in one snapshot: the totals (kept for finished states, counted
# from the partial indexes for the others, as the overview does) less every group's kept counts.
COUNT_UNGROUPED = """
SELECT status, sum(n) FROM (
    SELECT status, n FROM sitq_totals
    UNION ALL SELECT 'pending', count(*) FROM sitq_tasks WHERE status = 'pending'
    UNION ALL SELECT 'waiting', count(*) FROM sitq_tasks WHERE status = 'waiting'
    UNION ALL SELECT 'running', count(*) FROM sitq_tasks WHERE status = 'running'
    UNION ALL SELECT status, -n FROM sitq_group_counts
) GROUP BY status
"""

# The tasks of no group in one state, in enqueue order, from sitq_loose (its terms written out, so
# the planner takes it): the rows read are those returned, however big the groups beside them.
LOOSE_IN_STATE = """
SELECT * FROM (SELECT seq, {columns} FROM sitq_tasks
    WHERE group_id IS NULL AND status <> 'running' AND status = ? ORDER BY seq {order} LIMIT ?)
"""

# The running tasks of no group, which sitq_loose leaves out: found in the running rows' index (as
# many as run), then sorted.
LOOSE_RUNNING = """
SELECT * FROM (SELECT seq, {columns} FROM sitq_tasks
    WHERE seq IN (SELECT seq FROM sitq_tasks WHERE status = 'running') AND group_id IS NULL
    ORDER BY seq {order} LIMIT ?)
"""

SELECT_GROUP = "SELECT id, name, created_at FROM sitq_groups WHERE id = ?"

NEWEST_GROUPS = "SELECT id, name, created_at FROM sitq_groups ORDER BY created_at DESC LIMIT ?"

GROUP_COUNTS = "SELECT status, n FROM sitq_group_counts WHERE group_id = ?"

SELECT_GROUP_ID = "SELECT id FROM sitq_groups WHERE id = ?"

GROUP_IDS_STARTING = "SELECT id FROM sitq_groups WHERE id >= ? AND id < ? ORDER BY id LIMIT ?"

GROUP_IDS_ENDING = "SELECT id FROM sitq_groups WHERE substr(id, -?) = ? LIMIT ?"

SELECT_ID = "SELECT id FROM sitq_tasks WHERE id = ?"

IDS_STARTING = "SELECT id FROM sitq_tasks WHERE id >= ? AND id < ? ORDER BY id LIMIT ?"

IDS_ENDING = "SELECT id FROM sitq_tasks WHERE substr(id, -?) = ? LIMIT ?"

SELECT_META = "SELECT value FROM sitq_meta WHERE key = ?"

INSERT_META_IF_ABSENT = "INSERT INTO sitq_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING"

# -- retention ---------------------------------------------------------------------

PRUNE = f"""
DELETE FROM sitq_tasks WHERE seq IN (
    SELECT seq FROM sitq_tasks INDEXED BY sitq_expiry WHERE expires_at <= ? AND status IN {FINISHED} LIMIT ?
) RETURNING {ROW_SIZE}
"""

PURGE_WHERE = """
status IN (SELECT value FROM json_each(:statuses)) AND (:before IS NULL OR finished_at < :before)
"""

PURGE = f"""
DELETE FROM sitq_tasks WHERE seq IN (
    SELECT seq FROM sitq_tasks WHERE seq > :after AND {PURGE_WHERE} ORDER BY seq LIMIT :limit
) RETURNING seq, {ROW_SIZE}
"""

COUNT_PURGE = f"SELECT count(*), coalesce(sum({ROW_SIZE}), 0) FROM sitq_tasks WHERE {PURGE_WHERE}"

# -- schedules ---------------------------------------------------------------------

SCHEDULE_COLUMNS = (
    "name, task_name, func, args, signature, every, cron, tz, next_run, last_run, queue, priority, max_attempts, "
    "retention"
)

# Declared again with the same period, a schedule keeps its next run: a cell run twice changes nothing.
SET_SCHEDULE = f"""
INSERT INTO sitq_schedules ({SCHEDULE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (name) DO UPDATE SET
    next_run = CASE WHEN every IS excluded.every AND cron IS excluded.cron AND tz = excluded.tz
                    THEN next_run ELSE excluded.next_run END,
    last_run = CASE WHEN every IS excluded.every AND cron IS excluded.cron AND tz = excluded.tz
                    THEN last_run ELSE excluded.last_run END,
    task_name = excluded.task_name, func = excluded.func, args = excluded.args, signature = excluded.signature,
    every = excluded.every, cron = excluded.cron, tz = excluded.tz, queue = excluded.queue,
    priority = excluded.priority, max_attempts = excluded.max_attempts, retention = excluded.retention
"""

DELETE_SCHEDULE = "DELETE FROM sitq_schedules WHERE name = ?"

SELECT_SCHEDULES = (
    "SELECT name, task_name, queue, every, cron, tz, next_run, last_run FROM sitq_schedules ORDER BY next_run, name"
)

DUE_SCHEDULES = f"SELECT {SCHEDULE_COLUMNS} FROM sitq_schedules WHERE next_run <= ? ORDER BY next_run"

# Of many workers that see a tick due, the one whose update finds it still due enqueues it.
FIRE_SCHEDULE = "UPDATE sitq_schedules SET next_run = ?, last_run = ? WHERE name = ? AND next_run = ?"

# -- rows sitq did not write ---------------------------------------------------------

# SQLite orders text and bytes after every number, so a pending task whose eta is not a number
# is never due, and a running one whose lease is not a number never expires. The first are
# failed, naming the column; the second count as long expired, so the usual rules for expired
# leases take them on.
FAIL_UNREADABLE_ETA = """
UPDATE sitq_tasks SET status = 'failed', finished_at = ?, error = 'BackendError: the stored row of this task has '
    || CASE typeof(eta) WHEN 'text' THEN 'text ' || quote(substr(eta, 1, 40)) ELSE 'bytes' END
    || ' in column ''eta'' where sitq stores a time (POSIX seconds); it was not written by sitq, or was '
    || 'changed by hand'
WHERE seq IN (SELECT seq FROM sitq_tasks INDEXED BY sitq_unreadable_etas
              WHERE status = 'pending' AND typeof(eta) IN ('text', 'blob'))
"""

END_UNREADABLE_LEASES = """
UPDATE sitq_tasks SET lease_until = 0 WHERE status = 'running' AND (lease_until IS NULL OR lease_until >= '')
"""

CHECKPOINT = "PRAGMA wal_checkpoint(PASSIVE)"


# -- enqueue -----------------------------------------------------------------------


def is_plain(tasks: Sequence[NewTask]) -> bool:
    """Whether every task takes the plain path: no dedupe key and nothing to run after."""
    if isinstance(tasks, NewTaskBatch):
        return tasks.keys is None and not tasks.after
    if len(tasks) == 1:
        return tasks[0].key is None and not tasks[0].after
    return all(t.key is None and not t.after for t in tasks)


def task_rows(tasks: Sequence[NewTask]) -> Iterable[tuple[Any, ...]]:
    """The plain INSERT's parameters; for a batch, made one at a time from its columns."""
    if isinstance(tasks, NewTaskBatch):
        n = len(tasks)
        t = tasks
        return zip(t.task_ids, repeat(t.name, n), repeat(t.func, n), t.args, t.signatures, repeat(t.max_attempts, n),
                   repeat(t.eta, n), repeat(t.enqueued_at, n), repeat(t.queue, n), repeat(t.priority, n),
                   repeat(t.retention, n), repeat(t.group_id, n), strict=False)
    return [(t.task_id, t.name, t.func, t.args, t.signature, t.max_attempts, t.eta, t.enqueued_at, t.queue, t.priority,
             t.retention, t.group_id) for t in tasks]


def _groups(tasks: Sequence[NewTask]) -> dict[str, tuple[str, float]]:
    """The groups the tasks join: id -> (name, created_at)."""
    if isinstance(tasks, NewTaskBatch):
        t = tasks
        return {} if t.group_id is None else {t.group_id: (t.group_name or t.name, t.enqueued_at)}
    return {t.group_id: (t.group_name or t.name, t.enqueued_at) for t in tasks if t.group_id is not None}


def add_groups(conn: sqlite3.Connection, tasks: Sequence[NewTask]) -> None:
    for group_id, (name, created) in _groups(tasks).items():
        conn.execute(ADD_GROUP, (group_id, name, created))


def count_pending(conn: sqlite3.Connection, tasks: Sequence[NewTask]) -> None:
    """Add plain tasks, all pending, to their groups' counts."""
    if isinstance(tasks, NewTaskBatch):
        if tasks.group_id is not None:
            conn.execute(COUNT_IN_GROUP, (tasks.group_id, "pending", len(tasks)))
        return
    counts = Counter(t.group_id for t in tasks if t.group_id is not None)
    for group_id, n in counts.items():
        conn.execute(COUNT_IN_GROUP, (group_id, "pending", n))


def insert(conn: sqlite3.Connection, tasks: Sequence[NewTask]) -> tuple[list[Enqueued], bool]:
    """The plain path, for a few tasks: one INSERT (a transaction only if there is more to write)."""
    if not tasks:
        return [], False  # nothing stored: waiters must not wake
    if len(tasks) == 1 and (t := tasks[0]).group_id is None:  # one enqueue: one statement, its own transaction
        conn.execute(INSERT_TASK, (t.task_id, t.name, t.func, t.args, t.signature, t.max_attempts, t.eta,
                                   t.enqueued_at, t.queue, t.priority, t.retention, t.group_id))
        return [Enqueued.INSERTED], True
    rows = task_rows(tasks)
    conn.execute("BEGIN IMMEDIATE")
    add_groups(conn, tasks)
    conn.executemany(INSERT_TASK, rows)
    count_pending(conn, tasks)
    conn.execute("COMMIT")
    return [Enqueued.INSERTED] * len(tasks), True


def stage(conn: sqlite3.Connection, tasks: Sequence[NewTask]) -> None:
    conn.execute(STAGE_TABLE)
    conn.execute("BEGIN")  # the temporary database only: takes no lock on the shared file
    if isinstance(tasks, NewTaskBatch):
        conn.executemany(STAGE_BATCH_TASK, zip(tasks.task_ids, tasks.args, tasks.signatures, strict=True))
    else:
        conn.executemany(STAGE_TASK, task_rows(tasks))
    conn.execute("COMMIT")


def insert_staged(conn: sqlite3.Connection, tasks: Sequence[NewTask]) -> tuple[list[Enqueued], bool]:
    conn.execute("BEGIN IMMEDIATE")
    add_groups(conn, tasks)
    if isinstance(tasks, NewTaskBatch):
        t = tasks
        conn.execute(INSERT_STAGED_BATCH, {
            "name": t.name, "func": t.func, "max_attempts": t.max_attempts, "eta": t.eta,
            "enqueued_at": t.enqueued_at, "queue": t.queue, "priority": t.priority, "retention": t.retention,
            "group_id": t.group_id,
        })
    else:
        conn.execute(INSERT_STAGED)
    count_pending(conn, tasks)
    conn.execute("COMMIT")
    return [Enqueued.INSERTED] * len(tasks), True


def insert_full(conn: sqlite3.Connection, tasks: Sequence[NewTask]) -> tuple[list[Enqueued], bool]:
    """The full path, in one transaction: keyed tasks, dependencies, groups."""
    conn.execute("BEGIN IMMEDIATE")
    done = insert_full_rows(conn, tasks)
    conn.execute("COMMIT")
    return done, any(d is not Enqueued.EXISTING for d in done)


def insert_full_rows(conn: sqlite3.Connection, tasks: Sequence[NewTask], if_absent: bool = False) -> list[Enqueued]:
    """Insert (or keep, or reset) each task inside the caller's transaction. ``if_absent``: a task
    whose id is stored already is left as it is, whatever its state (a schedule's tick)."""
    add_groups(conn, tasks)
    dependencies = _dependencies(conn, tasks)
    done = []
    batch = isinstance(tasks, NewTaskBatch)
    group_counts: Counter[tuple[str, str]] = Counter()
    for task in tasks:
        if any(d not in dependencies for d in task.after):
            raise InvalidTaskError(_unknown(next(d for d in task.after if d not in dependencies)))
        deps = [dependencies[d] for d in dict.fromkeys(task.after)]
        status, waiting, error = initial_state((d[1], d[2], d[3]) for d in deps)
        finished = task.enqueued_at if status == CANCELLED else None
        row = (status.value, task.task_id, task.name, task.func, task.args, task.signature, task.max_attempts,
               task.eta, task.enqueued_at, task.queue, task.priority, task.retention, task.group_id, task.key,
               waiting, error, finished, expires_at(finished, task.retention) if finished is not None else None)
        outcome, seq = _store_new(conn, task, row, if_absent)
        done.append(outcome)
        if outcome is Enqueued.EXISTING:
            continue
        if outcome is Enqueued.INSERTED:  # a reset row moved, and the triggers counted the move
            if task.group_id is not None:
                group_counts[task.group_id, status.value] += 1
            if status == CANCELLED:
                conn.execute(COUNT_INSERTED, (task.queue, status.value, 1))
        if status == WAITING:
            for dep_seq, _, _, dep_status in deps:
                if dependency_finished(dep_status) is None:
                    conn.execute(ADD_EDGE, (dep_seq, seq))
                    conn.execute(COUNT_DEPENDENT, (dep_seq,))
        if not batch:
            dependencies[task.task_id] = (seq, task.task_id, task.name, status)  # a later task may run after it
    for (group_id, state), n in group_counts.items():
        conn.execute(COUNT_IN_GROUP, (group_id, state, n))
    return done


def _store_new(conn: sqlite3.Connection, task: NewTask, row: tuple[Any, ...], if_absent: bool) -> tuple[Enqueued, int]:
    if task.key is None and not if_absent:
        return Enqueued.INSERTED, conn.execute(INSERT_FULL, row).lastrowid or 0
    cursor = conn.execute(INSERT_IF_ABSENT, row)
    if cursor.rowcount == 1:
        return Enqueued.INSERTED, cursor.lastrowid or 0
    seq, status, expires = conn.execute(SELECT_KEYED, (task.task_id,)).fetchone()
    expired = isinstance(expires, (int, float)) and expires <= task.enqueued_at
    outcome = Enqueued.EXISTING if if_absent else keyed_enqueue(TaskStatus.read(status), expired, task.replace_failed)
    if outcome is Enqueued.REPLACED:
        conn.execute(DROP_OWN_EDGES, (seq,))
        conn.execute(RESET_KEYED, (*row[:1], *row[2:], seq))
    return outcome, seq


def _dependencies(conn: sqlite3.Connection, tasks: Sequence[NewTask]) -> dict[str, tuple[int, str, str, Any]]:
    """``id -> (seq, id, name, status)`` of every task the new ones run after; raises for an unknown id."""
    wanted: dict[str, None] = {}
    if isinstance(tasks, NewTaskBatch):
        after, fresh = [tasks.after], set()
    else:  # a task may run after one enqueued before it in the same call
        after, fresh = [t.after for t in tasks], {t.task_id for t in tasks}
    for ids in after:
        wanted.update(dict.fromkeys(ids))
    if not wanted:
        return {}
    found = {row[1]: (row[0], row[1], row[2], TaskStatus.read(row[3]))
             for row in conn.execute(SELECT_DEPENDENCIES, (json.dumps(list(wanted)),))}
    missing = [i for i in wanted if i not in found and i not in fresh]
    if missing:
        raise InvalidTaskError(_unknown(missing[0]))
    return found


def _unknown(task_id: str) -> str:
    return (
        f"cannot run after task {task_id!r}: there is no task with that id before this one (it was never "
        "enqueued here, it was purged, or it comes later in the same call)"
    )


# -- claims ------------------------------------------------------------------------


def finish_and_claim(
    conn: sqlite3.Connection,
    worker_id: str,
    outcomes: Sequence[Outcome],
    limit: int,
    now: float,
    lease_until: float,
    alone: bool,
    queues: Sequence[str] | None,
) -> tuple[tuple[list[bool], list[ClaimedTask]], int]:
    """Store ``outcomes`` and claim up to ``limit`` tasks; returns what was stored and what was claimed."""
    # Many outcomes are stored in one transaction, and the claim goes in it too (one commit).
    # One outcome commits by itself, then the claim looks (a read) and claims in its own: two
    # statements fewer, on the path of every task a worker runs alone. (Should the process die
    # between a finish and the settling of its dependents, every requeue_expired settles them.)
    batch = len(outcomes) > 1
    if batch:
        conn.execute("BEGIN IMMEDIATE")
    stored, unsettled = store_outcomes(conn, worker_id, outcomes)
    if unsettled:
        settle(conn)
    claimed: list[ClaimedTask] = []
    if limit > 0:
        names, suspects = look(conn, now, queues)
        rows: list[Any] = []
        if alone and suspects:
            rows = _claim(conn, _suspect_claim(queues), worker_id, now, lease_until, 1, queues)
        if not rows and names:
            rows = _claim(conn, _claim_statement(len(names)), worker_id, now, lease_until, limit, names)
        claimed = sorted(map(readers.claimed, rows), key=lambda t: t.handle)
    if batch:
        conn.execute("COMMIT")
    changed = True if any(stored) else NONE_FINISHED if claimed else False
    return (stored, claimed), changed


def look(conn: sqlite3.Connection, now: float, queues: Sequence[str] | None) -> tuple[list[str], bool]:
    """The queues to claim from (``queues``, or those with pending tasks) and whether a suspect is due."""
    if queues is None:
        found = [row[0] for row in conn.execute(LOOK, {"now": now})]
        names = [name for name in found if name is not None]
        return names, len(names) < len(found)
    suspects = conn.execute(LOOK_IN_QUEUES, {"now": now, "queues": json.dumps(list(queues))}).fetchone() is not None
    return list(queues), suspects


def _claim(
    conn: sqlite3.Connection, statement: str, worker_id: str, now: float, lease: float, limit: int,
    queues: Sequence[str] | None,
) -> list[Any]:
    params: dict[str, Any] = {"worker": worker_id, "now": now, "lease": lease, "limit": limit}
    if queues is not None:
        params["queues"] = json.dumps(list(queues))
        params.update({f"q{i}": name for i, name in enumerate(queues)})
    return readers.claimed_rows(conn, conn.execute(statement, params))


@functools.lru_cache(maxsize=32)
def _claim_statement(queues: int) -> str:
    """The claim for ``queues`` named queues: each queue's first candidates, merged in claim order."""
    if queues == 1:
        chosen = CANDIDATES.format(i=0).replace("seq, priority, eta", "seq", 1)
    else:
        parts = " UNION ALL ".join(f"SELECT * FROM ({CANDIDATES.format(i=i)})" for i in range(queues))
        chosen = f"SELECT seq FROM ({parts}) ORDER BY priority DESC, eta, seq LIMIT :limit"
    return f"UPDATE sitq_tasks {CLAIMED} WHERE seq IN ({chosen}) {CLAIM_RETURNING}"


def _suspect_claim(queues: Sequence[str] | None) -> str:
    chosen = SUSPECTS.format(queues="" if queues is None else IN_QUEUES)
    return f"UPDATE sitq_tasks {CLAIMED} WHERE seq IN ({chosen}) {CLAIM_RETURNING}"


def pending_queues(conn: sqlite3.Connection) -> list[str]:
    """The queues that hold pending tasks, found with one index seek each."""
    return [row[0] for row in conn.execute(PENDING_QUEUES)]


def suspects_waiting(conn: sqlite3.Connection, now: float, queues: Sequence[str] | None) -> bool:
    statement = "SELECT 1 FROM sitq_tasks WHERE seq IN (" + SUSPECTS.format(
        queues="" if queues is None else IN_QUEUES) + ")"
    params: dict[str, Any] = {"now": now}
    if queues is not None:
        params["queues"] = json.dumps(list(queues))
    return conn.execute(statement, params).fetchone() is not None


def next_eta(conn: sqlite3.Connection, queues: Sequence[str] | None) -> float | None:
    """The earliest eta among pending tasks: the first of each (queue, priority) in the claim index."""
    earliest: float | None = None
    for queue in list(queues) if queues is not None else pending_queues(conn):
        priority = conn.execute(FIRST_PRIORITY, (queue,)).fetchone()
        while priority is not None:
            # Each read is its own snapshot: another worker may have claimed the last pending
            # task at this priority since the priority was read, so the row can be gone.
            row = conn.execute(EARLIEST_ETA, (queue, priority[0])).fetchone()
            # Numbers sort first, so anything else means only tasks with unreadable etas are pending there.
            if row is not None and isinstance(row[0], (int, float)) and (earliest is None or row[0] < earliest):
                earliest = row[0]
            priority = conn.execute(NEXT_PRIORITY, (queue, priority[0])).fetchone()
    return earliest


def store_outcomes(conn: sqlite3.Connection, worker_id: str, outcomes: Sequence[Outcome]) -> tuple[list[bool], bool]:
    """Write each outcome if its task is still running under this claim: which were written, and
    whether any of those has dependents to settle. Final outcomes of a batch go in one statement."""
    stored = [False] * len(outcomes)
    unsettled = False
    staged: dict[Any, int] = {}  # handle -> position, of final outcomes written together
    for i, o in enumerate(outcomes):
        if len(outcomes) >= FINISH_IN_ONE and o.kind is not OutcomeKind.RETRY and o.handle not in staged:
            staged[o.handle] = i
            continue
        row = conn.execute(*outcome_statement(o, worker_id)).fetchone()
        stored[i] = row is not None
        unsettled = unsettled or (row is not None and row[0] != 0)
    if staged:
        conn.execute(STAGE_OUTCOMES)
        conn.executemany(STAGE_OUTCOME, (_staged_row(outcomes[i]) for i in staged.values()))
        try:
            for seq, dependents in conn.execute(FINISH_STAGED, (worker_id,)).fetchall():
                stored[staged[seq]] = True
                unsettled = unsettled or dependents != 0
        finally:
            conn.execute(UNSTAGE_OUTCOMES)
    return stored, unsettled


def _staged_row(o: Outcome) -> tuple[Any, ...]:
    return (o.handle, o.attempts, o.kind.value, o.finished_at, o.value, o.value_signature, o.error, o.traceback,
            o.output, *(o.progress or NO_PROGRESS))


def outcome_statement(o: Outcome, worker_id: str) -> tuple[str, tuple[Any, ...]]:
    if o.kind is OutcomeKind.RETRY:  # another attempt is due at o.retry_at (or cancelled: rules.after_retry)
        return RETRY_TASK, (o.finished_at, o.finished_at, o.retry_at, o.error, o.traceback, o.output, o.handle,
                            o.attempts, worker_id)
    progress = o.progress or NO_PROGRESS
    return FINISH_TASK, (
        o.kind.value, o.finished_at, o.finished_at, o.value, o.value_signature, o.error, o.traceback, o.output,
        *progress, o.handle, o.attempts, worker_id,
    )


def release(conn: sqlite3.Connection, worker_id: str, claims: Sequence[tuple[Any, int]]) -> tuple[list[bool], int]:
    conn.execute("BEGIN IMMEDIATE")
    released = [conn.execute(RELEASE_TASK, (handle, attempts, worker_id)).rowcount == 1 for handle, attempts in claims]
    conn.execute("COMMIT")
    return released, NONE_FINISHED if any(released) else False


# -- dependencies ------------------------------------------------------------------


def settle(conn: sqlite3.Connection) -> None:
    """Settle the tasks waiting for tasks that have finished (rules.dependency_finished), inside the
    caller's transaction, or in one of its own. Cancelling a waiting task can make it a finished
    dependency in turn, so this goes on until nothing is left to settle."""
    own = not conn.in_transaction
    if own:
        conn.execute("BEGIN IMMEDIATE")
    while rows := conn.execute(UNSETTLED).fetchall():
        for seq, task_id, name, status, finished_at in rows:
            fate = dependency_finished(TaskStatus.read(status))
            if fate is DependencyFate.RELEASE:
                conn.execute(RELEASE_DEPENDENTS, (seq,))
            elif fate is DependencyFate.CANCEL:
                when = finished_at if isinstance(finished_at, (int, float)) else 0.0
                conn.execute(CANCEL_DEPENDENTS, (when, when, dependency_error(task_id, name, status), seq))
            conn.execute(DROP_EDGES, (seq,))
            conn.execute(SETTLED, (seq,))
    if own:
        conn.execute("COMMIT")


# -- leases, cancel, retry ------------------------------------------------------------


def requeue_expired(conn: sqlite3.Connection, now: float) -> tuple[int, bool]:
    lost = lost_worker_error(LOST_WORKER_LIMIT)
    conn.execute("BEGIN IMMEDIATE")
    failed = conn.execute(FAIL_UNREADABLE_ETA, (now,)).rowcount
    if failed:
        log.warning("failed %d pending task(s) whose stored eta is not a time (a row sitq did not write)", failed)
    ended = conn.execute(END_UNREADABLE_LEASES).rowcount
    if ended:
        log.warning("%d running task(s) had a stored lease that is not a time (a row sitq did not write); "
                    "it counts as expired", ended)
    count = conn.execute(EXPIRED_CANCELLED, (now, now, now)).rowcount
    count += conn.execute(EXPIRED_TOO_OFTEN, (now, now, lost, now, LOST_WORKER_LIMIT)).rowcount
    count += conn.execute(EXPIRED_REQUEUED, (now,)).rowcount
    settle(conn)
    conn.execute("COMMIT")
    return count, count > 0 or failed > 0


def cancel(conn: sqlite3.Connection, task_id: str, now: float) -> tuple[CancelOutcome | None, bool]:
    conn.execute("BEGIN IMMEDIATE")
    if conn.execute(CANCEL_PENDING, (now, now, task_id)).rowcount:
        state = CancelOutcome.CANCELLED
        settle(conn)
    elif conn.execute(REQUEST_CANCEL, (task_id,)).rowcount:
        state = CancelOutcome.REQUESTED
    elif conn.execute(SELECT_STATUS, (task_id,)).fetchone():
        state = CancelOutcome.FINISHED
    else:
        state = None
    conn.execute("COMMIT")
    return state, state in (CancelOutcome.CANCELLED, CancelOutcome.REQUESTED)


def cancel_group(conn: sqlite3.Connection, group_id: str, now: float) -> tuple[dict[CancelOutcome, int], bool]:
    conn.execute("BEGIN IMMEDIATE")
    cancelled = conn.execute(CANCEL_GROUP_PENDING, (now, now, group_id)).rowcount
    requested = conn.execute(REQUEST_GROUP_CANCEL, (group_id,)).rowcount
    if cancelled:
        settle(conn)
    conn.execute("COMMIT")
    return {CancelOutcome.CANCELLED: cancelled, CancelOutcome.REQUESTED: requested}, bool(cancelled or requested)


def match_group_ids(conn: sqlite3.Connection, fragment: str, limit: int) -> list[str]:
    if conn.execute(SELECT_GROUP_ID, (fragment,)).fetchone() is not None:
        return [fragment]
    found = [row[0] for row in conn.execute(GROUP_IDS_STARTING, (fragment, fragment + "\U0010ffff", limit))]
    found += [row[0] for row in conn.execute(GROUP_IDS_ENDING, (len(fragment), fragment, limit))]
    return sorted(set(found))[:limit]


def retry_by_hand(
    conn: sqlite3.Connection, task_ids: Sequence[str], now: float
) -> tuple[dict[str, RetryOutcome], bool]:
    conn.execute("BEGIN IMMEDIATE")
    done: dict[str, RetryOutcome] = {}
    for task_id in task_ids:
        if conn.execute(RETRY_BY_HAND, (now, task_id)).rowcount:
            done[task_id] = RetryOutcome.RETRIED
        elif (row := conn.execute(SELECT_STATUS, (task_id,)).fetchone()) is not None:
            done[task_id] = retry(TaskStatus.read(row[0]))
    conn.execute("COMMIT")
    return done, RetryOutcome.RETRIED in done.values()


# -- readers -----------------------------------------------------------------------


def overview(conn: sqlite3.Connection, limit: int) -> QueueOverview:
    """Everything a board shows, in one snapshot; each part reads a bounded number of rows."""
    conn.execute("BEGIN")
    try:
        counted = [*readers.read(conn, lambda: conn.execute(SELECT_TOTALS).fetchall()),
                   *conn.execute(COUNT_UNFINISHED).fetchall()]
        lists = [readers.read(conn, lambda sql=sql: conn.execute(sql, (limit,)).fetchall())  # type: ignore[misc]
                 for sql in (SELECT_RECENT, SELECT_RUNNING, SELECT_FAILURES)]
        groups = [group_info(conn, row) for row in conn.execute(NEWEST_GROUPS, (limit,)).fetchall()]
        plans = [readers.schedule_info(row) for row in conn.execute(SELECT_SCHEDULES).fetchall()]
    finally:
        conn.execute("COMMIT")
    counts: dict[str, int] = dict.fromkeys(STATES, 0)
    queues: dict[str, dict[str, int]] = {}
    for queue, status, n in counted:
        state = TaskStatus.read(readers.text(status))
        name = readers.text(queue) or ""
        counts[state] = counts.get(state, 0) + n
        per_queue = queues.setdefault(name, dict.fromkeys(STATES, 0))
        per_queue[state] = per_queue.get(state, 0) + n
    recent, running, failures = ([readers.info(row) for row in rows] for rows in lists)
    return QueueOverview(counts, recent, dict(sorted(queues.items())), running, failures, groups, plans)


def group_info(conn: sqlite3.Connection, row: Sequence[Any]) -> GroupInfo:
    return readers.group(row, conn.execute(GROUP_COUNTS, (row[0],)).fetchall())


def group(conn: sqlite3.Connection, group_id: str) -> GroupInfo | None:
    row = conn.execute(SELECT_GROUP, (group_id,)).fetchone()
    return None if row is None else group_info(conn, row)


def find_tasks(
    conn: sqlite3.Connection, statuses: Sequence[str] | None, queue: str | None, group_id: str | None, limit: int,
    offset: int, newest_first: bool, ungrouped: bool = False,
) -> list[TaskInfo]:
    """The rows of ``Backend.find_tasks``; with ``ungrouped``, of ``Backend.find_ungrouped``."""
    order = "DESC" if newest_first else "ASC"
    where: list[str] = ["group_id IS NULL"] if ungrouped else []
    params: list[Any] = []
    if queue is not None:
        where.append("queue = ?")
        params.append(queue)
    if group_id is not None:
        where.append("group_id = ?")
        params.append(group_id)
    if statuses is None:
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        statement = f"SELECT {INFO_COLUMNS} FROM sitq_tasks {clause} ORDER BY seq {order} LIMIT ? OFFSET ?"
        rows = readers.read(conn, lambda: conn.execute(statement, (*params, limit, offset)).fetchall())
        return [readers.info(row) for row in rows]
    # One part a state, each in enqueue order from that state's partial index, merged: a state
    # written as a literal lets SQLite use its partial index (a bound parameter would not), so a
    # few failures among millions of finished tasks are found without a scan.
    parts: list[str] = []
    all_params: list[Any] = []
    for status in dict.fromkeys(str(s) for s in statuses):
        if status in SORTED_BY_INDEX:
            test = f"status = '{status}'"
        elif status in STATES:  # their indexes are not in enqueue order: find the rows there, then sort
            test = f"seq IN (SELECT seq FROM sitq_tasks WHERE status = '{status}')"
        else:
            test, all_params = "status = ?", [*all_params, status]
        all_params += [*params, limit + offset]
        parts.append(f"SELECT * FROM (SELECT seq, {INFO_COLUMNS} FROM sitq_tasks WHERE "
                     f"{' AND '.join([test, *where])} ORDER BY seq {order} LIMIT ?)")
    if not parts:
        return []
    statement = f"{' UNION ALL '.join(parts)} ORDER BY seq {order} LIMIT ? OFFSET ?"
    rows = readers.read(conn, lambda: conn.execute(statement, (*all_params, limit, offset)).fetchall())
    return [readers.info(row[1:]) for row in rows]


def find_ungrouped(
    conn: sqlite3.Connection, statuses: Sequence[str] | None, limit: int, offset: int, newest_first: bool,
) -> list[TaskInfo]:
    """The rows of ``Backend.find_ungrouped``: one part a state, each read from sitq_loose (the running
    from their own index), merged. Without states, every row of no group, read as find_tasks reads them."""
    if statuses is None:
        return find_tasks(conn, statuses, None, None, limit, offset, newest_first, ungrouped=True)
    order = "DESC" if newest_first else "ASC"
    parts: list[str] = []
    params: list[Any] = []
    for status in dict.fromkeys(str(s) for s in statuses):
        if status == "running":
            parts.append(LOOSE_RUNNING.format(columns=INFO_COLUMNS, order=order))
            params.append(limit + offset)
        else:
            parts.append(LOOSE_IN_STATE.format(columns=INFO_COLUMNS, order=order))
            params += [status, limit + offset]
    if not parts:
        return []
    statement = f"{' UNION ALL '.join(parts)} ORDER BY seq {order} LIMIT ? OFFSET ?"
    rows = readers.read(conn, lambda: conn.execute(statement, (*params, limit, offset)).fetchall())
    return [readers.info(row[1:]) for row in rows]


def count_ungrouped(conn: sqlite3.Connection) -> dict[str, int]:
    counts: dict[str, int] = dict.fromkeys(STATES, 0)
    for status, n in readers.read(conn, lambda: conn.execute(COUNT_UNGROUPED).fetchall()):
        state = TaskStatus.read(readers.text(status))
        counts[state] = counts.get(state, 0) + n
    return counts


def match_ids(conn: sqlite3.Connection, fragment: str, limit: int) -> list[str]:
    if conn.execute(SELECT_ID, (fragment,)).fetchone() is not None:
        return [fragment]
    found = [row[0] for row in conn.execute(IDS_STARTING, (fragment, fragment + "\U0010ffff", limit))]
    found += [row[0] for row in conn.execute(IDS_ENDING, (len(fragment), fragment, limit))]
    return sorted(set(found))[:limit]


def fetch_result(conn: sqlite3.Connection, task_id: str) -> Any:
    return fetch_one(conn, SELECT_RESULT, (task_id,))


def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute(SELECT_META, (key,)).fetchone()
    value: str | None = None if row is None else row[0]
    return value


def set_meta_if_absent(conn: sqlite3.Connection, key: str, value: str) -> tuple[str, bool]:
    conn.execute("BEGIN IMMEDIATE")
    added = conn.execute(INSERT_META_IF_ABSENT, (key, value)).rowcount == 1
    (recorded,) = conn.execute(SELECT_META, (key,)).fetchone()
    conn.execute("COMMIT")
    return recorded, added


# -- retention -------------------------------------------------------------------------


def prune_batch(conn: sqlite3.Connection, now: float, limit: int) -> tuple[tuple[int, int], bool]:
    """Delete up to ``limit`` expired tasks in one transaction: ``((tasks, bytes), changed)``."""
    conn.execute("BEGIN IMMEDIATE")
    sizes = [row[0] or 0 for row in conn.execute(PRUNE, (now, limit)).fetchall()]
    conn.execute("COMMIT")
    return (len(sizes), sum(sizes)), bool(sizes)


def purge_batch(
    conn: sqlite3.Connection, statuses: Sequence[str], before: float | None, after: int, limit: int
) -> tuple[tuple[int, int, int], bool]:
    """Delete up to ``limit`` tasks past ``after`` (a seq) in one transaction:
    ``((tasks, bytes, last seq), changed)``."""
    params = {"statuses": json.dumps(list(statuses)), "before": before, "after": after, "limit": limit}
    conn.execute("BEGIN IMMEDIATE")
    rows = conn.execute(PURGE, params).fetchall()
    conn.execute("COMMIT")
    last = max((row[0] for row in rows), default=after)
    return (len(rows), sum(row[1] or 0 for row in rows), last), bool(rows)


def count_purge(conn: sqlite3.Connection, statuses: Sequence[str], before: float | None) -> tuple[int, int]:
    row = conn.execute(COUNT_PURGE, {"statuses": json.dumps(list(statuses)), "before": before}).fetchone()
    return row[0], row[1]


def give_back_space(conn: sqlite3.Connection) -> None:
    """Return free pages to the file system (a file in incremental auto-vacuum mode) and empty the
    WAL; best effort: another process reading the file makes SQLite skip the truncation."""
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
        # executescript steps the pragma to its end; execute() steps it once, which frees one page.
        conn.executescript("PRAGMA incremental_vacuum;")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


# -- schedules -----------------------------------------------------------------------


def set_schedule(conn: sqlite3.Connection, s: Schedule) -> tuple[None, bool]:
    conn.execute(SET_SCHEDULE, (s.name, s.task_name, s.func, s.args, s.signature, s.every, s.cron, s.tz, s.next_run,
                                s.last_run, s.queue, s.priority, s.max_attempts, s.retention))
    return None, True


def delete_schedule(conn: sqlite3.Connection, name: str) -> tuple[bool, bool]:
    gone = conn.execute(DELETE_SCHEDULE, (name,)).rowcount == 1
    return gone, gone


def fire_schedule(
    conn: sqlite3.Connection, name: str, due: float, next_run: float, task: NewTask
) -> tuple[bool, bool]:
    conn.execute("BEGIN IMMEDIATE")
    fired = conn.execute(FIRE_SCHEDULE, (next_run, due, name, due)).rowcount == 1
    if fired:
        insert_full_rows(conn, [task], if_absent=True)
    conn.execute("COMMIT")
    return fired, fired


# -- small helpers -------------------------------------------------------------------


def execute_count(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> int:
    return conn.execute(sql, params).rowcount


def set_progress(conn: sqlite3.Connection, rows: Sequence[Sequence[Any]]) -> tuple[None, int]:
    if not rows:
        return None, False
    before = conn.total_changes
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(SET_PROGRESS, rows)
    conn.execute("COMMIT")
    return None, NONE_FINISHED if conn.total_changes > before else False


def fetch_one(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> Any:
    return readers.read(conn, lambda: conn.execute(sql, params).fetchone())


def fetch_all(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[Any]:
    return readers.read(conn, lambda: conn.execute(sql, params).fetchall())


def renew(conn: sqlite3.Connection, worker_id: str, lease: float, clock: Callable[[], float]) -> int:
    return conn.execute(RENEW_LEASES, (clock() + lease, worker_id)).rowcount
