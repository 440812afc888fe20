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
    its worker; of a finished one, changes nothing (:func:`cancel`).
"""

from __future__ import annotations

import enum

from sitq.core import CANCELLED, FINISHED_STATES, PENDING, RUNNING, TaskStatus

__all__ = [
    "LOST_WORKER_LIMIT",
    "lost_worker_error",
    "ExpiredLease",
    "expired_lease",
    "after_retry",
    "CancelOutcome",
    "cancel",
]

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
    """Decide for a running task whose lease expired, having lost its worker ``lost`` times before."""
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
    if status == PENDING:
        return CancelOutcome.CANCELLED
    if status == RUNNING:
        return CancelOutcome.REQUESTED
    assert status in FINISHED_STATES, status
    return CancelOutcome.FINISHED
