"""The :class:`PostgresBackend` class (its connection, reconnecting, rate-limited notices, the contract's
methods) and its side thread, which listens for other processes' notices and renews leases."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
import urllib.parse
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from sitq.backends.base import Backend
from sitq.backends.postgres import driver, schema
from sitq.backends.postgres import statements as sql
from sitq.backends.postgres.driver import AsyncSession, SideSession
from sitq.backends.rules import PRUNE_BATCH, CancelOutcome, RetryOutcome
from sitq.core import (
    FINISHED_STATES,
    STATES,
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

__all__ = ["PostgresBackend", "BATCH_ROWS", "RENEWALS_PER_LEASE"]

log = logging.getLogger("sitq.backends.postgres")

T = TypeVar("T")

# The most tasks a worker claims at once, and the most outcomes one statement stores.
BATCH_ROWS = 128
# A heartbeat renews leases this many times per lease.
RENEWALS_PER_LEASE = 5
# The side thread's longest wait for a notice: how soon it sees a new heartbeat or a stop.
SIDE_WAIT = 0.2


class PostgresBackend(Backend):
    """Tasks and results in a PostgreSQL database, shared by workers on many machines.

    ``dsn`` is a libpq address, ``postgresql://user@host:5432/database`` (or ``host=... dbname=...``);
    what it leaves out comes from the ``PG*`` environment variables, ``PGPASSWORD`` and ``~/.pgpass``,
    as for ``psql``. The queue lives in the schema ``schema`` (``sitq`` by default; also
    ``?schema=name`` in a URL), created with its tables on first use, so several queues can share
    a database. With ``read_only`` nothing is created or written (``sitq status``).

    A process uses at most two connections to the server: one for statements (on whichever event
    loop calls it; calls from another thread's loop wait their turn) and one, on a thread of its
    own, that LISTENs for other processes' notices and renews this process's leases. A lost
    connection (a server restart, a failover) is opened again with backoff for up to
    ``reconnect_timeout`` seconds before a statement fails with ``BackendError``; a statement
    whose answer was lost is checked (did it commit?) before it is tried again, so no task is
    claimed twice or lost. Claims commit without waiting for the disk: a server crash (not a
    restart) may undo the last of them, and those tasks run again. Other processes are told of
    changes with NOTIFY, at most one notice every ``notify_interval`` seconds from the busy paths
    (enqueue, finish, progress), the others folded into a trailing one; waiters also look again
    every ``check_interval`` seconds, in case a notice was missed.

    The password never shows: ``repr``, errors and logs name the store by :attr:`target`.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        read_only: bool = False,
        reconnect_timeout: float = 60.0,
        notify_interval: float = 0.002,
        check_interval: float = 2.0,
    ) -> None:
        super().__init__()
        if not isinstance(dsn, str) or not dsn.strip():
            raise TypeError(f"PostgresBackend needs a DSN such as postgresql://user@host/database, not {dsn!r}")
        from sitq.backends import describe_target

        libpq_dsn, url_schema = _split_schema(dsn)
        if schema is not None and url_schema is not None and schema != url_schema:
            raise ValueError(
                f"two schemas given: schema={schema!r} and ?schema={url_schema} in the URL; give one"
            )
        self.schema = schema_name = _schema_from(schema if schema is not None else url_schema)
        self.target = describe_target(dsn)
        self.read_only = bool(read_only)
        self.reconnect_timeout = reconnect_timeout
        self.notify_interval = notify_interval
        self.check_interval = check_interval
        self.channel = _channel(schema_name)
        try:
            driver.conninfo(libpq_dsn, "sitq")
        except ValueError as exc:
            raise ValueError(f"{self.target}: {self._scrub(str(exc), libpq_dsn)}") from None
        self._dsn = libpq_dsn
        self._password = _password(libpq_dsn)
        self._session: AsyncSession | None = None
        self._ever_connected = False
        self._own_pids: set[int] = set()
        self._loop_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self._busy = threading.Lock()  # the statement connection: one caller at a time, from any loop
        self._holder: tuple[object, asyncio.AbstractEventLoop] | None = None  # who holds it, on which loop
        self._holder_lock = threading.Lock()
        self._side: SideThread | None = None
        self._side_lock = threading.Lock()
        self._last_notice = 0.0
        self._trailing: asyncio.TimerHandle | None = None
        self._trailing_loop: asyncio.AbstractEventLoop | None = None
        self._trailing_tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        mode = ", read_only=True" if self.read_only else ""
        return f"PostgresBackend({self.target!r}, schema={self.schema!r}{mode})"

    # -- connection ----------------------------------------------------------

    async def _hold(self) -> object:
        """Take the statement connection (``_busy``), waiting while another thread's loop uses it; returns
        the token that gives it back (:meth:`_let_go`)."""
        delay = 0.001
        while not self._busy.acquire(blocking=False):
            self._take_from_ended_loop()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.01)
        holder = object()
        self._holder = (holder, asyncio.get_running_loop())
        return holder

    def _let_go(self, holder: object) -> None:
        with self._holder_lock:
            if self._holder is not None and self._holder[0] is holder:  # not taken from it meanwhile
                self._holder = None
                self._busy.release()

    def _take_from_ended_loop(self) -> None:
        """Free the statement connection if its holder's event loop has closed (an ``asyncio.run()``
        that returned while a call of its loop, a held-back notice say, was unfinished): that call
        will never end, and without this every later call would wait for it for ever. Its statement
        may have been half sent, so the connection is dropped; the next call opens another."""
        with self._holder_lock:
            holder = self._holder
            if holder is None or not holder[1].is_closed():
                return
            self._holder = None
            session, self._session = self._session, None
            if session is not None:
                session.abandon()
            self._last_notice = float("-inf")  # what it held back goes with the next notice
            self._busy.release()

    async def connect(self) -> None:
        """Connect, and create the queue's schema or check its version. Safe to call twice."""
        await self._call(lambda db, retrying: _nothing())

    async def close(self) -> None:
        self._take_from_ended_loop()  # a statement left unfinished there would hold the session for ever
        side, self._side = self._side, None
        if side is not None:
            side.stop()
        owed = self._trailing is not None or bool(self._trailing_tasks)
        if self._trailing is not None:
            self._trailing.cancel()
            self._trailing = None
        for task in list(self._trailing_tasks):
            if not task.get_loop().is_closed():
                task.cancel()
        self._trailing_tasks.clear()
        session, self._session = self._session, None
        if owed and session is not None and session.usable:  # the notice held back is sent before leaving
            try:
                await session.fetch(sql.q(sql.NOTIFY, self.schema), (self.channel, "e"))
            except (driver.Lost, driver.DriverError):
                pass
        if session is not None:
            await session.close()

    async def ensure_same_store(self) -> None:
        """A server has no file to be replaced: nothing to check."""

    def _conninfo(self) -> str:
        """The DSN for libpq, naming this process in ``pg_stat_activity`` (application_name ``sitq PID``)
        unless the DSN names an application itself."""
        return driver.conninfo(self._dsn, f"sitq {os.getpid()}")

    def _loop_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = self._loop_locks.get(loop)
        if lock is None:
            lock = self._loop_locks[loop] = asyncio.Lock()
        return lock

    async def _open(self) -> AsyncSession:
        session = await AsyncSession.connect(self._conninfo(), self.read_only)
        try:
            await schema.ensure_schema(session, self.schema, self.read_only, self.target)
        except BaseException:
            await session.close()
            raise
        self._own_pids.add(session.pid)
        if self._ever_connected:
            log.warning("%s: connected again", self.target)
            self.changes.notify()  # what changed while this process was away: everyone looks again
        self._ever_connected = True
        return session

    async def _call(self, op: Callable[[AsyncSession, bool], Awaitable[T]], changed: bool | None = None) -> T:
        """Run ``op(session, retrying)`` on the statement connection, one caller at a time.

        A lost connection is opened again with backoff, up to ``reconnect_timeout``, and ``op`` run
        again with ``retrying`` true: it then first finds out what its lost attempt did. Other driver
        errors become ``BackendError``. ``changed`` (or a result that is truthy, if None) moves the
        change token after the statement committed.
        """
        async with self._loop_lock():
            holder = await self._hold()
            try:
                result = await self._attempts(op)
            finally:
                self._let_go(holder)
        if changed if changed is not None else bool(result):
            self.changes.notify()
        return result

    async def _attempts(self, op: Callable[[AsyncSession, bool], Awaitable[T]]) -> T:
        retrying = False
        deadline: float | None = None
        delay = 0.05
        while True:
            try:
                session = self._session
                if session is None or not session.usable:
                    if session is not None:
                        session.abandon()
                    self._session = None
                    session = self._session = await self._open()
                return await op(session, retrying)
            except driver.Lost as exc:
                if self._session is not None:
                    self._session.abandon()
                    self._session = None
                if not self._ever_connected:
                    raise BackendError(
                        f"cannot connect to the sitq queue at {self.target}: {self._scrub(str(exc))}; check that "
                        "the server runs and the address, user and password (PGPASSWORD, ~/.pgpass) are right"
                    ) from None
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.reconnect_timeout
                    log.warning("%s: lost the connection (%s); connecting again for up to %g s",
                                self.target, self._scrub(str(exc)), self.reconnect_timeout)
                elif now >= deadline:
                    raise BackendError(
                        f"lost the connection to the sitq queue at {self.target} and could not connect again "
                        f"for {self.reconnect_timeout:g} s ({self._scrub(str(exc))}); check the server"
                    ) from None
                retrying = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            except driver.Conflict as exc:
                raise BackendError(f"{self.target}: a task id is stored twice ({self._scrub(str(exc))}); "
                                   "task ids are unique") from None
            except driver.DriverError as exc:
                raise BackendError(f"sitq queue at {self.target}: {self._scrub(str(exc))}") from None

    def _scrub(self, text: str, dsn: str | None = None) -> str:
        """``text`` with the password taken out, wherever a driver may have put it."""
        password = _password(dsn) if dsn is not None else self._password
        return text.replace(password, "***") if password else text

    # -- notices to other processes ----------------------------------------------

    def _gate(self, may_wait: bool = False) -> str | None:
        """The channel to NOTIFY on now, or None if a notice went out less than ``notify_interval`` ago:
        then a trailing notice follows once the interval has passed (a NOTIFY takes a lock at commit
        that every notifying transaction in the server waits for, so busy paths send few). With
        ``may_wait`` (enqueues, which come in runs) it may wait one interval more for a statement
        to carry it; a finish notice, which a client may be waiting for, goes out on time."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        wait = self._last_notice + self.notify_interval - now
        if wait <= 0:
            self._last_notice = now
            return self.channel
        if self._trailing is not None and self._trailing_loop is not None and self._trailing_loop.is_closed():
            self._trailing = None  # its loop ended before it fired: the next one takes its place
        if self._trailing is None:
            self._trailing, self._trailing_loop = loop.call_later(wait, self._send_trailing, now,
                                                                  not may_wait), loop
        return None

    def _send_trailing(self, held_at: float, on_time: bool) -> None:
        """Send the notice held back at ``held_at``, unless a later statement carried one (its commit
        comes after what was held back, so it covers it). Unless ``on_time``, while a statement runs
        (the next one usually carries it) it waits one more interval rather than send a statement
        of its own."""
        loop = asyncio.get_running_loop()
        self._trailing = None
        if self._last_notice > held_at:
            return
        if self._busy.locked() and not on_time:
            self._trailing, self._trailing_loop = loop.call_later(self.notify_interval, self._send_trailing,
                                                                  held_at, True), loop
            return
        self._last_notice = loop.time()
        task = asyncio.ensure_future(self._trailing_notice())
        self._trailing_tasks.add(task)
        task.add_done_callback(self._trailing_tasks.discard)

    async def _trailing_notice(self) -> None:
        try:
            await self._call(lambda db, retrying: db.fetch(sql.q(sql.NOTIFY, self.schema), (self.channel, "e")),
                             changed=False)
        except BackendError as exc:  # the waiters' periodic look finds the change instead
            log.warning("%s: could not send a change notice (%s)", self.target, exc)

    # -- producers ---------------------------------------------------------

    async def enqueue(self, tasks: Sequence[NewTask]) -> list[Enqueued]:
        if not tasks:
            return []
        plain = sql.is_plain(tasks)
        s = self.schema
        chan = self._gate(may_wait=True)

        async def op(db: AsyncSession, retrying: bool) -> list[Enqueued]:
            if retrying and plain and (stored := await self._stored(db, tasks)) is not None:
                return stored
            if plain:
                return await sql.insert_plain(db, s, tasks, chan)
            async with db.transaction():
                return await sql.insert_full(db, s, tasks, chan)

        done = await self._call(op, changed=False)
        if plain or any(d is not Enqueued.EXISTING for d in done):
            self.changes.notify()
        return done

    async def _stored(self, db: AsyncSession, tasks: Sequence[NewTask]) -> list[Enqueued] | None:
        """After a lost answer: the enqueue's outcome if it committed (all its tasks are there), None
        if it did not (none are). One transaction, so nothing in between."""
        ids = [t.task_id for t in tasks]
        row = await db.fetchone(sql.q("SELECT count(*) FROM {s}.tasks WHERE id = ANY(%s)", self.schema), (ids,))
        found = row[0] if row else 0
        if found == 0:
            return None
        if found == len(set(ids)):
            return [Enqueued.INSERTED] * len(tasks)
        raise BackendError(f"{self.target}: some of the tasks being enqueued were already stored")

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
        stored: list[bool] = []
        last = max(len(outcomes) - BATCH_ROWS, 0)  # the last slice of outcomes goes with the claim
        for first in range(0, last, BATCH_ROWS):
            stored += await self._finish(worker_id, outcomes[first: min(first + BATCH_ROWS, last)])
        rest = outcomes[last:]
        if not rest and limit <= 0:
            return stored, []
        flags, claimed = await self._finish_and_claim(worker_id, rest, min(limit, BATCH_ROWS), now, lease_until,
                                                      alone, queues)
        return stored + flags, claimed

    async def _finish(self, worker_id: str, outcomes: Sequence[Outcome]) -> list[bool]:
        return (await self._finish_and_claim(worker_id, outcomes, 0, 0.0, 0.0, False, None))[0]

    async def _finish_and_claim(
        self, worker_id: str, outcomes: Sequence[Outcome], limit: int, now: float, lease_until: float, alone: bool,
        queues: Sequence[str] | None,
    ) -> tuple[list[bool], list[ClaimedTask]]:
        """One transaction, one round trip: the outcomes stored, then up to ``limit`` tasks claimed."""
        s = self.schema
        names = None if queues is None else list(queues)
        chan = self._gate() if outcomes else None

        async def op(db: AsyncSession, retrying: bool) -> tuple[list[bool], list[ClaimedTask]]:
            if not retrying:
                return await sql.finish_and_claim(db, s, worker_id, outcomes, chan, limit, now, lease_until, alone,
                                                  names)
            # The lost attempt may have committed: what it stored counts as stored, the rest is tried again,
            # and the tasks it claimed go back, as if never claimed, before the claim is tried again.
            before = await sql.stored_before(db, s, worker_id, outcomes) if outcomes else set()
            if limit > 0:
                await db.execute(sql.q(sql.UNDO_CLAIM, s), (worker_id, now))
            rest = [o for o in outcomes if (o.handle, o.attempts) not in before]
            flags, claimed = await sql.finish_and_claim(db, s, worker_id, rest, self.channel if rest else None,
                                                        limit, now, lease_until, alone, names)
            stored = before | {(o.handle, o.attempts) for o, flag in zip(rest, flags, strict=True) if flag}
            return [(o.handle, o.attempts) in stored for o in outcomes], claimed

        flags, claimed = await self._call(op, changed=False)
        if any(flags) or claimed:
            self.changes.notify()
        return flags, claimed

    async def release(self, worker_id: str, claims: Sequence[tuple[Any, int]]) -> list[bool]:
        if not claims:
            return []
        flags = await self._call(lambda db, r: sql.release(db, self.schema, worker_id, claims, self.channel),
                                 changed=False)
        if any(flags):
            self.changes.notify()
        return flags

    async def suspects_waiting(self, now: float, queues: Sequence[str] | None = None) -> bool:
        return await self._call(lambda db, r: sql.suspects_waiting(db, self.schema, now, queues), changed=False)

    async def next_eta(self, queues: Sequence[str] | None = None) -> float | None:
        return await self._call(lambda db, r: sql.next_eta(db, self.schema, queues), changed=False)

    async def renew(self, worker_id: str, lease_until: float) -> int:
        return await self._call(
            lambda db, r: db.execute(sql.q(sql.RENEW, self.schema), (lease_until, worker_id)), changed=False)

    def start_heartbeat(self, worker_id: str, lease: float, clock: Callable[[], float] = time.time) -> Heartbeat:
        heartbeat = Heartbeat(worker_id, lease, clock)
        self._side_thread().add(heartbeat)
        return heartbeat

    async def requeue_expired(self, now: float) -> int:
        return await self._call(lambda db, r: sql.requeue_expired(db, self.schema, now, self.channel))

    async def cancel(self, task_id: str, now: float) -> CancelOutcome | None:
        outcome = await self._call(lambda db, r: sql.cancel(db, self.schema, task_id, now, self.channel),
                                   changed=False)
        if outcome in (CancelOutcome.CANCELLED, CancelOutcome.REQUESTED):
            self.changes.notify()
        return outcome

    async def retry(self, task_ids: Sequence[str], now: float) -> dict[str, RetryOutcome]:
        if not task_ids:
            return {}
        done = await self._call(lambda db, r: sql.retry_by_hand(db, self.schema, task_ids, now, self.channel),
                                changed=False)
        if RetryOutcome.RETRIED in done.values():
            self.changes.notify()
        return done

    async def cancel_requests(self, worker_id: str) -> list[str]:
        rows = await self._call(
            lambda db, r: db.fetch(sql.q(sql.SELECT_CANCEL_REQUESTS, self.schema), (worker_id,)), changed=False)
        return [row[0] for row in rows]

    async def set_progress(
        self, worker_id: str, progress: Sequence[tuple[Any, int, float | None, float | None, str | None]]
    ) -> None:
        if not progress:
            return
        chan = self._gate()
        await self._call(lambda db, r: sql.set_progress(db, self.schema, worker_id, progress, chan))

    # -- readers -----------------------------------------------------------

    async def fetch_result(self, task_id: str) -> Result | None:
        row = await self._call(lambda db, r: db.fetchone(sql.q(sql.SELECT_RESULT, self.schema), (task_id,)),
                               changed=False)
        return None if row is None else sql.result(row)

    async def fetch_results(self, task_ids: Sequence[str]) -> dict[str, Result]:
        rows = await self._call(lambda db, r: db.fetch(sql.q(sql.SELECT_RESULTS, self.schema), (list(task_ids),)),
                                changed=False)
        return {row[0]: sql.result(row) for row in rows}

    async def fetch_info(self, task_ids: Sequence[str]) -> dict[str, TaskInfo]:
        rows = await self._call(lambda db, r: db.fetch(sql.q(sql.SELECT_INFO, self.schema), (list(task_ids),)),
                                changed=False)
        return {row[0]: sql.info(row) for row in rows}

    async def overview(self, limit: int) -> QueueOverview:
        return await self._call(lambda db, r: sql.overview(db, self.schema, limit), changed=False)

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
        wanted = None if statuses is None else [str(x) for x in statuses]
        return await self._call(
            lambda db, r: sql.find_tasks(db, self.schema, wanted, queue, group_id, limit, offset, newest_first),
            changed=False)

    async def match_ids(self, fragment: str, limit: int = 2) -> list[str]:
        return await self._call(lambda db, r: sql.match_ids(db, self.schema, fragment, limit), changed=False)

    async def group(self, group_id: str) -> GroupInfo | None:
        return await self._call(lambda db, r: sql.group(db, self.schema, group_id), changed=False)

    async def match_group_ids(self, fragment: str, limit: int = 2) -> list[str]:
        return await self._call(lambda db, r: sql.match_group_ids(db, self.schema, fragment, limit), changed=False)

    async def find_ungrouped(
        self,
        *,
        statuses: Sequence[TaskStatus | str] | None = None,
        limit: int = 100,
        offset: int = 0,
        newest_first: bool = True,
    ) -> list[TaskInfo]:
        if statuses is None:
            return await super().find_ungrouped(limit=limit, offset=offset, newest_first=newest_first)
        states = list(dict.fromkeys(str(x) for x in statuses))
        if not states or limit == 0:
            return []
        statement = sql.q(sql.find_ungrouped(states, newest_first), self.schema)
        params = {"states": [s for s in states if s != "running"], "rows": limit + offset,
                  "limit": limit, "offset": offset}
        rows = await self._call(lambda db, r: db.fetch(statement, params), changed=False)
        return [sql.info(row) for row in rows]

    async def count_ungrouped(self) -> dict[str, int]:
        rows = await self._call(lambda db, r: db.fetch(sql.q(sql.COUNT_UNGROUPED, self.schema)), changed=False)
        counts: dict[str, int] = dict.fromkeys(STATES, 0)
        for status, n in rows:
            state = TaskStatus.read(status)
            counts[state] = counts.get(state, 0) + int(n)
        return counts

    # -- retention ---------------------------------------------------------

    async def prune(self, now: float, limit: int) -> PurgeReport:
        tasks = size = 0
        while tasks < limit:
            batch = min(PRUNE_BATCH, limit - tasks)
            removed, nbytes = await self._call(functools.partial(_prune, now=now, limit=batch, schema=self.schema),
                                               changed=False)
            tasks, size = tasks + removed, size + nbytes
            if removed:
                self.changes.notify()
            if removed < batch:
                break
        return PurgeReport(tasks, size)

    async def purge(
        self, *, statuses: Sequence[TaskStatus | str], finished_before: float | None, dry_run: bool = False
    ) -> PurgeReport:
        wanted = [str(x) for x in statuses if x in FINISHED_STATES]
        if dry_run:
            tasks, size = await self._call(lambda db, r: sql.count_purge(db, self.schema, wanted, finished_before),
                                           changed=False)
            return PurgeReport(tasks, size, dry_run=True)
        tasks = size = last = 0
        while True:
            after = last
            removed, nbytes, last = await self._call(
                functools.partial(_purge, schema=self.schema, statuses=wanted, before=finished_before, after=after),
                changed=False)
            tasks, size = tasks + removed, size + nbytes
            if removed:
                self.changes.notify()
            if removed < PRUNE_BATCH:
                break
        return PurgeReport(tasks, size)

    # -- schedules ---------------------------------------------------------

    async def set_schedule(self, schedule: Schedule) -> None:
        await self._call(lambda db, r: sql.set_schedule(db, self.schema, schedule, self.channel), changed=True)

    async def delete_schedule(self, name: str) -> bool:
        return await self._call(
            lambda db, r: _positive(db.execute(sql.q(sql.DELETE_SCHEDULE, self.schema), (name,))))

    async def schedules(self) -> list[ScheduleInfo]:
        rows = await self._call(lambda db, r: db.fetch(sql.q(sql.SELECT_SCHEDULES, self.schema)), changed=False)
        return [sql.schedule_info(row) for row in rows]

    async def due_schedules(self, now: float) -> list[Schedule]:
        rows = await self._call(lambda db, r: db.fetch(sql.q(sql.DUE_SCHEDULES, self.schema), (now,)),
                                changed=False)
        return [Schedule(*row) for row in rows]

    async def fire_schedule(self, name: str, due: float, next_run: float, now: float, task: NewTask) -> bool:
        return await self._call(
            lambda db, r: sql.fire_schedule(db, self.schema, name, due, next_run, task, self.channel))

    # -- facts about the store -------------------------------------------------

    async def get_meta(self, key: str) -> str | None:
        row = await self._call(lambda db, r: db.fetchone(sql.q(sql.SELECT_META, self.schema), (key,)),
                               changed=False)
        return None if row is None else str(row[0])

    async def set_meta_if_absent(self, key: str, value: str) -> str:
        recorded, added = await self._call(lambda db, r: sql.set_meta_if_absent(db, self.schema, key, value),
                                           changed=False)
        if added:
            self.changes.notify()
        return recorded

    # -- change notification -------------------------------------------------

    def _on_watch(self) -> None:
        self._side_thread()

    def _side_thread(self) -> SideThread:
        side = self._side
        if side is None:
            with self._side_lock:
                if self._side is None:
                    self._side = SideThread(self)
                    self._side.start()
                side = self._side
        return side

    def _heard(self, pid: int, payload: str) -> None:
        """A notice on the queue's channel, on the side thread: another process changed the store."""
        if pid not in self._own_pids:  # this process's own writes woke its waiters already
            self.changes.notify()


