"""The kernel's own sitq: a queue, a worker and live views on one loop thread.

A cell runs inside the kernel's event loop, so the worker cannot share it: it
would stop whenever a cell blocks. The runtime runs the queue, the worker and
the refresher of live widgets on a :class:`sitq.sync.LoopThread` of its own,
and cells talk to it with ``LoopThread.run``/``submit``. Nothing global is
patched. There is at most one runtime per kernel; starting it twice with the
same settings returns the running one, and it stops at ``stop_worker()``,
``%sitq stop`` and interpreter exit (kernel shutdown or restart).

This module imports neither IPython nor ipywidgets: widgets are imported
when something is displayed, so headless code can use it.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextvars
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from sitq.backends import describe_target, open_backend
from sitq.backends.rules import key_group_id
from sitq.errors import InvalidTaskError, SitqError, TaskNotFoundError
from sitq.notebook.group import GroupHandle
from sitq.notebook.handle import TaskHandle, widgets_enabled
from sitq.notebook.refresher import Refresher
from sitq.options import Task
from sitq.queue import TaskQueue, new_task_id
from sitq.serialization import describe_callable
from sitq.sync import LoopThread
from sitq.worker import Worker

if TYPE_CHECKING:  # loads when a board is first asked for
    from sitq.notebook.widgets import BoardWidget

__all__ = ["Runtime", "start_worker", "stop_worker", "current", "submit", "map", "task", "group", "lookup",
           "board", "DEFAULT_PATH", "MAP_WAIT"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PATH = "sitq.db"
# How long map() waits for its tasks to be stored before it returns the group still storing: a
# small map is stored by then (and its errors raise in the cell); a bigger one goes on in the
# background, so the kernel is never held for longer.
MAP_WAIT = 0.005
# A map of more items returns at once, still storing (it could not be stored in MAP_WAIT, and
# waiting would only cost the cell the time to win the GIL back from the thread that stores it),
# with its widget made before storing starts (see Runtime.map).
EAGER_WIDGET = 1000
# A big map pickles on the runtime's loop thread in slices of about 2 ms; after each it sleeps this
# long, so the kernel's thread takes the GIL at once rather than after the switch interval (5 ms).
MAP_PAUSE = 0.001
_runtime: Runtime | None = None
_lock = threading.Lock()


class Runtime:
    """A queue on a SQLite file, the worker that runs its tasks in this kernel,
    and the refresher that keeps task widgets and boards live.

    ``concurrency`` tasks run at once (threads for plain functions, the loop for
    coroutines; 4 by default). With ``processes=N`` every task runs in one of N
    processes instead, N at a time, so N CPU-bound tasks use N cores; the
    processes start in the background when the runtime starts.
    """

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_PATH, concurrency: int | None = None,
                 processes: int | None = None, poll_interval: float = 1.0) -> None:
        self.backend = open_backend(path)
        self.path: str = getattr(self.backend, "path", None) or describe_target(path)
        self.processes = processes or 0
        self.worker = Worker(self.backend, max_concurrency=concurrency or (None if processes else 4),
                             processes=processes, poll_interval=poll_interval, name="notebook",
                             capture_output=True)
        self.concurrency = self.worker.max_concurrency
        self.loop = LoopThread(name="sitq-notebook")
        self.queue = TaskQueue(self.backend, map_pause=MAP_PAUSE)
        self.refresher = Refresher(self.queue, self.loop, self._live_output, self.worker.look)
        self.stopped = False
        self._tasks: list[concurrent.futures.Future[None]] = []

    def __repr__(self) -> str:
        mode = f"processes={self.processes}" if self.processes else f"concurrency={self.concurrency}"
        state = "running" if self._tasks else "stopped"
        return f"<sitq notebook worker {state} on {self.path} {mode}>"

    def matches(
        self, path: str | os.PathLike[str] | None, concurrency: int | None, processes: int | None
    ) -> bool:
        """Whether asking for these settings means this runtime (None: any)."""
        return ((path is None or _same_store(path, self.path))
                and (concurrency is None or concurrency == self.concurrency)
                and (processes is None or processes == self.processes))

    def start(self) -> None:
        """Open the store, start the worker and the live views on the runtime's loop thread; returns at once."""
        self.loop.run(self.backend.connect())  # a bad path fails here, in the user's cell
        # The worker's task inherits this cell's context, so anything it prints
        # outside a task stays in the cell that started it. The refresher starts
        # in an empty context: ipykernel then sends its widget updates with the
        # running cell as parent, which nbclient needs to record them.
        self._tasks = [self.loop.submit(self.worker.start()),
                       contextvars.Context().run(self.loop.submit, self.refresher.run())]
        self._tasks[0].add_done_callback(self._worker_ended)

    def _worker_ended(self, future: concurrent.futures.Future[None]) -> None:
        if not future.cancelled() and future.exception() is not None:
            log.error("sitq: the notebook worker on %s stopped: %s", self.path, future.exception(),
                      exc_info=future.exception())

    def stop(self, timeout: float | None = None) -> None:
        """Stop claiming tasks, let running ones finish (up to ``timeout``), close."""
        self.stopped = True
        try:
            self.loop.run(self.worker.stop(), timeout)
        except (TimeoutError, concurrent.futures.TimeoutError):  # distinct types before 3.11
            log.warning("sitq: tasks still running after %ss; stopping without them", timeout)
        finally:
            for fut in self._tasks:
                fut.cancel()
            self._tasks = []
            try:  # leave the views showing how things ended
                self.loop.run(self.refresher.refresh(), timeout=5)
            except Exception:
                log.warning("sitq: could not draw the final state of the notebook views",
                            exc_info=True)
            try:
                self.loop.run(self.queue.close(), timeout=5)
            finally:
                self.loop.stop()

    def _live_output(self, task_id: str) -> str | None:
        from sitq.notebook.render import LIVE_LINES

        return self.worker.live_output(task_id, max_chars=LIVE_LINES * 200)

    def output(self, task_id: str) -> str | None:
        """What the task printed: so far, while this kernel's worker runs it; all of it once it ended."""
        live = self.worker.live_output(task_id)
        if live is not None:
            return live
        result = self.run(self.queue.get_result(task_id, 0))
        return result.output if result is not None else None

    def successor(self) -> Runtime | None:
        """The kernel's runtime on this runtime's store, for handles made before it was stopped."""
        now = current(required=False)
        return now if now is not None and now.path == self.path else None

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the runtime's loop and wait for its value."""
        return self.loop.run(coro, timeout)

    def enqueue(self, func: Callable[..., Any], /, *args: Any, eta: Any = None, **kwargs: Any) -> TaskHandle:
        """Store a call and return its :class:`TaskHandle`."""
        task_id = self.run(self.queue.enqueue(func, *args, eta=eta, **kwargs))
        return TaskHandle(self, task_id, describe_callable(func))

    def handle(self, task_id: str) -> TaskHandle:
        """A handle for a task that is already stored (from any session); ``task_id`` may be a
        unique beginning or end of the id, as the views show it."""
        info = self.run(self.queue.status(task_id))
        if info is None:
            task_id = self.run(self.queue.resolve(task_id))
            info = self.run(self.queue.status(task_id))
            if info is None:
                raise TaskNotFoundError(f"no task with id {task_id!r} in {self.path}")
        return TaskHandle(self, task_id, info.name)

    def map(self, func: Callable[..., Any], /, *iterables: Iterable[Any], eta: Any = None,
            key: str | None = None) -> GroupHandle:
        """Store ``func(*items)`` for each item of ``zip(*iterables)`` as one group, in one transaction,
        and return its :class:`GroupHandle`; see :func:`sitq.notebook.map`."""
        columns = [list(items) for items in iterables]  # read here, in the cell's thread, not the loop's
        expected = min((len(c) for c in columns), default=0)
        if isinstance(key, str) and key:
            group_id = key_group_id(key)
        elif key is None:
            group_id = new_task_id(time.time())
        else:
            raise InvalidTaskError(f"key takes a non-empty string, not {key!r}")
        if isinstance(func, Task):
            name = func.task_options.name or describe_callable(func.func)
        else:
            name = describe_callable(func) if callable(func) else ""
        handle = GroupHandle(self, group_id, name, expected=expected)
        if expected > EAGER_WIDGET and widgets_enabled():
            # Drawn before the tasks are stored: once storing runs on the loop thread, every step of
            # making a widget's models here would wait its turn for the GIL.
            from sitq.notebook.widgets import GroupWidget

            handle._widget = GroupWidget(group_id, name, expected, on_cancel=handle._cancel_clicked)
        future = self.loop.submit(self.queue.map(func, *columns, eta=eta, group=group_id, key=key))
        if expected <= EAGER_WIDGET:
            try:
                handle._ids = future.result(MAP_WAIT)
                return handle
            except (TimeoutError, concurrent.futures.TimeoutError):  # distinct types before 3.11
                pass
        future.add_done_callback(self._stored)
        handle._stored = future
        return handle

    def _stored(self, future: concurrent.futures.Future[list[str]]) -> None:
        if not future.cancelled() and future.exception() is not None:
            log.error("sitq: storing the tasks of a map failed: %s", future.exception())
        self.refresher.wake()

    def group_handle(self, group_id: str) -> GroupHandle:
        """A handle for a group that is already stored (from any session); ``group_id`` may be a
        unique beginning or end of the id."""
        info = self.run(self.queue.group(group_id))
        if info is None:
            group_id = self.run(self.queue.resolve_group(group_id))
            info = self.run(self.queue.group(group_id))
            if info is None:
                raise TaskNotFoundError(f"no group with id {group_id!r} in {self.path}")
        return GroupHandle(self, group_id, info.name)

    def lookup(self, fragment: str) -> TaskHandle | GroupHandle:
        """The task or the group whose id is, begins or ends with ``fragment``."""
        # A group's id is made as a task's is (time first), so a short beginning can match tasks
        # of the same moment too: a unique group match wins over a task lookup that failed.
        try:
            return self.handle(fragment)
        except (TaskNotFoundError, InvalidTaskError) as task_error:
            try:
                return self.group_handle(fragment)
            except TaskNotFoundError:
                if isinstance(task_error, InvalidTaskError):
                    raise task_error from None
                raise TaskNotFoundError(f"no task id and no group id is, begins or ends with {fragment!r} "
                                        f"in {self.path}") from None

    def cancel(self, task_id: str) -> Any:
        """Cancel a task: ``"cancelled"``, ``"requested"``, ``"finished"`` or None (see ``TaskQueue.cancel``)."""
        return self.run(self.queue.cancel(task_id))

    def board(self, limit: int = 20) -> BoardWidget:
        """A live board widget for this queue."""
        from sitq.notebook.widgets import BoardWidget

        def select(_task_id: str) -> None:
            self.refresher.wake()

        def cancel(task_id: str) -> None:
            from sitq.notebook.widgets import GROUP_PREFIX

            def report(f: concurrent.futures.Future[Any]) -> None:
                if not f.cancelled() and f.exception() is not None:
                    log.warning("sitq: cancel %s failed: %s", task_id, f.exception())

            if task_id.startswith(GROUP_PREFIX):
                future: concurrent.futures.Future[Any] = self.loop.submit(
                    self.queue.cancel_group(task_id[len(GROUP_PREFIX):]))
            else:
                future = self.loop.submit(self.queue.cancel(task_id))
            future.add_done_callback(report)
            self.refresher.wake()

        def page(step: int) -> None:
            self.refresher.page(widget, step)

        widget = BoardWidget(select, cancel, page)
        self.refresher.add_board(widget, limit)
        return widget


