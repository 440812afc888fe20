"""The records that travel between the queue, the worker and a backend.

Backends store bytes and rows; these plain dataclasses are those rows. Times
are stored as POSIX seconds (floats) and shown to users as timezone-aware UTC
datetimes.

A store can hold values sitq never wrote (SQLite lets any value into any column,
and another program or a hand edit can put it there). Readers never fail on
them: a time or number that cannot be read is None, text that is not text is
shown as a short description of what is there, and an unknown status is kept
as it is, so it shows.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, overload

__all__ = [
    "TaskStatus",
    "WAITING",
    "PENDING",
    "RUNNING",
    "SUCCESS",
    "FAILED",
    "CANCELLED",
    "STATES",
    "FINISHED_STATES",
    "Result",
    "TaskInfo",
    "QueueOverview",
    "GroupInfo",
    "ScheduleInfo",
    "Schedule",
    "PurgeReport",
    "Enqueued",
    "NewTask",
    "NewTaskBatch",
    "ClaimedTask",
    "Outcome",
    "OutcomeKind",
]



class TaskStatus(str, enum.Enum):
    """A task's state. Each member is also its string, so ``result.status == "success"`` holds.

    ``waiting``: it runs after other tasks (``after=``), and not all of them have succeeded yet.
    ``pending``: waiting for its eta or a worker. ``running``: claimed by a worker. The
    finished states, which never change again (unless it is retried by hand):
    ``success``, ``failed``, ``cancelled``.

    >>> TaskStatus("success") == "success", TaskStatus.FAILED.finished
    (True, True)
    >>> f"{TaskStatus.PENDING}"
    'pending'
    """

    WAITING = "waiting"
    PENDING = "pending"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    # f"{status}" reads "success" on every Python version (mypy takes str's signature for one
    # unlike Enum's; both take a format spec and return str).
    __format__ = str.__format__  # type: ignore[assignment]

    @property
    def finished(self) -> bool:
        """Whether this is ``success``, ``failed`` or ``cancelled``: a state that never changes again."""
        return self in FINISHED_STATES

    @classmethod
    def read(cls, stored: Any) -> TaskStatus | str:
        """The member for a stored status; a status sitq does not know stays as it is, to show."""
        status: TaskStatus | str = _STATUS_BY_VALUE.get(stored, stored)
        return status


WAITING = TaskStatus.WAITING
PENDING = TaskStatus.PENDING
RUNNING = TaskStatus.RUNNING
SUCCESS = TaskStatus.SUCCESS
FAILED = TaskStatus.FAILED
CANCELLED = TaskStatus.CANCELLED
STATES = tuple(TaskStatus)
FINISHED_STATES = frozenset((SUCCESS, FAILED, CANCELLED))
UNFINISHED_STATES = frozenset((WAITING, PENDING, RUNNING))
DEFAULT_QUEUE = "default"
_STATUS_BY_VALUE = {status.value: status for status in TaskStatus}


class OutcomeKind(str, enum.Enum):
    """How one attempt of a task ended, as its worker reports it."""

    SUCCESS = "success"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RETRY = "retry"  # it failed, and another attempt is due

    def __str__(self) -> str:
        return self.value

    @property
    def status(self) -> TaskStatus:
        """The status the task ends in (a retry: pending, unless a cancel was requested)."""
        return PENDING if self is OutcomeKind.RETRY else TaskStatus(self.value)
_UTC = dt.timezone.utc


def to_datetime(seconds: float | None) -> dt.datetime | None:
    """The time as a UTC datetime; None for None and for anything that is not a time one can show."""
    if type(seconds) is not float and type(seconds) is not int:  # None, or not a number
        return None
    try:
        return dt.datetime.fromtimestamp(seconds, _UTC)
    except (OverflowError, ValueError, OSError):  # out of range, or not a number (nan)
        return None


@dataclass(frozen=True)
class Result:
    """The outcome of a finished task.

    ``status`` is a :class:`TaskStatus`, equal to ``"success"``, ``"failed"`` or
    ``"cancelled"`` (``"waiting"``, ``"pending"`` or ``"running"`` only from a look
    that does not wait, such as ``get_result(..., timeout=...)`` running out).
    ``value`` holds the pickled return value (bytes, only on success); turn it back
    into the object with ``TaskQueue.deserialize_result``. ``error`` reads
    ``"ExceptionType: message"`` and ``traceback`` is the formatted remote
    traceback. ``output`` is what the task printed, when the worker captured it.
    ``value_signature`` is the worker's signature of ``value`` in a store used
    with a secret key; ``deserialize_result`` checks it before unpickling.
    """

    task_id: str
    name: str
    status: TaskStatus | str  # str only for a status sitq did not write
    value: bytes | None
    error: str | None
    traceback: str | None
    enqueued_at: dt.datetime | None  # None only for a time sitq did not write
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    attempts: int | None  # None only for a count sitq did not write
    output: str | None = None
    value_signature: bytes | None = None

    @property
    def duration(self) -> float | None:
        """Seconds from start to finish, or None if the task never started."""
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()

    def __repr__(self) -> str:
        detail = f" error={self.error!r}" if self.error else ""
        return f"<Result {self.task_id} {self.name} {self.status}{detail}>"


@dataclass(frozen=True)
class TaskInfo:
    """A task's current state, as the non-blocking status calls report it.

    ``queue`` is the named queue it was sent to, ``priority`` its priority (higher
    runs first), ``group_id`` the group it belongs to (``map(..., group=...)``) and
    ``key`` the dedupe key it was enqueued with, if any.
    """

    task_id: str
    name: str
    status: TaskStatus | str  # str only for a status sitq did not write
    enqueued_at: dt.datetime | None  # None only for a time sitq did not write
    eta: dt.datetime | None  # None only for a time sitq did not write
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    attempts: int | None  # None only for a count sitq did not write
    worker_id: str | None
    progress_done: float | None
    progress_total: float | None
    progress_message: str | None
    error: str | None
    queue: str = DEFAULT_QUEUE
    priority: int = 0
    group_id: str | None = None
    key: str | None = None

    @property
    def finished(self) -> bool:
        """Whether the task has finished (succeeded, failed or was cancelled); it will not change again."""
        return self.status in FINISHED_STATES

    def __repr__(self) -> str:
        return f"<TaskInfo {self.task_id} {self.name} {self.status} attempts={self.attempts}>"


@dataclass(frozen=True)
class GroupInfo:
    """A group of tasks enqueued together (``map(..., group=...)``): its name and counts per state.

    The counts are kept by the store as tasks move, so reading them costs the same for a
    group of ten tasks and of a million.
    """

    group_id: str
    name: str
    created_at: dt.datetime | None
    counts: dict[str, int]

    @property
    def total(self) -> int:
        """How many tasks the group holds, in every state."""
        return sum(self.counts.values())

    @property
    def finished(self) -> int:
        """How many of its tasks have finished (succeeded, failed or were cancelled)."""
        return sum(n for state, n in self.counts.items() if state in FINISHED_STATES)

    def __repr__(self) -> str:
        counts = " ".join(f"{state}={n}" for state, n in self.counts.items() if n)
        return f"<GroupInfo {self.group_id} {self.name} {counts or 'empty'}>"


@dataclass(frozen=True)
class ScheduleInfo:
    """A periodic task: what it runs, how often, and when it runs next.

    ``every`` is its period in seconds, or ``cron`` its cron expression (read in the
    time zone ``tz``); ``next_run`` is the tick the next worker to look will enqueue.
    """

    name: str
    task_name: str
    queue: str
    every: float | None
    cron: str | None
    tz: str
    next_run: dt.datetime | None
    last_run: dt.datetime | None

    @property
    def period(self) -> str:
        """``every 300s`` or ``cron '0 9 * * *' (UTC)``, for people."""
        if self.cron is not None:
            return f"cron {self.cron!r} ({self.tz})"
        return f"every {self.every:g}s"

    def __repr__(self) -> str:
        return f"<ScheduleInfo {self.name} {self.period} next={self.next_run}>"


@dataclass(frozen=True)
class QueueOverview:
    """What the store holds, for boards and ``sitq status``; each part costs the same however many
    finished tasks the store keeps.

    ``counts`` per state for the whole store and ``queues`` per named queue; ``recent``: the
    newest tasks, newest first; ``running``: tasks running now; ``failures``: the newest failed
    tasks; ``groups``: the newest groups with their counts; ``schedules``: every periodic task.
    The lists hold at most the ``limit`` the overview was asked for.
    """

    counts: dict[str, int]
    recent: list[TaskInfo]
    queues: dict[str, dict[str, int]] = field(default_factory=dict)
    running: list[TaskInfo] = field(default_factory=list)
    failures: list[TaskInfo] = field(default_factory=list)
    groups: list[GroupInfo] = field(default_factory=list)
    schedules: list[ScheduleInfo] = field(default_factory=list)

    @property
    def total(self) -> int:
        """How many tasks the store holds, in every state."""
        return sum(self.counts.values())

    def __repr__(self) -> str:
        counts = " ".join(f"{state}={self.counts.get(state, 0)}" for state in STATES)
        return f"<QueueOverview {counts}>"


@dataclass(frozen=True)
class PurgeReport:
    """What a purge or a retention sweep removed: how many tasks, and how many bytes they held."""

    tasks: int
    bytes: int
    dry_run: bool = False

    def __repr__(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        return f"<PurgeReport {verb} {self.tasks} tasks, {self.bytes} bytes>"


class Enqueued(str, enum.Enum):
    """What ``Backend.enqueue`` did with one new task (see :mod:`sitq.backends.rules`, keyed tasks)."""

    INSERTED = "inserted"  # a new task
    EXISTING = "existing"  # a keyed task that already existed: nothing changed, its id is returned
    REPLACED = "replaced"  # a keyed task that had failed, was cancelled or expired: it was reset to run again

    def __str__(self) -> str:
        return self.value


@dataclass
class NewTask:
    """A row to insert: everything is already serialized.

    ``queue``, ``priority``: where and in which order it is claimed. ``key``: set for a keyed
    task, whose id is derived from the key (``sitq.backends.rules.key_task_id``); an existing
    task with that id is kept or reset instead of inserting a second one, as
    ``rules.keyed_enqueue`` decides with ``replace_failed``. ``after``: ids of tasks that must
    succeed first. ``retention``: seconds to keep it once finished (None: for ever).
    ``group_id``: the group it belongs to, named ``group_name``.
    """

    task_id: str
    name: str
    func: bytes
    args: bytes
    eta: float
    enqueued_at: float
    max_attempts: int = 1
    signature: bytes | None = None
    queue: str = DEFAULT_QUEUE
    priority: int = 0
    key: str | None = None
    replace_failed: bool = True
    after: tuple[str, ...] = ()
    retention: float | None = None
    group_id: str | None = None
    group_name: str | None = None


@dataclass(eq=False)
class NewTaskBatch(Sequence[NewTask]):
    """Many new tasks of one function (``map``), kept as columns: a sequence of NewTask.

    Why not a list of NewTask: each of those is an object the garbage collector tracks,
    and with 100,000 of them alive a full collection pauses every thread of the process
    for tens of milliseconds. Lists of strings and bytes cost it nothing. An item is
    built when it is read; a backend may read the columns directly. Everything but the
    ids, arguments, signatures and keys is the same for every task of the batch.
    """

    name: str
    func: bytes
    eta: float
    enqueued_at: float
    max_attempts: int
    task_ids: list[str]
    args: list[bytes]  # one per task
    signatures: list[bytes | None]  # one per task
    keys: list[str] | None = None  # one per task, for a keyed batch
    queue: str = DEFAULT_QUEUE
    priority: int = 0
    replace_failed: bool = True
    after: tuple[str, ...] = ()
    retention: float | None = None
    group_id: str | None = None
    group_name: str | None = None

    def __len__(self) -> int:
        return len(self.task_ids)

    @overload
    def __getitem__(self, index: int) -> NewTask: ...

    @overload
    def __getitem__(self, index: slice) -> list[NewTask]: ...

    def __getitem__(self, index: int | slice) -> NewTask | list[NewTask]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return NewTask(
            self.task_ids[index], self.name, self.func, self.args[index], self.eta, self.enqueued_at,
            self.max_attempts, self.signatures[index], self.queue, self.priority,
            None if self.keys is None else self.keys[index], self.replace_failed, self.after, self.retention,
            self.group_id, self.group_name,
        )


@dataclass
class Schedule:
    """A periodic task as stored: ``payload`` makes each tick's :class:`NewTask` (see
    ``sitq.backends.rules.next_tick``). ``signature`` signs the payload for the schedule's
    name, with a key; the worker that fires a tick checks it and signs the new task."""

    name: str
    task_name: str
    func: bytes
    args: bytes
    signature: bytes | None
    every: float | None
    cron: str | None
    tz: str
    next_run: float
    last_run: float | None = None
    queue: str = DEFAULT_QUEUE
    priority: int = 0
    max_attempts: int = 1
    retention: float | None = None


@dataclass
class ClaimedTask:
    """A task a worker has claimed and must finish while its lease holds.

    ``handle`` is the backend's own way to find the row again (SQLite and
    PostgreSQL: its sequence number); the worker hands it back in outcomes and
    progress without looking inside. ``attempts`` with ``handle`` identify this
    claim: a write for an older claim of the same task is refused.
    ``problem`` is set by the backend when the stored row holds values sitq does
    not write (text where bytes belong, say). It names the column and what was
    found; the worker then fails the task with it, without unpickling anything.
    """

    handle: Any
    task_id: str
    name: str
    func: bytes
    args: bytes
    signature: bytes | None
    attempts: int
    lost: int = 0  # times it lost its worker before: a suspect, run alone (see backends.rules)
    problem: str | None = None


@dataclass
class Outcome:
    """What a worker reports for one claimed task: ``kind`` says what happened.

    A ``RETRY`` is due again at ``retry_at`` (``sitq.backends.rules.after_retry``
    decides whether it is pending or, if a cancel was requested, cancelled).
    """

    task_id: str
    handle: Any  # the ClaimedTask's
    attempts: int
    kind: OutcomeKind
    finished_at: float
    value: bytes | None = None
    error: str | None = None
    traceback: str | None = None
    output: str | None = None
    progress: tuple[float, float | None, str | None] | None = field(default=None)  # the last (done, total, message)
    retry_at: float | None = None
    value_signature: bytes | None = None  # the worker's signature of value, with a key
