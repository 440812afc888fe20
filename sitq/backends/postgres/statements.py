"""The statements the PostgreSQL backend runs, as named SQL strings, and the functions that run them.

``{s}`` in a statement is the queue's schema (quoted); :func:`q` fills it in, once per
statement and schema. Each function takes the session it runs on and the schema. Writes that
other processes must hear of carry their NOTIFY in the same statement or transaction (``chan``:
the channel, or None when the backend holds it back to rate-limit); counts and dependencies are
written by the statements themselves, in CTEs (``COUNT_ADDED``, ``COUNT_MOVES``), and dependencies
settled by the schema's trigger (see :mod:`sitq.backends.postgres.schema`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from sitq.backends.postgres.driver import AsyncSession
from sitq.backends.postgres.schema import COUNT_ADDED, COUNT_MOVES, SHARD
from sitq.backends.rules import (
    LOST_WORKER_LIMIT,
    CancelOutcome,
    RetryOutcome,
    expires_at,
    initial_state,
    keyed_enqueue,
    lost_worker_error,
    retry,
)
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
    Result,
    Schedule,
    ScheduleInfo,
    TaskInfo,
    TaskStatus,
    to_datetime,
)
from sitq.errors import InvalidTaskError

FINISHED = "('success', 'failed', 'cancelled')"
# A NOTIFY payload must stay under 8,000 bytes: past this, a finish notice names no ids.
PAYLOAD_BYTES = 7900
ROW_SIZE = """octet_length(func) + octet_length(args) + coalesce(octet_length(signature), 0)
    + coalesce(octet_length(value), 0) + coalesce(octet_length(value_signature), 0)
    + coalesce(octet_length(error), 0) + coalesce(octet_length(traceback), 0) + coalesce(octet_length(output), 0)"""


@functools.lru_cache(maxsize=512)
def q(statement: str, schema: str) -> str:
    """``statement`` for the queue in ``schema``."""
    return statement.replace("{s}", f'"{schema}"')


# -- enqueue ---------------------------------------------------------------------

NEW_COLUMNS = "id, name, func, args, signature, max_attempts, eta, enqueued_at, queue, priority, retention, group_id"

# The plain path: tasks with no key and no dependencies are pending. One statement for a whole
# batch, its counts and its NOTIFY included (an idle worker wakes once per batch).
INSERT_PLAIN = f"""
WITH added AS (
    INSERT INTO {{s}}.tasks (status, {NEW_COLUMNS})
    SELECT 'pending', t.id, %(name)s, %(func)s, t.args, t.signature, %(max_attempts)s, %(eta)s, %(enqueued_at)s,
        %(queue)s, %(priority)s, %(retention)s, %(group_id)s
    FROM unnest(%(ids)s::text[], %(args)s::bytea[], %(signatures)s::bytea[]) WITH ORDINALITY
        AS t(id, args, signature, n)
    ORDER BY t.n
    RETURNING queue, status, group_id
), {COUNT_ADDED}
SELECT count(*), (SELECT pg_notify(%(chan)s::text, 'e') WHERE %(chan)s::text IS NOT NULL) FROM added
"""

# One task of no group, the usual enqueue: the insert and its count, and (in INSERT_ONE_NOTIFY) the
# NOTIFY, one statement that returns the count's row.
INSERT_ONE = f"""
WITH added AS (
    INSERT INTO {{s}}.tasks (status, {NEW_COLUMNS}) VALUES ('pending', %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, NULL)
    RETURNING queue
)
INSERT INTO {{s}}.counts AS c (queue, status, shard, n) SELECT queue, 'pending', {SHARD}, 1 FROM added
ON CONFLICT (queue, status, shard) DO UPDATE SET n = c.n + 1
"""

INSERT_ONE_NOTIFY = INSERT_ONE + "RETURNING pg_notify(%s, 'e')\n"

ADD_GROUP = "INSERT INTO {s}.groups (id, name, created_at) VALUES (%s, %s, %s) ON CONFLICT (id) DO NOTHING"

FULL_COLUMNS = f"status, {NEW_COLUMNS}, key, waiting, error, finished_at, expires_at"

INSERT_FULL = f"""
WITH added AS (
    INSERT INTO {{s}}.tasks ({FULL_COLUMNS}) VALUES ({', '.join(['%s'] * 18)})
    RETURNING seq, queue, status, group_id
), {COUNT_ADDED}
SELECT seq FROM added
"""

INSERT_IF_ABSENT = INSERT_FULL.replace("\n    RETURNING seq,", "\n    ON CONFLICT (id) DO NOTHING RETURNING seq,")

SELECT_KEYED = "SELECT seq, status, expires_at FROM {s}.tasks WHERE id = %s FOR UPDATE"

# A keyed task enqueued again that had failed, was cancelled or expired (rules.keyed_enqueue) runs
# again in its place, with the new payload: its id, and so every handle on it, stays the same.
RESET_KEYED = f"""
WITH was AS (SELECT seq, queue, status, group_id FROM {{s}}.tasks WHERE seq = %s), moved AS (
    UPDATE {{s}}.tasks t SET status = %s, name = %s, func = %s, args = %s, signature = %s, max_attempts = %s,
        eta = %s, enqueued_at = %s, queue = %s, priority = %s, retention = %s, group_id = %s, key = %s, waiting = %s,
        error = %s, finished_at = %s, expires_at = %s, started_at = NULL, attempts = 0, worker_id = NULL,
        lease_until = NULL, value = NULL, value_signature = NULL, traceback = NULL, output = NULL,
        progress_done = NULL, progress_total = NULL, progress_message = NULL, lost = 0, cancel_requested = false
    FROM was WHERE t.seq = was.seq
    RETURNING t.queue, t.status, t.group_id, was.queue AS was_queue, was.status AS was_status,
        was.group_id AS was_group
), {COUNT_MOVES}
SELECT count(*) FROM moved
"""

DROP_OWN_EDGES = "DELETE FROM {s}.deps WHERE task = %s"

SELECT_DEPENDENCIES = "SELECT seq, id, name, status FROM {s}.tasks WHERE id = ANY(%s) FOR SHARE"

ADD_EDGE = "INSERT INTO {s}.deps (dep, task) VALUES (%s, %s) ON CONFLICT DO NOTHING"

COUNT_DEPENDENT = "UPDATE {s}.tasks SET dependents = dependents + 1 WHERE seq = %s"

NOTIFY = "SELECT pg_notify(%s, %s)"

# -- claims, outcomes --------------------------------------------------------------

# One statement: the candidates are locked, skipping rows another worker's claim holds, and
# marked running; no worker ever waits on another's locks, and none gets a task twice. The
# candidates are one suspect (a task that lost its worker before runs alone: only a worker with
# nothing running, `alone`, takes one) if one is ready, else up to `limit` ready tasks; the second
# scan runs only when the first found none. ARRAY(...) runs each subquery once (as
# `seq IN (subquery)` the planner may run it again for every row).
# A claim commits without waiting for the disk (AsyncSession.fetch_unflushed): the flush was a good
# part of a claim's time, and all a server crash can undo is the claims of its last moments, whose
# tasks are then pending again and may run twice, as a dead worker's tasks may (the finish's guard
# still stores one outcome). Enqueues and outcomes, which callers are told are stored, wait for it.
CLAIM = f"""
WITH suspect AS MATERIALIZED (
    SELECT ARRAY(
        SELECT seq FROM {{s}}.tasks
        WHERE status = 'pending' AND lost > 0 AND eta <= %(now)s {{queues}}
        ORDER BY priority DESC, eta, seq LIMIT CASE WHEN %(alone)s THEN 1 ELSE 0 END
        FOR UPDATE SKIP LOCKED
    ) AS seqs
), moved AS (
    UPDATE {{s}}.tasks SET status = 'running', worker_id = %(worker)s, started_at = %(now)s, lease_until = %(lease)s,
        attempts = attempts + 1, progress_done = NULL, progress_total = NULL, progress_message = NULL
    WHERE seq = ANY(CASE WHEN (SELECT cardinality(seqs) FROM suspect) > 0 THEN (SELECT seqs FROM suspect) ELSE ARRAY(
        SELECT seq FROM {{s}}.tasks
        WHERE status = 'pending' AND lost = 0 AND eta <= %(now)s {{queues}}
        ORDER BY priority DESC, eta, seq LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ) END) AND status = 'pending'
    RETURNING seq, id, name, func, args, signature, attempts, lost, queue, status, group_id, queue AS was_queue,
        'pending'::text AS was_status, group_id AS was_group
), {COUNT_MOVES}
SELECT seq, id, name, func, args, signature, attempts, lost FROM moved
"""

IN_QUEUES = "AND queue = ANY(%(queues)s)"

# The outcomes of many tasks in one statement, each written only if the task is still running under
# this claim (seq, attempts, worker). A retry is pending again at retry_at, or cancelled if a cancel
# was requested meanwhile (rules.after_retry); a finished task is kept until finished_at + retention.
# The NOTIFY names the tasks for the clients waiting for their results.
_FINISH = f"""
WITH v AS (
    SELECT * FROM {{rows}}
    AS v(seq, attempts, kind, finished_at, retry_at, value, value_signature, error, traceback, output, done, total,
         message)
), moved AS (
    UPDATE {{s}}.tasks t SET
        status = CASE WHEN v.kind <> 'retry' THEN v.kind WHEN t.cancel_requested THEN 'cancelled' ELSE 'pending' END,
        finished_at = CASE WHEN v.kind <> 'retry' OR t.cancel_requested THEN v.finished_at END,
        expires_at = CASE WHEN v.kind <> 'retry' OR t.cancel_requested THEN v.finished_at + t.retention END,
        eta = CASE WHEN v.kind = 'retry' THEN v.retry_at ELSE t.eta END,
        worker_id = CASE WHEN v.kind = 'retry' THEN NULL ELSE t.worker_id END,
        value = CASE WHEN v.kind = 'retry' THEN t.value ELSE v.value END,
        value_signature = CASE WHEN v.kind = 'retry' THEN t.value_signature ELSE v.value_signature END,
        error = v.error, traceback = v.traceback, output = v.output, lease_until = NULL,
        progress_done = CASE WHEN v.kind = 'retry' THEN t.progress_done ELSE coalesce(v.done, t.progress_done) END,
        progress_total = CASE WHEN v.kind = 'retry' THEN t.progress_total
                              ELSE coalesce(v.total, t.progress_total) END,
        progress_message = CASE WHEN v.kind = 'retry' THEN t.progress_message
                                ELSE coalesce(v.message, t.progress_message) END
    FROM v
    WHERE t.seq = v.seq AND t.attempts = v.attempts AND t.status = 'running' AND t.worker_id = %(worker)s
    RETURNING t.seq, t.attempts, t.id, t.queue, t.status, t.group_id, t.queue AS was_queue,
        'running'::text AS was_status, t.group_id AS was_group
), {COUNT_MOVES}
SELECT seq, attempts, (SELECT pg_notify(%(chan)s::text, CASE WHEN sum(octet_length(id) + 1) > {PAYLOAD_BYTES} THEN 'f'
                                            ELSE 'f:' || string_agg(id, ',') END)
             FROM moved WHERE %(chan)s::text IS NOT NULL HAVING count(*) > 0)
