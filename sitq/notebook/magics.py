"""The ``%sitq`` line magic and the ``%%sitq`` cell magic (``%load_ext sitq``)."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import types
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser, argument, magic_arguments

from sitq.errors import SitqError
from sitq.notebook import runtime
from sitq.notebook.cells import CellTask, cell_label, names_read
from sitq.notebook.group import GroupHandle
from sitq.notebook.handle import TaskHandle

__all__ = ["SitqMagics"]


@magic_arguments(name="%sitq start")
@argument("path", nargs="?", default=None,
          help="the store: a SQLite file path, sqlite:///path or postgresql://... "
               f"(default: {runtime.DEFAULT_PATH} in the working folder)")
@argument("--concurrency", "-c", type=int, default=None,
          help="tasks run at once (default 4; with --processes, one per process)")
@argument("--processes", "-p", type=int, default=None,
          help="run every task in one of N processes, N at a time, for CPU-bound work "
               "(they start in the background)")
def _start(args: argparse.Namespace) -> None:
    """Start the background worker in this kernel (again: does nothing)."""


@magic_arguments(name="%sitq stop")
@argument("--timeout", type=float, default=None, help="seconds to wait for running tasks")
def _stop(args: argparse.Namespace) -> None:
    """Stop the worker; running tasks finish first."""


@magic_arguments(name="%sitq status")
@argument("--limit", "-n", type=int, default=20, help="how many recent tasks to list")
def _status(args: argparse.Namespace) -> None:
    """Show the live status board of the queue."""


@magic_arguments(name="%sitq result")
@argument("task_id", metavar="ID", help="a task's or a group's id, or a unique beginning or end of it")
def _result(args: argparse.Namespace) -> None:
    """Show a task's result (or live state), or a group's, also one from before a kernel restart."""


@magic_arguments(name="%sitq cancel")
@argument("task_id", metavar="ID", help="a task's or a group's id, or a unique beginning or end of it")
def _cancel(args: argparse.Namespace) -> None:
    """Cancel a pending or running task, or every unfinished task of a group."""


@magic_arguments(name="%%sitq")
@argument("-o", "--output", metavar="NAME", default=None, help="store the task's handle in NAME")
@argument("--name", default=None, help="the task's name on the board (default: the first line)")
@argument("--delay", type=float, default=None, metavar="SECONDS", help="start no sooner than this")
def _cell(args: argparse.Namespace) -> None:
    """Run the body of the cell as a background task and show its handle."""


_COMMANDS = {"start": _start, "stop": _stop, "status": _status, "result": _result,
             "cancel": _cancel}
_PARSERS = {name: func.parser for name, func in _COMMANDS.items()}
_CELL_PARSER = _cell.parser


@magics_class
class SitqMagics(Magics):
    @line_cell_magic
    def sitq(self, line: str, cell: str | None = None) -> object:
        if cell is not None:
            return self._run_cell(_parse(_CELL_PARSER, line), cell, line)
        command, _, rest = line.strip().partition(" ")
        if command not in _COMMANDS:
            raise UsageError(f"%sitq: unknown command {command!r}; use one of "
                             f"{', '.join(_COMMANDS)} (%sitq? for help)" if command else
                             f"%sitq needs a command: {', '.join(_COMMANDS)} (%sitq? for help)")
        args = _parse(_PARSERS[command], rest)
        try:
            return getattr(self, f"_{command}")(args)
        except SitqError as exc:
            raise UsageError(f"%sitq {command}: {exc}") from exc

    def _start(self, args: argparse.Namespace) -> runtime.Runtime:
        for label in ("concurrency", "processes"):
            value = getattr(args, label)
            if value is not None and value < 1:
                raise UsageError(f"%sitq start: --{label} must be 1 or more, not {value}")
        return runtime.start_worker(args.path, args.concurrency, args.processes)

    def _stop(self, args: argparse.Namespace) -> None:
        if not runtime.stop_worker(args.timeout):
            print("sitq: no worker was running")

    def _status(self, args: argparse.Namespace) -> object:  # the board: a widget, or a table to draw
        return runtime.board(args.limit)

    def _result(self, args: argparse.Namespace) -> TaskHandle | GroupHandle:
        return runtime.lookup(args.task_id)

    def _cancel(self, args: argparse.Namespace) -> None:
        rt = runtime.current()
        found = rt.lookup(args.task_id)
        if isinstance(found, GroupHandle):
            done = found.cancel()
            print(f"sitq: group {found.group_id[-8:]} ({found.name}): {done.get('cancelled', 0):,} tasks cancelled "
                  f"before they started, {done.get('requested', 0):,} running asked to stop")
            return
        outcome = rt.cancel(found.task_id)
        if outcome is None:
            raise UsageError(f"%sitq cancel: no task with id {args.task_id!r} in {rt.path}")
        print(f"sitq: task {found.task_id} {_CANCELLED.get(outcome, outcome)}")

    def _run_cell(self, args: argparse.Namespace, body: str, line: str = "") -> TaskHandle:
        if not body.strip():
            raise UsageError("%%sitq: the cell is empty; put the code to run below the %%sitq line")
        try:
            rt = runtime.current()
            names = names_read(body)
        except SitqError as exc:
            raise UsageError(f"%%sitq: {exc}") from exc
        except SyntaxError as exc:
            raise UsageError(f"%%sitq: the cell does not parse: {exc}") from exc
        shell = self.shell
        assert shell is not None  # IPython registers magics with the shell they run in
        user_ns = shell.user_ns
        namespace = {name: user_ns[name] for name in names if name in user_ns}
        label = _calling_cell() or f"Cell In[{shell.execution_count}]"
        header = f"%%sitq {line}".rstrip()
        task = CellTask(body, f"<sitq {label}>", args.name, label=label, header=header)
        eta = dt.timedelta(seconds=args.delay) if args.delay else None
        try:
            handle = rt.enqueue(task, namespace, eta=eta)
        except SitqError as exc:
            raise UsageError(f"%%sitq: {_unpicklable(namespace) or exc}") from exc
        if args.output:
            user_ns[args.output] = handle
        return handle


_CANCELLED = {
    "cancelled": "cancelled before it started",
    "requested": "is running; cancellation requested (a coroutine stops at once, "
                 "a function's result will be discarded)",
    "finished": "had already finished; nothing changed",
}


def _calling_cell() -> str | None:
    """IPython's name for the cell running this magic (``Cell In[23]``): the first frame up the
    stack whose code a cell compiled. (The shell's ``execution_count`` has already moved on
    to the next cell by the time a cell that stores history runs.)"""
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        label = cell_label(frame.f_code.co_filename)
        if label:
            return label
        frame = frame.f_back
    return None


def _parse(parser: MagicArgumentParser, argstring: str) -> argparse.Namespace:
    try:
        args: argparse.Namespace = parser.parse_argstring(argstring)
        return args
    except UsageError as exc:
        raise UsageError(f"{parser.prog}: {exc}; usage: {parser.format_usage().strip()[7:]}") from None
    except ValueError as exc:  # unbalanced quotes
        raise UsageError(f"{parser.prog}: {exc}") from None


def _unpicklable(namespace: dict[str, Any]) -> str | None:
    """Name the first variable that cannot travel to the worker."""
    import cloudpickle

    for name, value in namespace.items():
        try:
            cloudpickle.dumps(value)
        except Exception as exc:
            return (f"the cell reads {name!r}, a {type(value).__name__} that cannot be sent to "
                    f"the worker ({exc}); create it inside the cell instead")
    return None


SitqMagics.sitq.__doc__ = "\n".join(
    ["Run and watch background tasks with sitq.", "",
     "Line magic: %sitq COMMAND [options]", ""]
    + [f"{func.__doc__.strip()}\n" for func in _COMMANDS.values()]
    + ["Cell magic:", _cell.__doc__.strip(), "",
       "Variables the body reads are copied from the notebook when the cell runs; the value",
       "of the last expression is the task's result."])