# -- the kernel's runtime ------------------------------------------------------

def start_worker(path: str | os.PathLike[str] | None = None, concurrency: int | None = None,
                 processes: int | None = None) -> Runtime:
    """Start sitq's worker inside this kernel and return its runtime.

    Tasks run in the background while you keep running cells. ``path`` is the
    store: a SQLite file (default ``sitq.db`` in the working folder), so results
    outlive the kernel, or a ``postgresql://`` URL. Calling it again with the same (or no) settings
    returns the running runtime; other settings need ``stop_worker()`` first.
    """
    global _runtime
    with _lock:
        if _runtime is not None:
            if _runtime.matches(path, concurrency, processes):
                return _runtime
            raise SitqError(f"{_runtime!r} is already running; stop it first "
                            "(stop_worker() or %sitq stop) to start one with other settings")
        runtime = Runtime(DEFAULT_PATH if path is None else path, concurrency, processes)
        runtime.start()
        _runtime = runtime
        _register_exit_hook()
        return runtime


def stop_worker(timeout: float | None = None) -> bool:
    """Stop the kernel's worker (running tasks finish first, up to ``timeout``
    seconds). Returns False when no worker was running."""
    global _runtime
    with _lock:
        runtime, _runtime = _runtime, None
    if runtime is None:
        return False
    runtime.stop(timeout)
    return True


@overload
def current(required: Literal[True] = True) -> Runtime: ...


@overload
def current(required: bool) -> Runtime | None: ...


def current(required: bool = True) -> Runtime | None:
    """The kernel's runtime; raises a SitqError saying what to do when there is none."""
    runtime = _runtime
    if runtime is None and required:
        raise SitqError("no sitq worker runs in this kernel; start one with "
                        "sitq.notebook.start_worker() or %sitq start")
    return runtime


def submit(func: Callable[..., Any], /, *args: Any, eta: Any = None, **kwargs: Any) -> TaskHandle:
    """Enqueue ``func(*args, **kwargs)`` on the kernel's queue; returns a
    :class:`TaskHandle` that shows itself live in a cell."""
    return current().enqueue(func, *args, eta=eta, **kwargs)


def map(func: Callable[..., Any], /, *iterables: Iterable[Any], eta: Any = None,  # noqa: A001
        key: str | None = None) -> GroupHandle:
    """Enqueue ``func(*items)`` for each item of ``zip(*iterables)`` on the kernel's queue, as one
    group, in one transaction; returns a :class:`GroupHandle` that shows itself in a cell as one
    live widget (aggregate bar, first failures, cancel-all) and whose ``results()`` are in input order.

    With ``key``, running the cell again re-attaches to the same group instead of enqueueing again:
    item ``i`` has the dedupe key ``f"{key}/{i}"`` (see ``TaskQueue.map``), so its task is the one
    stored, whatever state it is in. A map whose tasks take longer than a moment to store (many
    thousands) returns at once and goes on storing in the background; the widget says so.
    """
    return current().map(func, *iterables, eta=eta, key=key)


def task(task_id: str) -> TaskHandle:
    """A handle for a stored task, e.g. one submitted before a kernel restart (a unique beginning
    or end of its id will do)."""
    return current().handle(task_id)


def group(group_id: str) -> GroupHandle:
    """A handle for a stored group, e.g. one mapped before a kernel restart (a unique beginning or
    end of its id will do, as the widget shows it)."""
    return current().group_handle(group_id)


def lookup(fragment: str) -> TaskHandle | GroupHandle:
    """The task or group whose id is, begins or ends with ``fragment`` (what ``%sitq result`` shows)."""
    return current().lookup(fragment)


def board(limit: int = 20) -> BoardWidget | _StaticBoard:
    """The live status board of the kernel's queue (a static table outside a
    kernel with widgets, e.g. in a terminal IPython)."""
    runtime = current()
    if not widgets_enabled():
        return _StaticBoard(runtime, limit)
    return runtime.board(limit)


class _StaticBoard:
    """The board as a table drawn when displayed, for frontends without widgets."""

    def __init__(self, runtime: Runtime, limit: int) -> None:
        self._runtime, self._limit = runtime, limit

    def __repr__(self) -> str:
        return repr(self._runtime.run(self._runtime.queue.overview(0)))

    def _repr_html_(self) -> str:
        from sitq.notebook.render import board_html

        counts, rows, page, _newer, _older = self._runtime.run(self._runtime.refresher.board_rows(self._limit))
        return board_html(counts, rows, page)


_exit_hook_registered = False


def _register_exit_hook() -> None:
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_stop_at_exit)
        _exit_hook_registered = True


def _stop_at_exit() -> None:
    # A kernel shutting down gets a few seconds; tasks still running then are
    # taken over by another worker once their lease expires.
    stop_worker(timeout=5)


def _same_store(target: str | os.PathLike[str], path: str) -> bool:
    """Whether ``target`` names the store this runtime has open (``path``)."""
    backend = open_backend(target)
    return (getattr(backend, "path", None) or describe_target(target)) == path