FROM moved
"""

FINISH = _FINISH.replace("{rows}", """unnest(%(seqs)s::bigint[], %(attempts)s::integer[], %(kinds)s::text[],
    %(finished)s::float8[], %(retry_at)s::float8[], %(values)s::bytea[], %(value_signatures)s::bytea[],
    %(errors)s::text[], %(tracebacks)s::text[], %(outputs)s::text[], %(done)s::float8[], %(total)s::float8[],
    %(messages)s::text[])""")

# One outcome (the usual case when tasks take a while, or a client waits for each): the same
# statement on one row of values, which spares the arrays and goes straight to the row.
FINISH_ONE = _FINISH.replace("{rows}", """(VALUES (%(seqs)s::bigint, %(attempts)s::integer, %(kinds)s::text,
    %(finished)s::float8, %(retry_at)s::float8, %(values)s::bytea, %(value_signatures)s::bytea, %(errors)s::text,
    %(tracebacks)s::text, %(outputs)s::text, %(done)s::float8, %(total)s::float8, %(messages)s::text))""")

# After a lost connection: which of these outcomes were stored by the attempt that lost its answer.
STORED_BEFORE = """
SELECT seq, attempts FROM {s}.tasks WHERE seq = ANY(%s) AND worker_id = %s AND status <> 'running'
    AND finished_at = ANY(%s)
