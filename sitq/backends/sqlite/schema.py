"""The SQLite file itself: its schema and upgrades, opening it, and checking it is sitq's.

Only reads happen until a file is known to be sitq's (or new and empty): another
application's database is left exactly as it was. SQLite's errors are turned
into messages that say what to do here, in one place (:func:`translate`).
"""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path

from sitq.errors import BackendError, SchemaVersionError

__all__ = ["SCHEMA_VERSION", "APPLICATION_ID", "MEMORY", "open_file", "connect_file", "parse_path",
           "file_identity", "is_busy", "translate", "stand_in_for_older"]

MEMORY = ":memory:"

SCHEMA_VERSION = 4
APPLICATION_ID = 0x73697471  # "sitq"

# States counted from their partial indexes; the others are counted in sitq_totals as tasks move.
UNFINISHED = "('pending', 'waiting', 'running')"

TASKS_TABLE = """
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
    value_signature  BLOB,
    queue            TEXT    NOT NULL DEFAULT 'default',
    priority         INTEGER NOT NULL DEFAULT 0,
    key              TEXT,
    group_id         TEXT,
    retention        REAL,
    expires_at       REAL,
    waiting          INTEGER NOT NULL DEFAULT 0,  -- tasks it runs after that have not succeeded yet
    dependents       INTEGER NOT NULL DEFAULT 0   -- more than 0: tasks run after it, to settle once it finishes
);
-- Facts about the store itself, such as whether its payloads must be signed.
CREATE TABLE sitq_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE INDEX sitq_tasks_leases ON sitq_tasks (worker_id, lease_until) WHERE status = 'running';
CREATE INDEX sitq_tasks_suspects ON sitq_tasks (eta, seq) WHERE status = 'pending' AND lost > 0;
"""

# What version 3 adds. Each index costs every write that touches it about as much as the write
# itself, so an insert touches only the table, the id index and sitq_ready (and, for a task of no
# group, sitq_loose of version 4); the other indexes are partial, on rows that few writes touch
# (running, waiting, failed, grouped, expiring rows).
VERSION_3 = f"""
-- The claim: pending tasks of a queue, highest priority first, then oldest eta, then enqueue order;
-- also the next eta and the count of pending tasks. Finished rows are not in it, however many.
CREATE INDEX sitq_ready ON sitq_tasks (queue, priority DESC, eta, seq) WHERE status = 'pending';
CREATE INDEX sitq_waiting ON sitq_tasks (queue) WHERE status = 'waiting';
CREATE INDEX sitq_failures ON sitq_tasks (seq) WHERE status = 'failed';
CREATE INDEX sitq_cancelled ON sitq_tasks (seq) WHERE status = 'cancelled';
CREATE INDEX sitq_members ON sitq_tasks (group_id, status) WHERE group_id IS NOT NULL;
CREATE INDEX sitq_expiry ON sitq_tasks (expires_at) WHERE expires_at IS NOT NULL;
-- Rows sitq did not write: a pending task whose eta is text or bytes is never due (see statements).
CREATE INDEX sitq_unreadable_etas ON sitq_tasks (seq) WHERE status = 'pending' AND typeof(eta) IN ('text', 'blob');
CREATE INDEX sitq_unsettled ON sitq_tasks (seq)
    WHERE dependents > 0 AND status IN ('success', 'failed', 'cancelled');
-- A task (seq) runs after another (dep): one row per edge, until the dependency settles it.
CREATE TABLE sitq_deps (
    dep  INTEGER NOT NULL,
    task INTEGER NOT NULL,
    PRIMARY KEY (dep, task)
) WITHOUT ROWID;
CREATE INDEX sitq_deps_task ON sitq_deps (task);
-- Counts of tasks per queue in every state but the unfinished ones, kept in the transaction that
-- moves a task (by the triggers below) or inserts it (by the insert itself: a trigger on every
-- insert would cost each enqueue as much as the insert), so counting never reads finished rows.
CREATE TABLE sitq_totals (
    queue  TEXT    NOT NULL,
    status TEXT    NOT NULL,
    n      INTEGER NOT NULL,
    PRIMARY KEY (queue, status)
) WITHOUT ROWID;
CREATE TRIGGER sitq_totals_leave AFTER UPDATE OF status, queue ON sitq_tasks
WHEN old.status NOT IN {UNFINISHED} AND (old.status IS NOT new.status OR old.queue IS NOT new.queue)
BEGIN
    UPDATE sitq_totals SET n = n - 1 WHERE queue = old.queue AND status = old.status;
END;
CREATE TRIGGER sitq_totals_enter AFTER UPDATE OF status, queue ON sitq_tasks
WHEN new.status NOT IN {UNFINISHED} AND (old.status IS NOT new.status OR old.queue IS NOT new.queue)
BEGIN
    INSERT INTO sitq_totals VALUES (new.queue, new.status, 1) ON CONFLICT (queue, status) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER sitq_totals_delete AFTER DELETE ON sitq_tasks WHEN old.status NOT IN {UNFINISHED}
BEGIN
    UPDATE sitq_totals SET n = n - 1 WHERE queue = old.queue AND status = old.status;
END;
-- Groups (map(..., group=...)), and their counts in every state, kept the same way (an enqueue adds
-- its tasks to the counts itself, once per batch).
CREATE TABLE sitq_groups (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX sitq_groups_newest ON sitq_groups (created_at);
CREATE TABLE sitq_group_counts (
    group_id TEXT    NOT NULL,
    status   TEXT    NOT NULL,
    n        INTEGER NOT NULL,
    PRIMARY KEY (group_id, status)
) WITHOUT ROWID;
CREATE TRIGGER sitq_group_update AFTER UPDATE OF status, group_id ON sitq_tasks
WHEN (old.group_id IS NOT NULL OR new.group_id IS NOT NULL)
    AND (old.status IS NOT new.status OR old.group_id IS NOT new.group_id)
BEGIN
    UPDATE sitq_group_counts SET n = n - 1 WHERE group_id = old.group_id AND status = old.status;
    INSERT INTO sitq_group_counts SELECT new.group_id, new.status, 1 WHERE new.group_id IS NOT NULL
        ON CONFLICT (group_id, status) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER sitq_group_delete AFTER DELETE ON sitq_tasks WHEN old.group_id IS NOT NULL
BEGIN
    UPDATE sitq_group_counts SET n = n - 1 WHERE group_id = old.group_id AND status = old.status;
    DELETE FROM sitq_groups WHERE id = old.group_id
        AND NOT EXISTS (SELECT 1 FROM sitq_group_counts WHERE group_id = old.group_id AND n > 0);
    DELETE FROM sitq_group_counts WHERE group_id = old.group_id
        AND NOT EXISTS (SELECT 1 FROM sitq_groups WHERE id = old.group_id);
END;
-- Periodic tasks: each tick is enqueued by the first worker to see it due (sitq.backends.rules).
CREATE TABLE sitq_schedules (
    name         TEXT    PRIMARY KEY,
    task_name    TEXT    NOT NULL,
    func         BLOB    NOT NULL,
    args         BLOB    NOT NULL,
    signature    BLOB,
    every        REAL,
    cron         TEXT,
    tz           TEXT    NOT NULL,
    next_run     REAL    NOT NULL,
    last_run     REAL,
    queue        TEXT    NOT NULL,
    priority     INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    retention    REAL
);
"""

