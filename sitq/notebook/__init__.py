"""sitq in Jupyter: a background worker in the kernel, live widgets, ``%sitq`` magics.

    import sitq.notebook as sn
    sn.start_worker()                 # or: %load_ext sitq, then %sitq start
    handle = sn.submit(crunch, 42)    # shows a live widget when displayed
    handle.result(timeout=60)         # or: await handle
    group = sn.map(crunch, range(100))  # one group, one widget; group.results() in input order
    sn.board()                        # counts, recent tasks, tracebacks

Importing this package needs neither IPython nor ipywidgets; they are
imported when a magic is loaded or a widget is displayed. Imported in an
IPython shell (or loaded with ``%load_ext sitq``), it registers HTML views of
sitq's records (``Result``, ``TaskInfo``, ``QueueOverview``) with the shell's
display formatter: the core knows nothing of notebooks and draws nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sitq.notebook.cells import cell_label, running_shell
from sitq.notebook.group import GroupHandle
from sitq.notebook.handle import TaskHandle
from sitq.notebook.runtime import (
    Runtime,
    board,
    current,
    group,
    lookup,
    map,
    start_worker,
    stop_worker,
    submit,
    task,
)
from sitq.serialization import set_code_labeller

if TYPE_CHECKING:  # IPython loads with the magics, not with this package
    from IPython.core.interactiveshell import InteractiveShell

__all__ = [
    "GroupHandle",
    "Runtime",
    "TaskHandle",
    "board",
    "current",
    "group",
    "load_ipython_extension",
    "lookup",
    "map",
    "start_worker",
    "stop_worker",
    "submit",
    "task",
    "unload_ipython_extension",
]


def load_ipython_extension(ipython: InteractiveShell) -> None:
    """Register ``%sitq``/``%%sitq`` and HTML displays for sitq's records."""
    from sitq.notebook.magics import SitqMagics

    ipython.register_magics(SitqMagics)
    _register_displays(ipython)


def _register_displays(ipython: InteractiveShell) -> None:
    """Draw sitq's records as HTML in this IPython shell (what the core leaves to this layer)."""
    from sitq.core import QueueOverview, Result, TaskInfo
    from sitq.notebook.render import board_html, result_html, task_html
    from sitq.notebook.rows import task_row

    formatter = ipython.display_formatter
    if formatter is None:  # IPython's shells all have one; a shell without one shows no HTML
        return
    html = formatter.formatters["text/html"]
    html.for_type(Result, result_html)
    html.for_type(TaskInfo, lambda info: task_html(task_row(info)))
    html.for_type(QueueOverview, lambda ov: board_html(ov.counts, [task_row(i) for i in ov.recent]))


def unload_ipython_extension(ipython: InteractiveShell) -> None:
    """Stop the kernel's worker and remove the magics."""
    stop_worker()
    for kind in ("line", "cell"):
        ipython.magics_manager.magics[kind].pop("sitq", None)


# Functions defined in cells are pickled with the cell they came from, so their remote
# tracebacks read "Cell In[7], line 5" as IPython's own do, wherever the task runs.
set_code_labeller(cell_label)

_shell = running_shell()
if _shell is not None:  # `import sitq.notebook` in a notebook: its records draw as HTML at once
    _register_displays(_shell)
del _shell
