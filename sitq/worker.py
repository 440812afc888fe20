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
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
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

from sitq.backends.base import Backend
from sitq.core import CANCELLED, FAILED, PENDING, SUCCESS, ClaimedTask, Outcome
from sitq.errors import InvalidTaskError, SerializationError, SignatureError, SitqError, TaskTimeoutError
from sitq.options import Task, TaskOptions
from sitq.output import CapturedOutput, OutputCapture, capture_into
from sitq.serialization import CloudpickleSerializer, Serializer
from sitq.signing import signer_from

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


class _Run:
    """Tasks one slot executes one after another; the slot is free once all have settled."""

    def __init__(self, jobs: list) -> None:
        self.jobs = jobs
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
    payload is not signed with that key, without unpickling it.
    """

    def __init__(
        self,
        backend: Backend,
        max_concurrency: int = 1,
        poll_interval: float = 1.0,
        serializer: Optional[Serializer] = None,
        *,
        name: Optional[str] = None,
        lease: float = 60.0,
        progress_interval: float = 0.2,
        capture_output: bool = True,
        secret_key: Optional[Any] = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(backend, Backend):
            raise TypeError(
                f"Worker needs a sitq backend such as SQLiteBackend('tasks.db'), not {type(backend).__name__}"
            )
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise InvalidTaskError(f"max_concurrency must be a whole number >= 1, not {max_concurrency!r}")
        for label, seconds in (("poll_interval", poll_interval), ("lease", lease), ("progress_interval", progress_interval)):
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
                raise InvalidTaskError(f"{label} must be a number of seconds > 0, not {seconds!r}")
        self.backend = backend
        self.max_concurrency = max_concurrency
        self.poll_interval = float(poll_interval)
        self.serializer = serializer or CloudpickleSerializer()
        self.lease = float(lease)
        self.progress_interval = float(progress_interval)
        self.capture_output = capture_output
        self.clock = clock
        self._signer = signer_from(secret_key)
        self.worker_id = f"{name or socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.processed = 0
        self.failed = 0
        self._active: dict[int, _Running] = {}
        self._busy_slots = 0
        self._loop_runs: set[asyncio.Task] = set()
        self._average_run = None  # moving average of task run times, in seconds
        self._outcomes: list[Outcome] = []
        self._progress_changed: set[_Running] = set()
        self._progress_lock = threading.Lock()
        self._wake: Optional[asyncio.Future] = None
        self._stopping = False
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
        """Run tasks until :meth:`stop` is called."""
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
        self._done = asyncio.Event()
        self._stopping = False
        backend = self.backend
        await backend.connect()
        capture = OutputCapture.install() if self.capture_output else None
        side = loop.create_task(self._side_tasks(), name=f"sitq-side-{self.worker_id}")
        try:
            await self._main(backend, until_empty)
        finally:
            side.cancel()
            await asyncio.gather(side, return_exceptions=True)
            if self._threads is not None:
                self._threads.shutdown()
                self._threads = None
            if capture is not None:
                capture.uninstall()
            self._done.set()

    async def _main(self, backend: Backend, until_empty: bool) -> None:
        while True:
            # Read before looking: a change after this moment, ours or anyone's, ends the wait below.
            # (Writes that change nothing move no token, so an idle worker does not wake itself.)
            token = backend.change_token
            outcomes, self._outcomes = self._outcomes, []
            free = 0 if self._stopping else self.max_concurrency - self._busy_slots
            claimed: list[ClaimedTask] = []
            if outcomes or free:
                await self._flush_progress()
                now = self.clock()
                stored, claimed = await backend.finish_and_claim(
                    self.worker_id, outcomes, free * self._run_length(), now, now + self.lease
                )
                self._count(outcomes, stored)
                if claimed:
                    self._launch(claimed, free)
            if not self._active and not self._outcomes and (self._stopping or (until_empty and not claimed)):
                if until_empty and not self._stopping and await backend.requeue_expired(self.clock()):
                    continue  # a dead worker's tasks are ready again
                return
            if self._outcomes:
                continue
            can_claim = not self._stopping and self._busy_slots < self.max_concurrency
            timeout = await self._idle_timeout() if can_claim else None
            await self._wait(token if can_claim else None, timeout)

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
        if self._outcomes or (self._stopping and token is not None):
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
        try:
            if self._signer is not None:
                self._signer.verify(task.func, task.args, task.signature)
            func, args, kwargs = self.serializer.loads_call(task.func, task.args)
        except (SignatureError, SerializationError) as exc:
            self._settle(running, self._failure(running, exc, skip_frames=0))
            return None
        if isinstance(func, Task):
            running.options, func = func.task_options, func.func
        running.call = (func, args, kwargs)
        running.is_async = inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
            getattr(func, "__call__", None)
        )
        running.context = context = contextvars.copy_context()
        context.run(_current.set, running)
        if self.capture_output:
            running.output = CapturedOutput()
            context.run(capture_into.set, running.output)
        return running

    def _start_run(self, run: _Run) -> None:
        self._busy_slots += 1
        if any(job.is_async for job in run.jobs):
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
        """Run a run's jobs in order: coroutines here, plain functions in a thread."""
        while (job := run.take()) is not None:
            self._arm_timeout(job)
            if job.is_async:
                job.handle = job.context.run(self._loop.create_task, self._run_coroutine(job))
                await asyncio.wait([job.handle])
            else:
                done = self._loop.create_future()
                self._thread_pool().submit(lambda: self._settle_from_thread([(job, self._call_in_thread(job))], done))
                await done

    async def _run_coroutine(self, running: _Running) -> None:
        func, args, kwargs = running.call
        started = time.perf_counter()
        try:
            value = await func(*args, **kwargs)
        except asyncio.CancelledError:
            if running.stop_reason is None:
                raise  # not ours: let it propagate
            outcome = self._stopped_outcome(running)
        except (Exception, SystemExit) as exc:
            outcome = self._failure(running, exc)
        else:
            outcome = self._success(running, value)
        self._timed(time.perf_counter() - started)
        self._settle(running, outcome)

    def _run_in_thread(self, run: _Run) -> None:
        """Run a run of plain functions in this thread; settle them on the loop in one hop."""
        settled = []
        while (job := run.take()) is not None:
            if job.options.timeout is not None:
                self._loop.call_soon_threadsafe(self._arm_timeout, job)
            settled.append((job, self._call_in_thread(job)))
        self._settle_from_thread(settled)

    def _call_in_thread(self, running: _Running) -> Outcome:
        return running.context.run(self._call_sync, running)

    def _call_sync(self, running: _Running) -> Outcome:
        func, args, kwargs = running.call
        started = time.perf_counter()
        try:
            value = func(*args, **kwargs)
            if inspect.isawaitable(value):
                value = asyncio.run(_awaited(value))
        except (Exception, SystemExit) as exc:
            outcome = self._failure(running, exc)
        else:
            outcome = self._success(running, value)
        running.elapsed = time.perf_counter() - started
        return outcome

    def _settle_from_thread(self, settled: list, done: Optional[asyncio.Future] = None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._settle_all, settled, done)
        except RuntimeError:
            pass  # the worker stopped and its loop closed while an abandoned thread ran on

    def _settle_all(self, settled: list, done: Optional[asyncio.Future]) -> None:
        for job, outcome in settled:
            self._timed(job.elapsed)
            self._settle(job, outcome)
        if done is not None:
            _resolve(done)

    def _arm_timeout(self, running: _Running) -> None:
        if running.options.timeout is not None and not running.settled:
            self._loop.call_later(running.options.timeout, self._stop_task, running, "timeout")

    def _stop_task(self, running: _Running, reason: str) -> None:
        """Stop waiting for a task (timeout or cancel): cancel a coroutine, abandon a thread."""
        if running.settled or running.stop_reason is not None:
            return
        running.stop_reason = reason
        if running.handle is not None:
            running.handle.cancel()  # _run_coroutine records the outcome
            return
        # Not started yet (its run skips it), or a thread, which cannot be stopped: record the
        # outcome now and discard whatever the thread returns later. The tasks queued behind a
        # thread's task in its run move to another thread and slot; this one's slot is freed.
        run = running.run
        rest = run.take_rest() if run is not None and running.started and not running.is_async else []
        self._settle(running, self._stopped_outcome(running))
        if rest:
            self._start_run(_Run(rest))

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
        return self._outcome(running, SUCCESS, value=data)

    def _failure(self, running: _Running, exc: BaseException, skip_frames: int = 1) -> Outcome:
        tb = exc.__traceback__
        for _ in range(skip_frames):  # drop sitq's own frame: the user's code comes first
            if tb is not None:
                tb = tb.tb_next
        while tb is not None and tb.tb_next is not None and tb.tb_frame.f_locals.get("__tracebackhide__"):
            tb = tb.tb_next  # wrappers (notebook cells, process runners) hide themselves, as in pytest
        text = "".join(traceback.format_exception(type(exc), exc, tb)) if tb is not None else None
        message = str(exc)
        error = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
        delay = running.options.retry_after(running.task.attempts, exc)
        if delay is not None:
            return self._outcome(running, PENDING, error=error, traceback=text, retry_at=self.clock() + delay)
        return self._outcome(running, FAILED, error=error, traceback=text)

    def _outcome(self, running: _Running, status: str, **fields) -> Outcome:
        output = running.output.text() if running.output is not None else None
        task = running.task
        return Outcome(task.seq, task.attempts, status, self.clock(), output=output, progress=running.progress, **fields)

    def _settle(self, running: _Running, outcome: Outcome) -> None:
        if running.settled:
            return  # a thread that returned after its timeout or cancel: discard
        running.settled = True
        # Its context and its run refer back to it: unlinked, all are freed at once by reference
        # counting instead of piling up for a full garbage collection, which would stall the loop.
        run, running.run, running.context = running.run, None, None
        self._active.pop(running.task.seq, None)
        with self._progress_lock:
            self._progress_changed.discard(running)
        self._outcomes.append(outcome)
        if run is not None:
            run.unsettled -= 1
            if run.unsettled == 0:
                self._busy_slots -= 1
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
                except SitqError:
                    log.exception("worker %s: side task failed; trying again shortly", self.worker_id)
                await asyncio.sleep(min(self.progress_interval, beat))
        finally:
            heartbeat.stop()

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
        while (job := self._jobs.get()) is not None:
            job()
            with self._lock:
                self._idle += 1

    def shutdown(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, 0
        for _ in range(idle):
            self._jobs.put(None)


async def _awaited(awaitable):
    return await awaitable


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
