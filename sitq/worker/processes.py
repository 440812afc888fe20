"""Running tasks in child processes: ``Worker(..., processes=N)`` and ``sitq worker --processes N``.

The worker claims a task only when one of its N children is free, so a task
shown as running is running (or is next in a run handed to one child, see
below). Each child is a fresh interpreter (never a fork of a process with
threads, such as a Jupyter kernel) that runs one task at a time and talks to
the worker's event loop over a socket of its own; the loop reads it as it
reads anything else, so no thread waits on a child. A child gets the task's
stored bytes as they are (the worker checks a signed payload first), unpickles
the function and its arguments itself (cloudpickle: notebook functions travel
by value), and sends back what a thread worker would record: the value
pickled by the worker's serializer, or the error and the task's own traceback
(the user's frames only), and whether to retry.

Progress and output are relayed while the task runs: ``sitq.progress`` at
most every ``PROGRESS_EVERY`` seconds and printed text every
``OUTPUT_EVERY`` seconds (and the rest with the outcome), into the worker's
record of the task, where the notebook's live views read it.

Short tasks travel in runs, as in threads (:mod:`sitq.worker.runners`): one
message hands a child several tasks, and the child sends each outcome as soon
as its task ends, so a slow task never holds back those before it.

When the worker stops waiting for a task (its timeout passed or it was
cancelled), the child running it is terminated (SIGTERM, SIGKILL after
``TERMINATE_GRACE`` seconds) and replaced; a task of the same run that had not
started yet goes to another child, and one queued behind it that had is told
to skip it. A child that dies (``os._exit``, a segfault) fails only the task it
was running, with :class:`ProcessDiedError`. Children run in a session of
their own, so signals for the worker's process group (Ctrl-C, a Jupyter
interrupt, ipykernel ending its children at shutdown) do not reach their tasks;
they ignore SIGINT besides, and exit when the worker's process goes away, even
in the middle of a task.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import io
import logging
import multiprocessing.connection
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from sitq.errors import SerializationError, SitqError
from sitq.options import Task, TaskOptions
from sitq.output import MAX_CAPTURED_CHARS
from sitq.serialization import Serializer
from sitq.worker.capture import reporting_progress
from sitq.worker.failures import describe_exception, describe_failure

__all__ = ["ProcessDiedError", "ProcessPool"]

log = logging.getLogger(__name__)

T = TypeVar("T")

PROGRESS_EVERY = 0.1  # a child relays progress at most this often (and always the last)
OUTPUT_EVERY = 0.1  # and what its task printed
TERMINATE_GRACE = 2.0  # seconds a child gets to exit after SIGTERM before it is killed
FRAME = 256 * 1024  # bytes per message frame: reading one never holds the loop up for long
SEND_IN_THREAD = 1024 * 1024  # a payload larger than this is written to the child from a thread
_CHILD = "from sitq.worker.processes import _child_main; _child_main()"
_WHOLE, _PART = b"=", b"+"


class ProcessDiedError(SitqError):
    """The process running a task died before it sent the task's outcome back."""


class Owner(Protocol):
    """What the pool reports to the runner that owns it (:class:`sitq.worker.runners.Runner`).

    A job is the runner's record of a claimed task and a run a list of them for one
    process (``jobs``, and ``child``, where the pool notes which process has it).
    """

    def finished(self, job: Any, status: str, data: bytes | None, error: str | None, traceback: str | None,
                 delay: float | None, elapsed: float) -> None:
        """The job's process sent its outcome."""

    def died(self, job: Any, error: BaseException) -> None:
        """The job's process died while it ran the job."""

    def arm_timeout(self, job: Any) -> None:
        """The job starts now in its process: its timeout, if it has one, runs from now."""

    def requeue(self, run: Any, jobs: list[Any]) -> None:
        """These jobs of ``run`` never started (their process went away): run them elsewhere."""


