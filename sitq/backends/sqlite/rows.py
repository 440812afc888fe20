"""Reading rows into sitq's records, including rows sitq did not write.

SQLite lets any value into any column, so a row may hold what sitq never wrote
(a hand edit, another program). Reading never fails on such a row: a claimed
one comes back with ``ClaimedTask.problem`` naming the column, for the worker to
fail that task alone; readers get what can be shown (see ``sitq.core``); text
that is not UTF-8 is read with replacement characters instead of failing the
whole statement.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar, cast

from sitq.core import (
    STATES,
    ClaimedTask,
    GroupInfo,
    Result,
    Schedule,
    ScheduleInfo,
    TaskInfo,
    TaskStatus,
    to_datetime,
)

T = TypeVar("T")

def infos(rows: Iterable[Any], share_gil: bool = False) -> dict[str, TaskInfo]:
    """The records keyed by id. On a helper thread (``share_gil``), let the event loop's thread
    take the GIL every few hundred records instead of waiting out Python's 5 ms switch interval."""
    if not share_gil:
        return {row[0]: info(row) for row in rows}
    infos = {}
    for i, row in enumerate(rows, 1):
        infos[row[0]] = info(row)
        if i % 256 == 0:
            time.sleep(0)
    return infos


def result(row: Sequence[Any]) -> Result:
    task_id, name, status, value, error, tb, enqueued, started, finished, attempts, output, value_signature = row
    return Result(
        task_id=task_id if type(task_id) is str else cast(str, text(task_id)),  # NOT NULL: never None
        name=name if type(name) is str else cast(str, text(name)),
        status=TaskStatus.read(status if type(status) is str else text(status)),
        value=value,  # as stored: deserialize_result names it if it is not bytes
        error=text(error),
        traceback=text(tb),
        enqueued_at=to_datetime(enqueued),
        started_at=to_datetime(started),
        finished_at=to_datetime(finished),
        attempts=attempts if type(attempts) is int else _whole(attempts),
        output=text(output),
        value_signature=value_signature if isinstance(value_signature, bytes) else None,
    )


def info(row: Sequence[Any]) -> TaskInfo:
    (task_id, name, status, enqueued, eta, started, finished, attempts, worker_id, done, total, message, error,
     queue, priority, group_id, key) = row
    # The inline checks keep the usual row, which holds only what sitq writes, fast.
    return TaskInfo(
        task_id=task_id if type(task_id) is str else cast(str, text(task_id)),  # NOT NULL: never None
        name=name if type(name) is str else cast(str, text(name)),
        status=TaskStatus.read(status if type(status) is str else text(status)),
        enqueued_at=to_datetime(enqueued),
        eta=to_datetime(eta),
        started_at=to_datetime(started),
        finished_at=to_datetime(finished),
        attempts=attempts if type(attempts) is int else _whole(attempts),
        worker_id=worker_id if type(worker_id) is str else text(worker_id),
        progress_done=done if done is None or type(done) is float else _number(done),
        progress_total=total if total is None or type(total) is float else _number(total),
        progress_message=message if message is None else text(message),
        error=error if error is None else text(error),
        queue=queue if type(queue) is str else cast(str, text(queue)),  # NOT NULL: never None
        priority=priority if type(priority) is int else (_whole(priority) or 0),
        group_id=group_id if group_id is None or type(group_id) is str else text(group_id),
        key=key if key is None or type(key) is str else text(key),
    )


def group(row: Sequence[Any], counts: Iterable[tuple[Any, Any]]) -> GroupInfo:
    """A group from its ``(id, name, created_at)`` row and its ``(status, n)`` counts."""
    group_id, name, created = row
    full: dict[str, int] = dict.fromkeys(STATES, 0)
    for status, n in counts:
        key = TaskStatus.read(text(status))
        full[key] = full.get(key, 0) + (n if type(n) is int else 0)
    return GroupInfo(cast(str, text(group_id)), cast(str, text(name)), to_datetime(created), full)


def schedule_info(row: Sequence[Any]) -> ScheduleInfo:
    name, task_name, queue, every, cron, tz, next_run, last_run = row
    return ScheduleInfo(
        cast(str, text(name)), cast(str, text(task_name)), cast(str, text(queue)), _number(every), text(cron),
        cast(str, text(tz)), to_datetime(next_run), to_datetime(last_run),
    )


def schedule(row: Sequence[Any]) -> Schedule:
    return Schedule(*row)


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


def read(conn: sqlite3.Connection, read: Callable[[], T]) -> T:
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


def claimed_rows(conn: sqlite3.Connection, cursor: sqlite3.Cursor) -> list[Any]:
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


def claimed(row: Sequence[Any]) -> ClaimedTask:
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


def text(value: object) -> str | None:
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