"""

# After a lost connection: the tasks a claim at `now` marked running for this worker, whose answer
# never came. They go back, as if never claimed, before the claim is tried again.
UNDO_CLAIM = f"""
WITH moved AS (
    UPDATE {{s}}.tasks SET status = 'pending', worker_id = NULL, lease_until = NULL, started_at = NULL,
        attempts = attempts - 1
    WHERE status = 'running' AND worker_id = %s AND started_at = %s
    RETURNING queue, status, group_id, queue AS was_queue, 'running'::text AS was_status, group_id AS was_group
), {COUNT_MOVES}
SELECT count(*) FROM moved
"""

RELEASE = f"""
WITH moved AS (
    UPDATE {{s}}.tasks SET status = 'pending', worker_id = NULL, lease_until = NULL, started_at = NULL,
        attempts = attempts - 1
    WHERE seq = ANY(%(seqs)s) AND status = 'running' AND worker_id = %(worker)s
        AND (seq, attempts) IN (SELECT * FROM unnest(%(seqs)s::bigint[], %(attempts)s::integer[]))
    RETURNING seq, attempts + 1 AS attempts, queue, status, group_id, queue AS was_queue, 'running'::text AS was_status,
        group_id AS was_group
), {COUNT_MOVES}
SELECT seq, attempts, (SELECT pg_notify(%(chan)s::text, 'e') FROM moved HAVING count(*) > 0) FROM moved
"""

SUSPECTS_WAITING = """
SELECT EXISTS (SELECT 1 FROM {s}.tasks WHERE status = 'pending' AND lost > 0 AND eta <= %(now)s {queues})
"""

# The earliest eta of pending tasks: the first of each priority in the claim index (a skip scan),
# and the suspects, which are few.
NEXT_ETA = """
WITH RECURSIVE levels(priority, eta) AS (
    (SELECT priority, eta FROM {s}.tasks WHERE status = 'pending' AND lost = 0 {queues}
     ORDER BY priority DESC, eta, seq LIMIT 1)
    UNION ALL
    SELECT later.priority, later.eta FROM levels, LATERAL (
        SELECT priority, eta FROM {s}.tasks WHERE status = 'pending' AND lost = 0 {queues}
            AND priority < levels.priority
        ORDER BY priority DESC, eta, seq LIMIT 1) later
)
SELECT least((SELECT min(eta) FROM levels),
             (SELECT min(eta) FROM {s}.tasks WHERE status = 'pending' AND lost > 0 {queues}))
"""

RENEW = "UPDATE {s}.tasks SET lease_until = %s WHERE worker_id = %s AND status = 'running'"

# -- leases, cancel and retry ------------------------------------------------------------

# Tasks whose worker stopped renewing the lease (rules.expired_lease): cancelled if that was asked
# for, failed on their LOST_WORKER_LIMIT-th lost worker, else claimable again as suspects. One
# sweeper at a time, whoever takes the try-lock; the others find it taken and move on. One
# statement, so that no process can be stopped between its parts with the lock held.
SWEEP = f"""
WITH sweeper AS (SELECT pg_try_advisory_xact_lock(hashtextextended(%(key)s, 0)) AS taken),
cancelled AS (
    UPDATE {{s}}.tasks SET status = 'cancelled', finished_at = %(now)s, expires_at = %(now)s + retention,
        lease_until = NULL
    WHERE status = 'running' AND lease_until < %(now)s AND cancel_requested AND (SELECT taken FROM sweeper)
    RETURNING queue, status, group_id
), failed AS (
    UPDATE {{s}}.tasks SET status = 'failed', finished_at = %(now)s, expires_at = %(now)s + retention,
        lease_until = NULL, error = %(error)s, traceback = NULL
    WHERE status = 'running' AND lease_until < %(now)s AND NOT cancel_requested AND lost + 1 >= %(limit)s
        AND (SELECT taken FROM sweeper)
    RETURNING queue, status, group_id
), requeued AS (
    UPDATE {{s}}.tasks SET status = 'pending', worker_id = NULL, lease_until = NULL, lost = lost + 1
    WHERE status = 'running' AND lease_until < %(now)s AND NOT cancel_requested AND lost + 1 < %(limit)s
        AND (SELECT taken FROM sweeper)
    RETURNING queue, status, group_id
), moved AS (
    SELECT queue, status, group_id, queue AS was_queue, 'running'::text AS was_status, group_id AS was_group
    FROM (SELECT * FROM cancelled UNION ALL SELECT * FROM failed UNION ALL SELECT * FROM requeued) swept
), {COUNT_MOVES}
SELECT n, (SELECT pg_notify(%(chan)s::text, 'e') WHERE n > 0) FROM (SELECT count(*) AS n FROM moved) swept
"""

# rules.cancel: pending or waiting -> cancelled now; running -> a request for its worker.
CANCEL = f"""
WITH found AS (SELECT seq, status FROM {{s}}.tasks WHERE id = %(id)s FOR UPDATE),
moved AS (
    UPDATE {{s}}.tasks t SET status = 'cancelled', finished_at = %(now)s, expires_at = %(now)s + t.retention
    FROM found WHERE t.seq = found.seq AND found.status IN ('pending', 'waiting')
    RETURNING t.queue, t.status, t.group_id, t.queue AS was_queue, found.status AS was_status, t.group_id AS was_group
), requested AS (
    UPDATE {{s}}.tasks t SET cancel_requested = true
    FROM found WHERE t.seq = found.seq AND found.status = 'running' RETURNING t.seq
), {COUNT_MOVES}
SELECT found.status FROM found
"""

SELECT_CANCEL_REQUESTS = """
SELECT id FROM {s}.tasks WHERE worker_id = %s AND status = 'running' AND cancel_requested
"""

# rules.retry: a failed or cancelled task runs once more.
RETRY_BY_HAND = f"""
WITH found AS (SELECT seq, id, status FROM {{s}}.tasks WHERE id = ANY(%(ids)s) FOR UPDATE),
moved AS (
    UPDATE {{s}}.tasks t SET status = 'pending', eta = %(now)s, max_attempts = t.attempts + 1, finished_at = NULL,
        expires_at = NULL, worker_id = NULL, lease_until = NULL, value = NULL, value_signature = NULL, error = NULL,
        traceback = NULL, output = NULL, lost = 0, cancel_requested = false, waiting = 0
    FROM found WHERE t.seq = found.seq AND found.status IN ('failed', 'cancelled')
    RETURNING t.queue, t.status, t.group_id, t.queue AS was_queue, found.status AS was_status, t.group_id AS was_group
), {COUNT_MOVES}
SELECT id, status FROM found
"""

SET_PROGRESS = """
WITH stored AS (
    UPDATE {s}.tasks t SET progress_done = v.done, progress_total = v.total, progress_message = v.message
    FROM unnest(%(seqs)s::bigint[], %(attempts)s::integer[], %(done)s::float8[], %(total)s::float8[],
                %(messages)s::text[]) AS v(seq, attempts, done, total, message)
    WHERE t.seq = v.seq AND t.attempts = v.attempts AND t.status = 'running' AND t.worker_id = %(worker)s
    RETURNING 1
)
SELECT count(*), (SELECT pg_notify(%(chan)s::text, 'p') WHERE %(chan)s::text IS NOT NULL) FROM stored
HAVING count(*) > 0
"""

# -- readers -----------------------------------------------------------------------

RESULT_COLUMNS = """id, name, status, value, error, traceback, enqueued_at, started_at, finished_at, attempts, output,
    value_signature"""

SELECT_RESULTS = f"SELECT {RESULT_COLUMNS} FROM {{s}}.tasks WHERE id = ANY(%s)"

SELECT_RESULT = f"SELECT {RESULT_COLUMNS} FROM {{s}}.tasks WHERE id = %s"

INFO_COLUMNS = """id, name, status, enqueued_at, eta, started_at, finished_at, attempts, worker_id,
    progress_done, progress_total, progress_message, error, queue, priority, group_id, key"""

SELECT_INFO = f"SELECT {INFO_COLUMNS} FROM {{s}}.tasks WHERE id = ANY(%s)"

SELECT_RECENT = f"SELECT {INFO_COLUMNS} FROM {{s}}.tasks ORDER BY seq DESC LIMIT %s"

SELECT_RUNNING = f"SELECT {INFO_COLUMNS} FROM {{s}}.tasks WHERE status = 'running' ORDER BY seq DESC LIMIT %s"

SELECT_FAILURES = f"SELECT {INFO_COLUMNS} FROM {{s}}.tasks WHERE status = 'failed' ORDER BY seq DESC LIMIT %s"

# The counts, added up over their shards: a few rows per queue, however many tasks.
SELECT_COUNTS = "SELECT queue, status, sum(n) FROM {s}.counts GROUP BY queue, status HAVING sum(n) <> 0"

SELECT_GROUP = "SELECT id, name, created_at FROM {s}.groups WHERE id = %s"

NEWEST_GROUPS = "SELECT id, name, created_at FROM {s}.groups ORDER BY created_at DESC LIMIT %s"

GROUP_COUNTS = "SELECT status, sum(n) FROM {s}.group_counts WHERE group_id = %s GROUP BY status"

# The tasks of no group per state, in one statement (one snapshot): the counts less the groups' counts.
COUNT_UNGROUPED = """
SELECT status, sum(n) FROM (SELECT status, n FROM {s}.counts UNION ALL SELECT status, -n FROM {s}.group_counts) c
GROUP BY status
"""

# The tasks of no group in the states asked for but running, each state read from tasks_loose in
# enqueue order (its terms written out, so the planner takes it), as many as asked for: the rows read
# are those returned, however big the groups beside them.
LOOSE_IN_STATES = f"""
SELECT seq, {INFO_COLUMNS} FROM unnest(%(states)s::text[]) AS wanted(state) CROSS JOIN LATERAL (
    SELECT seq, {INFO_COLUMNS} FROM {{s}}.tasks t
    WHERE t.group_id IS NULL AND t.status <> 'running' AND t.status = wanted.state
    ORDER BY t.seq DESC LIMIT %(rows)s) found