class _Child:
    """One child process and the worker's end of its socket."""

    def __init__(self, proc: subprocess.Popen[bytes], conn: multiprocessing.connection.Connection,
                 lifeline: int) -> None:
        self.proc = proc
        self.conn = conn
        self.lifeline = lifeline  # the write end of a pipe the child watches: closed, it exits
        self.pidfd: int | None = None
        self.ready = False
        self.run: Any = None
        self.frames: list[bytes] = []
        self.terminated = False  # the pool ended it, to stop the task it was running
        self.gone = False
        self.sending = False  # a large payload is being written from a thread
        self.deferred: list[bytes] = []  # messages to send once that write is done

    def __repr__(self) -> str:
        return f"<sitq task process {self.proc.pid}{' ready' if self.ready else ''}>"


class ProcessPool:
    """``size`` children for one :class:`~sitq.worker.runners.Runner`, driven from its loop.

    :meth:`open` starts them in the background; :meth:`available` says how many
    more runs can start now; :meth:`start_run` hands a run to a free child (or
    holds it until one is free); :meth:`stop` stops one task; :meth:`close` ends
    every child and waits for it.
    """

    def __init__(self, size: int, owner: Owner, serializer: Serializer, capture_output: bool,
                 on_capacity: Callable[[], None]) -> None:
        self.size = size
        self._owner = owner
        self._init = pickle.dumps(("init", _dumps_serializer(serializer), capture_output))
        self._on_capacity = on_capacity
        self._loop: asyncio.AbstractEventLoop | None = None
        self._children: set[_Child] = set()
        self._idle: list[_Child] = []
        self._pending: collections.deque[Any] = collections.deque()
        self._starting = 0
        self._closing = False
        self._spawning: set[asyncio.Task[None]] = set()  # owned: children being started
        self._burials: set[asyncio.Task[None]] = set()  # owned: dead children being dealt with

    def __repr__(self) -> str:
        return f"<sitq ProcessPool size={self.size} processes={len(self._children)} idle={len(self._idle)}>"

    @property
    def pids(self) -> list[int]:
        """The process ids of the children alive now."""
        return [child.proc.pid for child in self._children if not child.gone]

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the children in the background (they take a moment to be ready)."""
        self._loop = loop
        self._closing = False
        for _ in range(self.size - len(self._children) - self._starting):
            self._spawn()

    def available(self) -> int:
        """How many more runs a free child could start now."""
        return max(0, len(self._idle) - len(self._pending))

    def start_run(self, run: Any) -> None:
        self._pending.append(run)
        self._dispatch()

    # -- stopping one task ---------------------------------------------------

    def stop(self, job: Any) -> None:
        """The worker stops waiting for ``job`` (settled by the caller right after): end it where it runs."""
        run = job.run
        child: _Child | None = getattr(run, "child", None)
        if run is None or child is None or child.gone:
            return  # not handed to a child yet: it is skipped when its run is sent
        executing = next((j for j in run.jobs if not j.settled), None)
        if executing is job:
            child.terminated = True
            self._terminate(child)
        else:  # queued behind another task in the same child: tell it to skip this one
            self._send(child, pickle.dumps(("skip", run.jobs.index(job))))

    def _terminate(self, child: _Child) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.proc.terminate()
        assert self._loop is not None
        self._loop.call_later(TERMINATE_GRACE, self._kill, child)

    @staticmethod
    def _kill(child: _Child) -> None:
        if child.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()

    # -- closing ---------------------------------------------------------------

    async def close(self) -> None:
        """End every child: idle ones exit as their socket closes, busy ones (tasks the worker no longer
        waits for) because their lifeline does; any still there after a moment is killed. Returns once
        all have exited."""
        self._closing = True
        self._pending.clear()
        for task in list(self._burials):
            task.cancel()
        # not cancelled: a child being started is reaped by its own task once it exists
        await asyncio.gather(*self._burials, *self._spawning, return_exceptions=True)
        children, self._children, self._idle = list(self._children), set(), []
        for child in children:
            self._forget(child)
        await _reap([c.proc for c in children])

    # -- children ----------------------------------------------------------------

    def _spawn(self) -> None:
        assert self._loop is not None
        self._starting += 1
        task = self._loop.create_task(self._start_child())
        self._spawning.add(task)
        task.add_done_callback(self._spawning.discard)

    async def _start_child(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            child = await _in_thread(self._new_child)
        except Exception:
            log.exception("sitq: could not start a task process; tasks wait until one starts")
            return
        finally:
            self._starting -= 1
        if self._closing:
            self._forget(child)
            await _reap([child.proc])
            return
        self._children.add(child)
        loop.add_reader(child.conn.fileno(), self._readable, child)
        pidfd_open = getattr(os, "pidfd_open", None)  # Linux: notice an exit even if a grandchild holds the socket
        if pidfd_open is not None:
            with contextlib.suppress(OSError):
                child.pidfd = pidfd_open(child.proc.pid)
                loop.add_reader(child.pidfd, self._readable, child)

    def _new_child(self) -> _Child:
        """Start a child (in a helper thread: starting a process may take milliseconds)."""
        ours, theirs = socket.socketpair()
        life_read, life_write = os.pipe()
        env = dict(os.environ)
        # The child imports what this process can: sitq itself, and modules tasks were pickled by reference from.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if isinstance(p, str) and p)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(theirs.fileno()), str(life_read)],
                pass_fds=(theirs.fileno(), life_read), env=env, stdin=subprocess.DEVNULL,
                # A session of its own: signals for the worker's process group (Ctrl-C, a Jupyter
                # interrupt, ipykernel ending its "children" at shutdown) are not for its tasks.
                # The lifeline ends it when the worker's process goes away.
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            os.close(life_write)
            raise
        finally:
            theirs.close()
            os.close(life_read)
        conn = multiprocessing.connection.Connection(ours.detach())
        conn.send_bytes(self._init)
        return _Child(proc, conn, life_write)

    def _forget(self, child: _Child) -> None:
        """Stop listening to a child and close the worker's ends: it exits when it sees them closed."""
        if child.gone:
            return
        child.gone = True
        loop = self._loop
        for fd in (child.conn.fileno(), child.pidfd):
            if fd is not None and loop is not None and not loop.is_closed():
                loop.remove_reader(fd)
        child.conn.close()
        os.close(child.lifeline)
        if child.pidfd is not None:
            os.close(child.pidfd)

    # -- messages --------------------------------------------------------------------

    def _readable(self, child: _Child) -> None:
        """Handle what the child sent (a bounded number of messages, then let the loop run)."""
        for _ in range(256):
            if child.gone:
                return
            try:
                if not child.conn.poll():
                    if child.proc.poll() is not None:
                        raise EOFError  # exited, and everything it sent is read
                    return
                data = child.conn.recv_bytes()
            except (EOFError, OSError):
                self._died(child)
                return
            if data[:1] == _PART:
                child.frames.append(data[1:])
                continue
            if child.frames:
                data, child.frames = b"".join([*child.frames, data[1:]]), []
            else:
                data = data[1:]
            self._handle(child, pickle.loads(data))

    def _handle(self, child: _Child, message: tuple[Any, ...]) -> None:
        kind = message[0]
        run = child.run
        if kind == "ready":
            child.ready = True
            self._free(child)
        elif kind == "idle":
            child.run = None
            self._free(child)
        elif run is not None:
            job = run.jobs[message[1]]
            if job.settled:
                return  # stopped: whatever it sends now is discarded
            if kind == "progress":
                job.progress = message[2]
                job.progress_log.add(job)
            elif kind == "output":
                if job.output is not None:
                    job.output.write(message[2])
            elif kind == "done":
                _, _, status, data, error, traceback, delay, elapsed, rest = message
                if rest and job.output is not None:
                    job.output.write(rest)
                self._owner.finished(job, status, data, error, traceback, delay, elapsed)
                self._arm_next(run)

    def _free(self, child: _Child) -> None:
        if child.gone:
            return
        self._idle.append(child)
        self._dispatch()
        self._on_capacity()

    def _dispatch(self) -> None:
        while self._pending and self._idle:
            run = self._pending.popleft()
            jobs = [job for job in run.jobs if not job.settled]
            if not jobs:
                continue
            child = self._idle.pop()
            run.jobs = jobs
            run.child = child  # what stop() needs to find
            child.run = run
            funcs: dict[bytes, int] = {}
            calls = [(funcs.setdefault(job.task.func, len(funcs)), job.task.args, job.task.attempts) for job in jobs]
            for job in jobs:
                job.started = True
            self._send(child, pickle.dumps(("run", list(funcs), calls), protocol=pickle.HIGHEST_PROTOCOL))
            self._arm_next(run)

    def _arm_next(self, run: Any) -> None:
        """The task the child runs now is the first one not settled: its timeout starts now."""
        job = next((j for j in run.jobs if not j.settled), None)
        if job is not None and job.timer is None:
            self._owner.arm_timeout(job)

    def _send(self, child: _Child, data: bytes) -> None:
        if child.gone:
            return
        if child.sending:
            child.deferred.append(data)
        elif len(data) <= SEND_IN_THREAD:
            self._write(child, data)
        else:  # a child reads as fast as it is sent, but tens of MB would still hold the loop up
            assert self._loop is not None
            child.sending = True
            future = _in_thread(self._write, child, data)
            future.add_done_callback(lambda _: self._sent(child))

    def _sent(self, child: _Child) -> None:
        child.sending = False
        deferred, child.deferred = child.deferred, []
        for data in deferred:
            self._send(child, data)

    def _write(self, child: _Child, data: bytes) -> None:
        try:
            _send_frames(child.conn, data)
        except OSError:
            pass  # it died: the loop reads its end of the socket and deals with that

    # -- a child that went away -----------------------------------------------------

    def _died(self, child: _Child) -> None:
        self._forget(child)
        self._children.discard(child)
        if child in self._idle:
            self._idle.remove(child)
        if self._closing:
            return
        assert self._loop is not None
        task = self._loop.create_task(self._bury(child))
        self._burials.add(task)
        task.add_done_callback(self._burials.discard)
        self._spawn()

    async def _bury(self, child: _Child) -> None:
        """Fail the task a dead child was running, and hand its run's other tasks to another child."""
        proc = child.proc
        code = proc.poll()
        if code is None:
            code = await _in_thread(_wait, proc)
        run, child.run = child.run, None
        if run is None:
            return
        unsettled = [job for job in run.jobs if not job.settled]
        if unsettled and not child.terminated:
            victim, *unsettled = unsettled
            error = ProcessDiedError(
                f"its process died: {_how(code)} (pid {proc.pid}) before the task returned. Only this task "
                "was running in that process; the next task gets a fresh one."
            )
            self._owner.died(victim, error)
        if unsettled:
            self._owner.requeue(run, unsettled)