async def _prune(db: AsyncSession, retrying: bool, *, schema: str, now: float, limit: int) -> tuple[int, int]:
    return await sql.prune_batch(db, schema, now, limit)


async def _purge(
    db: AsyncSession, retrying: bool, *, schema: str, statuses: list[str], before: float | None, after: int
) -> tuple[int, int, int]:
    return await sql.purge_batch(db, schema, statuses, before, after, PRUNE_BATCH)


async def _nothing() -> None:
    return None


async def _positive(count: Awaitable[int]) -> bool:
    return await count > 0


def _split_schema(dsn: str) -> tuple[str, str | None]:
    """The DSN without sitq's ``?schema=`` parameter (libpq would refuse it), and that parameter."""
    if "://" not in dsn or "?" not in dsn:
        return dsn, None
    parts = urllib.parse.urlsplit(dsn)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for name, value in query if name == "schema"]
    if not schemas:
        return dsn, None
    rest = urllib.parse.urlencode([(name, value) for name, value in query if name != "schema"])
    return urllib.parse.urlunsplit(parts._replace(query=rest)), schemas[-1]


def _schema_from(name: str | None) -> str:
    return schema.check_schema_name(schema.DEFAULT_SCHEMA if name is None else name)


def _channel(schema_name: str) -> str:
    return schema.channel(schema_name)