"""

# The running tasks of no group, which tasks_loose leaves out: found in tasks_running (as many as run).
LOOSE_RUNNING = f"""
SELECT seq, {INFO_COLUMNS} FROM {{s}}.tasks WHERE status = 'running' AND group_id IS NULL
ORDER BY seq DESC LIMIT %(rows)s
"""


def find_ungrouped(states: list[str], newest_first: bool) -> str:
    """The statement of ``Backend.find_ungrouped`` for ``states``: one part for the states in
    tasks_loose, one for the running, merged."""
    parts = []
    if any(s != "running" for s in states):
        parts.append(LOOSE_IN_STATES)
    if "running" in states:
        parts.append(LOOSE_RUNNING)
    merged = " UNION ALL ".join(f"({part.strip()})" for part in parts)
    statement = f"SELECT {INFO_COLUMNS} FROM ({merged}) m ORDER BY seq DESC LIMIT %(limit)s OFFSET %(offset)s"
    return statement if newest_first else statement.replace("DESC", "ASC")


SELECT_ID = "SELECT id FROM {s}.tasks WHERE id = %s"

IDS_STARTING = "SELECT id FROM {s}.tasks WHERE id >= %s AND id < %s ORDER BY id LIMIT %s"

IDS_ENDING = "SELECT id FROM {s}.tasks WHERE right(id, %s) = %s LIMIT %s"

SELECT_GROUP_ID = "SELECT id FROM {s}.groups WHERE id = %s"

GROUP_IDS_STARTING = "SELECT id FROM {s}.groups WHERE id >= %s AND id < %s ORDER BY id LIMIT %s"

GROUP_IDS_ENDING = "SELECT id FROM {s}.groups WHERE right(id, %s) = %s LIMIT %s"

SELECT_META = "SELECT value FROM {s}.meta WHERE key = %s"

INSERT_META_IF_ABSENT = """
WITH added AS (INSERT INTO {s}.meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING RETURNING value)
SELECT value, true FROM added
UNION ALL SELECT value, false FROM {s}.meta WHERE key = %s AND NOT EXISTS (SELECT 1 FROM added)
"""

# -- retention ---------------------------------------------------------------------

PRUNE = f"""
DELETE FROM {{s}}.tasks WHERE seq IN (
    SELECT seq FROM {{s}}.tasks WHERE expires_at <= %s AND status IN {FINISHED} LIMIT %s
) RETURNING {ROW_SIZE}
"""

PURGE_WHERE = "status = ANY(%(statuses)s) AND (%(before)s::float8 IS NULL OR finished_at < %(before)s)"

PURGE = f"""
DELETE FROM {{s}}.tasks WHERE seq IN (
    SELECT seq FROM {{s}}.tasks WHERE seq > %(after)s AND {PURGE_WHERE} ORDER BY seq LIMIT %(limit)s
) RETURNING seq, {ROW_SIZE}
"""

COUNT_PURGE = f"SELECT count(*), coalesce(sum({ROW_SIZE}), 0) FROM {{s}}.tasks WHERE {PURGE_WHERE}"

# -- schedules ---------------------------------------------------------------------

SCHEDULE_COLUMNS = (
    "name, task_name, func, args, signature, every, cron, tz, next_run, last_run, queue, priority, max_attempts, "
    "retention"
)

SAME_PERIOD = ("s.every IS NOT DISTINCT FROM excluded.every AND s.cron IS NOT DISTINCT FROM excluded.cron "
               "AND s.tz = excluded.tz")

# Declared again with the same period, a schedule keeps its next run: a cell run twice changes nothing.
SET_SCHEDULE = f"""
INSERT INTO {{s}}.schedules AS s ({SCHEDULE_COLUMNS}) VALUES ({', '.join(['%s'] * 14)})
ON CONFLICT (name) DO UPDATE SET
    next_run = CASE WHEN {SAME_PERIOD} THEN s.next_run ELSE excluded.next_run END,
    last_run = CASE WHEN {SAME_PERIOD} THEN s.last_run ELSE excluded.last_run END,
    task_name = excluded.task_name, func = excluded.func, args = excluded.args, signature = excluded.signature,
    every = excluded.every, cron = excluded.cron, tz = excluded.tz, queue = excluded.queue,
    priority = excluded.priority, max_attempts = excluded.max_attempts, retention = excluded.retention
