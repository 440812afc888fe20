"""Executing claimed tasks: threads, coroutines, runs of short tasks, timeouts and stops.

The worker's loop hands claimed tasks to a :class:`Runner` and hears back,
through one callback, the outcome of each. Coroutine functions run on the
worker's event loop; plain functions run in the runner's threads.

A slot normally takes one task. When the tasks run so far were very short
(the runner keeps a moving average), a slot takes a run of several, executed
one after another, so that the store's round trips and the hops between the
loop and a thread are shared by the run; a run is sized to stay within a few
milliseconds of work, so no task waits long behind another and other workers
are not starved. Batching never holds a result back for long: a thread hands
the outcomes of its run to the loop at most ``RUN_BUDGET`` after the first of
them, whatever the tasks after it do; and when a task of a run turns out slow
(it runs longer than ``SLOW_TASK``), the tasks of the run that have not
started are handed back to the store (``Backend.release``), for any idle
worker to take. ``docs/performance.md`` has the measurements.

A task is data whatever it does: anything it raises (``KeyboardInterrupt``
and other ``BaseException`` subclasses included) and anything that goes wrong
while sitq records its outcome (an exception whose ``str()`` raises, a value
that cannot be pickled) ends the task as failed, and the thread or coroutine
that ran it carries on; :class:`Loader` unpickles a claimed task (a task
that cannot be unpickled fails alone) and :class:`Recorder` turns what a call
returned or raised into the outcome to store. A timeout or cancel stops a coroutine by cancelling
it; one that ignores the cancel for ``cancel_grace`` seconds is abandoned: its
outcome is recorded, its slot freed and whatever it does later discarded. A
thread cannot be stopped, so the same happens to it at once; code that runs a
task elsewhere (a process pool) watches :func:`sitq.worker.capture.stop_event`
and stops it there.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import queue as thread_queue
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from sitq.core import ClaimedTask, Outcome, OutcomeKind
from sitq.errors import SerializationError, TaskTimeoutError
from sitq.options import DEFAULT_OPTIONS, Task, TaskOptions
from sitq.output import CapturedOutput
from sitq.serialization import Serializer
from sitq.signing import Signer
from sitq.worker.capture import ProgressLog, mark_stopped, task_context
from sitq.worker.failures import describe_exception, describe_failure

if TYPE_CHECKING:
    from sitq.worker.processes import ProcessPool

__all__ = ["Loader", "Recorder", "Runner"]

log = logging.getLogger(__name__)

RUN_BUDGET = 0.002  # seconds of work one slot may claim at once, judged by recent task times
MAX_RUN = 64  # tasks one slot may claim at once
FUNCTION_CACHE = 64  # functions kept unpickled, by their bytes (a task's globals are its function's)
SLOW_TASK = 2 * RUN_BUDGET  # a task of a run that runs longer has the run's unstarted tasks handed back

T = TypeVar("T")
# A task's unpickled call: (function, args, kwargs).
_Call = tuple[Any, tuple[Any, ...], dict[str, Any]]


@dataclass(eq=False)
class _Running:
    """A claimed task this worker is running."""

    task: ClaimedTask
    progress_log: ProgressLog[_Running]
    options: TaskOptions = DEFAULT_OPTIONS
    output: CapturedOutput | None = None
    progress: tuple[float, float | None, str | None] | None = None
    handle: Any = field(default=None, repr=False)  # the asyncio task of a coroutine
    stop_reason: str | None = None  # "timeout" or "cancel" once the worker stopped waiting for it
    settled: bool = False  # its outcome is recorded; anything later is discarded
    started: bool = False  # its run has started it
    elapsed: float = 0.0  # seconds the function ran, measured in its thread
    call: _Call | None = field(default=None, repr=False)  # (func, args, kwargs) once unpickled
    context: contextvars.Context | None = field(default=None, repr=False)
    is_async: bool = False
    run: _Run | None = field(default=None, repr=False)
    timer: Any = field(default=None, repr=False)  # the timeout's timer, cancelled once settled
    grace: Any = field(default=None, repr=False)  # the timer that abandons a coroutine ignoring its cancel
    waiter: asyncio.Future[None] | None = field(default=None, repr=False)  # resolved once settled (runs on the loop)
    stopped: threading.Event | None = field(default=None, repr=False)  # see stop_event()

    def release(self) -> None:
        """Drop what a settled task no longer needs: its arguments, context and output may be
        large, and an abandoned thread or coroutine (or a run) may keep this record alive."""
        self.call = self.context = self.output = self.handle = None
        self.timer = self.grace = self.waiter = None


class _Run:
    """Tasks one slot executes one after another; the slot is free once all have settled."""

    def __init__(self, jobs: list[_Running]) -> None:
        self.jobs = jobs
        self.on_loop = False  # run by a coroutine on the loop (else by a thread)
        self.unsettled = len(jobs)
        self.next = 0  # index of the next job to start
        self.lock = threading.Lock()
        self.child: Any = None  # the process running it, with processes (see sitq.worker.processes)
        self.current_since: float | None = None  # perf_counter() when the job running now started
        self.done: list[tuple[_Running, Outcome | None]] = []  # outcomes a thread recorded, not yet settled
        for job in jobs:
            job.run = self

    def take(self) -> _Running | None:
        """The next job to start, or None when the run is over (called from the executing thread)."""
        with self.lock:
            while self.next < len(self.jobs):
                job = self.jobs[self.next]
                self.next += 1
                if not job.settled:
                    job.started = True
                    self.current_since = time.perf_counter()
                    return job
            self.current_since = None
            return None

    def waiting(self) -> bool:
        """Whether some of its jobs have not started yet."""
        with self.lock:
            return self.next < len(self.jobs)

    def hand_over(self, job: _Running, outcome: Outcome | None) -> bool:
        """Record a job's outcome for the loop to settle; True for the first one since the loop last took them."""
        with self.lock:
            self.done.append((job, outcome))
            return len(self.done) == 1

    def take_done(self) -> list[tuple[_Running, Outcome | None]]:
        with self.lock:
            done, self.done = self.done, []
        return done

    def take_rest(self) -> list[_Running]:
        """Take the jobs not started yet away from this run, to run them elsewhere."""
        with self.lock:
            rest, self.next = self.jobs[self.next :], len(self.jobs)
        rest = [job for job in rest if not job.settled]
        self.unsettled -= len(rest)
        return rest


