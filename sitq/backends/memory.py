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
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sitq.backends.base import Backend
from sitq.backends.rules import (
    CancelOutcome,
    ExpiredLease,
    after_retry,
    cancel,
    expired_lease,
    lost_worker_error,
)
from sitq.core import (
    CANCELLED,
    FAILED,
    PENDING,
    RUNNING,
    STATES,
    ClaimedTask,
    NewTask,
    Outcome,
    OutcomeKind,
    QueueOverview,
    Result,
    TaskInfo,
    TaskStatus,
    to_datetime,
)
from sitq.errors import BackendError

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


class MemoryBackend(Backend):
    """Tasks in a dict in this process. Thread-safe; every method is one atomic step."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._rows: dict[str, _Row] = {}
        self._by_seq: dict[int, _Row] = {}
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

    # -- producers ---------------------------------------------------------

    async def enqueue(self, tasks: Sequence[NewTask]) -> None:
        def step() -> tuple[None, bool]:
            fresh = [task.task_id for task in tasks]
            clash = next((i for i in fresh if i in self._rows), None)
            if clash is None and len(set(fresh)) < len(fresh):
                clash = next(i for i in fresh if fresh.count(i) > 1)
            if clash is not None:  # all or nothing, as in one transaction
                raise BackendError(f"a task with id {clash!r} is already stored; task ids are unique")
            for task in tasks:
                row = _Row(
                    self._next_seq, task.task_id, task.name, task.func, task.args, task.signature,
                    task.max_attempts, task.eta, task.enqueued_at,
                )
                self._next_seq += 1
                self._rows[row.task_id] = row
                self._by_seq[row.seq] = row
            return None, bool(tasks)

        self._write(step)

    # -- workers -----------------------------------------------------------

    async def claim(
        self, worker_id: str, limit: int, now: float, lease_until: float, *, alone: bool = True
    ) -> list[ClaimedTask]:
        return (await self.finish_and_claim(worker_id, (), limit, now, lease_until, alone=alone))[1]

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
    ) -> tuple[list[bool], list[ClaimedTask]]:
        def step() -> tuple[tuple[list[bool], list[ClaimedTask]], bool]:
            stored = [self._store_outcome(worker_id, outcome) for outcome in outcomes]
            claimed = self._claim(worker_id, limit, now, lease_until, alone) if limit > 0 else []
            return (stored, claimed), any(stored) or bool(claimed)

        return self._write(step)

    def _claim(self, worker_id: str, limit: int, now: float, lease_until: float, alone: bool) -> list[ClaimedTask]:
        ready = [r for r in self._by_seq.values() if r.status == PENDING and r.eta <= now]
        suspects = sorted((r for r in ready if r.lost > 0), key=lambda r: (r.eta, r.seq))
        if alone and suspects:
            chosen = suspects[:1]
        else:
            chosen = sorted((r for r in ready if r.lost == 0), key=lambda r: (r.eta, r.seq))[:limit]
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
            row.status = after_retry(row.cancel_requested)
            row.finished_at = o.finished_at if row.status == CANCELLED else None
            row.eta, row.error, row.traceback, row.output = o.retry_at, o.error, o.traceback, o.output
            row.worker_id = row.lease_until = None
            return True
        row.status, row.finished_at = o.kind.status, o.finished_at
        row.value, row.value_signature = o.value, o.value_signature
        row.error, row.traceback, row.output, row.lease_until = o.error, o.traceback, o.output, None
        done, total, message = o.progress or (None, None, None)
        row.progress_done = row.progress_done if done is None else done
        row.progress_total = row.progress_total if total is None else total
        row.progress_message = row.progress_message if message is None else message
        return True

    async def suspects_waiting(self, now: float) -> bool:
        return self._read(
            lambda: any(r.status == PENDING and r.lost > 0 and r.eta <= now for r in self._by_seq.values())
        )

    async def next_eta(self) -> float | None:
        return self._read(lambda: min((r.eta for r in self._by_seq.values() if r.status == PENDING), default=None))

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
            for row in self._by_seq.values():
                if row.status != RUNNING or row.lease_until is None or not row.lease_until < now:
                    continue
                fate = expired_lease(row.cancel_requested, row.lost)
                if fate is ExpiredLease.CANCELLED:
                    row.status, row.finished_at, row.lease_until = CANCELLED, now, None
                elif fate is ExpiredLease.FAILED:
                    row.status, row.finished_at, row.lease_until = FAILED, now, None
                    row.error, row.traceback = lost_worker_error(), None
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
                row.status, row.finished_at = CANCELLED, now
            elif outcome is CancelOutcome.REQUESTED:
                row.cancel_requested = True
            return outcome, outcome is not CancelOutcome.FINISHED

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

    async def fetch_info(self, task_ids: Sequence[str]) -> dict[str, TaskInfo]:
        return self._read(lambda: {i: _info(self._rows[i]) for i in task_ids if i in self._rows})

    async def overview(self, limit: int) -> QueueOverview:
        def step() -> QueueOverview:
            counts: dict[str, int] = dict.fromkeys(STATES, 0)
            for row in self._by_seq.values():
                counts[row.status] = counts.get(row.status, 0) + 1
            recent = [_info(row) for row in sorted(self._by_seq.values(), key=lambda r: -r.seq)[:limit]]
            return QueueOverview(counts=counts, recent=recent)

        return self._read(step)

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
    )


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
