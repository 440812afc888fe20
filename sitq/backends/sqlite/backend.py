"""The :class:`SQLiteBackend` class (connections, the busy retry, the contract's methods) and its
helper threads: the change watcher, the offload and checkpoint helpers, and heartbeats."""

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
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, overload

from sitq.backends.base import Backend
from sitq.backends.notify import ChangeNotifier
from sitq.backends.rules import PRUNE_BATCH, CancelOutcome, RetryOutcome
from sitq.backends.sqlite import rows as readers
from sitq.backends.sqlite import schema
from sitq.backends.sqlite import statements as sql
from sitq.backends.sqlite.schema import MEMORY
from sitq.core import (
    FINISHED_STATES,
    ClaimedTask,
    Enqueued,
    GroupInfo,
    NewTask,
    Outcome,
    PurgeReport,
    QueueOverview,
    Result,
    Schedule,
    ScheduleInfo,
    TaskInfo,
    TaskStatus,
)
from sitq.errors import BackendError

__all__ = ["SQLiteBackend"]

log = logging.getLogger("sitq.backends.sqlite")

T = TypeVar("T")
# A job for a helper thread: called with the helper's connection and its stop event.
Job = Callable[[sqlite3.Connection, threading.Event], Any]

# Work on more rows than this runs on a helper thread: at a few microseconds a row, the loop
# would otherwise be blocked for longer than a few milliseconds.
OFFLOAD_ROWS = 500
# The most rows a worker's finish-and-claim touches in one transaction, and the most tasks
# it claims at once: about 2 ms of statements, and of unpickling what it claimed.
BATCH_ROWS = 128
# A checkpoint is due once the loop's connection committed this many writes, or changed this
# many rows, since the last one: both stand for about the 1,000 pages written after which
# SQLite's own automatic checkpoint (off here) would come. A commit writes a few pages however
# few rows it changes; a worker's batch of 128 outcomes and claims, a few dozen.
CHECKPOINT_COMMITS = 1000
CHECKPOINT_ROWS = 10_000
LOCK_GRACE = 0.0005  # seconds the loop waits for its connection's lock before it sleeps and tries again


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
        self.finishes = ChangeNotifier(on_watch=self._on_watch)  # the changes that may finish a task
        self.path = schema.parse_path(path)
        self.read_only = bool(read_only)
        if self.read_only and self.path == MEMORY:
            raise ValueError("a ':memory:' store cannot be opened read-only: it starts empty")
        self.lock_timeout = lock_timeout
        self.change_check_interval = change_check_interval
        self._lock = threading.RLock()  # guards the loop's connection
        self._conn: sqlite3.Connection | None = None
        self._opened: tuple[str, int, int] | None = None  # (absolute path, device, inode) of the file at open
        self._watcher: ChangeWatcher | None = None
        self._threads_lock = threading.Lock()  # guards the helpers and heartbeats below
        self._helpers: dict[str, Helper] = {}
        self._heartbeats: set[Heartbeat] = set()
        self._checkpoint_mark = 0  # the loop connection's total_changes at the last checkpoint request
        self._commits = 0  # its writes that changed something since then
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
                self._conn = schema.open_file(self.path, self.read_only)
                self._opened = schema.file_identity(self.path)

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
            self._checkpoint_mark = self._commits = 0
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
                if not schema.is_busy(exc):
                    raise schema.translate(exc, self.path) from exc
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
    async def _run(self, fn: Callable[..., tuple[T, int]], *args: Any, write: Literal[True]) -> T: ...

    async def _run(self, fn: Callable[..., Any], *args: Any, write: bool = False) -> Any:
        """Run ``fn(conn, *args)`` under the lock, retrying while another process holds the lock."""
        if self._conn is None:
            await self.connect()
        conn = self._connection()
        lock = self._lock
        delay = 0.001
        deadline = None
        finished = False
        while True:
            # Never block the loop for long for the lock: a helper thread may hold it (in-memory
            # stores), or another loop's thread sharing this backend; then wait as for another
            # process. The change watcher holds it for one PRAGMA: worth a moment's wait.
            if lock.acquire(timeout=LOCK_GRACE):
                try:
                    result = fn(conn, *args)
                    if write:
                        result, changed = result
                        if changed:  # a write that changed nothing must not wake anyone, or idle workers spin
                            self.changes.mark()
                            if changed != sql.NONE_FINISHED:
                                finished = True
                                self.finishes.mark()
                            self._commits += 1
                            if (self._commits >= CHECKPOINT_COMMITS
                                    or conn.total_changes - self._checkpoint_mark >= CHECKPOINT_ROWS):
                                self._checkpoint_mark, self._commits = conn.total_changes, 0
                                self._request_checkpoint()
                    break
                except sqlite3.Error as exc:
                    if conn.in_transaction:
                        conn.rollback()
                    if not schema.is_busy(exc):
                        raise schema.translate(exc, self.path, self.read_only) from exc
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
            if finished:
                self.finishes.wake()
        return result

    def _write(self, fn: Callable[..., tuple[T, int]], *args: Any) -> Coroutine[Any, Any, T]:
        """Run ``fn(conn, *args) -> (result, changed)`` as ``_run`` does, and move the change
        token (waking waiters) if it changed anything. (It hands back ``_run``'s coroutine rather
        than awaiting it: one coroutine fewer on every write.)"""
        return self._run(fn, *args, write=True)

    # -- helper threads ----------------------------------------------------

    async def _offload(self, job: Callable[[sqlite3.Connection, threading.Event], T]) -> T:
        """Run ``job(conn, stopped)`` on the helper thread and await its result; the loop stays free.

        The job gets the helper's connection and its stop event, for ``_call_here``.
        """
        if self._conn is None:
            await self.connect()  # the file is opened and checked by the loop's connection first
        return await asyncio.wrap_future(self._helper("offload").submit(job))

    def _helper(self, kind: str) -> Helper:
        with self._threads_lock:
            helper = self._helpers.get(kind)
            if helper is None:
                helper = self._helpers[kind] = Helper(self, kind)
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
            conn = schema.connect_file(opened[0], self.read_only, create=False)
        except sqlite3.Error as exc:
            raise schema.translate(exc, self.path) from exc
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
            if self.read_only:
                schema.stand_in_for_older(conn)  # what an older file lacks, as its main connection sees it
        except sqlite3.Error as exc:
            conn.close()
            raise schema.translate(exc, self.path) from exc
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
                if not schema.is_busy(exc):
                    raise schema.translate(exc, self.path) from exc
            else:
                if write:
                    result, changed = result
                    if changed == sql.NONE_FINISHED:
                        self.changes.notify()
                    elif changed:
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
            self._helper("checkpoint").submit(self._checkpoint).add_done_callback(log_failure)
        except BackendError:  # closing
            self._checkpoint_queued = False

    def _checkpoint(self, conn: sqlite3.Connection, stopped: threading.Event) -> None:
        self._checkpoint_queued = False
        if self._moved() is not None:
            return  # the WAL is named after the path: it must not meet another file there
        # PASSIVE: copies what no reader still needs, without waiting for or blocking anyone.
        # Another process checkpointing at the same time is not an error (it reports busy).
        conn.execute(sql.CHECKPOINT).fetchall()

    def start_heartbeat(
        self, worker_id: str, lease: float, clock: Callable[[], float] = time.time
    ) -> Heartbeat:
        self._connection()
        heartbeat = Heartbeat(self, worker_id, lease, clock)
        with self._threads_lock:
            self._heartbeats.add(heartbeat)
        heartbeat.start()
        return heartbeat

    # -- producers ---------------------------------------------------------

    async def enqueue(self, tasks: Sequence[NewTask]) -> list[Enqueued]:
        plain = sql.is_plain(tasks)
        if len(tasks) <= OFFLOAD_ROWS:
            return await self._write(sql.insert if plain else sql.insert_full, tasks)

        def unstage(conn: sqlite3.Connection, stopped: threading.Event) -> None:
            self._call_here(conn, sql.execute_count, (sql.UNSTAGE, ()), stopped)

        def job(conn: sqlite3.Connection, stopped: threading.Event) -> list[Enqueued]:  # all tasks or none
            if not plain:
                return cast("list[Enqueued]", self._call_here(conn, sql.insert_full, (tasks,), stopped, write=True))
            self._call_here(conn, sql.stage, (tasks,), stopped)
            try:
                done: list[Enqueued] = self._call_here(conn, sql.insert_staged, (tasks,), stopped, write=True)
            except BaseException:
                unstage(conn, stopped)
                raise
            # Emptying the stage takes a while for a big batch (0.05 s or more for 100,000 rows); the
            # caller need not wait for it. This helper's next job, which may stage again, runs after it
            # (were it to fail, the next big batch would fail on its ids, not store them twice).
            with contextlib.suppress(BackendError):  # closing: the stage goes with the connection
                helper.submit(unstage).add_done_callback(_log_unstage_failure)
            self._request_checkpoint()
            return done

        if self._conn is None:
            await self.connect()
        helper = self._helper("offload")
        return await asyncio.wrap_future(helper.submit(job))

    # -- workers -----------------------------------------------------------

    async def claim(
        self,
        worker_id: str,
        limit: int,
        now: float,
        lease_until: float,
        *,
        alone: bool = True,
        queues: Sequence[str] | None = None,
    ) -> list[ClaimedTask]:
        return (await self.finish_and_claim(worker_id, (), limit, now, lease_until, alone=alone, queues=queues))[1]

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
        queues: Sequence[str] | None = None,
    ) -> tuple[list[bool], list[ClaimedTask]]:
        # At most BATCH_ROWS rows per transaction, and as many tasks claimed (the worker claims
        # more on its next round): at concurrency 8, runs of short tasks would otherwise finish
        # and claim 512 tasks at once, blocking the loop for tens of milliseconds for the
        # statements and for unpickling what was claimed. A bigger batch goes in slices, each
        # its own transaction, with the loop running in between.
        limit = min(limit, BATCH_ROWS)
        names = None if queues is None else tuple(queues)
        if len(outcomes) + limit <= BATCH_ROWS:
            return await self._write(sql.finish_and_claim, worker_id, outcomes, limit, now, lease_until, alone, names)
        stored: list[bool] = []
        for first in range(0, len(outcomes), BATCH_ROWS):
            await asyncio.sleep(0)
            batch = outcomes[first : first + BATCH_ROWS]
            stored += (await self._write(sql.finish_and_claim, worker_id, batch, 0, now, 0, False, names))[0]
        claimed: list[ClaimedTask] = []
        if limit > 0:
            await asyncio.sleep(0)
            claimed = (
                await self._write(sql.finish_and_claim, worker_id, (), limit, now, lease_until, alone, names)
            )[1]
        return stored, claimed

    async def release(self, worker_id: str, claims: Sequence[tuple[Any, int]]) -> list[bool]:
        if not claims:
            return []
        return await self._write(sql.release, worker_id, claims)

    async def suspects_waiting(self, now: float, queues: Sequence[str] | None = None) -> bool:
        return await self._run(sql.suspects_waiting, now, queues)

    async def next_eta(self, queues: Sequence[str] | None = None) -> float | None:
        return await self._run(sql.next_eta, queues)

    async def renew(self, worker_id: str, lease_until: float) -> int:
        return await self._run(sql.execute_count, sql.RENEW_LEASES, (lease_until, worker_id))

    async def requeue_expired(self, now: float) -> int:
        return await self._write(sql.requeue_expired, now)

    async def cancel(self, task_id: str, now: float) -> CancelOutcome | None:
        return await self._write(sql.cancel, task_id, now)

    async def retry(self, task_ids: Sequence[str], now: float) -> dict[str, RetryOutcome]:
        ids = list(task_ids)
        if len(ids) <= OFFLOAD_ROWS:
            return await self._write(sql.retry_by_hand, ids, now)

        def job(conn: sqlite3.Connection, stopped: threading.Event) -> dict[str, RetryOutcome]:
            return cast("dict[str, RetryOutcome]",
                        self._call_here(conn, sql.retry_by_hand, (ids, now), stopped, write=True))

        return await self._offload(job)

    async def cancel_requests(self, worker_id: str) -> list[str]:
        return [row[0] for row in await self._run(sql.fetch_all, sql.SELECT_CANCEL_REQUESTS, (worker_id,))]

    async def set_progress(
        self, worker_id: str, progress: Sequence[tuple[Any, int, float | None, float | None, str | None]]
    ) -> None:
        rows = [
            (done, total, message, handle, attempts, worker_id) for handle, attempts, done, total, message in progress
        ]
        await self._write(sql.set_progress, rows)

    # -- readers -----------------------------------------------------------

    async def fetch_result(self, task_id: str) -> Result | None:
        row = await self._run(sql.fetch_result, task_id)
        return None if row is None else readers.result(row)

    async def fetch_results(self, task_ids: Sequence[str]) -> dict[str, Result]:
        ids = json.dumps(list(task_ids))
        if len(task_ids) <= OFFLOAD_ROWS:
            rows = await self._run(sql.fetch_all, sql.SELECT_RESULTS, (ids,))
            return {row[0]: readers.result(row) for row in rows}

        def job(conn: sqlite3.Connection, stopped: threading.Event) -> dict[str, Result]:
            rows = self._call_here(conn, sql.fetch_all, (sql.SELECT_RESULTS, (ids,)), stopped)
            return {row[0]: readers.result(row) for row in rows}

        return await self._offload(job)

    async def fetch_info(self, task_ids: Sequence[str]) -> dict[str, TaskInfo]:
        if len(task_ids) <= OFFLOAD_ROWS:
            return readers.infos(await self._run(sql.fetch_all, sql.SELECT_INFO, (json.dumps(list(task_ids)),)))

        def job(conn: sqlite3.Connection, stopped: threading.Event) -> dict[str, TaskInfo]:
            rows = self._call_here(conn, sql.fetch_all, (sql.SELECT_INFO, (json.dumps(list(task_ids)),)), stopped)
            return readers.infos(rows, share_gil=True)

        return await self._offload(job)

    async def overview(self, limit: int) -> QueueOverview:
        return await self._read_off_loop(sql.overview, limit)

    async def find_tasks(
        self,
        *,
        statuses: Sequence[TaskStatus | str] | None = None,
        queue: str | None = None,
        group_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
        newest_first: bool = True,
    ) -> list[TaskInfo]:
        wanted = None if statuses is None else [str(s) for s in statuses]
        return await self._read_off_loop(sql.find_tasks, wanted, queue, group_id, limit, offset, newest_first)

    async def match_ids(self, fragment: str, limit: int = 2) -> list[str]:
        return await self._read_off_loop(sql.match_ids, fragment, limit)  # an id's end is found by a scan

    async def group(self, group_id: str) -> GroupInfo | None:
        return await self._run(sql.group, group_id)

    async def match_group_ids(self, fragment: str, limit: int = 2) -> list[str]:
        return await self._run(sql.match_group_ids, fragment, limit)  # few groups: the scan is short

    async def find_ungrouped(
        self,
        *,
        statuses: Sequence[TaskStatus | str] | None = None,
        limit: int = 100,
        offset: int = 0,
        newest_first: bool = True,
    ) -> list[TaskInfo]:
        wanted = None if statuses is None else [str(s) for s in statuses]
        return await self._read_off_loop(sql.find_ungrouped, wanted, limit, offset, newest_first)

    async def count_ungrouped(self) -> dict[str, int]:
        # Off the loop, as overview: the unfinished states are counted from their partial indexes.
        return await self._read_off_loop(sql.count_ungrouped)

    async def cancel_group(self, group_id: str, now: float) -> dict[CancelOutcome, int]:
        # A group may hold a million pending tasks: cancel them off the loop.
        def job(conn: sqlite3.Connection, stopped: threading.Event) -> dict[CancelOutcome, int]:
            return cast("dict[CancelOutcome, int]",
                        self._call_here(conn, sql.cancel_group, (group_id, now), stopped, write=True))

        return await self._offload(job)

    async def _read_off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(conn, *args)`` on the helper thread: a read whose cost may grow with the store."""

        def job(conn: sqlite3.Connection, stopped: threading.Event) -> T:
            return cast(T, self._call_here(conn, fn, args, stopped))

        return await self._offload(job)

    # -- retention ---------------------------------------------------------

    async def prune(self, now: float, limit: int) -> PurgeReport:
        def job(conn: sqlite3.Connection, stopped: threading.Event) -> PurgeReport:
            tasks = size = 0
            while tasks < limit and not stopped.is_set():
                batch = min(PRUNE_BATCH, limit - tasks)
                removed, nbytes = self._call_here(conn, sql.prune_batch, (now, batch), stopped, write=True)
                tasks, size = tasks + removed, size + nbytes
                if removed < batch:
                    break
            if tasks:
                self._call_here(conn, sql.give_back_space, (), stopped)
            return PurgeReport(tasks, size)

        return await self._offload(job)

    async def purge(
        self, *, statuses: Sequence[TaskStatus | str], finished_before: float | None, dry_run: bool = False
    ) -> PurgeReport:
        wanted = [str(s) for s in statuses if s in FINISHED_STATES]

        def job(conn: sqlite3.Connection, stopped: threading.Event) -> PurgeReport:
            if dry_run:
                tasks, size = self._call_here(conn, sql.count_purge, (wanted, finished_before), stopped)
                return PurgeReport(tasks, size, dry_run=True)
            tasks = size = last = 0
            while not stopped.is_set():
                args = (wanted, finished_before, last, PRUNE_BATCH)
                removed, nbytes, last = self._call_here(conn, sql.purge_batch, args, stopped, write=True)
                tasks, size = tasks + removed, size + nbytes
                if removed < PRUNE_BATCH:
                    break
            if tasks:
                self._call_here(conn, sql.give_back_space, (), stopped)
            return PurgeReport(tasks, size)

        return await self._offload(job)

    # -- schedules ---------------------------------------------------------

    async def set_schedule(self, schedule: Schedule) -> None:
        await self._write(sql.set_schedule, schedule)

    async def delete_schedule(self, name: str) -> bool:
        return await self._write(sql.delete_schedule, name)

    async def schedules(self) -> list[ScheduleInfo]:
        rows = await self._run(sql.fetch_all, sql.SELECT_SCHEDULES, ())
        return [readers.schedule_info(row) for row in rows]

    async def due_schedules(self, now: float) -> list[Schedule]:
        return [readers.schedule(row) for row in await self._run(sql.fetch_all, sql.DUE_SCHEDULES, (now,))]

    async def fire_schedule(self, name: str, due: float, next_run: float, now: float, task: NewTask) -> bool:
        return await self._write(sql.fire_schedule, name, due, next_run, task)

    # -- facts about the store -------------------------------------------------

    async def get_meta(self, key: str) -> str | None:
        return await self._run(sql.get_meta, key)

    async def set_meta_if_absent(self, key: str, value: str) -> str:
        return await self._write(sql.set_meta_if_absent, key, value)

    # -- change notification -------------------------------------------------

    @property
    def finish_token(self) -> int:
        return self.finishes.token

    async def wait_for_finish(self, token: int, timeout: float | None) -> None:
        await self.finishes.wait(token, timeout)

    def store_before_claim(self, outcomes: int) -> bool:
        # Statements run on the loop's thread: a batch of outcomes and a claim of as many tasks
        # (then unpickled) are two steps of the loop rather than one twice as long.
        return outcomes > 1 or self.finishes.has_watchers

    def notify_change(self) -> None:
        self.changes.notify()
        self.finishes.notify()  # a change seen from elsewhere may be anything

    def _on_watch(self) -> None:
        if self.is_memory:
            return  # nobody outside this object can write to it
        watcher = self._watcher
        if watcher is None:
            with self._lock:
                if self._watcher is None:
                    self._watcher = ChangeWatcher(self)
                    self._watcher.start()
                watcher = self._watcher
        watcher.wanted.set()


# A heartbeat renews leases this many times per lease: with a 1 s lease, a renewal that another
# process's write transaction holds up for 0.8 s still comes in time.
RENEWALS_PER_LEASE = 5

class ChangeWatcher(threading.Thread):
    """Notices commits by other connections while something waits for a change.

    It asks the loop's own connection when it can (``data_version`` moves for every
    connection's commits but that connection's own), so the backend's own writes, which
    woke their waiters already, do not wake them a second time a moment later; its side
    connection only while the loop's is closed.
    """

    # How often it looks: fastest just after a change (an answer to it, such as a result for a
    # task just enqueued, tends to follow within milliseconds), at change_check_interval while
    # changes keep coming, and seldom once the store has been quiet for a while.
    HOT_FOR = 0.02
    HOT_SPEEDUP = 4
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
                if not (backend.changes.has_watchers or backend.finishes.has_watchers):
                    self.wanted.clear()
                    if not (backend.changes.has_watchers or backend.finishes.has_watchers):
                        self.wanted.wait()
                    continue
                since = time.monotonic() - last_change
                interval = backend.change_check_interval
                if since < self.HOT_FOR:
                    interval /= self.HOT_SPEEDUP
                elif since > self.QUIET_AFTER:
                    interval = self.SLOWEST
                self._stopped.wait(interval)
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


class Helper(threading.Thread):
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
        self._jobs: queue.SimpleQueue[tuple[Job, concurrent.futures.Future[Any]] | None] = queue.SimpleQueue()
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
        self, job: Job, fut: concurrent.futures.Future[Any], conn: sqlite3.Connection | None
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


class Heartbeat(threading.Thread):
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
                    backend._call_here(conn, sql.renew, args, self._stopped, slowest=0.002)
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


def _log_unstage_failure(fut: concurrent.futures.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("sitq: emptying the staging table after a bulk enqueue failed (%s)", fut.exception())


def log_failure(fut: concurrent.futures.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("sitq: a WAL checkpoint failed (%s); the next one tries again", fut.exception())
