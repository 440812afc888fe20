"""The storage contract every backend fulfils, and the wake-up machinery they share.

A backend stores rows and bytes; it never sees a callable. Every state change
is one statement guarded by the state it expects, so a worker that lost its
claim can never overwrite the outcome written by the one that took over.

The rules of a task's life (lost workers, expired leases, retries and cancels)
are in :mod:`sitq.backends.rules`; waking waiters when the store changes is
:mod:`sitq.backends.notify`. ``docs/writing-a-backend.md`` walks through
writing a new backend against this contract.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from sitq.backends.notify import ChangeNotifier
from sitq.backends.rules import CancelOutcome, RetryOutcome
from sitq.core import (
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

__all__ = ["Backend", "Heartbeat"]

class Heartbeat(Protocol):
    """What :meth:`Backend.start_heartbeat` returns."""

    def stop(self) -> None:
        """Stop renewing. Returns once a renewal in progress has ended; safe to call twice."""


class Backend:
    """Base class of task stores. Storage methods raise ``NotImplementedError`` here."""

    def __init__(self) -> None:
        self.changes = ChangeNotifier(on_watch=self._on_watch)

    # -- lifecycle ---------------------------------------------------------

    async def connect(self) -> None:
        """Open the store and create or check its schema. Safe to call twice."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections and helper threads. The backend may be reopened."""
        raise NotImplementedError

    async def ensure_same_store(self) -> None:
        """Raise ``BackendError`` if the store at the backend's address is no longer the one it opened.

        A file deleted or replaced (``rm tasks.db``, ``mv other.db tasks.db``) under an open
        connection still takes its writes, but no one else can see them. Workers call this on
        their periodic schedule and stop with the error, so it must be cheap (SQLite: one
        ``os.stat``). A store with nothing to replace (``:memory:``, a server) returns at once;
        so does one that cannot tell just now: only a definite change raises.
        """
        raise NotImplementedError

    # -- producers ---------------------------------------------------------

    async def enqueue(self, tasks: Sequence[NewTask]) -> list[Enqueued]:
        """Store new tasks, all in one transaction (all or none), and say what became of each.

        A task is ``pending``, or ``waiting`` if it runs ``after`` tasks that have not all
        succeeded yet, or ``cancelled`` at once if one of them failed or was cancelled
        (``rules.initial_state``). An ``after`` id that names no task raises
        ``InvalidTaskError`` and stores nothing. A task with a ``key`` whose id is already
        stored is kept or reset as ``rules.keyed_enqueue`` decides (``EXISTING``,
        ``REPLACED``); an unkeyed task whose id is taken raises ``BackendError``. A task
        with a ``group_id`` joins that group (recorded with ``group_name`` if new).
        """
        raise NotImplementedError

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
        """Atomically mark up to ``limit`` ready tasks running for this worker: pending tasks
        whose ``eta`` has come, in the named ``queues`` (every queue if None), highest
        ``priority`` first, then oldest ``eta``, then enqueue order. Returned in enqueue order.

        Suspects (tasks that lost their worker before, ``lost > 0``) are claimed only by a
        worker that runs nothing else (``alone``), one at a time: when one is ready, it is
        the only task returned. A worker that is running tasks passes ``alone=False`` and
        gets only tasks that never lost a worker.
        """
        raise NotImplementedError

    async def finish(self, worker_id: str, outcomes: Sequence[Outcome]) -> list[bool]:
        """Store outcomes, each only if the task is still running under this claim.

        Each outcome names its claim by the ``ClaimedTask``'s ``handle`` and ``attempts``.
        Its ``kind`` decides the row: ``SUCCESS``, ``FAILED``, ``CANCELLED`` store that
        status; ``RETRY`` makes the task pending again at ``retry_at``, or cancelled if a
        cancel was requested meanwhile (``rules.after_retry``). A task that finishes is
        kept until ``rules.expires_at`` and settles the tasks waiting for it
        (``rules.dependency_finished``), in the same transaction. Returns one flag per
        outcome: False means the claim was lost (the lease expired and another worker
        took the task) and nothing was written.
        """
        raise NotImplementedError

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
        """``finish`` then ``claim``. Backends override it to do both in one transaction."""
        stored = await self.finish(worker_id, outcomes) if outcomes else []
        claimed = (
            await self.claim(worker_id, limit, now, lease_until, alone=alone, queues=queues) if limit > 0 else []
        )
        return stored, claimed

    async def release(self, worker_id: str, claims: Sequence[tuple[Any, int]]) -> list[bool]:
        """Hand back claimed tasks this worker has not started, ``(handle, attempts)`` each: they
        are pending again as if never claimed (the attempt is not counted). Guarded by the claim,
        as ``finish`` is; returns one flag per claim, False where the claim was lost."""
        raise NotImplementedError

    async def suspects_waiting(self, now: float, queues: Sequence[str] | None = None) -> bool:
        """Whether a suspect (see :meth:`claim`) is ready in ``queues`` (every queue if None): a busy
        worker then stops claiming until it runs nothing, so that some worker can take the suspect alone."""
        raise NotImplementedError

    async def next_eta(self, queues: Sequence[str] | None = None) -> float | None:
        """When the earliest pending task (in ``queues``, every queue if None) becomes ready
        (POSIX seconds), or None if none is pending."""
        raise NotImplementedError

    async def renew(self, worker_id: str, lease_until: float) -> int:
        """Extend the lease of every task this worker is running, once. Returns how many.
        Workers use :meth:`start_heartbeat`, which does this off the event loop."""
        raise NotImplementedError

    def start_heartbeat(self, worker_id: str, lease: float, clock: Callable[[], float] = time.time) -> Heartbeat:
        """Renew ``worker_id``'s leases to ``clock() + lease`` now and a few times per lease,
        until the returned heartbeat's ``stop()`` (or ``close()``).

        The renewals must not depend on the caller's event loop: a worker whose loop is held
        up by a long statement, a checkpoint or a task that blocks it is still alive, and its
        leases must not expire while it is. So a backend renews from a thread of its own, with
        a connection of its own, waiting out other processes' locks there. A heartbeat proves
        only that the worker's process lives; a process that is stopped or killed stops it.
        """
        raise NotImplementedError

    async def requeue_expired(self, now: float) -> int:
        """Deal with running tasks whose lease has expired. Returns how many.

        What each becomes is :func:`sitq.backends.rules.expired_lease`'s to decide
        (cancelled, failed for losing its worker too often, or pending again as a
        suspect with one more lost worker). Rows a backend
        cannot order by time (a row sitq did not write, with an eta or lease that is not
        a time) are dealt with here too, so that none waits forever.
        """
        raise NotImplementedError

    async def cancel(self, task_id: str, now: float) -> CancelOutcome | None:
        """Cancel a task: ``"cancelled"`` (it was pending or waiting and never runs), ``"requested"``
        (it is running; its worker will stop it), ``"finished"`` (nothing changed), or
        None if there is no such task (``rules.cancel``). The tasks waiting for a task
        cancelled here are cancelled too."""
        raise NotImplementedError

    async def retry(self, task_ids: Sequence[str], now: float) -> dict[str, RetryOutcome]:
        """Retry tasks by hand: each that failed or was cancelled is pending again at ``now``, with
        its result, error and lost-worker count cleared and one more attempt allowed; others are
        left as they are (``rules.retry``). Unknown ids are left out of the answer."""
        raise NotImplementedError

    async def cancel_requests(self, worker_id: str) -> list[str]:
        """The ids of this worker's running tasks that someone asked to cancel."""
        raise NotImplementedError

    async def set_progress(
        self, worker_id: str, progress: Sequence[tuple[Any, int, float | None, float | None, str | None]]
    ) -> None:
        """Store ``(handle, attempts, done, total, message)`` for tasks still running under this claim."""
        raise NotImplementedError

    # -- readers -----------------------------------------------------------

    async def fetch_result(self, task_id: str) -> Result | None:
        """The task's outcome fields in any state (``status`` may be pending), or None if unknown."""
        raise NotImplementedError

    async def fetch_results(self, task_ids: Sequence[str]) -> dict[str, Result]:
        """The outcome fields of the known tasks among ``task_ids``, in any state, in one read
        (a group's results, say); unknown ids are left out."""
        raise NotImplementedError

    async def fetch_info(self, task_ids: Sequence[str]) -> dict[str, TaskInfo]:
        """Current state of the known tasks among ``task_ids``."""
        raise NotImplementedError

    async def overview(self, limit: int) -> QueueOverview:
        """Counts per state, per queue, and at most ``limit`` of: the newest tasks, the running
        ones, the newest failures and the newest groups; and every schedule.

        The counts cost the same however many finished tasks the store keeps: a backend keeps
        them as tasks move (in the transactions that move them), rather than counting rows.
        """
        raise NotImplementedError

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
        """Tasks in ``statuses``, ``queue`` and ``group_id`` (None: any), in enqueue order (newest
        first unless ``newest_first`` is false), skipping ``offset``, at most ``limit``."""
        raise NotImplementedError

    async def match_ids(self, fragment: str, limit: int = 2) -> list[str]:
        """Ids equal to ``fragment``, or that begin or end with it (as git takes a short hash), at
        most ``limit``: a caller asks for two to tell a unique match from an ambiguous one."""
        raise NotImplementedError

    async def group(self, group_id: str) -> GroupInfo | None:
        """The group's name and counts per state (kept as its tasks move), or None if unknown."""
        raise NotImplementedError

    async def match_group_ids(self, fragment: str, limit: int = 2) -> list[str]:
        """Group ids equal to ``fragment``, or that begin or end with it, at most ``limit``, as
        :meth:`match_ids` finds task ids (views show a group by the end of its id)."""
        raise NotImplementedError

    async def find_ungrouped(
        self,
        *,
        statuses: Sequence[TaskStatus | str] | None = None,
        limit: int = 100,
        offset: int = 0,
        newest_first: bool = True,
    ) -> list[TaskInfo]:
        """Tasks in ``statuses`` (None: any) that belong to no group, as :meth:`find_tasks` lists them:
        a board shows each group as one row and lists the other tasks beside it. With ``statuses``,
        a backend finds them at a cost that does not grow with the groups' tasks (an index of the
        tasks of no group), so a board lists five loose tasks beside a group of a million.

        This base reads :meth:`find_tasks` a page at a time and skips the grouped tasks, so its cost
        grows with the grouped tasks it passes; a backend overrides it with one query.
        """
        found: list[TaskInfo] = []
        skip, start, page = offset, 0, max(limit, 500)
        while len(found) < limit:
            batch = await self.find_tasks(statuses=statuses, limit=page, offset=start, newest_first=newest_first)
            for info in batch:
                if info.group_id is None:
                    if skip:
                        skip -= 1
                    elif len(found) < limit:
                        found.append(info)
            if len(batch) < page:
                break
            start += page
        return found

    async def count_ungrouped(self) -> dict[str, int]:
        """How many tasks of no group are in each state (every state a key): the store's counts per
        state less its groups' counts, both kept as tasks move, so the cost does not grow with the
        number of tasks. A board says with it how many loose tasks there are in all."""
        raise NotImplementedError

    async def cancel_group(self, group_id: str, now: float) -> dict[CancelOutcome, int]:
        """Cancel every unfinished task of the group as :meth:`cancel` cancels one: waiting and pending
        ones are cancelled (and the tasks waiting for them), running ones are asked to stop. Returns how
        many were ``CANCELLED`` and how many ``REQUESTED``; finished tasks and unknown groups count 0.

        This base cancels the members one by one through :meth:`find_tasks` and :meth:`cancel`, in as
        many transactions, passing again over what a worker moved meanwhile; a backend overrides it
        with one statement per state in one transaction.
        """
        done = {CancelOutcome.CANCELLED: 0, CancelOutcome.REQUESTED: 0}
        asked: set[str] = set()
        unfinished = [TaskStatus.WAITING, TaskStatus.PENDING, TaskStatus.RUNNING]
        while True:
            ids: list[str] = []
            while True:  # every unfinished member now, a page at a time
                page = await self.find_tasks(statuses=unfinished, group_id=group_id, limit=500, offset=len(ids))
                ids += [info.task_id for info in page]
                if len(page) < 500:
                    break
            cancelled = 0
            for task_id in dict.fromkeys(ids):
                if task_id in asked:
                    continue
                outcome = await self.cancel(task_id, now)
                if outcome is CancelOutcome.CANCELLED:
                    cancelled += 1
                    done[outcome] += 1
                elif outcome is CancelOutcome.REQUESTED:
                    asked.add(task_id)
                    done[outcome] += 1
            if not cancelled:
                return done

    # -- retention ---------------------------------------------------------

    async def prune(self, now: float, limit: int) -> PurgeReport:
        """Delete at most ``limit`` finished tasks whose retention expired by ``now``
        (``rules.expires_at``), in short transactions, and return the space to the system
        where the store can. Pending, waiting and running tasks are never touched."""
        raise NotImplementedError

    async def purge(
        self, *, statuses: Sequence[TaskStatus | str], finished_before: float | None, dry_run: bool = False
    ) -> PurgeReport:
        """Delete every task in ``statuses`` (finished states only) that finished before
        ``finished_before`` (None: whenever), in short transactions; with ``dry_run``, only
        count them. Returns how many tasks and bytes went (or would go)."""
        raise NotImplementedError

    # -- schedules ---------------------------------------------------------

    async def set_schedule(self, schedule: Schedule) -> None:
        """Store a schedule under its name, replacing one of that name. A schedule whose
        period (``every``, ``cron``, ``tz``) is unchanged keeps its stored ``next_run``, so
        declaring it again (a notebook cell run twice) neither skips nor repeats a tick."""
        raise NotImplementedError

    async def delete_schedule(self, name: str) -> bool:
        """Remove a schedule; False if there was none of that name. Its tasks stay."""
        raise NotImplementedError

    async def schedules(self) -> list[ScheduleInfo]:
        """Every schedule, soonest next run first."""
        raise NotImplementedError

    async def due_schedules(self, now: float) -> list[Schedule]:
        """The schedules whose ``next_run`` has come, with their payloads."""
        raise NotImplementedError

    async def fire_schedule(self, name: str, due: float, next_run: float, now: float, task: NewTask) -> bool:
        """Enqueue ``task`` for the tick of ``name`` due at ``due`` and move its ``next_run`` on,
        in one transaction, only if its ``next_run`` is still ``due``: of many workers that see
        the same tick, exactly one enqueues it. False if another got there first (or the
        schedule is gone)."""
        raise NotImplementedError

    # -- facts about the store -------------------------------------------------

    async def get_meta(self, key: str) -> str | None:
        """The text recorded under ``key`` about the store itself, or None if nothing is.

        Reads only: it works on a store opened read-only, and on a store made by an
        older sitq that has nowhere to record such facts (None).
        """
        raise NotImplementedError

    async def set_meta_if_absent(self, key: str, value: str) -> str:
        """Record ``value`` under ``key`` unless something is recorded there already, atomically,
        and return what is recorded now: ``value``, or the earlier value if another process got
        there first. A recorded fact is never overwritten (sitq records the signing key's
        fingerprint this way: the first key a store is used with is its key).
        """
        raise NotImplementedError

    # -- change notification -------------------------------------------------
    # The protocol is in sitq.backends.notify; these are shorthands for self.changes.

    def _on_watch(self) -> None:
        """Hook: a backend that can see other processes' writes starts listening here."""

    @property
    def change_token(self) -> int:
        """A number that moves whenever this process sees the store change."""
        return self.changes.token

    def notify_change(self) -> None:
        """Wake everyone waiting for a change. Safe to call from any thread."""
        self.changes.notify()

    def watch(self, fut: asyncio.Future[None], token: int) -> bool:
        """Resolve ``fut`` on the next change. False (and nothing registered) if ``token`` is stale."""
        return self.changes.watch(fut, token)

    def unwatch(self, fut: asyncio.Future[None]) -> None:
        """Forget a future registered with :meth:`watch` (its waiter stopped waiting)."""
        self.changes.unwatch(fut)

    async def wait_for_change(self, token: int, timeout: float | None) -> None:
        """Return on the next change after ``token`` was read, or after ``timeout`` seconds."""
        await self.changes.wait(token, timeout)

    # Result waiters need only the changes that may finish a task. A backend that can tell
    # those apart from the rest (claims, progress) keeps a second notifier for them, so a
    # waiter is not woken for its task starting; these defaults wake it on every change.

    @property
    def finish_token(self) -> int:
        """Like :attr:`change_token`, for :meth:`wait_for_finish`."""
        return self.change_token

    async def wait_for_finish(self, token: int, timeout: float | None) -> None:
        """Return after a change that may have finished a task (or any change, or ``timeout``)."""
        await self.wait_for_change(token, timeout)

    def store_before_claim(self, outcomes: int) -> bool:
        """Whether a worker with ``outcomes`` outcomes to store, and room for more tasks, should
        store them in one call, let the loop run, and claim in a second call. A result waiter in
        this process then reads its value before the claim (which may unpickle many tasks), and
        a backend whose statements run on the loop's thread holds the loop in two shorter steps.
        Worth it only where two calls cost what one does (SQLite: no network); by default False,
        one call (PostgreSQL: one round trip)."""
        return False