"""

DELETE_SCHEDULE = "DELETE FROM {s}.schedules WHERE name = %s"

SELECT_SCHEDULES = (
    "SELECT name, task_name, queue, every, cron, tz, next_run, last_run FROM {s}.schedules ORDER BY next_run, name"
)

DUE_SCHEDULES = f"SELECT {SCHEDULE_COLUMNS} FROM {{s}}.schedules WHERE next_run <= %s ORDER BY next_run"

# Of many workers that see a tick due, the one whose update finds it still due enqueues it.
FIRE_SCHEDULE = "UPDATE {s}.schedules SET next_run = %s, last_run = %s WHERE name = %s AND next_run = %s"


# -- enqueue -----------------------------------------------------------------------


def is_plain(tasks: Sequence[NewTask]) -> bool:
    """Whether every task takes the plain path: no dedupe key and nothing to run after."""
    if isinstance(tasks, NewTaskBatch):
        return tasks.keys is None and not tasks.after
    return all(t.key is None and not t.after for t in tasks)


def _same_batch(tasks: Sequence[NewTask]) -> bool:
    first = tasks[0]
    shared = (first.name, first.func, first.max_attempts, first.eta, first.enqueued_at, first.queue, first.priority,
              first.retention, first.group_id)
    return all((t.name, t.func, t.max_attempts, t.eta, t.enqueued_at, t.queue, t.priority, t.retention,
                t.group_id) == shared for t in tasks)


def _groups(tasks: Sequence[NewTask]) -> dict[str, tuple[str, float]]:
    if isinstance(tasks, NewTaskBatch):
        t = tasks
        return {} if t.group_id is None else {t.group_id: (t.group_name or t.name, t.enqueued_at)}
    return {t.group_id: (t.group_name or t.name, t.enqueued_at) for t in tasks if t.group_id is not None}


async def insert_plain(db: AsyncSession, s: str, tasks: Sequence[NewTask], chan: str | None) -> list[Enqueued]:
    """The plain path: one statement for one task, or for a batch of one function."""
    if len(tasks) == 1 and tasks[0].group_id is None:
        t = tasks[0]
        row = (t.task_id, t.name, t.func, t.args, t.signature, t.max_attempts, t.eta, t.enqueued_at, t.queue,
               t.priority, t.retention)
        if chan is None:
            await db.execute(q(INSERT_ONE, s), row)
        else:
            await db.fetch(q(INSERT_ONE_NOTIFY, s), (*row, chan))
        return [Enqueued.INSERTED]
    async with db.transaction():
        for group_id, (name, created) in _groups(tasks).items():
            await db.execute(q(ADD_GROUP, s), (group_id, name, created))
        if isinstance(tasks, NewTaskBatch):
            parts: list[Sequence[NewTask]] = [tasks]
        elif _same_batch(tasks):
            parts = [tasks]
        else:
            parts = [[t] for t in tasks]
        for i, part in enumerate(parts):
            await db.fetch(q(INSERT_PLAIN, s), _batch_params(part, chan if i == len(parts) - 1 else None))
    return [Enqueued.INSERTED] * len(tasks)


def _batch_params(tasks: Sequence[NewTask], chan: str | None) -> dict[str, Any]:
    if isinstance(tasks, NewTaskBatch):
        t: Any = tasks
        ids, args, signatures = t.task_ids, t.args, t.signatures
    else:
        t = tasks[0]
        ids, args, signatures = [x.task_id for x in tasks], [x.args for x in tasks], [x.signature for x in tasks]
    return {"name": t.name, "func": t.func, "max_attempts": t.max_attempts, "eta": t.eta,
            "enqueued_at": t.enqueued_at, "queue": t.queue, "priority": t.priority, "retention": t.retention,
            "group_id": t.group_id, "ids": ids, "args": args, "signatures": signatures, "chan": chan}


async def insert_full(db: AsyncSession, s: str, tasks: Sequence[NewTask], chan: str | None,
                      if_absent: bool = False) -> list[Enqueued]:
    """The full path, inside the caller's transaction: keyed tasks, dependencies, groups.
    ``if_absent``: a task whose id is stored already is left as it is (a schedule's tick)."""
    for group_id, (name, created) in _groups(tasks).items():
        await db.execute(q(ADD_GROUP, s), (group_id, name, created))
    dependencies = await _dependencies(db, s, tasks)
    done = []
    batch = isinstance(tasks, NewTaskBatch)
    for task in tasks:
        if any(d not in dependencies for d in task.after):
            raise InvalidTaskError(_unknown(next(d for d in task.after if d not in dependencies)))
        deps = [dependencies[d] for d in dict.fromkeys(task.after)]
        status, waiting, error = initial_state((d[1], d[2], d[3]) for d in deps)
        finished = task.enqueued_at if status == CANCELLED else None
        row = (status.value, task.task_id, task.name, task.func, task.args, task.signature, task.max_attempts,
               task.eta, task.enqueued_at, task.queue, task.priority, task.retention, task.group_id, task.key,
               waiting, error, finished, expires_at(finished, task.retention) if finished is not None else None)
        outcome, seq = await _store_new(db, s, task, row, if_absent)
        done.append(outcome)
        if outcome is Enqueued.EXISTING:
            continue
        if status == WAITING:
            for dep_seq, _, _, dep_status in deps:
                if dep_status not in ("success", "failed", "cancelled"):
                    await db.execute(q(ADD_EDGE, s), (dep_seq, seq))
                    await db.execute(q(COUNT_DEPENDENT, s), (dep_seq,))
        if not batch:
            dependencies[task.task_id] = (seq, task.task_id, task.name, status)  # a later task may run after it
    if chan is not None and any(d is not Enqueued.EXISTING for d in done):
        await db.fetch(q(NOTIFY, s), (chan, "e"))
    return done


async def _store_new(
    db: AsyncSession, s: str, task: NewTask, row: tuple[Any, ...], if_absent: bool
) -> tuple[Enqueued, int]:
    if task.key is None and not if_absent:
        found = await db.fetchone(q(INSERT_FULL, s), row)
        assert found is not None
        return Enqueued.INSERTED, found[0]
    found = await db.fetchone(q(INSERT_IF_ABSENT, s), row)
    if found is not None:
        return Enqueued.INSERTED, found[0]
    stored = await db.fetchone(q(SELECT_KEYED, s), (task.task_id,))
    assert stored is not None
    seq, status, expires = stored
    expired = expires is not None and expires <= task.enqueued_at
    outcome = Enqueued.EXISTING if if_absent else keyed_enqueue(TaskStatus.read(status), expired, task.replace_failed)
    if outcome is Enqueued.REPLACED:
        await db.execute(q(DROP_OWN_EDGES, s), (seq,))
        await db.fetch(q(RESET_KEYED, s), (seq, *row[:1], *row[2:]))
    return outcome, seq


async def _dependencies(
    db: AsyncSession, s: str, tasks: Sequence[NewTask]
) -> dict[str, tuple[int, str, str, Any]]:
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
             for row in await db.fetch(q(SELECT_DEPENDENCIES, s), (list(wanted),))}
    missing = [i for i in wanted if i not in found and i not in fresh]
    if missing:
        raise InvalidTaskError(_unknown(missing[0]))
    return found


