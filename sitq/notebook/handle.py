"""TaskHandle: a submitted task as the notebook sees it.

Displayed in a cell it is a small live widget (name, state, elapsed time,
progress) that turns into the result or the traceback when the task ends;
outside a kernel it draws as HTML. ``await handle`` and the blocking
``handle.result(timeout=...)`` return the task's value.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from sitq.errors import SitqError, TaskNotFoundError
from sitq.notebook.render import result_html, task_html
from sitq.notebook.rows import task_row

if TYPE_CHECKING:
    from sitq.core import Result, TaskInfo
    from sitq.notebook.refresher import Refresher
    from sitq.notebook.widgets import TaskWidget
    from sitq.queue import TaskQueue
    from sitq.sync import LoopThread

__all__ = ["TaskHandle", "widgets_enabled"]

T = TypeVar("T")


class _Runtime(Protocol):
    """What a handle needs of the runtime it belongs to.

    That is a :class:`sitq.notebook.runtime.Runtime`, which makes handles;
    this module names it only by what it does, so imports go one way.
    """

    path: str
    stopped: bool
    queue: TaskQueue
    loop: LoopThread
    refresher: Refresher

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T: ...

    def cancel(self, task_id: str) -> Any: ...

    def output(self, task_id: str) -> str | None: ...

    def successor(self) -> _Runtime | None: ...


class TaskHandle:
    """A task stored in the kernel's queue. Cheap to make and to keep."""

    def __init__(self, runtime: _Runtime, task_id: str, name: str = "") -> None:
        self._runtime = runtime
        self.task_id = task_id
        self.name = name
        self._widget: TaskWidget | None = None

    @property
    def runtime(self) -> _Runtime:
        """The runtime the task was submitted to or, once that one was stopped,
        the kernel's current runtime on the same file."""
        if self._runtime.stopped:
            now = self._runtime.successor()
            if now is None:
                raise SitqError(f"the sitq worker on {self._runtime.path} was stopped; start it "
                                f"again (%sitq start {self._runtime.path}) to reach task {self.task_id}")
            self._runtime = now
        return self._runtime

    def __repr__(self) -> str:
        # no I/O here: a repr may be taken on any thread, including the loop's
        return f"<TaskHandle {self.task_id}{' ' + self.name if self.name else ''}>"

    # -- state -----------------------------------------------------------------

    def info(self) -> TaskInfo:
        """The task's current state, timings, attempts and progress."""
        runtime = self.runtime
        info = runtime.run(runtime.queue.status(self.task_id))
        if info is None:
            raise TaskNotFoundError(f"no task with id {self.task_id!r} in {runtime.path}")
        self.name = info.name
        return info

    @property
    def status(self) -> str:
        """``waiting``, ``pending``, ``running``, ``success``, ``failed`` or ``cancelled``."""
        return self.info().status

    def done(self) -> bool:
        """Whether the task has finished: succeeded, failed or was cancelled."""
        return self.info().finished

    def cancel(self) -> Any:
        """Cancel the task if it has not finished (needs a sitq that can cancel)."""
        return self.runtime.cancel(self.task_id)

    def output(self) -> str | None:
        """What the task printed: what it printed so far while the kernel's worker runs it,
        all of it (up to sitq's limit of a million characters) once it has ended; None if nothing."""
        return self.runtime.output(self.task_id)

    # -- results ---------------------------------------------------------------

    def outcome(self, timeout: float | None = None) -> Result:
        """Wait for the task and return its :class:`sitq.Result` (value still pickled).
        Raises the builtin ``TimeoutError`` if it has not finished in ``timeout`` s."""
        runtime = self.runtime
        return runtime.run(self._outcome(runtime, timeout))

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the task and return its value. Raises ``TaskFailedError`` (with
        the remote traceback) if it failed, ``TaskCancelledError`` if it was
        cancelled and ``TimeoutError`` if it is not done within ``timeout`` s."""
        return self.runtime.queue.deserialize_result(self.outcome(timeout))

    def __await__(self) -> Generator[Any, None, Any]:
        # The queue lives on the runtime's loop; the awaiting cell on the kernel's.
        runtime = self.runtime
        future = asyncio.wrap_future(runtime.loop.submit(self._outcome(runtime, None)))
        result = yield from future.__await__()
        return runtime.queue.deserialize_result(result)

    async def _outcome(self, runtime: _Runtime, timeout: float | None) -> Result:
        result = await runtime.queue.get_result(self.task_id, timeout)
        if result is not None:
            return result
        if await runtime.queue.status(self.task_id) is None:
            raise TaskNotFoundError(f"no task with id {self.task_id!r} in {runtime.path}")
        raise TimeoutError(f"task {self.task_id} ({self.name or 'task'}) has not finished after "
                           f"{timeout}s; call .result() again, or await the handle")

    # -- display ---------------------------------------------------------------

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None, **kwargs: Any) -> dict[str, Any]:
        runtime = self.runtime
        info = runtime.run(runtime.refresher.task_info(self.task_id))  # as the live view draws it
        if info is None:
            raise TaskNotFoundError(f"no task with id {self.task_id!r} in {runtime.path}")
        self.name = info.name
        if info.finished:
            result = runtime.run(runtime.queue.get_result(self.task_id, 0))
            return {"text/plain": repr(self), "text/html": result_html(result, runtime.queue.deserialize_result)}
        html = task_html(task_row(info))
        if not widgets_enabled():
            return {"text/plain": repr(self), "text/html": html}
        if self._widget is None:
            from sitq.notebook.widgets import TaskWidget
            self._widget = TaskWidget(self.task_id, info.name)
            self._widget.show(task_row(info))
            runtime.refresher.add_task(self._widget)
        bundle = self._widget._repr_mimebundle_()
        # frontends without widget support (nbconvert, GitHub) show the HTML instead
        bundle.setdefault("text/html", html)
        bundle["text/plain"] = repr(self)
        return bundle


def widgets_enabled() -> bool:
    """True inside a Jupyter kernel, where a frontend can draw ipywidgets."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None