# What version 4 adds: the tasks of no group by state, in enqueue order, so that a board finds
# the few beside a big group without reading the group's rows. Running rows are left out (a claim
# then costs this index nothing; the running are found in their own index), so a loose task
# touches it when it is stored and when it finishes, and a grouped one never.
VERSION_4 = """
CREATE INDEX sitq_loose ON sitq_tasks (status, seq) WHERE group_id IS NULL AND status <> 'running';
"""

SCHEMA = TASKS_TABLE + VERSION_3 + VERSION_4

# Each step takes a file from the version before it to the next one, in one transaction.
MIGRATIONS = {
    1: """
ALTER TABLE sitq_tasks ADD COLUMN lost INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sitq_tasks ADD COLUMN value_signature BLOB;
CREATE TABLE sitq_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE INDEX sitq_tasks_suspects ON sitq_tasks (eta, seq) WHERE status = 'pending' AND lost > 0;
""",
    # Tasks stored before version 3 are in the default queue at priority 0 and are kept for ever.
    2: f"""
ALTER TABLE sitq_tasks ADD COLUMN queue TEXT NOT NULL DEFAULT 'default';
ALTER TABLE sitq_tasks ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sitq_tasks ADD COLUMN key TEXT;
ALTER TABLE sitq_tasks ADD COLUMN group_id TEXT;
ALTER TABLE sitq_tasks ADD COLUMN retention REAL;
ALTER TABLE sitq_tasks ADD COLUMN expires_at REAL;
ALTER TABLE sitq_tasks ADD COLUMN waiting INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sitq_tasks ADD COLUMN dependents INTEGER NOT NULL DEFAULT 0;
DROP INDEX sitq_tasks_state;
{VERSION_3}
INSERT INTO sitq_totals SELECT queue, status, count(*) FROM sitq_tasks WHERE status NOT IN {UNFINISHED}
    GROUP BY queue, status;
""",
    3: VERSION_4,
}