def _password(dsn: str) -> str | None:
    try:
        from psycopg import conninfo as libpq_conninfo

        password = libpq_conninfo.conninfo_to_dict(dsn).get("password")
    except Exception:
        return None
    return str(password) if password else None


class Heartbeat:
    """A worker's lease renewals, which the backend's side thread carries out (see ``start_heartbeat``)."""

    def __init__(self, worker_id: str, lease: float, clock: Callable[[], float]) -> None:
        self.worker_id = worker_id
        self.lease = lease
        self.clock = clock
        self.interval = lease / RENEWALS_PER_LEASE
        self.due = 0.0  # time.monotonic() of the next renewal: at once
        self.lock = threading.Lock()  # held while a renewal runs
        self.stopped = False

    def __repr__(self) -> str:
        state = "stopped" if self.stopped else "running"
        return f"<sitq heartbeat of {self.worker_id} every {self.interval:g} s, {state}>"

    def stop(self) -> None:
        """Stop renewing; returns once a renewal in progress has ended. Safe to call twice."""
        with self.lock:
            self.stopped = True


class SideThread(threading.Thread):
    """The backend's second connection, on a thread of its own: it LISTENs on the queue's channel and
    wakes this process's waiters when another process changed the store, and renews the leases of
    this process's heartbeats between waits. Neither depends on any event loop. A lost connection is
    opened again with backoff; once it is back, waiters are woken to look again (a notice may have
    gone by meanwhile), and they are woken every ``check_interval`` seconds anyway while they wait."""

    def __init__(self, backend: PostgresBackend) -> None:
        super().__init__(name=f"sitq-listen-{backend.schema}", daemon=True)
        self.backend = backend
        self._stopped = threading.Event()
        self._heartbeats: list[Heartbeat] = []
        self._lock = threading.Lock()

    def add(self, heartbeat: Heartbeat) -> None:
        with self._lock:
            self._heartbeats.append(heartbeat)

    def stop(self) -> None:
        self._stopped.set()
        if self is not threading.current_thread() and self.is_alive():
            self.join(timeout=10)

    def run(self) -> None:
        backend = self.backend
        session: SideSession | None = None
        delay = 0.05
        failing = False
        last_look = time.monotonic()
        while not self._stopped.is_set():
            try:
                if session is None:
                    session = SideSession.connect(backend._conninfo(), 10.0)
                    session.listen(backend.channel)
                    backend.changes.notify()  # a change may have gone by unheard: waiters look again
                    if failing:
                        log.warning("%s: listening and renewing leases again", backend.target)
                    failing, delay = False, 0.05
                self._renew_due(session)
                session.wait(self._wait_time(), backend._heard)
                now = time.monotonic()
                if now - last_look >= backend.check_interval:
                    last_look = now
                    if backend.changes.has_watchers:
                        backend.changes.notify()  # the safety net for a notice that never came
            except (driver.Lost, driver.DriverError, BackendError) as exc:
                if session is not None:
                    session.close()
                    session = None
                if not failing:
                    log.warning("%s: the listening connection failed (%s); trying again. Leases are not "
                                "renewed meanwhile", backend.target, backend._scrub(str(exc)))
                failing = True
                self._stopped.wait(delay)
                delay = min(delay * 2, 2.0)
        if session is not None:
            session.close()

    def _wait_time(self) -> float:
        with self._lock:
            self._heartbeats = [h for h in self._heartbeats if not h.stopped]
            dues = [h.due for h in self._heartbeats]
        wait = min(dues, default=time.monotonic() + SIDE_WAIT) - time.monotonic()
        return min(max(wait, 0.0), SIDE_WAIT)

    def _renew_due(self, session: SideSession) -> None:
        with self._lock:
            heartbeats = list(self._heartbeats)
        statement = sql.q(sql.RENEW, self.backend.schema)
        for heartbeat in heartbeats:
            if heartbeat.due > time.monotonic():
                continue
            with heartbeat.lock:
                if heartbeat.stopped:
                    continue
                session.execute(statement, (heartbeat.clock() + heartbeat.lease, heartbeat.worker_id))
                heartbeat.due = time.monotonic() + heartbeat.interval
