"""The tables of a PostgreSQL queue, created on first use, and the check of their version.

A queue lives in one schema of a database (``sitq`` unless told otherwise), so several queues
can share a database, each in a schema of its own. The schema is created inside one
transaction, under an advisory lock, so two processes starting on an empty database at the
same moment create it once; its version is recorded in the ``meta`` table. A database whose
queue was written by a newer sitq is refused with :class:`sitq.errors.SchemaVersionError`.

Counts per queue and state (``overview``) and per group and state (``group``) are kept in the
transaction of every statement that inserts, moves or deletes tasks, one aggregated row change
per (queue, state) and statement, never by counting rows: a statement that inserts or moves tasks
writes them itself (``COUNT_ADDED``, ``COUNT_MOVES``: CTEs beside its own), deletes are
counted by a statement trigger. They are spread over ``COUNT_SHARDS`` rows per (queue, state),
chosen by the writing connection's server process, so that many workers finishing tasks at once
do not queue up behind one counter row; readers add the shards up.

Schema version 2 moved the counts of inserts and moves out of statement triggers into the
statements, which spares every claim, outcome and enqueue a trigger call and its transition
tables; it also added an index of the tasks of no group (boards beside a big group). A version 1
queue is migrated on first use. Stop every older sitq process on the queue
before: they would insert and move tasks without counting them.
"""

from __future__ import annotations

import re

from sitq.backends.postgres.driver import AsyncSession
from sitq.backends.rules import dependency_error
from sitq.core import CANCELLED, FAILED, TaskStatus
from sitq.errors import BackendError, SchemaVersionError

__all__ = ["SCHEMA_VERSION", "DEFAULT_SCHEMA", "COUNT_SHARDS", "check_schema_name", "channel", "ensure_schema"]

SCHEMA_VERSION = 2
DEFAULT_SCHEMA = "sitq"
COUNT_SHARDS = 16

_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

# The counts per queue and state, and per group and state, are written by the statement that moves
# tasks, in a CTE of its own beside the rows it inserts (``added``: queue, status, group_id) or moves
# (``moved``: the same, and was_queue, was_status, was_group from before). One counter row change per
# (queue, state) and statement, on this session's shard; ordered, so that two sessions on one shard
# take the counter rows' locks in the same order.
SHARD = f"mod(pg_backend_pid(), {COUNT_SHARDS})"

COUNT_ADDED = f"""counted AS (
    INSERT INTO {{s}}.counts AS c (queue, status, shard, n)
    SELECT queue, status, {SHARD}, count(*) FROM added GROUP BY queue, status ORDER BY queue, status
    ON CONFLICT (queue, status, shard) DO UPDATE SET n = c.n + excluded.n
), grouped AS (
    INSERT INTO {{s}}.group_counts AS c (group_id, status, shard, n)
    SELECT group_id, status, {SHARD}, count(*) FROM added WHERE group_id IS NOT NULL
    GROUP BY group_id, status ORDER BY group_id, status
    ON CONFLICT (group_id, status, shard) DO UPDATE SET n = c.n + excluded.n
)"""

COUNT_MOVES = f"""counted AS (
    INSERT INTO {{s}}.counts AS c (queue, status, shard, n)
    SELECT queue, status, {SHARD}, sum(d) FROM (
        SELECT queue, status, 1 AS d FROM moved UNION ALL SELECT was_queue, was_status, -1 FROM moved
    ) m GROUP BY queue, status HAVING sum(d) <> 0 ORDER BY queue, status
    ON CONFLICT (queue, status, shard) DO UPDATE SET n = c.n + excluded.n
), grouped AS (
    INSERT INTO {{s}}.group_counts AS c (group_id, status, shard, n)
    SELECT group_id, status, {SHARD}, sum(d) FROM (
        SELECT group_id, status, 1 AS d FROM moved WHERE group_id IS NOT NULL
        UNION ALL SELECT was_group, was_status, -1 FROM moved WHERE was_group IS NOT NULL
    ) m GROUP BY group_id, status HAVING sum(d) <> 0 ORDER BY group_id, status
    ON CONFLICT (group_id, status, shard) DO UPDATE SET n = c.n + excluded.n
)"""

