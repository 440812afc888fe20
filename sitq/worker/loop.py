"""The worker's loop: claim tasks, hand them to the runner, store their outcomes.

The loop reads like its spec: wait until there is a free slot and something
to do, finish what is done and claim work for the free slots (one
transaction), hand it to the :class:`~sitq.worker.runners.Runner`, repeat.
Acting on cancel requests, requeueing tasks of dead workers, isolating
suspects (tasks that lost their worker before) and storing progress are a
side task the worker owns; leases are renewed by the backend's heartbeat
thread. Before it starts the worker checks the store's key; while it runs it
checks that the store is still the one it opened. How a task is executed,
timed out and stopped is :mod:`sitq.worker.runners`' business.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from sitq.backends import Backend, Target, open_backend
from sitq.backends.rules import PRUNE_BATCH, PRUNE_INTERVAL, SCHEDULE_CHECK
from sitq.core import ClaimedTask, Outcome, OutcomeKind
from sitq.errors import BackendError, InvalidTaskError, SitqError
from sitq.options import check_queue_name
from sitq.output import OutputCapture
from sitq.scheduling import fire_due
from sitq.serialization import CloudpickleSerializer, Serializer
from sitq.signing import STORE_KEY_RECORD, Signer, check_store_key, signer_from
from sitq.worker.runners import Runner

__all__ = ["Worker"]

log = logging.getLogger(__name__)

PRUNE_LIMIT = 20 * PRUNE_BATCH  # the most expired tasks one prune deletes; the next takes the rest
LOOK_TRIES = 2  # reads a view tries beside the worker's writes before it holds the next one back (Worker.look)

T = TypeVar("T")


class Worker:
    """Runs tasks from a backend, at most ``max_concurrency`` at a time (default 1).

    ``backend`` is a store target: a file path, a ``sqlite:///`` or
    ``postgresql://`` URL, or a backend object (see :func:`sitq.open_backend`).
    A backend the worker opened from a target it also closes (connections,
    threads) when ``start()`` or ``drain()`` returns; a backend object passed
    in stays open for its owner to close.

    ``await worker.start()`` runs until ``await worker.stop()``, which lets
    running tasks finish; ``await worker.drain()`` runs until no task is ready
    or running (tasks whose ``eta`` lies in the future stay queued).

    ``poll_interval`` is the longest an idle worker waits before it looks at
    the store again; new tasks usually wake it much sooner. A claimed task
    holds a lease of ``lease`` seconds that the worker renews while the task
    runs; if the worker dies, the task becomes claimable again once the lease
    expires. With ``capture_output`` what a task prints is stored with its
    result instead of going to this process's stdout and stderr. With
    ``secret_key`` (or ``SITQ_SECRET_KEY``) the worker refuses every task whose
    payload is not signed with that key for that task, without unpickling it,
    and signs the values it stores. It refuses to start, with
    :class:`SignatureError`, on a store that was used with a key (see
    :mod:`sitq.signing`) when it has no key or another one; a worker with a
    key records it in a store that has none.

    ``queues`` names the queues the worker serves (every queue if None); of the ready tasks
    there, higher priority runs first, then the oldest. Every ``prune_interval`` seconds the
    worker deletes finished tasks whose retention has expired, a few hundred per transaction,
    and about once a second it enqueues the ticks of schedules that are due (exactly one
    worker of those sharing the store enqueues each tick).

    With ``processes=N`` every task runs in one of N child processes that the
    worker starts when it starts (fresh interpreters, not forks), one task per
    process, N at a time: the worker claims a task only for a free process, so
    ``max_concurrency`` is N and may be left out. Functions travel by value as
    cloudpickle sends them, progress and output are relayed while a task runs,
    a task that is timed out or cancelled has its process terminated and
    replaced, and a process that dies fails only its own task (see
    :mod:`sitq.worker.processes`).

    ``name`` begins the worker's id (``worker_id``, ``name:pid:random``, the
    host name by default), which the board, ``sitq status`` and the logs show.
    Progress that tasks report is stored about every ``progress_interval`` seconds.
    ``serializer`` must match the one the tasks were enqueued with; ``clock``
    returns POSIX seconds (tests pass their own). ``processed`` and ``failed``
    count the outcomes this worker stored.

    A coroutine that is timed out or cancelled gets ``cancel_grace`` seconds
    to end after its ``CancelledError``; one that catches it and goes on is
    then abandoned: the task is recorded as timed out or cancelled, its slot
    goes to the next task, and whatever the coroutine does later is
    discarded (it is cancelled once more when the worker stops).
    """

    def __init__(
        self,
        backend: Target,
        max_concurrency: int | None = None,
        poll_interval: float = 1.0,
        serializer: Serializer | None = None,
        *,
        name: str | None = None,
        lease: float = 60.0,
        progress_interval: float = 0.2,
        capture_output: bool = True,
        secret_key: str | bytes | None = None,
        cancel_grace: float = 5.0,
        queues: Sequence[str] | None = None,
        prune_interval: float = PRUNE_INTERVAL,
        processes: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        max_concurrency = _concurrency(max_concurrency, processes)
        _check_settings(max_concurrency, poll_interval=poll_interval, lease=lease,
                        progress_interval=progress_interval, cancel_grace=cancel_grace, prune_interval=prune_interval)
        self.queues = _check_queues(queues)
        self.prune_interval = float(prune_interval)
        self._owns_backend = not isinstance(backend, Backend)  # opened here from a target: closed here too
        self.backend = open_backend(backend)
        self.max_concurrency = max_concurrency
        self.processes = processes or 0
        self.poll_interval = float(poll_interval)
        self.serializer = serializer or CloudpickleSerializer()
        self.lease = float(lease)
        self.progress_interval = float(progress_interval)
        self.cancel_grace = float(cancel_grace)
        self.capture_output = capture_output
        self.clock = clock
        self._signer = signer_from(secret_key)
        self.worker_id = f"{name or socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.processed = 0
        self.failed = 0
        self._runner = Runner(
            self.worker_id, self._settled, serializer=self.serializer, signer=self._signer, clock=clock,
            capture_output=capture_output, cancel_grace=self.cancel_grace, processes=self.processes,
            on_capacity=self._capacity, on_released=self._released_by_runner,
        )
        self._side = _SideTasks(self)
        self._moves = _Moves()
        self._wakeup = _Wakeup(self.backend)
        self._outcomes: list[Outcome] = []
        self._released: list[ClaimedTask] = []  # claimed, never started, to hand back to the store
        self._suspect: str | None = None  # the id of a suspect running alone here
        self._stopping = False
        self._done: asyncio.Event | None = None

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        active = f"{len(self._runner.active)}/{self.max_concurrency}"
        return f"<Worker {self.worker_id} {state} active={active} processed={self.processed}>"

    @property
    def is_running(self) -> bool:
        """Whether :meth:`start` or :meth:`drain` is running now."""
        return self._done is not None and not self._done.is_set()

    @property
    def active(self) -> int:
        """How many tasks are claimed and not yet finished."""
        return len(self._runner.active)

    def waiting_in_runs(self) -> list[str]:
        """The tasks this worker has claimed (so the store counts them running) that are not running
        now: a slot claims up to 64 very short tasks at once and runs them one after another, so
        all but one of a run wait, or have ended with their outcome not stored yet. Call it on the
        worker's loop; a view that corrects what it read from the store with it uses :meth:`look`,
        which takes it as of that read."""
        waiting = [outcome.task_id for outcome in self._outcomes] + [task.task_id for task in self._released]
        seen: set[int] = set()
        for running in list(self._runner.active.values()):
            run = running.run
            if run is None or id(run) in seen:
                continue
            seen.add(id(run))
            unsettled = [job for job in run.jobs if not job.settled]
            if run.child is not None:  # a process runs them in order: the first unsettled one runs now
                now = unsettled[:1]
            else:  # a thread (or the loop) marks each as it starts it: the last one started runs now
                now = [job for job in unsettled if job.started][-1:]
            waiting += [job.task.task_id for job in unsettled if job not in now]
        return waiting

    async def look(self, read: Callable[[], Awaitable[T]]) -> tuple[T, list[str]]:
        """Run a view's ``read`` of the store and return what it read with :meth:`waiting_in_runs`
        as of that read: none of this worker's claims, outcome writes or hand-backs lands between
        the two, so the tasks the read found running here, less those waiting, are the ones running.

        The worker does not wait for views: a read that one of its writes overlapped is read again.
        Only a read that finds a write under way, or is overlapped ``LOOK_TRIES`` times, holds the
        worker's next write back until it is done, so a busy worker cannot starve a view. For views
        in the worker's own process (the notebook's); call it on the worker's loop.
        """
        moves = self._moves
        for _ in range(LOOK_TRIES):
            before = moves.count
            if before % 2:  # a write is under way: wait for it (below) rather than race the next
                break
            value = await read()
            if moves.count == before:
                return value, self.waiting_in_runs()
        async with moves.lock:
            return await read(), self.waiting_in_runs()

    def live_output(self, task_id: str, max_chars: int | None = None) -> str | None:
        """What a task this worker is running has printed so far (its last ``max_chars``
        characters, if given), or None if it printed nothing or does not run here.

        For live views in the worker's own process (the notebook's widgets); a worker
        elsewhere stores the output when the task ends. Safe to call from any thread.
        """
        running = self._runner.active.get(task_id)
        output = running.output if running is not None else None
        if output is None:
            return None
        return output.text() if max_chars is None else output.tail(max_chars)

    async def start(self) -> None:
        """Run tasks until :meth:`stop` is called.

        Raises ``BackendError`` if the store is deleted or replaced meanwhile (see
        ``Backend.ensure_same_store``): the worker stops at once, and the tasks it was
        running stay claimed in the old store until their lease expires.
        """
        await self._run(until_empty=False)

    async def drain(self) -> None:
        """Run tasks until none is ready or running, then return."""
        await self._run(until_empty=True)

    async def stop(self) -> None:
        """Stop claiming, let running tasks finish, store their outcomes, and return."""
        self._stopping = True
        self._wakeup.signal()
        if self._done is not None:
            await self._done.wait()

    # -- the loop ----------------------------------------------------------

    async def _run(self, until_empty: bool) -> None:
        if self.is_running:
            raise SitqError(f"worker {self.worker_id} is already running")
        loop = asyncio.get_running_loop()
        self._runner.open(loop)
        self._done = done = asyncio.Event()
        self._moves = _Moves()  # its lock belongs to this run's loop
        self._stopping = False
        self._side.fatal = None
        backend = self.backend
        try:
            await backend.connect()
            await _check_key(backend, self._signer, f"worker {self.worker_id}")
        except BaseException:
            done.set()  # never started (or refused): stop() returns at once and start() may be tried again
            if self._owns_backend:
                await backend.close()
            raise
        capture = OutputCapture.install() if self.capture_output else None
        side = loop.create_task(self._side.run(), name=f"sitq-side-{self.worker_id}")
        try:
            await self._main(backend, until_empty)
        finally:
            side.cancel()
            await asyncio.gather(side, return_exceptions=True)
            await self._runner.close()
            if capture is not None:
                capture.uninstall()
            if self._owns_backend:  # its connections and threads; it opens again if the worker runs again
                await backend.close()
            self._done.set()

    async def _main(self, backend: Backend, until_empty: bool) -> None:
        while True:
            if self._side.fatal is not None:
                raise self._side.fatal
            # Read before looking: a change after this moment, ours or anyone's, ends the wait below.
            # (Writes that change nothing move no token, so an idle worker does not wake itself.)
            token = backend.change_token
            if self._released:
                async with self._moves:  # the store counts them running until this commits
                    released, self._released = self._released, []
                    await backend.release(self.worker_id, [(task.handle, task.attempts) for task in released])
            free = self._free_slots()
            claimed: list[ClaimedTask] = []
            if self._outcomes or free:
                claimed, free, token = await self._finish_and_claim(backend, free, token)
            drained = until_empty and free > 0 and not claimed  # it looked for work with room for it, and found none
            if not self._runner.active and not self._outcomes and not self._released and (self._stopping or drained):
                if until_empty and not self._stopping and (await backend.requeue_expired(self.clock())
                                                           or self._side.take_requeued()):
                    continue  # a dead worker's tasks are ready again (requeued here, or by the side task meanwhile)
                return
            if self._outcomes or self._released:
                continue
            can_claim = self._free_slots() > 0
            timeout = await self._idle_timeout() if can_claim else None
            await self._wakeup.wait(token if can_claim else None, timeout, self._woken)

    async def _finish_and_claim(self, backend: Backend, free: int, token: int) -> tuple[list[ClaimedTask], int, int]:
        """Store the outcomes recorded so far and claim work for ``free`` slots, launched at once: one
        step for views, from taking the outcomes to launching the claimed tasks (see :meth:`look`).
        Returns what it claimed, the slots it claimed for and the change token, moved past this
        worker's own writes."""
        async with self._moves:
            outcomes, self._outcomes = self._outcomes, []
            await self._side.flush_progress()
            if outcomes and free and backend.store_before_claim(len(outcomes)):
                # Store, and let the loop run (a result waiter here reads its value) before this
                # worker claims and unpickles more work.
                now = self.clock()
                stored, _ = await backend.finish_and_claim(self.worker_id, outcomes, 0, now, now, queues=self.queues)
                if any(stored) and backend.change_token == token + 1:
                    token += 1  # as below
                self._count(outcomes, stored)
                outcomes = []
                await asyncio.sleep(0)
                free = self._free_slots()
            if not (outcomes or free):
                return [], free, token
            now = self.clock()
            alone = not self._runner.active  # only then may it take a suspect, which runs alone
            stored, claimed = await backend.finish_and_claim(
                self.worker_id, outcomes, free * self._runner.run_length(), now, now + self.lease, alone=alone,
                queues=self.queues,
            )
            if (any(stored) or claimed) and backend.change_token == token + 1:
                token += 1  # only this write moved it: waking for our own change would find nothing new
            self._count(outcomes, stored)
            if claimed:
                if claimed[0].lost:
                    self._suspect, self._side.suspects_waiting = claimed[0].task_id, False
                self._runner.launch(claimed, free)
            return claimed, free, token

    def _free_slots(self) -> int:
        """Slots to claim tasks for now. None while a suspect runs (it runs alone), and none while
        suspects wait and tasks still run here, so that this worker empties and can take one."""
        if self._stopping or self._suspect is not None or (self._side.suspects_waiting and self._runner.active):
            return 0
        return self._runner.free_slots(self.max_concurrency)

    def _capacity(self) -> None:
        """A process became free (or started): claim for it."""
        self._wakeup.signal()

    async def _idle_timeout(self) -> float:
        next_eta = await self.backend.next_eta(self.queues)
        if next_eta is None:
            return self.poll_interval
        return min(self.poll_interval, max(next_eta - self.clock(), 0.0) + 0.001)

    def _woken(self, watching: bool) -> bool:
        """Whether the loop has something to do at once: an outcome to store, a reason to stop."""
        return (bool(self._outcomes) or bool(self._released) or self._side.fatal is not None
                or (self._stopping and watching))

    def _released_by_runner(self, tasks: list[ClaimedTask]) -> None:
        """The runner gave back claimed tasks it will not start (a slow task held them up): hand them
        back to the store with the next round, for whichever worker is free first."""
        if self._suspect is not None and any(task.task_id == self._suspect for task in tasks):
            self._suspect = None
        self._released.extend(tasks)
        self._wakeup.signal()

    def _count(self, outcomes: list[Outcome], stored: list[bool]) -> None:
        for outcome, ok in zip(outcomes, stored, strict=False):
            if not ok:
                log.warning(
                    "task %s: lost its claim before it finished (its lease expired and another "
                    "worker took it over); this worker's outcome was discarded",
                    outcome.task_id,
                )
            elif outcome.kind is OutcomeKind.FAILED:
                self.failed += 1
            self.processed += ok

    def _settled(self, task: ClaimedTask, outcome: Outcome) -> None:
        """The runner recorded a task's outcome: store it with the next claim."""
        if task.task_id == self._suspect:
            self._suspect = None
        self._outcomes.append(outcome)
        self._wakeup.signal()



class _Moves:
    """The worker's writes that move its tasks into or out of the running state (a claim, stored
    outcomes, tasks handed back), each with the worker's own record of them (the runs, the
    outcomes not stored yet), as one step that views can tell apart (:meth:`Worker.look`).

    ``count`` moves when such a write starts and when it ends (it is odd while one is under way),
    so a view's read can tell whether one overlapped it. The lock is held over each write; it
    costs the worker nothing unless a view holds it to read, and then the worker's next write waits.
    """

    def __init__(self) -> None:
        self.count = 0
        self.lock = asyncio.Lock()

    async def __aenter__(self) -> None:
        await self.lock.acquire()
        self.count += 1

    async def __aexit__(self, *exc_info: object) -> None:
        self.count += 1
        self.lock.release()


class _SideTasks:
    """What a running worker does beside claiming: store progress, act on cancel requests,
    requeue tasks whose worker died, notice suspects waiting, check the store is still there,
    enqueue the ticks of due schedules and prune expired tasks.

    Leases are renewed by the backend's heartbeat, on a thread of its own: a task or a
    statement that holds up the loop must not make a healthy worker lose its tasks.
    """

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.suspects_waiting = False  # suspects wait for a worker with nothing else running
        self.fatal: BaseException | None = None  # why the worker must stop at once
        self.refused_schedules: set[str] = set()  # schedules whose payload this worker cannot trust
        self.requeued = False  # it requeued a dead worker's tasks since the main loop last asked

    def take_requeued(self) -> bool:
        """Whether a dead worker's tasks were requeued here since the last call (a drain then looks again)."""
        requeued, self.requeued = self.requeued, False
        return requeued

    async def run(self) -> None:
        worker = self.worker
        backend, runner = worker.backend, worker._runner
        loop = asyncio.get_running_loop()
        beat = worker.lease / 3
        next_beat = next_schedule_check = loop.time()
        next_prune = loop.time() + min(worker.prune_interval, 1.0)  # soon after start, then on the interval
        heartbeat = backend.start_heartbeat(worker.worker_id, worker.lease, worker.clock)
        try:
            while True:
                if not await self._store_still_there():
                    return
                try:
                    await self.flush_progress()
                    if runner.active:
                        for task_id in await backend.cancel_requests(worker.worker_id):
                            if task_id in runner.active:
                                runner.stop_task(runner.active[task_id], "cancel")
                    now = loop.time()
                    if now >= next_beat:
                        next_beat = now + beat
                        requeued = await backend.requeue_expired(worker.clock())
                        if requeued:
                            self.requeued = True
                            log.warning("requeued %d task(s) whose worker stopped renewing its lease", requeued)
                        waiting = bool(runner.active) and await backend.suspects_waiting(worker.clock(), worker.queues)
                        if waiting != self.suspects_waiting:
                            self.suspects_waiting = waiting
                            worker._wakeup.signal()  # claim again once the suspects are gone
                    if now >= next_schedule_check:
                        next_schedule_check = now + SCHEDULE_CHECK
                        fired = await fire_due(backend, worker._signer, worker.clock, self.refused_schedules)
                        if fired:
                            log.info("enqueued %d scheduled task(s)", fired)
                    if now >= next_prune:
                        pruned = await backend.prune(worker.clock(), PRUNE_LIMIT)
                        # A full prune left more behind: take the next slice on the next round
                        # instead of a whole interval later, so pruning keeps up with any rate.
                        next_prune = now + (0.0 if pruned.tasks >= PRUNE_LIMIT else worker.prune_interval)
                        if pruned.tasks:
                            log.info("deleted %d finished task(s) past their retention (%d bytes)",
                                     pruned.tasks, pruned.bytes)
                except SitqError:
                    log.exception("worker %s: side task failed; trying again shortly", worker.worker_id)
                await asyncio.sleep(min(worker.progress_interval, beat))
        finally:
            heartbeat.stop()

    async def _store_still_there(self) -> bool:
        """False, with the worker told to stop at once, if the store was deleted or replaced."""
        try:
            await self.worker.backend.ensure_same_store()
        except BackendError as exc:  # start() or drain() raises it once the main loop sees it
            self.fatal = exc
            self.worker._wakeup.signal()
            return False
        return True

    async def flush_progress(self) -> None:
        worker = self.worker
        progress = worker._runner.progress
        if not progress:
            return
        changed = progress.take()
        rows = [(r.task.handle, r.task.attempts, *r.progress) for r in changed if r.progress is not None]
        await worker.backend.set_progress(worker.worker_id, rows)


class _Wakeup:
    """Where the idle loop waits: until something it must act on happens, the store
    changes or the timeout passes, whichever comes first; never a fixed sleep."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._fut: asyncio.Future[None] | None = None

    def signal(self) -> None:
        """Something the loop must act on happened (a task finished, a stop request): wake it."""
        if self._fut is not None:
            _resolve(self._fut)

    async def wait(self, token: int | None, timeout: float | None, woken: Callable[[bool], bool]) -> None:
        """Wait for :meth:`signal`, a change in the store since ``token`` (unless None) or the timeout.
        ``woken(watching)`` says whether something happened while the loop got ready to wait."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if token is not None and not self._backend.watch(fut, token):
            return  # the store changed while we were looking
        self._fut = fut
        if woken(token is not None):
            _resolve(fut)  # it happened while we were getting ready to wait (to claim more)
        timer = loop.call_later(timeout, _resolve, fut) if timeout is not None else None
        try:
            await fut
        finally:
            self._fut = None
            if timer is not None:
                timer.cancel()
            if token is not None:
                self._backend.unwatch(fut)


def _concurrency(max_concurrency: int | None, processes: int | None) -> int:
    """Tasks at a time: one per process with ``processes``, else ``max_concurrency`` (default 1)."""
    if processes is None:
        return 1 if max_concurrency is None else max_concurrency
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise InvalidTaskError(f"processes must be a whole number >= 1, not {processes!r}")
    if max_concurrency is not None and max_concurrency != processes:
        raise InvalidTaskError(
            f"with processes={processes} the worker runs one task per process, {processes} at a time; "
            f"max_concurrency={max_concurrency!r} cannot be more or fewer: leave it out"
        )
    return processes


def _check_settings(max_concurrency: int, **timings: float) -> None:
    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
        raise InvalidTaskError(f"max_concurrency must be a whole number >= 1, not {max_concurrency!r}")
    for label, seconds in timings.items():
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise InvalidTaskError(f"{label} must be a number of seconds > 0, not {seconds!r}")


def _check_queues(queues: Sequence[str] | None) -> tuple[str, ...] | None:
    if queues is None:
        return None
    if isinstance(queues, str):
        queues = queues.split(",")
    names = tuple(check_queue_name(name) for name in queues)
    if not names:
        raise InvalidTaskError("queues names at least one queue; pass None to serve every queue")
    return names


async def _check_key(backend: Backend, signer: Signer | None, who: str) -> None:
    """Refuse a store whose recorded key ``who`` does not hold; record ours in a store without one."""
    recorded = await backend.get_meta(STORE_KEY_RECORD)
    if recorded is None and signer is not None:
        recorded = await backend.set_meta_if_absent(STORE_KEY_RECORD, signer.fingerprint)
    check_store_key(signer, recorded, repr(backend), who)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