# A file of an older version opened read-only is not upgraded (nothing may be written), so its
# reader connections see it through temporary views that stand in for what the version lacks:
# the columns with the values an upgrade would give them, the tables empty, the counts counted.
MISSING_COLUMNS = {  # version -> columns that version lacks beyond the next one's
    1: "0 AS lost, NULL AS value_signature",
    2: "'default' AS queue, 0 AS priority, NULL AS key, NULL AS group_id, NULL AS retention, NULL AS expires_at, "
       "0 AS waiting, 0 AS dependents",
}
STAND_INS = {  # version -> views of the tables it lacks
    1: ["CREATE TEMP VIEW sitq_meta AS SELECT NULL AS key, NULL AS value WHERE 0"],
    2: [
        "CREATE TEMP VIEW sitq_deps AS SELECT NULL AS dep, NULL AS task WHERE 0",
        f"CREATE TEMP VIEW sitq_totals AS SELECT queue, status, count(*) AS n FROM temp.sitq_tasks "
        f"WHERE status NOT IN {UNFINISHED} GROUP BY queue, status",
        "CREATE TEMP VIEW sitq_groups AS SELECT NULL AS id, NULL AS name, NULL AS created_at WHERE 0",
        "CREATE TEMP VIEW sitq_group_counts AS SELECT NULL AS group_id, NULL AS status, NULL AS n WHERE 0",
        "CREATE TEMP VIEW sitq_schedules AS SELECT NULL AS name, NULL AS task_name, NULL AS func, NULL AS args, "
        "NULL AS signature, NULL AS every, NULL AS cron, NULL AS tz, NULL AS next_run, NULL AS last_run, "
        "NULL AS queue, NULL AS priority, NULL AS max_attempts, NULL AS retention WHERE 0",
    ],
}


def parse_path(path: str | os.PathLike[str]) -> str:
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


def connect_file(path: str, read_only: bool, create: bool = True) -> sqlite3.Connection:
    """A raw connection: read-only ones cannot write to the file, create it, or change its mode;
    with ``create=False`` a missing file is an error rather than a new empty database."""
    if (read_only or not create) and path != MEMORY:
        mode = "ro" if read_only else "rw"
        return sqlite3.connect(
            Path(path).resolve().as_uri() + f"?mode={mode}", uri=True, isolation_level=None, check_same_thread=False
        )
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False)


def open_file(path: str, read_only: bool) -> sqlite3.Connection:
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
        conn = connect_file(path, read_only)
    except sqlite3.Error as exc:
        raise translate(exc, path) from exc
    try:
        conn.execute("PRAGMA busy_timeout = 0")  # never wait inside SQLite: sitq's retry waits without blocking
        _ensure_schema(conn, path, read_only)
        if path != MEMORY and not read_only:
            conn.execute("PRAGMA journal_mode = WAL")  # only now that the file is known to be sitq's
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # a helper checkpoints, off the event loop
    except sqlite3.Error as exc:
        conn.close()
        if is_busy(exc):
            raise
        raise translate(exc, path) from exc
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
        stand_in_for_older(conn, version)  # read as it is; the next worker or queue upgrades it
        return
    if version == 0:
        # Freed pages go back to the file system as prunes run (PRAGMA incremental_vacuum). Only a
        # file with no tables yet can take this; an older sitq's file keeps its mode (VACUUM changes it).
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
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


def file_identity(path: str) -> tuple[str, int, int] | None:
    """(absolute path, device, inode) of the file just opened; absolute because a task may chdir."""
    if path == MEMORY:
        return None
    absolute = os.path.abspath(path)
    try:
        st = os.stat(absolute)
    except OSError:
        return None
    return absolute, st.st_dev, st.st_ino


def stand_in_for_older(conn: sqlite3.Connection, version: int | None = None) -> None:
    """On a read-only connection to a file of an older schema version, create the temporary views
    that let every reader read it as if it were of this version (a no-op for a current file)."""
    if version is None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    upto = max(MISSING_COLUMNS) + 1  # later versions add indexes only: such a file is read as it is
    if not 0 < version < upto:
        return
    columns = ", ".join(MISSING_COLUMNS[v] for v in range(version, upto))
    conn.execute(f"CREATE TEMP VIEW sitq_tasks AS SELECT *, {columns} FROM main.sitq_tasks")
    for v in range(version, upto):
        for view in STAND_INS[v]:
            conn.execute(view)


def _execute_script(conn: sqlite3.Connection, script: str) -> None:
    """Run each statement of ``script`` inside the caller's transaction (``executescript`` would
    commit it first); a trigger's body holds semicolons, so statements end where SQLite says."""
    statement = ""
    for piece in script.split(";"):
        statement += piece + ";"
        if sqlite3.complete_statement(statement):
            if statement.strip(" \n;"):
                conn.execute(statement)
            statement = ""


def is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11 on, as are the constants
    if code is not None and sys.version_info >= (3, 11):
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    text = str(exc)
    return "database is locked" in text or "database table is locked" in text


def translate(exc: sqlite3.Error, path: str, read_only: bool = False) -> BackendError:
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