class Loader:
    """Turns a claimed task into one ready to run: checks its signature, unpickles its call (or,
    for a worker with processes, only its options: the child unpickles the call) and gives it
    its context and captured output. A task that cannot be loaded gets a failed outcome."""

    def __init__(self, serializer: Serializer, signer: Signer | None, recorder: Recorder, capture_output: bool,
                 in_processes: bool) -> None:
        self.serializer = serializer
        self.signer = signer
        self.recorder = recorder
        self.capture_output = capture_output
        self.in_processes = in_processes
        self._options: dict[bytes, TaskOptions] = {}  # with processes: each function's options, by its bytes
        self._functions: dict[bytes, Any] = {}  # each function unpickled once, by its bytes, as dask does

    def load(self, running: _Running) -> Outcome | None:
        """Make ``running`` ready to run; or the failed outcome to settle it with instead."""
        task = running.task
        if task.problem is not None:  # a row sitq did not write: fail it alone, unpickle nothing
            return self.recorder.outcome(running, OutcomeKind.FAILED, error=f"BackendError: {task.problem}")
        try:
            if self.signer is not None:
                self.signer.verify_task(task.task_id, task.func, task.args, task.signature)
            if self.in_processes:  # its process unpickles the call; only the options are needed here
                running.options = self._options_of(task.func)
                if self.capture_output:
                    running.output = CapturedOutput()
                return None
            func = self._functions.get(task.func)
            if func is None:
                func, args, kwargs = self.serializer.loads_call(task.func, task.args)
                if len(self._functions) >= FUNCTION_CACHE:
                    self._functions.clear()
                self._functions[task.func] = func
            else:
                args, kwargs = self.serializer.loads_args(task.args)
            if isinstance(func, Task):
                running.options, func = func.task_options, func.func
            running.is_async = inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
                getattr(func, "__call__", None)  # noqa: B004 - an object whose __call__ is async, not a callable check
            )
        except BaseException as exc:  # whatever unpickling a payload raises fails its task, not the worker
            return self.recorder.record(running, exc, failed=True, skip_frames=0)
        running.call = (func, args, kwargs)
        if self.capture_output:
            running.output = CapturedOutput()
        running.context = task_context(running, running.output)
        return None

    def _options_of(self, func: bytes) -> TaskOptions:
        options = self._options.get(func)
        if options is None:
            loaded = self.serializer.loads(func)
            options = loaded.task_options if isinstance(loaded, Task) else DEFAULT_OPTIONS
            if len(self._options) >= 64:
                self._options.clear()
            self._options[func] = options
        return options


