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
           "file_identity", "is_busy", "translate"]

MEMORY = ":memory:"

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


def _execute_script(conn: sqlite3.Connection, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


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
