"""Running notebook functions in a pool of processes, for CPU-bound tasks.

The worker itself is unchanged: with ``%sitq start --processes N`` each task's
function is wrapped in :class:`InProcess`, which the worker runs in one of its
threads like any plain function. That thread hands the function (cloudpickle
sends notebook-defined functions by value) to an idle child process, relays
the task's ``sitq.progress`` calls back into the worker's task context, and
hands back the value, the exception (with the child's traceback as its cause)
and what the task printed.

The pool keeps its own children instead of using ``concurrent.futures``, so
that one task can be stopped without the others: each child runs one task at
a time and talks to its thread over its own pipe. When the worker stops
waiting for a task (its timeout passed or it was cancelled), the thread
terminates that child; when a child dies (``os._exit``, a segfault), only
the task it ran fails. Either way the next task gets a fresh child.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import multiprocessing.util
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import cloudpickle

from sitq.errors import SerializationError, SitqError
from sitq.options import Task
from sitq.serialization import describe_callable, dumps_shipping_source, loads_shipped
from sitq.worker.capture import reporting_progress
from sitq.worker.runners import _describe, _message

__all__ = ["InProcess", "ProcessDiedError", "ProcessPool", "ProcessTraceback"]

T = TypeVar("T")

_pool: ProcessPool | None = None  # this process's pool, if a runtime started one
PROGRESS_EVERY = 0.1  # a child relays progress at most this often (and always the last)
STOP_POLL = 0.05  # how often a thread waiting for its child looks whether the worker stopped the task
TERMINATE_GRACE = 2.0  # seconds a child gets to exit after SIGTERM before it is killed


class InProcess:
    """A task function that runs in the kernel's process pool (in the calling
    thread when this process has none, e.g. in a headless worker)."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        # describe_callable() reads these: the board shows the user's function name
        self.__qualname__ = describe_callable(func)
        self.__module__ = "__main__"

    @classmethod
    def around(cls, func: Callable[..., Any]) -> Callable[..., Any]:
        """``func`` to run in the pool; a :class:`sitq.Task` keeps its options (its timeout, retries)
        on the outside, where the worker reads them."""
        if isinstance(func, Task):
            return Task(cls(func.func), func.task_options)
        return cls(func)

    def __repr__(self) -> str:
        return f"<{self.__qualname__} in a process>"

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True  # noqa: F841 - remote tracebacks start at the user's code
        if _pool is not None:
            return _pool.call(self.func, args, kwargs)
        return self.func(*args, **kwargs)


class ProcessTraceback(Exception):
    """The traceback of a task that failed in a pool process (shown as the cause)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n" + self.text.rstrip()


class ProcessDiedError(SitqError):
    """The process running a task died before it sent the task's outcome back."""


class _Stopped(Exception):
    """The worker stopped waiting for this task; its outcome is recorded already."""


