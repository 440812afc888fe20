"""The in-memory reference backend: the contract in plain Python, one dict of rows.

It is the model the contract suite and the stateful property test compare real
backends against, and a fast store for unit tests of the queue and the worker.
Every rule of a task's life comes from :mod:`sitq.backends.rules`; nothing is
persisted, and only objects in this process that share the backend object
share its store (``open_backend("memory://")`` makes a new one each time).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from sitq.backends.base import Backend
from sitq.backends.rules import (
    CancelOutcome,
    DependencyFate,
    ExpiredLease,
    RetryOutcome,
    after_retry,
    cancel,
    dependency_error,
    dependency_finished,
    expired_lease,
    expires_at,
    initial_state,
    keyed_enqueue,
    lost_worker_error,
    retry,
)
from sitq.core import (
    CANCELLED,
    FAILED,
    FINISHED_STATES,
    PENDING,
    RUNNING,
    STATES,
    WAITING,
    ClaimedTask,
    Enqueued,
    GroupInfo,
    NewTask,
    Outcome,
    OutcomeKind,
    PurgeReport,
    QueueOverview,
    Result,
    Schedule,
    ScheduleInfo,
    TaskInfo,
    TaskStatus,
    to_datetime,
)
from sitq.errors import BackendError, InvalidTaskError

__all__ = ["MemoryBackend"]

RENEWALS_PER_LEASE = 5

T = TypeVar("T")


@dataclasses.dataclass
class _Row:
    seq: int
    task_id: str
    name: str
    func: bytes
    args: bytes
    signature: bytes | None
    max_attempts: int
    eta: float
    enqueued_at: float
    status: TaskStatus = PENDING
    queue: str = "default"
    priority: int = 0
    key: str | None = None
    group_id: str | None = None
    retention: float | None = None
    expires_at: float | None = None
    waiting: int = 0  # dependencies that have not succeeded yet
    cancel_requested: bool = False
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    worker_id: str | None = None
    lease_until: float | None = None
    value: bytes | None = None
    value_signature: bytes | None = None
    error: str | None = None
    traceback: str | None = None
    output: str | None = None
    progress_done: float | None = None
    progress_total: float | None = None
    progress_message: str | None = None
    lost: int = 0

    def size(self) -> int:
        """The bytes the row keeps, as a purge reports them."""
        return sum(len(part) for part in (self.func, self.args, self.value or b"", self.signature or b"",
                                          self.value_signature or b"")) + sum(
            len(part.encode()) for part in (self.error, self.traceback, self.output) if part)


@dataclasses.dataclass
class _Group:
    name: str
    created_at: float


class MemoryBackend(Backend):
    """Tasks in a dict in this process. Thread-safe; every method is one atomic step."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._rows: dict[str, _Row] = {}
        self._by_seq: dict[int, _Row] = {}
        self._loose: dict[int, _Row] = {}  # the rows of no group, by seq: what find_ungrouped reads
        self._dependents: dict[str, list[str]] = {}  # task id -> ids of the tasks waiting for it
        self._groups: dict[str, _Group] = {}
        self._schedules: dict[str, Schedule] = {}
        self._meta: dict[str, str] = {}
        self._next_seq = 1

    def __repr__(self) -> str:
        return f"MemoryBackend(<{len(self._rows)} tasks>)"

    # -- lifecycle ---------------------------------------------------------

    async def connect(self) -> None:
        """Nothing to open; the store lives as long as this object."""

    async def close(self) -> None:
        """Nothing to release; the tasks stay, as in a file."""

    async def ensure_same_store(self) -> None:
        """The store is this object: it cannot be replaced under a worker."""

    # -- a write: one locked step that says whether it changed anything --------

    def _write(self, step: Callable[[], tuple[T, bool]]) -> T:
        with self._lock:
            result, changed = step()
        if changed:
            self.changes.notify()
        return result

    def _read(self, step: Callable[[], T]) -> T:
        with self._lock:
            return step()

    # -- finishing: what every path that ends a task does -----------------------

    def _finished(self, row: _Row, status: TaskStatus, when: float) -> None:
        """Move ``row`` to a finished state at ``when``, and settle the tasks waiting for it."""
        row.status, row.finished_at, row.lease_until = status, when, None
        row.expires_at = expires_at(when, row.retention)
        self._settle_dependents(row, when)

    def _settle_dependents(self, row: _Row, when: float) -> None:
        fate = dependency_finished(row.status)
        if fate is None:
            return
        for dependent_id in self._dependents.pop(row.task_id, ()):
            dependent = self._rows.get(dependent_id)
            if dependent is None or dependent.status != WAITING:
                continue
            if fate is DependencyFate.RELEASE:
                dependent.waiting -= 1
                if dependent.waiting <= 0:
                    dependent.status, dependent.waiting = PENDING, 0
            else:
                dependent.error = dependency_error(row.task_id, row.name, row.status)
                self._finished(dependent, CANCELLED, when)

    # -- producers ---------------------------------------------------------

    async def enqueue(self, tasks: Sequence[NewTask]) -> list[Enqueued]:
        def step() -> tuple[list[Enqueued], bool]:
            seen: set[str] = set()  # the tasks before this one in the call
            for task in tasks:  # all or nothing, as in one transaction: check before changing anything
                existing = task.task_id in self._rows or task.task_id in seen
                if existing and task.key is None:
                    raise BackendError(f"a task with id {task.task_id!r} is already stored; task ids are unique")
                for dep in task.after:
                    if dep not in self._rows and dep not in seen:
                        raise InvalidTaskError(
                            f"cannot run after task {dep!r}: there is no task with that id before this one (it "
                            "was never enqueued here, it was purged, or it comes later in the same call)"
                        )
                seen.add(task.task_id)
            outcomes = [self._enqueue_one(task) for task in tasks]
            return outcomes, any(o is not Enqueued.EXISTING for o in outcomes)

        return self._write(step)

    def _enqueue_one(self, task: NewTask) -> Enqueued:
        old = self._rows.get(task.task_id)
        outcome, seq = Enqueued.INSERTED, self._next_seq
        if old is not None:  # a keyed task enqueued again: kept, or reset in its place
            expired = old.expires_at is not None and old.expires_at <= task.enqueued_at
            outcome = keyed_enqueue(old.status, expired, task.replace_failed)
            if outcome is Enqueued.EXISTING:
                return outcome
            seq = old.seq
        else:
            self._next_seq += 1
        row = _Row(
            seq, task.task_id, task.name, task.func, task.args, task.signature,
            task.max_attempts, task.eta, task.enqueued_at, queue=task.queue, priority=task.priority,
            key=task.key, group_id=task.group_id, retention=task.retention,
        )
        self._rows[row.task_id] = row
        self._by_seq[row.seq] = row
        if row.group_id is None:
            self._loose[row.seq] = row
        else:  # a keyed task enqueued again may join a group
            self._loose.pop(row.seq, None)
        if task.group_id is not None and task.group_id not in self._groups:
            self._groups[task.group_id] = _Group(task.group_name or task.name, task.enqueued_at)
        deps = [self._rows[d] for d in dict.fromkeys(task.after)]
        status, waiting, error = initial_state((d.task_id, d.name, d.status) for d in deps)
        row.status, row.waiting = status, waiting
        if status == WAITING:
            for dep in deps:
                if dependency_finished(dep.status) is None:
                    self._dependents.setdefault(dep.task_id, []).append(row.task_id)
        elif status == CANCELLED:
            row.error = error
            self._finished(row, CANCELLED, task.enqueued_at)
        return outcome

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
        def step() -> tuple[tuple[list[bool], list[ClaimedTask]], bool]:
            stored = [self._store_outcome(worker_id, outcome) for outcome in outcomes]
            claimed = self._claim(worker_id, limit, now, lease_until, alone, queues) if limit > 0 else []
            return (stored, claimed), any(stored) or bool(claimed)

        return self._write(step)

    def _ready(self, now: float, queues: Sequence[str] | None) -> list[_Row]:
        return [
            r for r in self._by_seq.values()
            if r.status == PENDING and r.eta <= now and (queues is None or r.queue in queues)
        ]

    def _claim(
        self, worker_id: str, limit: int, now: float, lease_until: float, alone: bool, queues: Sequence[str] | None
    ) -> list[ClaimedTask]:
        ready = self._ready(now, queues)
        order: Callable[[_Row], tuple[float, float, int]] = lambda r: (-r.priority, r.eta, r.seq)  # noqa: E731
        suspects = sorted((r for r in ready if r.lost > 0), key=order)
        if alone and suspects:
            chosen = suspects[:1]
        else:
            chosen = sorted((r for r in ready if r.lost == 0), key=order)[:limit]
        for row in chosen:
            row.status, row.worker_id, row.started_at, row.lease_until = RUNNING, worker_id, now, lease_until
            row.attempts += 1
            row.progress_done = row.progress_total = row.progress_message = None
        return [
            ClaimedTask(r.seq, r.task_id, r.name, r.func, r.args, r.signature, r.attempts, r.lost)
            for r in sorted(chosen, key=lambda r: r.seq)
        ]

    def _held(self, worker_id: str, seq: int, attempts: int) -> _Row | None:
        """The row, if it is still running under this claim (the guard of every worker write)."""
        row = self._by_seq.get(seq)
        if row is None or row.status != RUNNING or row.worker_id != worker_id or row.attempts != attempts:
            return None
        return row

    def _store_outcome(self, worker_id: str, o: Outcome) -> bool:
        row = self._held(worker_id, o.handle, o.attempts)
        if row is None:
            return False
        if o.kind is OutcomeKind.RETRY:  # another attempt is due at o.retry_at
            assert o.retry_at is not None, "a RETRY outcome says when the next attempt is due"
            row.eta, row.error, row.traceback, row.output = o.retry_at, o.error, o.traceback, o.output
            row.worker_id = row.lease_until = None
            if after_retry(row.cancel_requested) == CANCELLED:
                self._finished(row, CANCELLED, o.finished_at)
            else:
                row.status, row.finished_at = PENDING, None
            return True
        row.value, row.value_signature = o.value, o.value_signature
        row.error, row.traceback, row.output = o.error, o.traceback, o.output
        done, total, message = o.progress or (None, None, None)
        row.progress_done = row.progress_done if done is None else done
        row.progress_total = row.progress_total if total is None else total
        row.progress_message = row.progress_message if message is None else message
        self._finished(row, o.kind.status, o.finished_at)
        return True

    async def release(self, worker_id: str, claims: Sequence[tuple[Any, int]]) -> list[bool]:
        def step() -> tuple[list[bool], bool]:
            released = []
            for handle, attempts in claims:
                row = self._held(worker_id, handle, attempts)
                if row is not None:
                    row.status, row.worker_id, row.lease_until, row.started_at = PENDING, None, None, None
                    row.attempts -= 1
                released.append(row is not None)
            return released, any(released)

        return self._write(step)

    async def suspects_waiting(self, now: float, queues: Sequence[str] | None = None) -> bool:
        return self._read(lambda: any(r.lost > 0 for r in self._ready(now, queues)))

    async def next_eta(self, queues: Sequence[str] | None = None) -> float | None:
        return self._read(
            lambda: min(
                (r.eta for r in self._by_seq.values() if r.status == PENDING and (queues is None or r.queue in queues)),
                default=None,
            )
        )

    async def renew(self, worker_id: str, lease_until: float) -> int:
        return self._renew(worker_id, lease_until)

    def _renew(self, worker_id: str, lease_until: float) -> int:
        with self._lock:
            rows = [r for r in self._by_seq.values() if r.status == RUNNING and r.worker_id == worker_id]
            for row in rows:
                row.lease_until = lease_until
            return len(rows)

    def start_heartbeat(self, worker_id: str, lease: float, clock: Callable[[], float] = time.time) -> _Heartbeat:
        heartbeat = _Heartbeat(self, worker_id, lease, clock)
        heartbeat.start()
        return heartbeat

    async def requeue_expired(self, now: float) -> int:
        def step() -> tuple[int, bool]:
            count = 0
            for row in list(self._by_seq.values()):
                if row.status != RUNNING or row.lease_until is None or not row.lease_until < now:
                    continue
                fate = expired_lease(row.cancel_requested, row.lost)
                if fate is ExpiredLease.CANCELLED:
                    self._finished(row, CANCELLED, now)
                elif fate is ExpiredLease.FAILED:
                    row.error, row.traceback = lost_worker_error(), None
                    self._finished(row, FAILED, now)
                else:
                    row.status, row.worker_id, row.lease_until = PENDING, None, None
                    row.lost += 1
                count += 1
            return count, count > 0

        return self._write(step)

    async def cancel(self, task_id: str, now: float) -> CancelOutcome | None:
        def step() -> tuple[CancelOutcome | None, bool]:
            row = self._rows.get(task_id)
            if row is None:
                return None, False
            outcome = cancel(row.status)
            if outcome is CancelOutcome.CANCELLED:
                self._finished(row, CANCELLED, now)
            elif outcome is CancelOutcome.REQUESTED:
                row.cancel_requested = True
            return outcome, outcome is not CancelOutcome.FINISHED

        return self._write(step)

    async def retry(self, task_ids: Sequence[str], now: float) -> dict[str, RetryOutcome]:
        def step() -> tuple[dict[str, RetryOutcome], bool]:
            done: dict[str, RetryOutcome] = {}
            for task_id in task_ids:
                row = self._rows.get(task_id)
                if row is None:
                    continue
                done[task_id] = outcome = retry(row.status)
                if outcome is RetryOutcome.RETRIED:
                    row.status, row.eta, row.max_attempts = PENDING, now, row.attempts + 1
                    row.finished_at = row.expires_at = row.worker_id = row.lease_until = None
                    row.value = row.value_signature = row.error = row.traceback = row.output = None
                    row.lost, row.cancel_requested, row.waiting = 0, False, 0
            return done, any(o is RetryOutcome.RETRIED for o in done.values())

        return self._write(step)

    async def cancel_requests(self, worker_id: str) -> list[str]:
        return self._read(
            lambda: [
                r.task_id
                for r in self._by_seq.values()
                if r.worker_id == worker_id and r.status == RUNNING and r.cancel_requested
            ]
        )

    async def set_progress(
        self, worker_id: str, progress: Sequence[tuple[Any, int, float | None, float | None, str | None]]
    ) -> None:
        def step() -> tuple[None, bool]:
            changed = False
            for handle, attempts, done, total, message in progress:
                row = self._held(worker_id, handle, attempts)
                if row is not None:
                    row.progress_done, row.progress_total, row.progress_message = done, total, message
                    changed = True
            return None, changed

        self._write(step)

    # -- readers -----------------------------------------------------------

    async def fetch_result(self, task_id: str) -> Result | None:
        return self._read(lambda: _result(self._rows[task_id]) if task_id in self._rows else None)

    async def fetch_results(self, task_ids: Sequence[str]) -> dict[str, Result]:
        return self._read(lambda: {i: _result(self._rows[i]) for i in task_ids if i in self._rows})

    async def fetch_info(self, task_ids: Sequence[str]) -> dict[str, TaskInfo]:
        return self._read(lambda: {i: _info(self._rows[i]) for i in task_ids if i in self._rows})

    async def overview(self, limit: int) -> QueueOverview:
        def step() -> QueueOverview:
            rows = list(self._by_seq.values())
            newest = sorted(rows, key=lambda r: -r.seq)
            groups = sorted(self._groups.items(), key=lambda item: -item[1].created_at)[:limit]
            return QueueOverview(
                counts=_counts(rows),
                recent=[_info(r) for r in newest[:limit]],
                queues={q: _counts(r for r in rows if r.queue == q) for q in sorted({r.queue for r in rows})},
                running=[_info(r) for r in newest if r.status == RUNNING][:limit],
                failures=[_info(r) for r in newest if r.status == FAILED][:limit],
                groups=[self._group_info(group_id, group) for group_id, group in groups],
                schedules=self._schedule_infos(),
            )

        return self._read(step)

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
        def step() -> list[TaskInfo]:
            rows = sorted(self._by_seq.values(), key=lambda r: -r.seq if newest_first else r.seq)
            chosen = [
                r for r in rows
                if (statuses is None or r.status in statuses) and (queue is None or r.queue == queue)
                and (group_id is None or r.group_id == group_id)
            ]
            return [_info(r) for r in chosen[offset : offset + limit]]

        return self._read(step)

    async def match_ids(self, fragment: str, limit: int = 2) -> list[str]:
        def step() -> list[str]:
            if fragment in self._rows:
                return [fragment]
            found = [i for i in self._rows if i.startswith(fragment) or i.endswith(fragment)]
            return sorted(found)[:limit]

        return self._read(step)

    async def group(self, group_id: str) -> GroupInfo | None:
        def step() -> GroupInfo | None:
            group = self._groups.get(group_id)
            return None if group is None else self._group_info(group_id, group)

        return self._read(step)

    async def match_group_ids(self, fragment: str, limit: int = 2) -> list[str]:
        def step() -> list[str]:
            if fragment in self._groups:
                return [fragment]
            return sorted(g for g in self._groups if g.startswith(fragment) or g.endswith(fragment))[:limit]

        return self._read(step)

    async def find_ungrouped(
        self,
        *,
        statuses: Sequence[TaskStatus | str] | None = None,
        limit: int = 100,
        offset: int = 0,
        newest_first: bool = True,
    ) -> list[TaskInfo]:
        def step() -> list[TaskInfo]:  # the rows of no group only, whatever the groups beside them
            rows = sorted(self._loose.values(), key=lambda r: -r.seq if newest_first else r.seq)
            chosen = [r for r in rows if statuses is None or r.status in statuses]
            return [_info(r) for r in chosen[offset : offset + limit]]

        return self._read(step)

    async def count_ungrouped(self) -> dict[str, int]:
        return self._read(lambda: _counts(self._loose.values()))

    async def cancel_group(self, group_id: str, now: float) -> dict[CancelOutcome, int]:
        def step() -> tuple[dict[CancelOutcome, int], bool]:
            done = {CancelOutcome.CANCELLED: 0, CancelOutcome.REQUESTED: 0}
            for row in sorted(self._by_seq.values(), key=lambda r: r.seq):
                if row.group_id != group_id:
                    continue
                outcome = cancel(row.status)
                if outcome is CancelOutcome.CANCELLED:
                    self._finished(row, CANCELLED, now)
                elif outcome is CancelOutcome.REQUESTED:
                    row.cancel_requested = True
                if outcome in done:
                    done[outcome] += 1
            return done, any(done.values())

        return self._write(step)

    def _group_info(self, group_id: str, group: _Group) -> GroupInfo:
        members = (r for r in self._by_seq.values() if r.group_id == group_id)
        return GroupInfo(group_id, group.name, to_datetime(group.created_at), _counts(members))

    # -- retention ---------------------------------------------------------

    async def prune(self, now: float, limit: int) -> PurgeReport:
        def step() -> tuple[PurgeReport, bool]:
            expired = [r for r in self._by_seq.values()
                       if r.status in FINISHED_STATES and r.expires_at is not None and r.expires_at <= now]
            return self._delete(expired[:limit], dry_run=False)

        return self._write(step)

    async def purge(
        self, *, statuses: Sequence[TaskStatus | str], finished_before: float | None, dry_run: bool = False
    ) -> PurgeReport:
        wanted = {s for s in statuses if s in FINISHED_STATES}

        def step() -> tuple[PurgeReport, bool]:
            chosen = [
                r for r in self._by_seq.values()
                if r.status in wanted and (finished_before is None
                                           or (r.finished_at is not None and r.finished_at < finished_before))
            ]
            return self._delete(chosen, dry_run)

        return self._write(step)

    def _delete(self, rows: list[_Row], dry_run: bool) -> tuple[PurgeReport, bool]:
        report = PurgeReport(len(rows), sum(r.size() for r in rows), dry_run)
        if not dry_run:
            for row in rows:
                del self._rows[row.task_id], self._by_seq[row.seq]
                self._loose.pop(row.seq, None)
            left = {r.group_id for r in self._by_seq.values()}
            for group_id in {r.group_id for r in rows} - left:  # a group goes with its last task
                self._groups.pop(group_id, None)  # type: ignore[arg-type]
        return report, bool(rows) and not dry_run

    # -- schedules ---------------------------------------------------------

    async def set_schedule(self, schedule: Schedule) -> None:
        def step() -> tuple[None, bool]:
            old = self._schedules.get(schedule.name)
            stored = dataclasses.replace(schedule)
            if old is not None and (old.every, old.cron, old.tz) == (schedule.every, schedule.cron, schedule.tz):
                stored.next_run, stored.last_run = old.next_run, old.last_run
            self._schedules[schedule.name] = stored
            return None, True

        self._write(step)

    async def delete_schedule(self, name: str) -> bool:
        def step() -> tuple[bool, bool]:
            gone = self._schedules.pop(name, None) is not None
            return gone, gone

        return self._write(step)

    async def schedules(self) -> list[ScheduleInfo]:
        return self._read(self._schedule_infos)

    def _schedule_infos(self) -> list[ScheduleInfo]:
        return [_schedule_info(s) for s in sorted(self._schedules.values(), key=lambda s: (s.next_run, s.name))]

    async def due_schedules(self, now: float) -> list[Schedule]:
        return self._read(lambda: [dataclasses.replace(s) for s in self._schedules.values() if s.next_run <= now])

    async def fire_schedule(self, name: str, due: float, next_run: float, now: float, task: NewTask) -> bool:
        def step() -> tuple[bool, bool]:
            schedule = self._schedules.get(name)
            if schedule is None or schedule.next_run != due:
                return False, False
            schedule.next_run, schedule.last_run = next_run, due
            if task.task_id not in self._rows:
                self._enqueue_one(task)
            return True, True

        return self._write(step)

    # -- facts about the store -------------------------------------------------

    async def get_meta(self, key: str) -> str | None:
        return self._read(lambda: self._meta.get(key))

    async def set_meta_if_absent(self, key: str, value: str) -> str:
        def step() -> tuple[str, bool]:
            if key in self._meta:
                return self._meta[key], False
            self._meta[key] = value
            return value, True

        return self._write(step)