# What stays in triggers: the counts of deleted tasks (prune and purge, a batch at a time: one
# statement trigger), with a group going with the last of its tasks; and the settling of the tasks
# that run after a task that finished (a row trigger whose WHEN spares every other row the call).
TRIGGERS = """
CREATE FUNCTION {s}.count_deleted() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
    INSERT INTO {s}.counts AS c (queue, status, shard, n)
        SELECT queue, status, {shard}, -count(*) FROM old_rows GROUP BY queue, status ORDER BY queue, status
        ON CONFLICT (queue, status, shard) DO UPDATE SET n = c.n + excluded.n;
    INSERT INTO {s}.group_counts AS c (group_id, status, shard, n)
        SELECT group_id, status, {shard}, -count(*) FROM old_rows WHERE group_id IS NOT NULL
        GROUP BY group_id, status ORDER BY group_id, status
        ON CONFLICT (group_id, status, shard) DO UPDATE SET n = c.n + excluded.n;
    DELETE FROM {s}.groups g WHERE g.id IN (SELECT DISTINCT group_id FROM old_rows WHERE group_id IS NOT NULL)
        AND NOT EXISTS (SELECT 1 FROM {s}.tasks t WHERE t.group_id = g.id);
    DELETE FROM {s}.group_counts gc
        WHERE gc.group_id IN (SELECT DISTINCT group_id FROM old_rows WHERE group_id IS NOT NULL)
        AND NOT EXISTS (SELECT 1 FROM {s}.groups g WHERE g.id = gc.group_id);
    RETURN NULL;
END
$body$;
CREATE TRIGGER tasks_count_delete AFTER DELETE ON {s}.tasks
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION {s}.count_deleted();
-- rules.dependency_finished, on every path that finishes a task (an outcome, a cancel, an expired
-- lease), in the transaction that finishes it: a task that succeeded releases the tasks waiting for
-- it; one that failed or was cancelled cancels them, which in turn (this trigger again) settles the
-- tasks waiting for those. The moves are counted here, as every statement counts its own.
CREATE FUNCTION {s}.settle_dependents() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
    IF NEW.status = 'success' THEN
        WITH moved AS (
            UPDATE {s}.tasks SET waiting = waiting - 1,
                status = CASE WHEN waiting <= 1 THEN 'pending' ELSE 'waiting' END
            WHERE seq IN (SELECT task FROM {s}.deps WHERE dep = NEW.seq) AND status = 'waiting'
            RETURNING queue, status, group_id, queue AS was_queue, 'waiting'::text AS was_status,
                group_id AS was_group
        ), {count_moves}
        DELETE FROM {s}.deps WHERE dep = NEW.seq;
        PERFORM pg_notify('{channel}', 'e');
    ELSE
        WITH moved AS (
            UPDATE {s}.tasks SET status = 'cancelled', finished_at = coalesce(NEW.finished_at, 0),
                expires_at = coalesce(NEW.finished_at, 0) + retention,
                error = format(CASE NEW.status WHEN 'failed' THEN {failed} ELSE {cancelled} END, NEW.id, NEW.name)
            WHERE seq IN (SELECT task FROM {s}.deps WHERE dep = NEW.seq) AND status = 'waiting'
            RETURNING queue, status, group_id, queue AS was_queue, 'waiting'::text AS was_status,
                group_id AS was_group
        ), {count_moves}
        DELETE FROM {s}.deps WHERE dep = NEW.seq;
    END IF;
    UPDATE {s}.tasks SET dependents = 0 WHERE seq = NEW.seq;
    RETURN NULL;
END
$body$;
CREATE TRIGGER tasks_settle AFTER UPDATE ON {s}.tasks FOR EACH ROW
    WHEN (NEW.dependents > 0 AND NEW.status IN ('success', 'failed', 'cancelled'))
    EXECUTE FUNCTION {s}.settle_dependents();
""".replace("{count_moves}", COUNT_MOVES).replace("{shard}", SHARD)

# Every statement's {s} is the schema's quoted name.
TABLES = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE {s}.tasks (
    seq              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id               text COLLATE "C" NOT NULL UNIQUE,
    name             text NOT NULL,
    status           text NOT NULL,
    func             bytea NOT NULL,
    args             bytea NOT NULL,
    signature        bytea,
    max_attempts     integer NOT NULL DEFAULT 1,
    cancel_requested boolean NOT NULL DEFAULT false,
    eta              double precision NOT NULL,
    enqueued_at      double precision NOT NULL,
    started_at       double precision,
    finished_at      double precision,
    attempts         integer NOT NULL DEFAULT 0,
    worker_id        text,
    lease_until      double precision,
    value            bytea,
    error            text,
    traceback        text,
    output           text,
    progress_done    double precision,
    progress_total   double precision,
    progress_message text,
    lost             integer NOT NULL DEFAULT 0,
    value_signature  bytea,
    queue            text NOT NULL DEFAULT 'default',
    priority         integer NOT NULL DEFAULT 0,
    key              text,
    group_id         text,
    retention        double precision,
    expires_at       double precision,
    waiting          integer NOT NULL DEFAULT 0,  -- tasks it runs after that have not succeeded yet
    dependents       integer NOT NULL DEFAULT 0   -- more than 0: tasks run after it, to settle once it finishes
);
-- An insert touches the table, the id index and tasks_ready only (a task of no group tasks_loose
-- too); the other indexes are partial, on rows few writes touch (running, waiting, failed, suspect,
-- grouped, expiring rows).
-- The claim, in claim order: highest priority first, then oldest eta, then enqueue order.
CREATE INDEX tasks_ready ON {s}.tasks (priority DESC, eta, seq) WHERE status = 'pending' AND lost = 0;
CREATE INDEX tasks_suspects ON {s}.tasks (priority DESC, eta, seq) WHERE status = 'pending' AND lost > 0;
CREATE INDEX tasks_running ON {s}.tasks (worker_id, seq) WHERE status = 'running';
CREATE INDEX tasks_waiting ON {s}.tasks (seq) WHERE status = 'waiting';
CREATE INDEX tasks_failed ON {s}.tasks (seq) WHERE status = 'failed';
CREATE INDEX tasks_cancelled ON {s}.tasks (seq) WHERE status = 'cancelled';
CREATE INDEX tasks_members ON {s}.tasks (group_id, seq) WHERE group_id IS NOT NULL;
{loose}
CREATE INDEX tasks_expiry ON {s}.tasks (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX tasks_unsettled ON {s}.tasks (seq)
    WHERE dependents > 0 AND status IN ('success', 'failed', 'cancelled');
-- A task (task) runs after another (dep): one row per edge, until the dependency settles it.
CREATE TABLE {s}.deps (
    dep  bigint NOT NULL,
    task bigint NOT NULL,
    PRIMARY KEY (dep, task)
);
CREATE INDEX deps_task ON {s}.deps (task);
CREATE TABLE {s}.groups (
    id         text PRIMARY KEY,
    name       text NOT NULL,
    created_at double precision NOT NULL
);
CREATE INDEX groups_newest ON {s}.groups (created_at);
CREATE TABLE {s}.counts (
    queue  text NOT NULL,
    status text NOT NULL,
    shard  integer NOT NULL,
    n      bigint NOT NULL,
    PRIMARY KEY (queue, status, shard)
);
CREATE TABLE {s}.group_counts (
    group_id text NOT NULL,
    status   text NOT NULL,
    shard    integer NOT NULL,
    n        bigint NOT NULL,
    PRIMARY KEY (group_id, status, shard)
);
CREATE TABLE {s}.schedules (
    name         text PRIMARY KEY,
    task_name    text NOT NULL,
    func         bytea NOT NULL,
    args         bytea NOT NULL,
    signature    bytea,
    every        double precision,
    cron         text,
    tz           text NOT NULL,
    next_run     double precision NOT NULL,
    last_run     double precision,
    queue        text NOT NULL,
    priority     integer NOT NULL,
    max_attempts integer NOT NULL,
    retention    double precision
);
-- Facts about the store: its schema version, whether its payloads are signed.
CREATE TABLE {s}.meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);
""" + TRIGGERS

# Version 2: the tasks of no group by state, in enqueue order, so that a board finds the few beside
# a big group without reading the group's rows. Running rows are left out: a claim adds nothing to
# it (the running are found in tasks_running), so a loose task is entered when it is stored and
# when it finishes, and a grouped one never.
LOOSE = "CREATE INDEX tasks_loose ON {s}.tasks (status, seq) WHERE group_id IS NULL AND status <> 'running';"

# Each step takes a schema from the version before it to the next one, in one transaction.
MIGRATIONS: dict[int, str] = {
    # 1 -> 2: the counts of inserts and moves go from the statement triggers to the statements,
    # and the tasks of no group get their index.
    1: """
DROP TRIGGER tasks_count_insert ON {s}.tasks;
DROP TRIGGER tasks_count_update ON {s}.tasks;
DROP TRIGGER tasks_count_delete ON {s}.tasks;
DROP FUNCTION {s}.count_tasks();
""" + TRIGGERS + LOOSE,
}


def check_schema_name(schema: str) -> str:
    if not isinstance(schema, str) or not _NAME.fullmatch(schema):
        raise ValueError(
            f"a sitq schema name is 1 to 63 lowercase letters, digits and underscores, starting with a letter "
            f"or underscore (as PostgreSQL folds unquoted names); {schema!r} is not one"
        )
    return schema


def channel(schema: str) -> str:
    """The LISTEN/NOTIFY channel of the queue in ``schema``."""
    return f"sitq_{schema}"[:63]


def tables(schema: str) -> str:
    return _filled(TABLES.replace("{loose}", LOOSE), schema)


def _filled(ddl: str, schema: str) -> str:
    return (ddl.replace("{s}", f'"{schema}"').replace("{channel}", channel(schema))
            .replace("{failed}", _error_format(FAILED)).replace("{cancelled}", _error_format(CANCELLED)))


def _error_format(status: TaskStatus) -> str:
    """``rules.dependency_error`` as a SQL literal for ``format(literal, id, name)``: the rule's words
    stay in one place."""
    text = dependency_error("\x00id\x00", "\x00name\x00", status).replace("%", "%%")
    text = text.replace("\x00id\x00", "%1$s").replace("\x00name\x00", "%2$s")
    return "'" + text.replace("'", "''") + "'"


async def ensure_schema(session: AsyncSession, schema: str, read_only: bool, where: str) -> None:
    """Create the queue's tables in ``schema`` if they are not there, or check their version.

    ``where`` names the store in messages (its address, password masked).
    """
    version = await _version(session, schema, where)
    if version == SCHEMA_VERSION or (read_only and version):  # an older version reads as it is (reads are alike)
        return
    if read_only:
        raise BackendError(
            f"there is no sitq queue in schema {schema!r} of {where} yet; start a worker or a queue on it first"
        )
    async with session.transaction():
        # One process creates it; another that comes at the same moment waits here, then finds it.
        await session.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"sitq schema {schema}",))
        version = await _version(session, schema, where)
        if version == 0:
            await session.execute(tables(schema))
            await session.execute(f'INSERT INTO "{schema}".meta VALUES (%s, %s)',
                                  ("schema_version", str(SCHEMA_VERSION)))
        else:
            for step in range(version, SCHEMA_VERSION):
                await session.execute(_filled(MIGRATIONS[step], schema))
            await session.execute(f'UPDATE "{schema}".meta SET value = %s WHERE key = %s',
                                  (str(SCHEMA_VERSION), "schema_version"))


async def _version(session: AsyncSession, schema: str, where: str) -> int:
    """The sitq schema version in ``schema``, 0 if there are no sitq tables there; raises if the schema
    holds a newer version, or tables that are not sitq's."""
    # From the catalog's tables, not to_regclass: after waiting for the advisory lock, this statement's
    # snapshot sees the tables another process just created; the catalog cache may not yet.
    rows = await session.fetch("SELECT tablename FROM pg_catalog.pg_tables WHERE schemaname = %s "
                               "AND tablename IN ('meta', 'tasks')", (schema,))
    names = {row[0] for row in rows}
    if "meta" not in names:
        if "tasks" in names:
            raise BackendError(
                f"schema {schema!r} of {where} holds a table 'tasks' that sitq did not create; give sitq "
                "a schema of its own (schema=... or ?schema=... in the URL)"
            )
        return 0
    found = await session.fetchone(f'SELECT value FROM "{schema}".meta WHERE key = %s', ("schema_version",))
    version = int(found[0]) if found is not None and str(found[0]).isdigit() else 0
    if version == 0:
        raise BackendError(
            f"schema {schema!r} of {where} has a table 'meta' with no sitq schema version; give sitq "
            "a schema of its own (schema=... or ?schema=... in the URL)"
        )
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"the sitq queue in schema {schema!r} of {where} was written by a newer sitq (schema version "
            f"{version}; this sitq reads up to {SCHEMA_VERSION}); upgrade sitq (pip install -U 'sitq[postgres]')"
        )
    return version