class ProcessPool:
    """Up to ``size`` spawned processes, one task at a time each, started when a task needs one."""

    def __init__(self, size: int) -> None:
        global _pool
        self.size = size
        self._context = multiprocessing.get_context("spawn")  # forking a kernel's threads is unsafe
        self._free = threading.Condition()  # guards the fields below; notified when a child frees up
        self._idle: list[_Child] = []
        self._children: set[_Child] = set()  # idle and busy
        self._starting = 0  # children being started, counted against size
        self._closed = False
        # Children are not daemons (a task may start processes of its own), so multiprocessing
        # would wait for them at exit: end them first, as multiprocessing.Pool does.
        self._at_exit = multiprocessing.util.Finalize(self, _end_children, args=(self._children,), exitpriority=10)
        _pool = self

    def __repr__(self) -> str:
        return f"<sitq ProcessPool size={self.size} processes={len(self._children)} idle={len(self._idle)}>"

    def call(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run ``func(*args, **kwargs)`` in a child; progress and output come back here.

        Called in the worker's thread for the task. If the worker stops
        waiting for the task, the child is terminated and this returns by
        raising (the worker has recorded the outcome and discards it).
        """
        from sitq.worker.capture import progress, stop_event

        stopped = stop_event() or threading.Event()  # outside a worker's task nothing stops it
        payload = dumps_shipping_source((func, args, kwargs))
        child = self._acquire(stopped)
        reusable = False
        try:
            child.send(payload)
            while True:
                message = child.next_message(stopped)
                if message[0] == "progress":
                    progress(*message[1])  # this thread runs in the task's context: stored on its row
                    continue
                break
            reusable = True
        finally:
            self._release(child, reusable)
        _, status, output, data, text = message
        if output:
            sys.stdout.write(output)  # the worker captures it as the task's output
        if status == "success":
            try:
                return pickle.loads(data)
            except BaseException as exc:
                raise SerializationError(
                    f"cannot rebuild the return value of the task outside its process: {_describe(exc)}. "
                    "Return plain data instead."
                ) from None
        try:
            error = pickle.loads(data)
        except BaseException as exc:
            error = SerializationError(f"the task failed in its process, and its exception cannot be rebuilt "
                                       f"here ({_describe(exc)}); its traceback is below")
        raise error from ProcessTraceback(text)

    def _acquire(self, stopped: threading.Event) -> _Child:
        child: _Child | None
        with self._free:
            while True:
                if self._closed:
                    raise SitqError("the process pool was shut down; start the notebook worker again")
                if stopped.is_set():
                    raise _Stopped()
                while self._idle:
                    child = self._idle.pop()
                    if child.process.is_alive():
                        return child
                    self._children.discard(child)  # died while idle (killed from outside)
                if len(self._children) + self._starting < self.size:
                    self._starting += 1
                    break
                self._free.wait(STOP_POLL)
        child = None
        try:
            child = _Child(self._context)
        finally:
            with self._free:
                self._starting -= 1
                if child is not None:
                    self._children.add(child)
                self._free.notify()
        return child

    def _release(self, child: _Child, reusable: bool) -> None:
        if not reusable:
            child.close()  # stopped, dead, or in an unknown state: a fresh one replaces it
        with self._free:
            if reusable and not self._closed:
                self._idle.append(child)
            else:
                self._children.discard(child)
            self._free.notify()
        if reusable and self._closed:
            child.close()

    def shutdown(self) -> None:
        """End the children: idle ones at once, busy ones (tasks the worker no longer waits for) too."""
        global _pool
        if _pool is self:
            _pool = None
        with self._free:
            self._closed = True
            idle, self._idle = self._idle, []
            self._children.difference_update(idle)
            self._free.notify_all()
        for child in idle:
            child.close()
        self._at_exit()  # the busy ones: their threads see them die and close their pipes


class _Child:
    """One spawned process and the parent's end of its pipe."""

    def __init__(self, context: multiprocessing.context.SpawnContext) -> None:
        self._ending = threading.Lock()  # serializes ending and reaping the process
        self.conn, child_end = context.Pipe()
        self.process = context.Process(target=_serve, args=(child_end,), name="sitq-task-process")
        self.process.start()
        child_end.close()

    def send(self, payload: bytes) -> None:
        try:
            self.conn.send_bytes(payload)
        except OSError:
            raise self._died() from None

    def next_message(self, stopped: threading.Event) -> tuple[Any, ...]:
        """The child's next message; raises once the worker stopped the task or the child died."""
        while True:
            ready = multiprocessing.connection.wait([self.conn, self.process.sentinel], STOP_POLL)
            if self.conn in ready:  # what it sent before it died still counts
                try:
                    message: tuple[Any, ...] = self.conn.recv()
                    return message
                except (EOFError, OSError):
                    raise self._died() from None
            if ready:
                raise self._died()
            if stopped.is_set():
                raise _Stopped()

    def _died(self) -> ProcessDiedError:
        with self._ending:  # one join at a time: two threads reaping one child lose its exit status
            self.process.join(TERMINATE_GRACE)
            code = self.process.exitcode
        if code is None:
            how = "it closed its pipe and stopped answering"
        elif code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exited with status {code}"
        return ProcessDiedError(
            f"its process died: {how} (pid {self.process.pid}) before the task returned. "
            "Only this task was in that process; the next task gets a fresh one."
        )

    def end(self) -> None:
        """End the process: SIGTERM, then SIGKILL if it handles that and goes on.

        Any thread may call it (the pool's shutdown ends busy children);
        only the thread that uses the child closes its pipe, see :meth:`close`.
        """
        with self._ending:
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(TERMINATE_GRACE)
                if self.process.is_alive():
                    self.process.kill()
            self.process.join()

    def close(self) -> None:
        self.end()
        self.conn.close()


def _end_children(children: set[_Child]) -> None:
    for child in list(children):
        child.end()


# -- in the child process --------------------------------------------------------


def _serve(conn: multiprocessing.connection.Connection) -> None:
    """A child's life: run the tasks its pipe brings, one at a time, until the pipe closes."""
    # Interrupting a cell signals the kernel's whole process group; a background
    # task must not die of it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the pool, or the process that owns it, is gone
        conn.send(_run(conn, payload))


def _run(conn: multiprocessing.connection.Connection, payload: bytes) -> tuple[str, str, str, bytes, str | None]:
    """Run one task, relaying its progress, and return its outcome message.

    Progress and outcome travel on the same pipe, so the last progress
    arrives before the outcome.
    """
    relay = _ProgressRelay(conn)
    output = io.StringIO()
    text: str | None
    try:
        func, args, kwargs = loads_shipped(payload)
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output), \
                reporting_progress(relay):
            value = func(*args, **kwargs)
            if inspect.isawaitable(value):
                value = asyncio.run(_awaited(value))
    except BaseException as exc:  # KeyboardInterrupt, SystemExit and the like are the task's outcome too
        status, data, text = "failed", *_dumps_exception(exc)
    else:
        status, data, text = _dumps_value(value)
    relay.flush()
    return ("outcome", status, output.getvalue(), data, text)


def _dumps_value(value: Any) -> tuple[str, bytes, str | None]:
    try:
        return "success", cloudpickle.dumps(value), None
    except BaseException as exc:
        error = SerializationError(
            f"cannot send the return value, a {type(value).__name__}, back from the task's process: "
            f"{_describe(exc)}. Return plain data instead."
        )
        return "failed", cloudpickle.dumps(error), f"{_describe(error)}\n"


def _dumps_exception(exc: BaseException) -> tuple[bytes, str]:
    """The exception as bytes the worker can rebuild, and the child's traceback as text.

    An exception that cannot be pickled, or not rebuilt from its pickle (an
    ``__init__`` that needs arguments its ``args`` do not hold), travels as a
    stand-in of the same name and kind that says why.
    """
    tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None  # skip this module's frame
    try:
        text = "".join(traceback.format_exception(type(exc), exc, tb))
    except BaseException:
        text = f"{_describe(exc)}\n"
    try:
        data = cloudpickle.dumps(exc)
        pickle.loads(data)
    except BaseException as problem:
        kind = Exception if isinstance(exc, Exception) else BaseException  # keeps retry_on=(Exception,) right
        stand_in = type(type(exc).__name__, (kind,), {"__module__": __name__})
        data = cloudpickle.dumps(stand_in(
            f"{_message(exc)} (sitq could not send this exception back from the task's process as it is: "
            f"{_describe(problem)})"
        ))
    return data, text


class _ProgressRelay:
    """Sends the latest progress at most every PROGRESS_EVERY seconds."""

    def __init__(self, conn: multiprocessing.connection.Connection) -> None:
        self.conn = conn
        self.pending: tuple[float, float | None, str | None] | None = None
        self.sent_at = 0.0

    def __call__(self, done: float, total: float | None = None, message: str | None = None) -> None:
        self.pending = (done, total, message)
        if time.monotonic() - self.sent_at >= PROGRESS_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.pending is not None:
            self.conn.send(("progress", self.pending))
            self.pending, self.sent_at = None, time.monotonic()


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable
