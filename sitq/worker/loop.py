"""The consumer side: claim tasks, run them, store their outcomes.

The loop reads like its spec: wait until there is a free slot and something
to do, finish what is done and claim work for the free slots (one
transaction), start it, repeat. Coroutine functions run on the worker's event
loop; plain functions run in the worker's threads. Renewing leases, acting on
cancel requests, requeueing tasks of dead workers and storing progress are a
side task the worker owns.

A slot normally takes one task. When the tasks run so far were very short
(the worker keeps a moving average), a slot takes a run of several, executed
one after another, so that the store's round trips and the hops between the
loop and a thread are shared by the run; a run is sized to stay within a few
milliseconds of work, so no task waits long behind another and other workers
are not starved. ``docs/performance.md`` has the measurements.

A task is data whatever it does: anything it raises (``KeyboardInterrupt``
and other ``BaseException`` subclasses included) and anything that goes wrong
while sitq records its outcome (an exception whose ``str()`` raises, a value
that cannot be pickled) ends the task as failed, and the thread or coroutine
that ran it carries on. A timeout or cancel stops a coroutine by cancelling
it; one that ignores the cancel for ``cancel_grace`` seconds is abandoned: its
outcome is recorded, its slot freed and whatever it does later discarded. A
thread cannot be stopped, so the same happens to it at once; code that runs a
task elsewhere (a process pool) watches :func:`stop_event` and stops it there.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import os
import queue as thread_queue
import secrets
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from sitq.backends import Backend, Target, open_backend
from sitq.core import CANCELLED, FAILED, PENDING, SUCCESS, ClaimedTask, Outcome
from sitq.errors import BackendError, InvalidTaskError, SerializationError, SitqError, TaskTimeoutError
from sitq.options import Task, TaskOptions
from sitq.output import CapturedOutput, OutputCapture, capture_into
from sitq.serialization import CloudpickleSerializer, Serializer
from sitq.signing import STORE_KEY_RECORD, check_store_key, signer_from

__all__ = ["Worker", "progress"]

log = logging.getLogger(__name__)

DEFAULT_OPTIONS = TaskOptions()
RUN_BUDGET = 0.002  # seconds of work one slot may claim at once, judged by recent task times
MAX_RUN = 64  # tasks one slot may claim at once


@dataclass(eq=False)
class _Running:
    """A claimed task this worker is running."""

    task: ClaimedTask
    worker: "Worker"
    options: TaskOptions = DEFAULT_OPTIONS
    output: Optional[CapturedOutput] = None
    progress: Optional[tuple] = None
    handle: Any = field(default=None, repr=False)  # the asyncio task of a coroutine
    stop_reason: Optional[str] = None  # "timeout" or "cancel" once the worker stopped waiting for it
    settled: bool = False  # its outcome is recorded; anything later is discarded
    started: bool = False  # its run has started it
    elapsed: float = 0.0  # seconds the function ran, measured in its thread
    call: Optional[tuple] = field(default=None, repr=False)  # (func, args, kwargs) once unpickled
    context: Optional[contextvars.Context] = field(default=None, repr=False)
    is_async: bool = False
    run: Optional["_Run"] = field(default=None, repr=False)
    timer: Any = field(default=None, repr=False)  # the timeout's timer, cancelled once settled
    grace: Any = field(default=None, repr=False)  # the timer that abandons a coroutine ignoring its cancel
    waiter: Optional[asyncio.Future] = field(default=None, repr=False)  # resolved once settled (runs on the loop)
    stopped: Optional[threading.Event] = field(default=None, repr=False)  # see stop_event()

    def release(self) -> None:
        """Drop what a settled task no longer needs: its arguments, context and output may be
        large, and an abandoned thread or coroutine (or a run) may keep this record alive."""
        self.call = self.context = self.output = self.handle = None
        self.timer = self.grace = self.waiter = None


class _Run:
    """Tasks one slot executes one after another; the slot is free once all have settled."""

    def __init__(self, jobs: list) -> None:
        self.jobs = jobs
        self.on_loop = False  # run by a coroutine on the loop (else by a thread)
        self.unsettled = len(jobs)
        self.next = 0  # index of the next job to start
        self.lock = threading.Lock()
        for job in jobs:
            job.run = self

    def take(self) -> Optional[_Running]:
        """The next job to start, or None when the run is over (called from the executing thread)."""
        with self.lock:
            while self.next < len(self.jobs):
                job = self.jobs[self.next]
                self.next += 1
                if not job.settled:
                    job.started = True
                    return job
            return None

    def take_rest(self) -> list:
        """Take the jobs not started yet away from this run, to run them elsewhere."""
        with self.lock:
            rest, self.next = self.jobs[self.next :], len(self.jobs)
        rest = [job for job in rest if not job.settled]
        self.unsettled -= len(rest)
        return rest


_current: contextvars.ContextVar[Optional[_Running]] = contextvars.ContextVar("sitq_current_task", default=None)
_reporter: contextvars.ContextVar[Optional[Callable]] = contextvars.ContextVar("sitq_progress_reporter", default=None)
_stop_lock = threading.Lock()  # between a task's thread asking for its stop event and the loop setting it


@contextlib.contextmanager
def reporting_progress(report: Callable[[float, Optional[float], Optional[str]], None]):
    """Within this block, :func:`progress` calls ``report(done, total, message)``.

    For runners that execute a task's function somewhere else (another
    process) and relay its progress back to the worker.
    """
    token = _reporter.set(report)
    try:
        yield
    finally:
        _reporter.reset(token)


def stop_event() -> Optional[threading.Event]:
    """The event set once the worker stops waiting for the task running in this context.

    The worker sets it when the task's timeout passes or the task is
    cancelled; by then its outcome is recorded and anything the task does
    later is discarded. For runners that execute a task somewhere they can
    stop it (a child process) and wait for it in the task's thread. None
    outside a task.
    """
    running = _current.get()
    if running is None:
        return None
    with _stop_lock:
        if running.stopped is None:  # made on demand: most tasks never need one
            running.stopped = threading.Event()
            if running.stop_reason is not None:
                running.stopped.set()
        return running.stopped


def progress(done: float, total: Optional[float] = None, message: Optional[str] = None) -> bool:
    """Report progress from inside a running task: ``done`` out of ``total``, and a short message.

    Works in coroutine and thread tasks. Cheap enough to call in a tight loop:
    the worker stores the latest value a few times a second. Outside a task
    it does nothing and returns False, so the function still runs on its own.
    """
    for label, number in (("done", done), ("total", total)):
        if (number is not None or label == "done") and (
            isinstance(number, bool) or not isinstance(number, (int, float))
        ):
            raise InvalidTaskError(f"sitq.progress({label}=...) takes a number, not {type(number).__name__}")
    value = (float(done), None if total is None else float(total), None if message is None else str(message))
    running = _current.get()
    if running is None:
        report = _reporter.get()
        if report is None:
            return False
        report(*value)
        return True
    running.progress = value
    worker = running.worker
    with worker._progress_lock:  # task threads add while the loop swaps the set out
        worker._progress_changed.add(running)
    return True


class Worker:
    """Runs tasks from a backend, at most ``max_concurrency`` at a time.

    ``backend`` is a store target: a file path, a ``sqlite:///`` or
    ``postgresql://`` URL, or a backend object (see :func:`sitq.open_backend`).

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


    A coroutine that is timed out or cancelled gets ``cancel_grace`` seconds
    to end after its ``CancelledError``; one that catches it and goes on is
    then abandoned: the task is recorded as timed out or cancelled, its slot
    goes to the next task, and whatever the coroutine does later is
    discarded (it is cancelled once more when the worker stops).
    """

    def __init__(
        self,
        backend: Target,
        max_concurrency: int = 1,
        poll_interval: float = 1.0,
        serializer: Optional[Serializer] = None,
        *,
        name: Optional[str] = None,
        lease: float = 60.0,
        progress_interval: float = 0.2,
        capture_output: bool = True,
        secret_key: Optional[Any] = None,
        cancel_grace: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise InvalidTaskError(f"max_concurrency must be a whole number >= 1, not {max_concurrency!r}")
        timings = (("poll_interval", poll_interval), ("lease", lease), ("progress_interval", progress_interval),
                   ("cancel_grace", cancel_grace))
        for label, seconds in timings:
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
                raise InvalidTaskError(f"{label} must be a number of seconds > 0, not {seconds!r}")
        self.backend = open_backend(backend)
        self.max_concurrency = max_concurrency
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
        self._active: dict[int, _Running] = {}
        self._busy_slots = 0
        self._loop_runs: set[asyncio.Task] = set()
        self._abandoned: set[asyncio.Task] = set()  # coroutines that ignored their cancel, kept to cancel on stop
        self._average_run = None  # moving average of task run times, in seconds
        self._outcomes: list[Outcome] = []
        self._progress_changed: set[_Running] = set()
        self._progress_lock = threading.Lock()
        self._wake: Optional[asyncio.Future] = None
        self._suspect: Optional[int] = None  # the seq of a suspect running alone here
        self._suspects_waiting = False
        self._stopping = False
        self._fatal: Optional[BaseException] = None  # why the worker must stop at once
        self._done: Optional[asyncio.Event] = None
        self._threads: Optional[_Threads] = None

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"<Worker {self.worker_id} {state} active={len(self._active)}/{self.max_concurrency} processed={self.processed}>"

    @property
    def is_running(self) -> bool:
        return self._done is not None and not self._done.is_set()

    @property
    def active(self) -> int:
        """How many tasks are claimed and not yet finished."""
        return len(self._active)

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
        self._signal()
        if self._done is not None:
            await self._done.wait()

    # -- the loop ----------------------------------------------------------

    async def _run(self, until_empty: bool) -> None:
        if self.is_running:
            raise SitqError(f"worker {self.worker_id} is already running")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._done = done = asyncio.Event()
        self._stopping = False
        self._fatal = None
        backend = self.backend
        try:
            await backend.connect()
            await self._check_key(backend)
        except BaseException:
            done.set()  # never started (or refused): stop() returns at once and start() may be tried again
            raise
        capture = OutputCapture.install() if self.capture_output else None
        side = loop.create_task(self._side_tasks(), name=f"sitq-side-{self.worker_id}")
        try:
            await self._main(backend, until_empty)
        finally:
            side.cancel()
            await asyncio.gather(side, return_exceptions=True)
            await self._cancel_abandoned()
            if self._threads is not None:
                self._threads.shutdown()
                self._threads = None
            if capture is not None:
                capture.uninstall()
            self._done.set()

    async def _check_key(self, backend: Backend) -> None:
        """Refuse a store whose recorded key this worker does not hold; record ours in a store without one."""
        recorded = await backend.get_meta(STORE_KEY_RECORD)
        if recorded is None and self._signer is not None:
            recorded = await backend.set_meta_if_absent(STORE_KEY_RECORD, self._signer.fingerprint)
        check_store_key(self._signer, recorded, repr(backend), f"worker {self.worker_id}")

    async def _main(self, backend: Backend, until_empty: bool) -> None:
        while True:
            if self._fatal is not None:
                raise self._fatal
            # Read before looking: a change after this moment, ours or anyone's, ends the wait below.
            # (Writes that change nothing move no token, so an idle worker does not wake itself.)
            token = backend.change_token
            outcomes, self._outcomes = self._outcomes, []
            free = self._free_slots()
            claimed: list[ClaimedTask] = []
            if outcomes or free:
                await self._flush_progress()
                now = self.clock()
                alone = not self._active  # only then may it take a suspect, which runs alone
                stored, claimed = await backend.finish_and_claim(
                    self.worker_id, outcomes, free * self._run_length(), now, now + self.lease, alone=alone
                )
                self._count(outcomes, stored)
                if claimed:
                    if claimed[0].lost:
                        self._suspect, self._suspects_waiting = claimed[0].seq, False
                    self._launch(claimed, free)
            if not self._active and not self._outcomes and (self._stopping or (until_empty and not claimed)):
                if until_empty and not self._stopping and await backend.requeue_expired(self.clock()):
                    continue  # a dead worker's tasks are ready again
                return
            if self._outcomes:
                continue
            can_claim = self._free_slots() > 0
            timeout = await self._idle_timeout() if can_claim else None
            await self._wait(token if can_claim else None, timeout)

    def _free_slots(self) -> int:
        """Slots to claim tasks for now. None while a suspect runs (it runs alone), and none while
        suspects wait and tasks still run here, so that this worker empties and can take one."""
        if self._stopping or self._suspect is not None or (self._suspects_waiting and self._active):
            return 0
        return self.max_concurrency - self._busy_slots

    async def _idle_timeout(self) -> float:
        next_eta = await self.backend.next_eta()
        if next_eta is None:
            return self.poll_interval
        return min(self.poll_interval, max(next_eta - self.clock(), 0.0) + 0.001)

    async def _wait(self, token: Optional[int], timeout: Optional[float]) -> None:
        """Wait for a finished task, a stop request, a change in the store (if token) or the timeout."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if token is not None and not self.backend.watch(fut, token):
            return  # the store changed while we were looking
        self._wake = fut
        if self._outcomes or self._fatal is not None or (self._stopping and token is not None):
            _resolve(fut)  # it happened while we were getting ready to wait (to claim more)
        timer = loop.call_later(timeout, _resolve, fut) if timeout is not None else None
        try:
            await fut
        finally:
            self._wake = None
            if timer is not None:
                timer.cancel()
            if token is not None:
                self.backend.unwatch(fut)

    def _signal(self) -> None:
        if self._wake is not None:
            _resolve(self._wake)

    def _count(self, outcomes: list[Outcome], stored: list[bool]) -> None:
        for outcome, ok in zip(outcomes, stored):
            if not ok:
                log.warning(
                    "task #%s: lost its claim before it finished (its lease expired and another "
                    "worker took it over); this worker's outcome was discarded",
                    outcome.seq,
                )
            elif outcome.status == FAILED:
                self.failed += 1
            self.processed += ok

    # -- running one task --------------------------------------------------

    def _run_length(self) -> int:
        """How many tasks one free slot claims: one, unless recent tasks were very short."""
        average = self._average_run
        if average is None or average >= RUN_BUDGET:
            return 1
        return max(1, min(MAX_RUN, int(RUN_BUDGET / max(average, 1e-6))))

    def _timed(self, seconds: float) -> None:
        average = self._average_run
        self._average_run = seconds if average is None else 0.8 * average + 0.2 * seconds

    def _launch(self, claimed: list[ClaimedTask], free: int) -> None:
        """Unpickle the claimed tasks and hand them to at most ``free`` slots, in order."""
        jobs = [job for job in map(self._prepare, claimed) if job is not None]
        slots = min(free, len(jobs))
        for i in range(slots):
            self._start_run(_Run(jobs[i::slots]))

    def _prepare(self, task: ClaimedTask) -> Optional[_Running]:
        running = _Running(task, self)
        self._active[task.seq] = running
        if task.problem is not None:  # a row sitq did not write: fail it alone, unpickle nothing
            self._settle(running, self._outcome(running, FAILED, error=f"BackendError: {task.problem}"))
            return None
        try:
            if self._signer is not None:
                self._signer.verify_task(task.task_id, task.func, task.args, task.signature)
            func, args, kwargs = self.serializer.loads_call(task.func, task.args)
            if isinstance(func, Task):
                running.options, func = func.task_options, func.func
            running.is_async = inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
                getattr(func, "__call__", None)
            )
        except BaseException as exc:  # whatever unpickling a payload raises fails its task, not the worker
            self._settle(running, self._record(running, exc, failed=True, skip_frames=0))
            return None
        running.call = (func, args, kwargs)
        running.context = context = contextvars.copy_context()
        context.run(_current.set, running)
        if self.capture_output:
            running.output = CapturedOutput()
            context.run(capture_into.set, running.output)
        return running

    def _start_run(self, run: _Run) -> None:
        self._busy_slots += 1
        if any(job.is_async for job in run.jobs):
            run.on_loop = True
            task = self._loop.create_task(self._run_on_loop(run))
            self._loop_runs.add(task)  # owned: asyncio keeps only weak references to tasks
            task.add_done_callback(self._loop_runs.discard)
        else:
            self._thread_pool().submit(lambda: self._run_in_thread(run))

    def _thread_pool(self) -> "_Threads":
        if self._threads is None:
            self._threads = _Threads(self.worker_id)
        return self._threads

    async def _run_on_loop(self, run: _Run) -> None:
        """Run a run's jobs in order: coroutines here, plain functions in a thread.

        Each job holds the slot until it is settled, not until its code ends:
        a stopped thread or an abandoned coroutine does not hold up the rest.
        """
        while (job := run.take()) is not None:
            waiter = job.waiter = self._loop.create_future()
            self._arm_timeout(job)
            if job.is_async:
                job.handle = job.context.run(self._loop.create_task, self._run_coroutine(job))
                job.handle.add_done_callback(functools.partial(self._coroutine_ended, job))
            else:
                self._thread_pool().submit(
                    lambda job=job: self._settle_from_thread([(job, self._call_in_thread(job))])
                )
            await waiter

    async def _run_coroutine(self, running: _Running) -> None:
        func, args, kwargs = running.call
        started = time.perf_counter()
        cancelled = None
        try:
            value = await func(*args, **kwargs)
        except asyncio.CancelledError as exc:
            if running.stop_reason is None and _cancelled_from_outside():
                cancelled = exc  # not sitq's doing (the loop is closing): settle, then let it propagate
            outcome = self._record(running, exc, failed=True)
        except BaseException as exc:  # KeyboardInterrupt and SystemExit too: they must not end the worker
            outcome = self._record(running, exc, failed=True)
        else:
            outcome = self._record(running, value)
        del func, args, kwargs
        self._timed(time.perf_counter() - started)
        self._settle(running, outcome)
        if cancelled is not None:
            raise cancelled

    def _coroutine_ended(self, running: _Running, handle: asyncio.Task) -> None:
        if not running.settled:  # cancelled before its first step: _run_coroutine never ran to settle it
            self._settle(running, self._record(running, asyncio.CancelledError(), failed=True, skip_frames=0))

    def _run_in_thread(self, run: _Run) -> None:
        """Run a run of plain functions in this thread; settle them on the loop in one hop."""
        settled = []
        try:
            while (job := run.take()) is not None:
                if job.options.timeout is not None:
                    self._loop.call_soon_threadsafe(self._arm_timeout, job)
                settled.append((job, self._call_in_thread(job)))
        finally:
            self._settle_from_thread(settled)

    def _call_in_thread(self, running: _Running) -> Optional[Outcome]:
        call, context = running.call, running.context
        if call is None or context is None:
            return None  # stopped just as this thread took it: its outcome is recorded already
        return context.run(self._call_sync, running, call)

    def _call_sync(self, running: _Running, call: tuple) -> Outcome:
        func, args, kwargs = call
        del call
        started = time.perf_counter()
        try:
            value = func(*args, **kwargs)
            if inspect.isawaitable(value):
                value = asyncio.run(_awaited(value))
        except BaseException as exc:  # SystemExit, KeyboardInterrupt, ... would end this thread
            outcome = self._record(running, exc, failed=True)
        else:
            outcome = self._record(running, value)
        running.elapsed = time.perf_counter() - started
        return outcome

    def _settle_from_thread(self, settled: list) -> None:
        try:
            self._loop.call_soon_threadsafe(self._settle_all, settled)
        except RuntimeError:
            pass  # the worker stopped and its loop closed while an abandoned thread ran on

    def _settle_all(self, settled: list) -> None:
        for job, outcome in settled:
            self._timed(job.elapsed)
            self._settle(job, outcome)

    def _arm_timeout(self, running: _Running) -> None:
        if running.options.timeout is not None and not running.settled:
            running.timer = self._loop.call_later(running.options.timeout, self._stop_task, running, "timeout")

    def _stop_task(self, running: _Running, reason: str) -> None:
        """Stop waiting for a task (timeout or cancel): cancel a coroutine, abandon a thread."""
        if running.settled or running.stop_reason is not None:
            return
        with _stop_lock:
            running.stop_reason = reason
            if running.stopped is not None:
                running.stopped.set()  # a process runner terminates the task's process
        if running.handle is not None:
            running.handle.cancel()  # _run_coroutine records the outcome, or _abandon does
            running.grace = self._loop.call_later(self.cancel_grace, self._abandon, running)
            return
        # Not started yet (its run skips it), or a thread, which cannot be stopped: record the
        # outcome now and discard whatever the thread returns later. The tasks queued behind a
        # thread's task in its run move to another thread and slot; this one's slot is freed.
        # (A run on the loop goes on to its next task by itself once this one is settled.)
        run = running.run
        rest = run.take_rest() if run is not None and running.started and not run.on_loop else []
        self._settle(running, self._stopped_outcome(running))
        if rest:
            self._start_run(_Run(rest))

    def _abandon(self, running: _Running) -> None:
        """A coroutine went on for ``cancel_grace`` seconds after its cancel: stop waiting for it."""
        if running.settled:
            return
        handle = running.handle
        log.warning(
            "task #%s: its coroutine caught the CancelledError of its %s and went on for %g s; "
            "it is recorded as stopped and left running, and whatever it does from now on is discarded",
            running.task.seq, running.stop_reason, self.cancel_grace,
        )
        self._abandoned.add(handle)
        handle.add_done_callback(self._abandoned.discard)
        self._settle(running, self._stopped_outcome(running))

    async def _cancel_abandoned(self) -> None:
        """Cancel abandoned coroutines once more as the worker stops, and give them ``cancel_grace`` to end."""
        if not self._abandoned:
            return
        for task in self._abandoned:
            task.cancel()
        _, pending = await asyncio.wait(set(self._abandoned), timeout=self.cancel_grace)
        if pending:
            log.warning(
                "worker %s: %d abandoned coroutine(s) ignore cancellation; they keep running on this event loop",
                self.worker_id, len(pending),
            )

    def _record(self, running: _Running, result: Any, failed: bool = False, skip_frames: int = 1) -> Outcome:
        """The outcome of a call that returned ``result`` (or raised it, if ``failed``).

        Never raises: whatever goes wrong while building the outcome (an
        exception whose ``str()`` raises, a serializer or retry rule that
        fails) fails the task with a message that says so.
        """
        try:
            if running.stop_reason is not None:
                return self._stopped_outcome(running)  # also when a coroutine caught its cancel and returned
            if failed:
                return self._failure(running, result, skip_frames=skip_frames)
            return self._success(running, result)
        except BaseException as exc:
            return self._unrecordable(running, exc)

    def _unrecordable(self, running: _Running, exc: BaseException) -> Outcome:
        log.error("task #%s: could not record its outcome: %s", running.task.seq, _describe(exc))
        error = f"SitqError: sitq could not record the outcome of this task: {_describe(exc)}"
        try:
            return self._outcome(running, FAILED, error=error)
        except BaseException:
            task = running.task
            return Outcome(task.seq, task.attempts, FAILED, time.time(), error=error)

    def _stopped_outcome(self, running: _Running) -> Outcome:
        if running.stop_reason == "cancel":
            return self._outcome(running, CANCELLED, error="cancelled while running")
        timeout = running.options.timeout
        exc = TaskTimeoutError(f"the task ran longer than its timeout of {timeout:g} s and was stopped")
        return self._failure(running, exc, skip_frames=0)

    def _success(self, running: _Running, value: Any) -> Outcome:
        try:
            data = self.serializer.dumps_value(value)
        except SerializationError as exc:
            return self._failure(running, exc, skip_frames=0)
        except BaseException as exc:  # the value's __reduce__ or __repr__ raised something else
            error = SerializationError(
                f"cannot pickle the return value, a {type(value).__name__}: {_describe(exc)}. "
                "Return plain data instead."
            )
            return self._failure(running, error, skip_frames=0)
        signature = self._signer.sign_value(running.task.task_id, data) if self._signer is not None else None
        return self._outcome(running, SUCCESS, value=data, value_signature=signature)

    def _failure(self, running: _Running, exc: BaseException, skip_frames: int = 1) -> Outcome:
        tb = exc.__traceback__
        for _ in range(skip_frames):  # drop sitq's own frame: the user's code comes first
            if tb is not None:
                tb = tb.tb_next
        while tb is not None and tb.tb_next is not None and tb.tb_frame.f_locals.get("__tracebackhide__"):
            tb = tb.tb_next  # wrappers (notebook cells, process runners) hide themselves, as in pytest
        text = _format_traceback(exc, tb) if tb is not None else None
        error = _describe(exc)
        delay = running.options.retry_after(running.task.attempts, exc)
        if delay is not None:
            return self._outcome(running, PENDING, error=error, traceback=text, retry_at=self.clock() + delay)
        return self._outcome(running, FAILED, error=error, traceback=text)

    def _outcome(self, running: _Running, status: str, **fields) -> Outcome:
        captured = running.output  # read once: the loop may release it while an abandoned thread gets here
        output = captured.text() if captured is not None else None
        task = running.task
        return Outcome(task.seq, task.attempts, status, self.clock(), output=output, progress=running.progress, **fields)

    def _settle(self, running: _Running, outcome: Optional[Outcome]) -> None:
        if running.settled:
            return  # a thread or coroutine that returned after its timeout or cancel: discard
        running.settled = True
        for timer in (running.timer, running.grace):
            if timer is not None:
                timer.cancel()  # a cancelled timer lets go of the task at once, not at its deadline
        # Its context and its run refer back to it: unlinked, all are freed at once by reference
        # counting instead of piling up for a full garbage collection, which would stall the loop.
        run, running.run, running.context = running.run, None, None
        self._active.pop(running.task.seq, None)
        if running.task.seq == self._suspect:
            self._suspect = None
        with self._progress_lock:
            self._progress_changed.discard(running)
        self._outcomes.append(outcome)
        if run is not None:
            run.unsettled -= 1
            if run.unsettled == 0:
                self._busy_slots -= 1
        if running.waiter is not None:
            _resolve(running.waiter)
        running.release()
        self._signal()

    # -- side tasks --------------------------------------------------------

    async def _side_tasks(self) -> None:
        """Store progress, act on cancel requests, and requeue tasks whose worker died.

        Leases are renewed by the backend's heartbeat, on a thread of its own: a task or a
        statement that holds up this loop must not make a healthy worker lose its tasks.
        """
        backend = self.backend
        loop = asyncio.get_running_loop()
        beat = self.lease / 3
        next_beat = loop.time()
        heartbeat = backend.start_heartbeat(self.worker_id, self.lease, self.clock)
        try:
            while True:
                if not await self._store_still_there():
                    return
                try:
                    await self._flush_progress()
                    if self._active:
                        for seq in await backend.cancel_requests(self.worker_id):
                            if seq in self._active:
                                self._stop_task(self._active[seq], "cancel")
                    now = loop.time()
                    if now >= next_beat:
                        next_beat = now + beat
                        requeued = await backend.requeue_expired(self.clock())
                        if requeued:
                            log.warning("requeued %d task(s) whose worker stopped renewing its lease", requeued)
                        waiting = bool(self._active) and await backend.suspects_waiting(self.clock())
                        if waiting != self._suspects_waiting:
                            self._suspects_waiting = waiting
                            self._signal()  # claim again once the suspects are gone
                except SitqError:
                    log.exception("worker %s: side task failed; trying again shortly", self.worker_id)
                await asyncio.sleep(min(self.progress_interval, beat))
        finally:
            heartbeat.stop()

    async def _store_still_there(self) -> bool:
        """False, with the worker told to stop at once, if the store was deleted or replaced."""
        try:
            await self.backend.ensure_same_store()
        except BackendError as exc:  # start() or drain() raises it once the main loop sees it
            self._fatal = exc
            self._signal()
            return False
        return True

    async def _flush_progress(self) -> None:
        if not self._progress_changed:
            return
        with self._progress_lock:
            changed, self._progress_changed = self._progress_changed, set()
        rows = [(r.task.seq, r.task.attempts, *r.progress) for r in changed if r.progress is not None]
        await self.backend.set_progress(self.worker_id, rows)


class _Threads:
    """Threads for plain-function tasks, started as needed.

    Normally there are at most ``max_concurrency`` of them. A thread whose
    task timed out or was cancelled cannot be stopped; it is left to finish
    and a new thread takes its place, so the worker keeps its concurrency.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: thread_queue.SimpleQueue = thread_queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._count = 0

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
            else:
                self._count += 1
                threading.Thread(target=self._serve, name=f"sitq-{self._name}-{self._count}", daemon=True).start()
        self._jobs.put(job)

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except BaseException:  # a bug in sitq: the thread, and with it the slot, must survive it
                log.exception("sitq thread %s: running a task failed", threading.current_thread().name)
            job = None  # let go of the finished run's tasks now, not when the next one comes
            with self._lock:
                self._idle += 1

    def shutdown(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, 0
        for _ in range(idle):
            self._jobs.put(None)


async def _awaited(awaitable):
    return await awaitable


def _message(exc: BaseException) -> str:
    """``str(exc)``, or a note saying it raised (an exception's ``__str__`` is user code)."""
    try:
        return str(exc)
    except BaseException as inner:
        return f"<str() of the exception raised {type(inner).__name__}>"


def _describe(exc: BaseException) -> str:
    """``"Type: message"`` for any exception, also one whose ``__str__`` raises."""
    message = _message(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _format_traceback(exc: BaseException, tb) -> Optional[str]:
    try:
        return "".join(traceback.format_exception(type(exc), exc, tb))
    except BaseException as inner:
        return f"{_describe(exc)}\n(sitq could not format its traceback: {_describe(inner)})\n"


def _cancelled_from_outside() -> bool:
    """Whether the current asyncio task was cancelled (the loop is closing), as opposed to its
    code raising ``CancelledError`` by itself. Before Python 3.11 there is no telling: assume it was."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is None or cancelling() > 0


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
