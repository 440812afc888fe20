"""A notebook cell's body as a task: what ``%%sitq`` enqueues.

The body runs with a copy of the notebook variables it reads, taken when the
cell ran; the value of its last expression is the task's result. ``await``
works at the top level of the body. Neither IPython nor widgets are imported,
so any worker can unpickle and run a cell task.
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import linecache
import re
import sys
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

from sitq.serialization import CODE_LABELS

__all__ = ["CellTask", "cell_label", "names_read", "running_shell"]

T = TypeVar("T")

_RESULT = "_sitq_cell_result_"
# IPython's own variables; a cell task never needs them
_SKIP = re.compile(r"^(_+|_i+\d*|_\d+|_[iod]h|In|Out|get_ipython|exit|quit)$")


class CellTask:
    """A picklable callable that runs a cell body in a fresh namespace.

    The board shows it by ``name``, or as ``cell:`` and the body's first line.
    ``label`` (``"Cell In[23]"``) is how its tracebacks name it, and ``header``
    the line above the body (the ``%%sitq`` line): line numbers count it, so a
    traceback points at the line of the cell as the notebook shows it.
    """

    def __init__(self, source: str, filename: str, name: str | None = None, *,
                 label: str | None = None, header: str | None = None) -> None:
        self.source = source
        self.filename = filename
        self.label = label
        self.header = header
        ast.parse(source, filename)  # a syntax error surfaces when the cell runs, not later
        first = next((line.strip() for line in source.splitlines() if line.strip()), "")
        # describe_callable() reads these, so the board names the cell by its first line
        self.__qualname__ = name or "cell: " + (first if len(first) <= 40 else first[:39] + "…")
        self.__module__ = "__main__"

    def __repr__(self) -> str:
        return f"<CellTask {self.__qualname__!r}>"

    def __call__(self, namespace: Mapping[str, Any]) -> Any:
        __tracebackhide__ = True  # noqa: F841 - remote tracebacks start at the cell's code
        # Register the source so tracebacks show the cell's lines in this process, by its label.
        header = getattr(self, "header", None)  # (cell tasks pickled by an older sitq have neither)
        text = self.source if header is None else header.rstrip("\n") + "\n" + self.source
        lines = text.splitlines(keepends=True)
        linecache.cache[self.filename] = (len(text), None, lines, self.filename)
        label = getattr(self, "label", None)
        if label:
            CODE_LABELS[self.filename] = label
        scope = dict(namespace)
        scope.setdefault("__builtins__", builtins)
        scope.setdefault("__name__", "__main__")
        tree = _with_result(ast.parse(self.source, self.filename))
        if header is not None:
            ast.increment_lineno(tree, 1)
        code = compile(tree, self.filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        pending = eval(code, scope)  # a coroutine when the body awaits, else None
        if pending is not None:
            asyncio.run(_awaited(pending))  # runs on this worker thread's own loop
        return scope.get(_RESULT)


def running_shell() -> Any:
    """The IPython shell this code runs in, if any; IPython is not imported to find out."""
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    return get_ipython() if get_ipython is not None else None


def cell_label(filename: str) -> str | None:
    """IPython's name for the cell a code file came from (``Cell In[7]``), or None."""
    shell = running_shell()
    name_of = getattr(getattr(shell, "compile", None), "format_code_name", None)
    named = name_of(filename) if name_of is not None else None
    return f"{named[0]} {named[1]}" if named else None


def names_read(source: str) -> set[str]:
    """The names a body reads (a superset: every name it loads anywhere),
    minus IPython's own history variables."""
    tree = ast.parse(source)
    names = {node.id for node in ast.walk(tree)
             if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    return {name for name in names if not _SKIP.match(name)}


def _with_result(tree: ast.Module) -> ast.Module:
    """Store the last expression's value, as a cell shows it."""
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = tree.body[-1]
        tree.body[-1] = ast.copy_location(
            ast.Assign(targets=[ast.Name(_RESULT, ast.Store())], value=last.value), last)
        ast.fix_missing_locations(tree)
    return tree


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable
