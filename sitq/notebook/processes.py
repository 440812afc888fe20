"""Running notebook functions in a pool of processes, for CPU-bound tasks.

The worker itself is unchanged: with ``%sitq start --processes N`` each task's
function is wrapped in :class:`InProcess`, which the worker runs in one of its
threads like any plain function. That thread ships
the function (cloudpickle sends notebook-defined functions by value) to a
``spawn`` process, relays the task's ``sitq.progress`` calls back into the
worker's task context, and hands back the value, the exception (with the
child's traceback as its cause) and what the task printed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import io
import itertools
import multiprocessing
import pickle
import queue as thread_queue
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional

import cloudpickle

from sitq.serialization import describe_callable, dumps_shipping_source, loads_shipped
from sitq.worker import reporting_progress

__all__ = ["InProcess", "ProcessPool", "ProcessTraceback"]

_pool: Optional["ProcessPool"] = None  # this process's pool, if a runtime started one
PROGRESS_EVERY = 0.1  # a child relays progress at most this often (and always the last)


class InProcess:
    """A task function that runs in the kernel's process pool (in the calling
    thread when this process has none, e.g. in a headless worker)."""

    def __init__(self, func: Callable) -> None:
        self.func = func
        # describe_callable() reads these: the board shows the user's function name
        self.__qualname__ = describe_callable(func)
        self.__module__ = "__main__"

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


class ProcessPool:
    """``size`` spawned processes; one task at a time each."""

    def __init__(self, size: int) -> None:
        global _pool
        self.size = size
        self._context = multiprocessing.get_context("spawn")  # forking a kernel's threads is unsafe
        self._events = self._context.SimpleQueue()  # (call id, kind, payload) from the children
        self._inboxes: dict[int, thread_queue.SimpleQueue] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._executor = self._new_executor()
        self._reader = threading.Thread(target=self._read_events, name="sitq-process-events",
                                        daemon=True)
        self._reader.start()
        _pool = self

    def _new_executor(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(
            self.size, mp_context=self._context, initializer=_child_init, initargs=(self._events,))

    def call(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """Run ``func(*args, **kwargs)`` in a process; progress and output come back here."""
        from sitq.worker import progress

        call_id = next(self._ids)
        inbox: thread_queue.SimpleQueue = thread_queue.SimpleQueue()
        self._inboxes[call_id] = inbox
        try:
            payload = dumps_shipping_source((func, args, kwargs))
            future = self._submit(call_id, payload)
            future.add_done_callback(lambda f: _report_crash(f, inbox))
            while True:
                kind, data = inbox.get()
                if kind == "progress":
                    progress(*data)  # this thread runs in the task's context: stored on its row
                elif kind == "crashed":
                    raise data
                else:
                    status, value, output = pickle.loads(data)
                    break
        finally:
            del self._inboxes[call_id]
        if output:
            sys.stdout.write(output)  # the worker captures it as the task's output
        if status == "failed":
            error, text = value
            raise error from ProcessTraceback(text)
        return value

    def _submit(self, call_id: int, payload: bytes) -> concurrent.futures.Future:
        with self._lock:
            try:
                return self._executor.submit(_child_call, call_id, payload)
            except concurrent.futures.BrokenExecutor:
                # a process died (killed, segfault): start a fresh pool for what comes next
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = self._new_executor()
                return self._executor.submit(_child_call, call_id, payload)

    def _read_events(self) -> None:
        while (event := self._events.get()) is not None:
            call_id, kind, data = event
            inbox = self._inboxes.get(call_id)
            if inbox is not None:
                inbox.put((kind, data))

    def shutdown(self) -> None:
        global _pool
        if _pool is self:
            _pool = None
        with self._lock:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self._events.put(None)
        self._reader.join(timeout=5)


def _report_crash(future: concurrent.futures.Future, inbox: thread_queue.SimpleQueue) -> None:
    """A child sends its outcome itself; the future only fails when the process died."""
    if future.cancelled():
        inbox.put(("crashed", concurrent.futures.CancelledError("the process pool was shut down")))
    elif future.exception() is not None:
        inbox.put(("crashed", future.exception()))


# -- in the child process --------------------------------------------------------

_events = None


def _child_init(events) -> None:
    global _events
    _events = events
    # Interrupting a cell signals the kernel's whole process group; a background
    # task must not die of it (nor the pool with it).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _child_call(call_id: int, payload: bytes) -> None:
    """Run one task; send its progress and then its outcome through the events queue
    (one channel, so the last progress arrives before the outcome)."""
    relay = _ProgressRelay(call_id)
    output = io.StringIO()
    try:
        func, args, kwargs = loads_shipped(payload)
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output), \
                reporting_progress(relay):
            value = func(*args, **kwargs)
            if inspect.isawaitable(value):
                value = asyncio.run(_awaited(value))
        outcome = ("success", value)
    except (Exception, SystemExit) as exc:
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None  # skip this frame
        text = "".join(traceback.format_exception(type(exc), exc, tb))
        outcome = ("failed", (_picklable(exc), text))
    relay.flush()
    status, value = outcome
    try:
        data = cloudpickle.dumps((status, value, output.getvalue()))
    except Exception as exc:  # the value cannot travel back: report that as the failure
        error = TypeError(f"cannot send the result of the task back from its process: {exc}")
        data = cloudpickle.dumps(("failed", (error, f"{type(error).__name__}: {error}\n"),
                                  output.getvalue()))
    _events.put((call_id, "outcome", data))


class _ProgressRelay:
    """Sends the latest progress at most every PROGRESS_EVERY seconds."""

    def __init__(self, call_id: int) -> None:
        self.call_id = call_id
        self.pending: Optional[tuple] = None
        self.sent_at = 0.0

    def __call__(self, done, total=None, message=None) -> None:
        self.pending = (done, total, message)
        if time.monotonic() - self.sent_at >= PROGRESS_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.pending is not None:
            _events.put((self.call_id, "progress", self.pending))
            self.pending, self.sent_at = None, time.monotonic()


def _picklable(exc: BaseException) -> BaseException:
    try:
        cloudpickle.dumps(exc)
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


async def _awaited(awaitable):
    return await awaitable