class Runner:
    """Runs the tasks the worker claims, one run per slot, and reports each outcome once.

    ``on_settled(task, outcome)`` is called on the worker's loop once a task's
    outcome is recorded (finished, stopped, or failed before it could start);
    anything the task does after that is discarded. ``active`` maps the id
    of every task handed over and not yet settled to its record, and
    ``busy_slots`` counts the runs under way. :meth:`open` binds the runner to
    the loop of a worker run, :meth:`close` ends that run's side effects.
    """

    def __init__(
        self,
        worker_id: str,
        on_settled: Callable[[ClaimedTask, Outcome], None],
        *,
        serializer: Serializer,
        signer: Signer | None,
        clock: Callable[[], float],
        capture_output: bool,
        cancel_grace: float,
        processes: int = 0,
        on_capacity: Callable[[], None] = lambda: None,
        on_released: Callable[[list[ClaimedTask]], None] = lambda tasks: None,
    ) -> None:
        self.worker_id = worker_id
        self.recorder = Recorder(serializer, signer, clock)
        self.progress: ProgressLog[_Running] = ProgressLog()
        self.active: dict[str, _Running] = {}
        self.busy_slots = 0
        self._coroutines = _Coroutines(worker_id, cancel_grace, self.recorder, self._settle, self._timed)
        self._on_settled = on_settled
        self._on_released = on_released
        self._loop: Any = None
        self._loop_runs: set[asyncio.Task[None]] = set()
        self._average_run: float | None = None  # moving average of task run times, in seconds
        self._threads: _Threads | None = None
        self._loader = Loader(serializer, signer, self.recorder, capture_output, in_processes=bool(processes))
        self.pool: ProcessPool | None = None
        if processes:
            from sitq.worker.processes import ProcessPool  # loaded only by workers that use processes

            self.pool = ProcessPool(processes, self, serializer, capture_output, on_capacity)

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run tasks on ``loop`` (the loop of the worker run that starts now); processes start now."""
        self._loop = loop
        if self.pool is not None:
            self.pool.open(loop)

    async def close(self) -> None:
        """Cancel abandoned coroutines once more and let idle threads end (tasks still running go on);
        end the processes."""
        await self._coroutines.cancel_abandoned()
        if self._threads is not None:
            self._threads.shutdown()
            self._threads = None
        if self.pool is not None:
            await self.pool.close()

    def free_slots(self, max_concurrency: int) -> int:
        """How many more runs can start now: free slots, and with processes, free processes."""
        free = max_concurrency - self.busy_slots
        return free if self.pool is None else min(free, self.pool.available())

    def run_length(self) -> int:
        """How many tasks one free slot claims: one, unless recent tasks were very short."""
        average = self._average_run
        if average is None or average >= RUN_BUDGET:
            return 1
        return max(1, min(MAX_RUN, int(RUN_BUDGET / max(average, 1e-6))))

    def _timed(self, seconds: float) -> None:
        average = self._average_run
        self._average_run = seconds if average is None else 0.8 * average + 0.2 * seconds

    def launch(self, claimed: list[ClaimedTask], free: int) -> None:
        """Unpickle the claimed tasks and hand them to at most ``free`` slots, in order."""
        jobs = [job for job in map(self._prepare, claimed) if job is not None]
        slots = min(free, len(jobs))
        for i in range(slots):
            self._start_run(_Run(jobs[i::slots]))

    def _prepare(self, task: ClaimedTask) -> _Running | None:
        running = _Running(task, self.progress)
        self.active[task.task_id] = running
        failed = self._loader.load(running)
        if failed is not None:
            self._settle(running, failed)
            return None
        return running

    # -- what the process pool reports (sitq.worker.processes.Owner) -------------

    def finished(self, job: _Running, status: str, data: bytes | None, error: str | None, traceback: str | None,
                 delay: float | None, elapsed: float) -> None:
        self._timed(elapsed)
        self._settle(job, self.recorder.remote(job, status, data, error, traceback, delay))

    def died(self, job: _Running, error: BaseException) -> None:
        self._settle(job, self.recorder.record(job, error, failed=True, skip_frames=0))

    def arm_timeout(self, job: _Running) -> None:
        self._arm_timeout(job)

    def requeue(self, run: _Run, jobs: list[_Running]) -> None:
        """Run ``jobs``, taken from ``run`` before they started (its process died), in a run of their own."""
        run.unsettled -= len(jobs)
        if run.unsettled == 0:
            self.busy_slots -= 1
        for job in jobs:
            job.started = False
        self._start_run(_Run(jobs))

    def _start_run(self, run: _Run) -> None:
        self.busy_slots += 1
        if self.pool is not None:
            self.pool.start_run(run)  # a child sends each outcome as its task ends
            return
        if len(run.jobs) > 1:
            self._loop.call_later(SLOW_TASK, self._watch, run)
        if any(job.is_async for job in run.jobs):
            run.on_loop = True
            task = self._loop.create_task(self._run_on_loop(run))
            self._loop_runs.add(task)  # owned: asyncio keeps only weak references to tasks
            task.add_done_callback(self._loop_runs.discard)
        else:
            self._thread_pool().submit(lambda: self._run_in_thread(run))

    def _watch(self, run: _Run) -> None:
        """While a run has jobs that have not started: if the one running now is slow, hand them back
        to the store, so that an idle worker takes them instead of waiting behind it."""
        if not run.waiting():
            return
        since = run.current_since
        if since is None or time.perf_counter() - since < SLOW_TASK:
            self._loop.call_later(SLOW_TASK, self._watch, run)
            return
        self._timed(time.perf_counter() - since)  # recent tasks are not short after all: claim fewer
        rest = run.take_rest()
        if rest and run.unsettled == 0:
            # The job that looked slow had just been settled (a run on the loop settles a job before
            # it takes the next): with the rest handed back, nothing of this run is left, and the
            # slot it held is free. (_settle frees it when the last job settles; none will now.)
            self.busy_slots -= 1
        for job in rest:  # never started: forget it here; the store makes it pending again
            job.settled = True
            self.active.pop(job.task.task_id, None)
            self.progress.discard(job)
            job.run = None
            job.release()
        if rest:
            self._on_released([job.task for job in rest])

    def _thread_pool(self) -> _Threads:
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
                self._coroutines.start(job, self._loop)
            else:
                self._thread_pool().submit(
                    # (mypy cannot type a lambda whose parameter has a default)
                    lambda job=job: self._settle_from_thread([(job, self._call_in_thread(job))])  # type: ignore[misc]
                )
            await waiter

    def _run_in_thread(self, run: _Run) -> None:
        """Run a run of plain functions in this thread. Their outcomes reach the loop in a few hops:
        the loop takes what has finished ``RUN_BUDGET`` after the first outcome, and the rest when
        the run ends."""
        try:
            while (job := run.take()) is not None:
                if job.options.timeout is not None:
                    self._loop.call_soon_threadsafe(self._arm_timeout, job)
                # The first outcome since the loop last took them: have it taken within the budget,
                # unless this was the run's last job, which the loop takes at once (below).
                if run.hand_over(job, self._call_in_thread(job)) and run.waiting():
                    self._from_thread(self._settle_soon, run)
        finally:
            self._from_thread(self._settle_done, run)

    def _from_thread(self, callback: Callable[[_Run], None], run: _Run) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, run)
        except RuntimeError:
            pass  # the worker stopped and its loop closed while an abandoned thread ran on

    def _settle_soon(self, run: _Run) -> None:
        self._loop.call_later(RUN_BUDGET, self._settle_done, run)

    def _settle_done(self, run: _Run) -> None:
        self._settle_all(run.take_done())

    def _call_in_thread(self, running: _Running) -> Outcome | None:
        call, context = running.call, running.context
        if call is None or context is None:
            return None  # stopped just as this thread took it: its outcome is recorded already
        return context.run(self.recorder.call_sync, running, call)

    def _settle_from_thread(self, settled: list[tuple[_Running, Outcome | None]]) -> None:
        try:
            self._loop.call_soon_threadsafe(self._settle_all, settled)
        except RuntimeError:
            pass  # the worker stopped and its loop closed while an abandoned thread ran on

    def _settle_all(self, settled: list[tuple[_Running, Outcome | None]]) -> None:
        for job, outcome in settled:
            self._timed(job.elapsed)
            self._settle(job, outcome)

    def _arm_timeout(self, running: _Running) -> None:
        if running.options.timeout is not None and not running.settled:
            running.timer = self._loop.call_later(running.options.timeout, self.stop_task, running, "timeout")

    def stop_task(self, running: _Running, reason: str) -> None:
        """Stop waiting for a task (timeout or cancel): cancel a coroutine, abandon a thread."""
        if running.settled or running.stop_reason is not None:
            return
        mark_stopped(running, reason)
        if self.pool is not None:  # terminate its process, or tell that process to skip it
            self.pool.stop(running)
            self._settle(running, self.recorder.stopped_outcome(running))
            return
        if running.handle is not None:
            self._coroutines.cancel(running, self._loop)
            return
        # Not started yet (its run skips it), or a thread, which cannot be stopped: record the
        # outcome now and discard whatever the thread returns later. The tasks queued behind a
        # thread's task in its run move to another thread and slot; this one's slot is freed.
        # (A run on the loop goes on to its next task by itself once this one is settled.)
        run = running.run
        rest = run.take_rest() if run is not None and running.started and not run.on_loop else []
        self._settle(running, self.recorder.stopped_outcome(running))
        if rest:
            self._start_run(_Run(rest))

    def _settle(self, running: _Running, outcome: Outcome | None) -> None:
        if running.settled:
            return  # a thread or coroutine that returned after its timeout or cancel: discard
        assert outcome is not None  # only a task settled already comes without one (_call_in_thread)
        running.settled = True
        for timer in (running.timer, running.grace):
            if timer is not None:
                timer.cancel()  # a cancelled timer lets go of the task at once, not at its deadline
        # Its context and its run refer back to it: unlinked, all are freed at once by reference
        # counting instead of piling up for a full garbage collection, which would stall the loop.
        run, running.run, running.context = running.run, None, None
        self.active.pop(running.task.task_id, None)
        self.progress.discard(running)
        if run is not None:
            run.unsettled -= 1
            if run.unsettled == 0:
                self.busy_slots -= 1
        if running.waiter is not None:
            _resolve(running.waiter)
        running.release()
        self._on_settled(running.task, outcome)


class _Coroutines:
    """Task coroutines on the worker's loop, each in its task's context.

    A timeout or cancel cancels a coroutine and gives it ``cancel_grace``
    seconds to end; one that goes on is then abandoned: recorded as stopped,
    and kept to be cancelled once more when the worker stops. ``settle`` and
    ``timed`` are the runner's: they record an outcome and a run time.
    """

    def __init__(
        self,
        worker_id: str,
        cancel_grace: float,
        recorder: Recorder,
        settle: Callable[[_Running, Outcome | None], None],
        timed: Callable[[float], None],
    ) -> None:
        self.worker_id = worker_id
        self.cancel_grace = cancel_grace
        self.recorder = recorder
        self.abandoned: set[asyncio.Task[None]] = set()  # coroutines that ignored their cancel, kept to cancel on stop
        self._settle = settle
        self._timed = timed

    def start(self, running: _Running, loop: asyncio.AbstractEventLoop) -> None:
        assert running.context is not None  # set by Runner._prepare; cleared only once settled
        running.handle = running.context.run(loop.create_task, self._run_coroutine(running))
        running.handle.add_done_callback(functools.partial(self._coroutine_ended, running))

    async def _run_coroutine(self, running: _Running) -> None:
        assert running.call is not None  # a coroutine stopped before its first step never gets here
        func, args, kwargs = running.call
        started = time.perf_counter()
        cancelled = None
        try:
            value = await func(*args, **kwargs)
        except asyncio.CancelledError as exc:
            if running.stop_reason is None and _cancelled_from_outside():
                cancelled = exc  # not sitq's doing (the loop is closing): settle, then let it propagate
            outcome = self.recorder.record(running, exc, failed=True)
        except BaseException as exc:  # KeyboardInterrupt and SystemExit too: they must not end the worker
            outcome = self.recorder.record(running, exc, failed=True)
        else:
            outcome = self.recorder.record(running, value)
        del func, args, kwargs
        self._timed(time.perf_counter() - started)
        self._settle(running, outcome)
        if cancelled is not None:
            raise cancelled

    def _coroutine_ended(self, running: _Running, handle: asyncio.Task[None]) -> None:
        if not running.settled:  # cancelled before its first step: _run_coroutine never ran to settle it
            outcome = self.recorder.record(running, asyncio.CancelledError(), failed=True, skip_frames=0)
            self._settle(running, outcome)


    def cancel(self, running: _Running, loop: asyncio.AbstractEventLoop) -> None:
        running.handle.cancel()  # _run_coroutine records the outcome, or _abandon does
        running.grace = loop.call_later(self.cancel_grace, self._abandon, running)

    def _abandon(self, running: _Running) -> None:
        """A coroutine went on for ``cancel_grace`` seconds after its cancel: stop waiting for it."""
        if running.settled:
            return
        handle = running.handle
        log.warning(
            "task #%s: its coroutine caught the CancelledError of its %s and went on for %g s; "
            "it is recorded as stopped and left running, and whatever it does from now on is discarded",
            running.task.task_id, running.stop_reason, self.cancel_grace,
        )
        self.abandoned.add(handle)
        handle.add_done_callback(self.abandoned.discard)
        self._settle(running, self.recorder.stopped_outcome(running))

    async def cancel_abandoned(self) -> None:
        """Cancel abandoned coroutines once more as the worker stops, and give them ``cancel_grace`` to end."""
        if not self.abandoned:
            return
        for task in self.abandoned:
            task.cancel()
        _, pending = await asyncio.wait(set(self.abandoned), timeout=self.cancel_grace)
        if pending:
            log.warning(
                "worker %s: %d abandoned coroutine(s) ignore cancellation; they keep running on this event loop",
                self.worker_id, len(pending),
            )


class Recorder:
    """Turns what a task's call returned or raised into the :class:`Outcome` to store
    (and makes the call of a plain function, in the thread that runs it).

    Never raises: whatever goes wrong while building an outcome (an exception
    whose ``str()`` raises, a serializer or retry rule that fails) fails the
    task with a message that says so.
    """

    def __init__(self, serializer: Serializer, signer: Signer | None, clock: Callable[[], float]) -> None:
        self.serializer = serializer
        self.clock = clock
        self._signer = signer

    def call_sync(self, running: _Running, call: _Call) -> Outcome:
        """Call a plain function in this thread and record what it returned or raised."""
        func, args, kwargs = call
        del call
        started = time.perf_counter()
        try:
            value = func(*args, **kwargs)
            if inspect.isawaitable(value):
                value = asyncio.run(_awaited(value))
        except BaseException as exc:  # SystemExit, KeyboardInterrupt, ... would end this thread
            outcome = self.record(running, exc, failed=True)
        else:
            outcome = self.record(running, value)
        running.elapsed = time.perf_counter() - started
        return outcome

    def record(self, running: _Running, result: Any, failed: bool = False, skip_frames: int = 1) -> Outcome:
        """The outcome of a call that returned ``result`` (or raised it, if ``failed``)."""
        try:
            if running.stop_reason is not None:
                return self.stopped_outcome(running)  # also when a coroutine caught its cancel and returned
            if failed:
                return self._failure(running, result, skip_frames=skip_frames)
            return self._success(running, result)
        except BaseException as exc:
            return self._unrecordable(running, exc)

    def _unrecordable(self, running: _Running, exc: BaseException) -> Outcome:
        log.error("task %s: could not record its outcome: %s", running.task.task_id, describe_exception(exc))
        error = f"SitqError: sitq could not record the outcome of this task: {describe_exception(exc)}"
        try:
            return self.outcome(running, OutcomeKind.FAILED, error=error)
        except BaseException:
            task = running.task
            return Outcome(task.task_id, task.handle, task.attempts, OutcomeKind.FAILED, time.time(), error=error)

    def stopped_outcome(self, running: _Running) -> Outcome:
        if running.stop_reason == "cancel":
            return self.outcome(running, OutcomeKind.CANCELLED, error="cancelled while running")
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
                f"cannot pickle the return value, a {type(value).__name__}: {describe_exception(exc)}. "
                "Return plain data instead."
            )
            return self._failure(running, error, skip_frames=0)
        signature = self._signer.sign_value(running.task.task_id, data) if self._signer is not None else None
        return self.outcome(running, OutcomeKind.SUCCESS, value=data, value_signature=signature)

    def _failure(self, running: _Running, exc: BaseException, skip_frames: int = 1) -> Outcome:
        error, text = describe_failure(exc, skip_frames)
        return self._failed(running, error, text, running.options.retry_after(running.task.attempts, exc))

    def _failed(self, running: _Running, error: str | None, text: str | None, delay: float | None) -> Outcome:
        if delay is not None:
            return self.outcome(running, OutcomeKind.RETRY, error=error, traceback=text, retry_at=self.clock() + delay)
        return self.outcome(running, OutcomeKind.FAILED, error=error, traceback=text)

    def remote(self, running: _Running, status: str, data: bytes | None, error: str | None,
               traceback: str | None, delay: float | None) -> Outcome:
        """The outcome of a task that ran in a process, from what that process sent back
        (the value already pickled by the worker's serializer, or the error, traceback and retry delay)."""
        try:
            if running.stop_reason is not None:
                return self.stopped_outcome(running)
            if status == "success" and data is not None:
                signature = self._signer.sign_value(running.task.task_id, data) if self._signer is not None else None
                return self.outcome(running, OutcomeKind.SUCCESS, value=data, value_signature=signature)
            return self._failed(running, error, traceback, delay)
        except BaseException as exc:
            return self._unrecordable(running, exc)

    def outcome(self, running: _Running, kind: OutcomeKind, **fields: Any) -> Outcome:
        captured = running.output  # read once: the loop may release it while an abandoned thread gets here
        output = captured.text() if captured is not None else None
        task = running.task
        return Outcome(
            task.task_id, task.handle, task.attempts, kind, self.clock(), output=output, progress=running.progress,
            **fields,
        )


class _Threads:
    """Threads for plain-function tasks, started as needed.

    Normally there are at most ``max_concurrency`` of them. A thread whose
    task timed out or was cancelled cannot be stopped; it is left to finish
    and a new thread takes its place, so the worker keeps its concurrency.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: thread_queue.SimpleQueue[Callable[[], None] | None] = thread_queue.SimpleQueue()
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


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _cancelled_from_outside() -> bool:
    """Whether the current asyncio task was cancelled (the loop is closing), as opposed to its
    code raising ``CancelledError`` by itself. Before Python 3.11 there is no telling: assume it was."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is None or cancelling() > 0


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