def _counts(rows: Iterable[_Row]) -> dict[str, int]:
    counts: dict[str, int] = dict.fromkeys(STATES, 0)
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    return counts


def _result(row: _Row) -> Result:
    return Result(
        task_id=row.task_id,
        name=row.name,
        status=row.status,
        value=row.value,
        error=row.error,
        traceback=row.traceback,
        enqueued_at=to_datetime(row.enqueued_at),
        started_at=to_datetime(row.started_at),
        finished_at=to_datetime(row.finished_at),
        attempts=row.attempts,
        output=row.output,
        value_signature=row.value_signature,
    )


def _info(row: _Row) -> TaskInfo:
    return TaskInfo(
        task_id=row.task_id,
        name=row.name,
        status=row.status,
        enqueued_at=to_datetime(row.enqueued_at),
        eta=to_datetime(row.eta),
        started_at=to_datetime(row.started_at),
        finished_at=to_datetime(row.finished_at),
        attempts=row.attempts,
        worker_id=row.worker_id,
        progress_done=row.progress_done,
        progress_total=row.progress_total,
        progress_message=row.progress_message,
        error=row.error,
        queue=row.queue,
        priority=row.priority,
        group_id=row.group_id,
        key=row.key,
    )


def _schedule_info(s: Schedule) -> ScheduleInfo:
    return ScheduleInfo(s.name, s.task_name, s.queue, s.every, s.cron, s.tz, to_datetime(s.next_run),
                        to_datetime(s.last_run))


class _Heartbeat(threading.Thread):
    """Renews this worker's leases from a thread of its own, however busy the loop is."""

    def __init__(self, backend: MemoryBackend, worker_id: str, lease: float, clock: Callable[[], float]) -> None:
        super().__init__(name=f"sitq-heartbeat-{worker_id}", daemon=True)
        self.backend, self.worker_id, self.lease, self.clock = backend, worker_id, lease, clock
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()
        if self is not threading.current_thread() and self.is_alive():
            self.join(timeout=5)

    def run(self) -> None:
        while not self._stopped.wait(self.lease / RENEWALS_PER_LEASE):
            self.backend._renew(self.worker_id, self.clock() + self.lease)
