"""The rules of a task's life that every backend follows, decided once, here.

A backend stores the outcome of each rule in its own way (SQLite and PostgreSQL in
one guarded statement each, the in-memory reference backend by calling these
functions), but none decides them for itself; the contract suite
(``tests/test_backend_contract.py``) checks every backend against them.

Lost workers
    A task whose worker stops renewing its lease (killed, crashed, frozen) is put
    back and counted: it has *lost its worker*. It may be the cause (``os._exit``,
    a segfault, the OOM killer) or an innocent bystander of a task beside it. So a
    task that has lost its worker is a *suspect*: it is claimed only by a worker
    that runs nothing else, and runs there alone (``Backend.claim(alone=...)``); a
    busy worker that sees suspects waiting stops claiming until it is empty
    (``Backend.suspects_waiting``). An innocent suspect then simply finishes, and
    only the culprit keeps killing its worker: its ``LOST_WORKER_LIMIT``-th lost
    worker fails it with :func:`lost_worker_error`. Lost workers have their own
    budget; ``retries`` are for what a task raises.

An expired lease
    :func:`expired_lease` decides: cancelled if someone asked to cancel the task
    (its worker is gone and cannot), failed on its last allowed lost worker,
    otherwise pending again as a suspect.

Retries and cancels
    When to retry is the task's own option (``TaskOptions.retry_after``, in the
    worker); the worker reports a retry as an outcome of kind ``retry`` with the
    time it is due. :func:`after_retry` decides what the task becomes: pending
    until then, or cancelled if a cancel was requested while it ran. A cancel of a
    pending task cancels it at once; of a running one, records the request for
    its worker; of a finished one, changes nothing (:func:`cancel`). A task retried
    by hand (``sitq retry``) must have failed or been cancelled (:func:`retry`).

Dependencies
    A task enqueued ``after`` other tasks waits (status ``waiting``) until every one
    of them has succeeded, then becomes pending. When one of them fails or is
    cancelled instead, it is cancelled with :func:`dependency_error` as its error,
    and so, in turn, are the tasks waiting for it (:func:`initial_state`,
    :func:`dependency_finished`).

Keyed tasks
    A task enqueued with a dedupe ``key`` has the id :func:`key_task_id` derives from
    the key, so enqueueing it again finds the same row. :func:`keyed_enqueue` decides
    what happens then: the existing task is returned as it is while it is waiting,
    pending, running or succeeded; one that failed or was cancelled is reset to run
    again with the new payload if ``replace_failed`` (the default), else returned as
    it is; one whose retention has expired counts as gone and is reset.

Retention
    A finished task is kept for its ``retention`` (seconds; None keeps it for ever)
    and deleted by the next worker's prune after :func:`expires_at`.

Schedules
    A schedule's tick is enqueued by whichever worker first sees it due, once
    (the store guards it; its task id is :func:`schedule_task_id`). A tick missed
    because no worker ran then is run once, late; further missed ticks are skipped,
    so a schedule never runs more than once to catch up (:func:`next_tick`).
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import math
from collections.abc import Iterable

from sitq.core import (
    CANCELLED,
    FAILED,
    FINISHED_STATES,
    PENDING,
    RUNNING,
    SUCCESS,
    WAITING,
    Enqueued,
    TaskStatus,
)

__all__ = [
    "LOST_WORKER_LIMIT",
    "lost_worker_error",
    "ExpiredLease",
    "expired_lease",
    "after_retry",
    "CancelOutcome",
    "cancel",
    "RetryOutcome",
    "retry",
    "DependencyFate",
    "dependency_finished",
    "dependency_error",
    "initial_state",
    "key_task_id",
    "key_group_id",
    "keyed_enqueue",
    "expires_at",
    "schedule_task_id",
    "next_tick",
    "SCHEDULE_CHECK",
    "PRUNE_INTERVAL",
    "PRUNE_BATCH",
]

SCHEDULE_CHECK = 1.0  # seconds between a worker's looks for due schedule ticks
PRUNE_INTERVAL = 60.0  # seconds between a worker's prunes of expired tasks
PRUNE_BATCH = 500  # tasks deleted per transaction by a prune or purge

LOST_WORKER_LIMIT = 3


def lost_worker_error(losses: int = LOST_WORKER_LIMIT) -> str:
    """The error of a task failed for losing its worker ``losses`` times."""
    return (
        f"WorkerLostError: the worker running this task was lost {losses} times (it stopped renewing the "
        "task's lease: killed, crashed or frozen), the last times with this task running alone in it; "
        "the task is taken to be what kills its worker (os._exit, a crash in native code, running out "
        "of memory) and is not run again"
    )


class ExpiredLease(enum.Enum):
    """What becomes of a running task whose lease expired."""

    CANCELLED = "cancelled"  # a cancel was requested: its worker is gone and cannot do it
    FAILED = "failed"  # its LOST_WORKER_LIMIT-th lost worker: lost_worker_error
    REQUEUED = "requeued"  # pending again, with one more lost worker: a suspect


def expired_lease(cancel_requested: bool, lost: int) -> ExpiredLease:
    """Decide for a running task whose lease expired, having lost its worker ``lost`` times before.

    >>> [expired_lease(False, lost).value for lost in range(LOST_WORKER_LIMIT)]
    ['requeued', 'requeued', 'failed']
    >>> expired_lease(True, 0).value
    'cancelled'
    """
    if cancel_requested:
        return ExpiredLease.CANCELLED
    if lost + 1 >= LOST_WORKER_LIMIT:
        return ExpiredLease.FAILED
    return ExpiredLease.REQUEUED


def after_retry(cancel_requested: bool) -> TaskStatus:
    """The status of a task whose attempt asked for a retry: pending until it is due, unless a
    cancel was requested while the attempt ran."""
    return CANCELLED if cancel_requested else PENDING


class CancelOutcome(str, enum.Enum):
    """What ``Backend.cancel`` (and ``TaskQueue.cancel``) did; each member equals its string."""

    CANCELLED = "cancelled"  # it was pending and will never run
    REQUESTED = "requested"  # it is running; its worker stops it and records it cancelled
    FINISHED = "finished"  # it had finished already; nothing changed

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__  # type: ignore[assignment]  # as TaskStatus's, in sitq.core


def cancel(status: TaskStatus) -> CancelOutcome:
    """What cancelling a task in ``status`` does."""
    if status in (PENDING, WAITING):
        return CancelOutcome.CANCELLED
    if status == RUNNING:
        return CancelOutcome.REQUESTED
    assert status in FINISHED_STATES, status
    return CancelOutcome.FINISHED


class RetryOutcome(str, enum.Enum):
    """What retrying a task by hand (``Backend.retry``, ``sitq retry``) did; each member equals its string."""

    RETRIED = "retried"  # it had failed or was cancelled: pending again, for one more attempt
    UNFINISHED = "unfinished"  # it is still waiting, pending or running: nothing changed
    SUCCEEDED = "succeeded"  # it succeeded: nothing to retry, nothing changed

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__  # type: ignore[assignment]  # as TaskStatus's, in sitq.core


def retry(status: TaskStatus | str) -> RetryOutcome:
    """What retrying a task in ``status`` by hand does. A retried task is pending again at once,
    with its result, error and lost-worker count cleared and one more attempt allowed; the tasks
    that were cancelled because it failed stay cancelled."""
    if status in (FAILED, CANCELLED):
        return RetryOutcome.RETRIED
    if status == SUCCESS:
        return RetryOutcome.SUCCEEDED
    return RetryOutcome.UNFINISHED


class DependencyFate(enum.Enum):
    """What a finished task does to the tasks waiting for it."""

    RELEASE = "release"  # it succeeded: one dependency fewer to wait for
    CANCEL = "cancel"  # it failed or was cancelled: they are cancelled, with dependency_error


def dependency_finished(status: TaskStatus | str) -> DependencyFate | None:
    """The fate of the tasks waiting for a task that is now in ``status`` (None: it has not finished)."""
    if status == SUCCESS:
        return DependencyFate.RELEASE
    if status in (FAILED, CANCELLED):
        return DependencyFate.CANCEL
    return None


def dependency_error(task_id: str, name: str, status: TaskStatus | str) -> str:
    """The error of a task cancelled because a task it runs after did not succeed."""
    what = "failed" if status == FAILED else "was cancelled"
    return f"DependencyError: it runs after task {task_id} ({name}), which {what}"


def initial_state(dependencies: Iterable[tuple[str, str, TaskStatus | str]]) -> tuple[TaskStatus, int, str | None]:
    """The state of a new task that runs after ``(id, name, status)`` tasks: ``(status, how many it
    still waits for, error)``; cancelled at once with the error if one of them did not succeed."""
    waiting = 0
    for task_id, name, status in dependencies:
        fate = dependency_finished(status)
        if fate is DependencyFate.CANCEL:
            return CANCELLED, 0, dependency_error(task_id, name, status)
        if fate is None:
            waiting += 1
    return (WAITING if waiting else PENDING), waiting, None


def key_task_id(key: str) -> str:
    """The id of the task enqueued with dedupe ``key``: 32 hex digits, the same every time."""
    return hashlib.sha256(b"sitq key\x00" + key.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def key_group_id(key: str) -> str:
    """The id of the group a keyed ``map`` joins: the same every time the map runs again."""
    return key_task_id(f"group\x00{key}")


def keyed_enqueue(status: TaskStatus | str, expired: bool, replace_failed: bool) -> Enqueued:
    """What enqueueing a keyed task does when a task with its id exists in ``status``."""
    if status in FINISHED_STATES and expired:
        return Enqueued.REPLACED
    if status in (FAILED, CANCELLED) and replace_failed:
        return Enqueued.REPLACED
    return Enqueued.EXISTING


def expires_at(finished_at: float, retention: float | None) -> float | None:
    """When a task finished at ``finished_at`` may be deleted (None: never)."""
    return None if retention is None else finished_at + retention


def schedule_task_id(name: str, tick: float) -> str:
    """The id of the task a schedule's tick enqueues: the same for every worker that fires it."""
    return key_task_id(f"schedule\x00{name}\x00{tick!r}")


def next_tick(every: float | None, cron: str | None, tz: str, due: float, now: float) -> float:
    """The tick after the one due at ``due``, which runs now: the first one after ``now``. Ticks
    between ``due`` and ``now`` (missed while no worker ran) are skipped.

    >>> next_tick(every=60.0, cron=None, tz="UTC", due=600.0, now=600.5)     # on time: the next one
    660.0
    >>> next_tick(every=60.0, cron=None, tz="UTC", due=600.0, now=790.0)     # 3 missed: skipped
    840.0
    """
    if every is not None:
        missed = math.floor((now - due) / every)
        return due + (max(missed, 0) + 1) * every
    assert cron is not None, "a schedule has a period or a cron expression"
    return first_cron_tick(cron, tz, now)


def first_cron_tick(cron: str, tz: str, after: float) -> float:
    """The first time after ``after`` (POSIX seconds) that the cron expression names, read in ``tz``."""
    from zoneinfo import ZoneInfo

    from cronsim import CronSim

    start = dt.datetime.fromtimestamp(after, ZoneInfo(tz))
    return next(CronSim(cron, start)).timestamp()