def _unknown(task_id: str) -> str:
    return (
        f"cannot run after task {task_id!r}: there is no task with that id before this one (it was never "
        "enqueued here, it was purged, or it comes later in the same call)"
    )


# -- claims and outcomes ------------------------------------------------------------


def _with_queues(statement: str, queues: Sequence[str] | None) -> str:
    return statement.replace("{queues}", "" if queues is None else IN_QUEUES)


def _claim_params(worker_id: str, limit: int, now: float, lease: float, alone: bool,
                  queues: Sequence[str] | None) -> tuple[str, dict[str, Any]]:
    return _with_queues(CLAIM, queues), {"worker": worker_id, "now": now, "lease": lease, "limit": limit,
                                         "alone": alone, "queues": None if queues is None else list(queues)}


def _claimed(rows: list[tuple[Any, ...]]) -> list[ClaimedTask]:
    return sorted((ClaimedTask(*row) for row in rows), key=lambda t: t.handle)


async def claim(
    db: AsyncSession, s: str, worker_id: str, limit: int, now: float, lease: float, alone: bool,
    queues: Sequence[str] | None,
) -> list[ClaimedTask]:
    statement, params = _claim_params(worker_id, limit, now, lease, alone, queues)
    return _claimed(await db.fetch_unflushed(q(statement, s), params))


def _finish_statement(worker_id: str, outcomes: Sequence[Outcome], chan: str | None) -> tuple[str, dict[str, Any]]:
    done = [o.progress or (None, None, None) for o in outcomes]
    columns: dict[str, list[Any]] = {
        "seqs": [o.handle for o in outcomes], "attempts": [o.attempts for o in outcomes],
        "kinds": [o.kind.value for o in outcomes], "finished": [o.finished_at for o in outcomes],
        "retry_at": [o.retry_at if o.kind is OutcomeKind.RETRY else None for o in outcomes],
        "values": [o.value for o in outcomes], "value_signatures": [o.value_signature for o in outcomes],
        "errors": [o.error for o in outcomes], "tracebacks": [o.traceback for o in outcomes],
        "outputs": [o.output for o in outcomes], "done": [d[0] for d in done], "total": [d[1] for d in done],
        "messages": [d[2] for d in done],
    }
    if len(outcomes) == 1:
        return FINISH_ONE, {**{name: values[0] for name, values in columns.items()}, "worker": worker_id, "chan": chan}
    return FINISH, {**columns, "worker": worker_id, "chan": chan}


T = TypeVar("T")


def _once(items: Sequence[T], key: Callable[[T], tuple[Any, int]]) -> tuple[list[bool], list[T]]:
    """Which of ``items`` name their claim (``key``: seq, attempts) first in the list, and those items.
    One statement writes a row once, so a claim named again in the same call (a worker's old claim
    and its successor's, under one worker, say) is left out: one at a time, as the contract has it,
    the first would have used the claim up."""
    seen: set[tuple[Any, int]] = set()
    firsts = []
    for item in items:
        claim = key(item)
        firsts.append(claim not in seen)
        seen.add(claim)
    return firsts, [item for item, first in zip(items, firsts, strict=True) if first]


def _claim_of(o: Outcome) -> tuple[Any, int]:
    return o.handle, o.attempts


def _stored(outcomes: Sequence[Outcome], firsts: list[bool], rows: Iterable[Any]) -> list[bool]:
    done = {(row[0], row[1]) for row in rows}
    return [first and (o.handle, o.attempts) in done for o, first in zip(outcomes, firsts, strict=True)]


async def finish(db: AsyncSession, s: str, worker_id: str, outcomes: Sequence[Outcome], chan: str | None) -> list[bool]:
    firsts, sent = _once(outcomes, _claim_of)
    statement, params = _finish_statement(worker_id, sent, chan)
    return _stored(outcomes, firsts, await db.fetch(q(statement, s), params))