def _how(code: int | None) -> str:
    if code is None:
        return "it closed its socket and stopped answering"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def _wait(proc: subprocess.Popen[bytes]) -> int | None:
    try:
        return proc.wait(TERMINATE_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


async def _reap(procs: list[subprocess.Popen[bytes]]) -> None:
    """Wait for children that were told to exit (they do within milliseconds); kill any
    that has not after a moment. Polls: at interpreter exit no new thread may be started."""
    deadline = time.monotonic() + 0.5
    while any(proc.poll() is None for proc in procs) and time.monotonic() < deadline:
        await asyncio.sleep(0.002)
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


def _in_thread(func: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """``func(*args)`` in a thread of its own, as a future of the running loop (the loop's default
    executor refuses work once the interpreter is shutting down, when a worker may still stop)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result = func(*args)
        except BaseException as exc:
            loop.call_soon_threadsafe(_fail, future, exc)
        else:
            loop.call_soon_threadsafe(_succeed, future, result)

    threading.Thread(target=run, name="sitq-process-helper", daemon=True).start()
    return future


def _succeed(future: asyncio.Future[T], result: T) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _dumps_serializer(serializer: Serializer) -> bytes:
    import cloudpickle

    return bytes(cloudpickle.dumps(serializer))


def _send_frames(conn: multiprocessing.connection.Connection, data: bytes) -> None:
    """One message as frames of at most ``FRAME`` bytes: the reader's loop never waits long for one."""
    view = memoryview(data)
    while len(view) > FRAME:
        conn.send_bytes(_PART + view[:FRAME])
        view = view[FRAME:]
    conn.send_bytes(_WHOLE + view)


# -- in the child process -----------------------------------------------------------


def _child_main() -> None:
    """A child's life: run the tasks its socket brings, one at a time, until the socket closes."""
    # Interrupting a cell signals the kernel's whole process group; a background task must not die of it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd, lifeline = int(sys.argv[1]), int(sys.argv[2])
    threading.Thread(target=_watch_lifeline, args=(lifeline,), name="sitq-lifeline", daemon=True).start()
    conn = multiprocessing.connection.Connection(fd)
    try:
        _, serializer_bytes, capture = pickle.loads(conn.recv_bytes())
        child = _ChildLoop(conn, pickle.loads(serializer_bytes), capture)
        child.send(("ready",))
        child.serve()
    except (EOFError, OSError):
        pass  # the worker closed the socket: it stopped, or its process is gone


def _watch_lifeline(fd: int) -> None:
    """Exit as soon as the worker's process is gone (or closes the pool), even in the middle of a task."""
    while True:
        try:
            if not os.read(fd, 1):
                os._exit(0)
        except InterruptedError:
            continue
        except OSError:
            os._exit(0)


class _ChildLoop:
    def __init__(self, conn: multiprocessing.connection.Connection, serializer: Serializer, capture: bool) -> None:
        self.conn = conn
        self.serializer = serializer
        self.capture = capture
        self.lock = threading.Lock()  # a task's own threads may print while the loop sends
        self.functions: collections.OrderedDict[bytes, Any] = collections.OrderedDict()
        self.skipped: set[int] = set()

    def send(self, message: tuple[Any, ...]) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self.lock:
            _send_frames(self.conn, data)

    def receive(self) -> tuple[Any, ...]:
        frames = []
        while True:
            data = self.conn.recv_bytes()
            if data[:1] == _PART:
                frames.append(data[1:])
                continue
            message: tuple[Any, ...] = pickle.loads(b"".join([*frames, data[1:]]))
            return message

    def serve(self) -> None:
        while True:
            message = self.receive()
            if message[0] == "run":
                _, funcs, calls = message
                self.skipped.clear()
                for index, (func_index, args, attempts) in enumerate(calls):
                    while self.conn.poll():  # skips for tasks of this run that were stopped meanwhile
                        control = self.receive()
                        if control[0] == "skip":
                            self.skipped.add(control[1])
                    if index not in self.skipped:
                        self.send(self.run_one(index, funcs[func_index], args, attempts))
                self.send(("idle",))

    def function(self, data: bytes) -> Any:
        """The task function pickled as ``data``; kept for the next tasks of the same function."""
        func = self.functions.get(data)
        if func is None:
            func = self.serializer.loads(data)
            self.functions[data] = func
            if len(self.functions) > 32:
                self.functions.popitem(last=False)
        else:
            self.functions.move_to_end(data)
        return func

    def run_one(self, index: int, func_data: bytes, args_data: bytes, attempts: int) -> tuple[Any, ...]:
        relay = _Relay(self, index)
        options = TaskOptions()
        started = time.perf_counter()
        status, data, error, text, delay = "failed", None, None, None, None
        try:
            try:
                func = self.function(func_data)
                call_args, call_kwargs = self.serializer.loads(args_data)
            except Exception as exc:
                raise SerializationError(
                    f"cannot unpickle the task in its process: {type(exc).__name__}: {exc}. The process "
                    "needs the same importable modules (and their versions) as the one that enqueued the task."
                ) from None
            if isinstance(func, Task):
                options, func = func.task_options, func.func
            with relay.capturing(self.capture), reporting_progress(relay.progress):
                started = time.perf_counter()
                outcome = _call(func, call_args, call_kwargs)
            del call_args, call_kwargs
            if outcome[0]:
                status, data = "success", self._dumps_value(outcome[1])
            else:
                raised: BaseException = outcome[1]
                error, text = describe_failure(raised, skip_frames=1)
                delay = options.retry_after(attempts, raised)
        except BaseException as exc:  # unpickling, pickling the value, a retry rule: the task fails, not the child
            status, data = "failed", None
            if isinstance(exc, SerializationError):
                error, text = describe_failure(exc, skip_frames=0)
            else:
                error = f"SitqError: sitq could not record the outcome of this task: {describe_exception(exc)}"
        elapsed = time.perf_counter() - started
        return ("done", index, status, data, error, text, delay, elapsed, relay.finish())

    def _dumps_value(self, value: Any) -> bytes:
        try:
            return self.serializer.dumps_value(value)
        except SerializationError:
            raise
        except BaseException as exc:  # the value's __reduce__ or __repr__ raised something else
            raise SerializationError(
                f"cannot pickle the return value, a {type(value).__name__}: {describe_exception(exc)}. "
                "Return plain data instead."
            ) from None


def _call(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bool, Any]:
    """``(True, value)`` or ``(False, exception)``; the exception's traceback starts at this frame."""
    try:
        value = func(*args, **kwargs)
        if inspect.isawaitable(value):
            outcome: tuple[bool, Any] = asyncio.run(_awaited(value))
            return outcome
        return True, value
    except BaseException as exc:  # KeyboardInterrupt, SystemExit and the like are the task's outcome too
        return False, exc


async def _awaited(awaitable: Awaitable[T]) -> tuple[bool, Any]:
    __tracebackhide__ = True  # noqa: F841 - the traceback starts at the task's coroutine
    try:
        return True, await awaitable
    except BaseException as exc:
        return False, exc


class _Relay:
    """What one task prints and reports, sent to the worker while it runs: at most every
    ``OUTPUT_EVERY`` (``PROGRESS_EVERY``) seconds, and what is left a moment later even if
    the task goes quiet (a timer sends it), so a task that prints and then waits shows it."""

    def __init__(self, child: _ChildLoop, index: int) -> None:
        self.child = child
        self.index = index
        self.lock = threading.Lock()  # held while sending, so nothing is sent after the outcome
        self.parts: list[str] = []
        self.size = 0
        self.sent_output = 0.0
        self.pending: tuple[float, float | None, str | None] | None = None
        self.sent_progress = 0.0
        self.timer: threading.Timer | None = None

    @contextlib.contextmanager
    def capturing(self, capture: bool) -> Any:
        if not capture:
            yield
            return
        saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = _Stream(self)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = saved

    def write(self, text: str) -> None:
        with self.lock:
            if self.size > MAX_CAPTURED_CHARS:
                return  # the worker's record truncates it and says so
            self.parts.append(text)
            self.size += len(text)
            self._send_or_later()

    def progress(self, done: float, total: float | None = None, message: str | None = None) -> None:
        with self.lock:
            self.pending = (done, total, message)
            self._send_or_later()

    def _send_or_later(self) -> None:
        now = time.monotonic()
        if self.parts and now - self.sent_output >= OUTPUT_EVERY:
            self.child.send(("output", self.index, self._take_output()))
        if self.pending is not None and now - self.sent_progress >= PROGRESS_EVERY:
            self._send_progress()
        if (self.parts or self.pending is not None) and self.timer is None:
            self.timer = threading.Timer(max(OUTPUT_EVERY, PROGRESS_EVERY), self._later)
            self.timer.daemon = True
            self.timer.start()

    def _later(self) -> None:
        with self.lock:
            self.timer = None
            if self.parts:
                self.child.send(("output", self.index, self._take_output()))
            if self.pending is not None:
                self._send_progress()

    def _take_output(self) -> str:
        text, self.parts = "".join(self.parts), []
        self.sent_output = time.monotonic()
        return text

    def _send_progress(self) -> None:
        pending, self.pending = self.pending, None
        self.child.send(("progress", self.index, pending))
        self.sent_progress = time.monotonic()

    def finish(self) -> str:
        """Send the last progress and return the rest of the output (it goes with the outcome)."""
        with self.lock:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            if self.pending is not None:
                self._send_progress()
            return self._take_output()


class _Stream(io.TextIOBase):
    """``sys.stdout`` and ``sys.stderr`` of a child while a task runs."""

    def __init__(self, relay: _Relay) -> None:
        self._relay = relay

    def write(self, text: str) -> int:
        self._relay.write(str(text))
        return len(text)

    def writable(self) -> bool:
        return True