async def finish_and_claim(
    db: AsyncSession, s: str, worker_id: str, outcomes: Sequence[Outcome], chan: str | None, limit: int,
    now: float, lease: float, alone: bool, queues: Sequence[str] | None,
) -> tuple[list[bool], list[ClaimedTask]]:
    """The outcomes stored and committed (the clients waiting for them hear of it at once), then a claim
    that sees them (a retry ready again, tasks that ran after a finished one released): two
    transactions sent together, one round trip."""
    if not outcomes or limit <= 0:
        stored = await finish(db, s, worker_id, outcomes, chan) if outcomes else []
        return stored, (await claim(db, s, worker_id, limit, now, lease, alone, queues) if limit > 0 else [])
    firsts, sent = _once(outcomes, _claim_of)
    finishing, finish_params = _finish_statement(worker_id, sent, chan)
    claiming, claim_params = _claim_params(worker_id, limit, now, lease, alone, queues)
    finished, claimed = await db.fetch_in_turn([(q(finishing, s), finish_params), (q(claiming, s), claim_params)],
                                               unflushed=(1,))
    return _stored(outcomes, firsts, finished), _claimed(claimed)


async def stored_before(db: AsyncSession, s: str, worker_id: str, outcomes: Sequence[Outcome]) -> set[Any]:
    rows = await db.fetch(q(STORED_BEFORE, s), ([o.handle for o in outcomes], worker_id,
                                                [o.finished_at for o in outcomes]))
    return {(row[0], row[1]) for row in rows}


async def release(db: AsyncSession, s: str, worker_id: str, claims: Sequence[tuple[Any, int]],
                  chan: str | None) -> list[bool]:
    keys = [(handle, attempts) for handle, attempts in claims]
    firsts, sent = _once(keys, lambda claim: claim)
    rows = await db.fetch(q(RELEASE, s), {"seqs": [handle for handle, _ in sent], "worker": worker_id, "chan": chan,
                                          "attempts": [attempts for _, attempts in sent]})
    released = {(row[0], row[1]) for row in rows}
    return [first and claim in released for claim, first in zip(keys, firsts, strict=True)]


async def next_eta(db: AsyncSession, s: str, queues: Sequence[str] | None) -> float | None:
    row = await db.fetchone(q(_with_queues(NEXT_ETA, queues), s), {"queues": None if queues is None else list(queues)})
    return None if row is None else row[0]


async def suspects_waiting(db: AsyncSession, s: str, now: float, queues: Sequence[str] | None) -> bool:
    row = await db.fetchone(q(_with_queues(SUSPECTS_WAITING, queues), s),
                            {"now": now, "queues": None if queues is None else list(queues)})
    return bool(row and row[0])


# -- leases, cancel, retry ------------------------------------------------------------


async def requeue_expired(db: AsyncSession, s: str, now: float, chan: str) -> int:
    params = {"now": now, "error": lost_worker_error(LOST_WORKER_LIMIT), "limit": LOST_WORKER_LIMIT,
              "key": f"sitq sweep {s}", "chan": chan}
    row = await db.fetchone(q(SWEEP, s), params)
    return int(row[0]) if row else 0


async def cancel(db: AsyncSession, s: str, task_id: str, now: float, chan: str) -> CancelOutcome | None:
    async with db.transaction():
        row = await db.fetchone(q(CANCEL, s), {"id": task_id, "now": now})
        if row is None:
            return None
        outcome = _cancel_outcome(row[0])
        if outcome is not CancelOutcome.FINISHED:
            await db.fetch(q(NOTIFY, s), (chan, "c"))
    return outcome


def _cancel_outcome(status: str) -> CancelOutcome:
    if status in ("pending", "waiting"):
        return CancelOutcome.CANCELLED
    if status == "running":
        return CancelOutcome.REQUESTED
    return CancelOutcome.FINISHED


async def retry_by_hand(db: AsyncSession, s: str, task_ids: Sequence[str], now: float,
                        chan: str) -> dict[str, RetryOutcome]:
    async with db.transaction():
        rows = await db.fetch(q(RETRY_BY_HAND, s), {"ids": list(task_ids), "now": now})
        found = {task_id: retry(TaskStatus.read(status)) for task_id, status in rows}
        if RetryOutcome.RETRIED in found.values():
            await db.fetch(q(NOTIFY, s), (chan, "e"))
    done: dict[str, RetryOutcome] = {}
    for task_id in task_ids:  # an id named twice: the second time it is pending already
        if task_id in found:
            done[task_id] = RetryOutcome.UNFINISHED if task_id in done and found[task_id] is RetryOutcome.RETRIED \
                else found[task_id]
    return done


async def set_progress(
    db: AsyncSession, s: str, worker_id: str,
    progress: Sequence[tuple[Any, int, float | None, float | None, str | None]], chan: str | None,
) -> bool:
    seqs, attempts, done, total, messages = (list(column) for column in zip(*progress, strict=True))
    row = await db.fetchone(q(SET_PROGRESS, s), {"seqs": seqs, "attempts": attempts, "done": done, "total": total,
                                                 "messages": messages, "worker": worker_id, "chan": chan})
    return row is not None


# -- readers -----------------------------------------------------------------------


def result(row: Sequence[Any]) -> Result:
    task_id, name, status, value, error, tb, enqueued, started, finished, attempts, output, value_signature = row
    return Result(
        task_id=task_id, name=name, status=TaskStatus.read(status), value=value, error=error, traceback=tb,
        enqueued_at=to_datetime(enqueued), started_at=to_datetime(started), finished_at=to_datetime(finished),
        attempts=attempts, output=output, value_signature=value_signature,
    )


def info(row: Sequence[Any]) -> TaskInfo:
    (task_id, name, status, enqueued, eta, started, finished, attempts, worker_id, done, total, message, error,
     queue, priority, group_id, key) = row
    return TaskInfo(
        task_id=task_id, name=name, status=TaskStatus.read(status), enqueued_at=to_datetime(enqueued),
        eta=to_datetime(eta), started_at=to_datetime(started), finished_at=to_datetime(finished), attempts=attempts,
        worker_id=worker_id, progress_done=done, progress_total=total, progress_message=message, error=error,
        queue=queue, priority=priority, group_id=group_id, key=key,
    )


def schedule_info(row: Sequence[Any]) -> ScheduleInfo:
    name, task_name, queue, every, cron, tz, next_run, last_run = row
    return ScheduleInfo(name, task_name, queue, every, cron, tz, to_datetime(next_run), to_datetime(last_run))


async def overview(db: AsyncSession, s: str, limit: int) -> QueueOverview:
    """Everything a board shows, in one snapshot; each part reads a bounded number of rows."""
    async with db.transaction():
        await db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        counted = await db.fetch(q(SELECT_COUNTS, s))
        lists = [await db.fetch(q(statement, s), (limit,))
                 for statement in (SELECT_RECENT, SELECT_RUNNING, SELECT_FAILURES)]
        groups = [await group_info(db, s, row) for row in await db.fetch(q(NEWEST_GROUPS, s), (limit,))]
        plans = [schedule_info(row) for row in await db.fetch(q(SELECT_SCHEDULES, s))]
    counts: dict[str, int] = dict.fromkeys(STATES, 0)
    queues: dict[str, dict[str, int]] = {}
    for queue, status, n in counted:
        state = TaskStatus.read(status)
        counts[state] = counts.get(state, 0) + int(n)
        per_queue = queues.setdefault(queue, dict.fromkeys(STATES, 0))
        per_queue[state] = per_queue.get(state, 0) + int(n)
    recent, running, failures = ([info(row) for row in rows] for rows in lists)
    return QueueOverview(counts, recent, dict(sorted(queues.items())), running, failures, groups, plans)


async def group_info(db: AsyncSession, s: str, row: Sequence[Any]) -> GroupInfo:
    group_id, name, created = row
    counts: dict[str, int] = dict.fromkeys(STATES, 0)
    for status, n in await db.fetch(q(GROUP_COUNTS, s), (group_id,)):
        key = TaskStatus.read(status)
        counts[key] = counts.get(key, 0) + int(n)
    return GroupInfo(group_id, name, to_datetime(created), counts)


async def group(db: AsyncSession, s: str, group_id: str) -> GroupInfo | None:
    row = await db.fetchone(q(SELECT_GROUP, s), (group_id,))
    return None if row is None else await group_info(db, s, row)


async def find_tasks(
    db: AsyncSession, s: str, statuses: Sequence[str] | None, queue: str | None, group_id: str | None, limit: int,
    offset: int, newest_first: bool,
) -> list[TaskInfo]:
    order = "DESC" if newest_first else "ASC"
    where: list[str] = []
    params: list[Any] = []
    if statuses is not None:
        wanted = list(dict.fromkeys(str(x) for x in statuses))
        if not wanted:
            return []
        # One test a state, each written as a literal so that PostgreSQL picks that state's partial index.
        known = [x for x in wanted if x in STATES]
        tests = [f"status = '{x}'" for x in known]
        if len(known) < len(wanted):
            tests.append("status = ANY(%s)")
            params.append([x for x in wanted if x not in STATES])
        where.append("(" + " OR ".join(tests) + ")")
    if queue is not None:
        where.append("queue = %s")
        params.append(queue)
    if group_id is not None:
        where.append("group_id = %s")
        params.append(group_id)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    statement = f"SELECT {INFO_COLUMNS} FROM {{s}}.tasks {clause} ORDER BY seq {order} LIMIT %s OFFSET %s"
    return [info(row) for row in await db.fetch(q(statement, s), (*params, limit, offset))]


async def match_ids(db: AsyncSession, s: str, fragment: str, limit: int) -> list[str]:
    if await db.fetchone(q(SELECT_ID, s), (fragment,)) is not None:
        return [fragment]
    found = [row[0] for row in await db.fetch(q(IDS_STARTING, s), (fragment, fragment + "\U0010ffff", limit))]
    found += [row[0] for row in await db.fetch(q(IDS_ENDING, s), (len(fragment), fragment, limit))]
    return sorted(set(found))[:limit]


async def match_group_ids(db: AsyncSession, s: str, fragment: str, limit: int) -> list[str]:
    if await db.fetchone(q(SELECT_GROUP_ID, s), (fragment,)) is not None:
        return [fragment]
    found = [row[0] for row in await db.fetch(q(GROUP_IDS_STARTING, s), (fragment, fragment + "\U0010ffff", limit))]
    found += [row[0] for row in await db.fetch(q(GROUP_IDS_ENDING, s), (len(fragment), fragment, limit))]
    return sorted(set(found))[:limit]


# -- retention -------------------------------------------------------------------------


async def prune_batch(db: AsyncSession, s: str, now: float, limit: int) -> tuple[int, int]:
    sizes = [row[0] or 0 for row in await db.fetch(q(PRUNE, s), (now, limit))]
    return len(sizes), sum(sizes)


async def purge_batch(
    db: AsyncSession, s: str, statuses: Sequence[str], before: float | None, after: int, limit: int
) -> tuple[int, int, int]:
    rows = await db.fetch(q(PURGE, s), {"statuses": list(statuses), "before": before, "after": after,
                                        "limit": limit})
    last = max((row[0] for row in rows), default=after)
    return len(rows), sum(row[1] or 0 for row in rows), last


async def count_purge(db: AsyncSession, s: str, statuses: Sequence[str], before: float | None) -> tuple[int, int]:
    row = await db.fetchone(q(COUNT_PURGE, s), {"statuses": list(statuses), "before": before})
    assert row is not None
    return int(row[0]), int(row[1])


# -- schedules -----------------------------------------------------------------------


async def set_schedule(db: AsyncSession, s: str, x: Schedule, chan: str) -> None:
    async with db.transaction():
        await db.execute(q(SET_SCHEDULE, s), (x.name, x.task_name, x.func, x.args, x.signature, x.every, x.cron, x.tz,
                                              x.next_run, x.last_run, x.queue, x.priority, x.max_attempts,
                                              x.retention))
        await db.fetch(q(NOTIFY, s), (chan, "s"))


async def fire_schedule(
    db: AsyncSession, s: str, name: str, due: float, next_run: float, task: NewTask, chan: str
) -> bool:
    async with db.transaction():
        fired = await db.execute(q(FIRE_SCHEDULE, s), (next_run, due, name, due)) == 1
        if fired:
            await insert_full(db, s, [task], chan, if_absent=True)
    return fired


async def set_meta_if_absent(db: AsyncSession, s: str, key: str, value: str) -> tuple[str, bool]:
    """What is recorded under ``key`` now, and whether this call recorded it."""
    row = await db.fetchone(q(INSERT_META_IF_ABSENT, s), (key, value, key))
    if row is None:  # another transaction inserted it after this one's snapshot: read it now
        row = await db.fetchone(q(SELECT_META, s), (key,))
        assert row is not None
        return row[0], False
    return row[0], bool(row[1])
