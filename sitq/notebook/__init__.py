"""sitq in Jupyter: a background worker in the kernel, live widgets, ``%sitq`` magics.

    import sitq.notebook as sn
    sn.start_worker()                 # or: %load_ext sitq, then %sitq start
    handle = sn.submit(crunch, 42)    # shows a live widget when displayed
    handle.result(timeout=60)         # or: await handle
    sn.board()                        # counts, recent tasks, tracebacks

Importing this package needs neither IPython nor ipywidgets; they are
imported when a magic is loaded or a widget is displayed.
"""

from sitq.notebook.handle import TaskHandle
from sitq.notebook.runtime import Runtime, board, current, start_worker, stop_worker, submit, task

__all__ = [
    "Runtime",
    "TaskHandle",
    "board",
    "current",
    "load_ipython_extension",
    "start_worker",
    "stop_worker",
    "submit",
    "task",
    "unload_ipython_extension",
]


def load_ipython_extension(ipython) -> None:
    """Register ``%sitq``/``%%sitq`` and HTML displays for sitq's records."""
    from sitq.core import QueueOverview, TaskInfo
    from sitq.notebook.magics import SitqMagics
    from sitq.notebook.render import board_html, task_html
    from sitq.notebook.rows import task_row

    ipython.register_magics(SitqMagics)
    html = ipython.display_formatter.formatters["text/html"]
    html.for_type(TaskInfo, lambda info: task_html(task_row(info)))
    html.for_type(QueueOverview, lambda ov: board_html(ov.counts, [task_row(i) for i in ov.recent]))


def unload_ipython_extension(ipython) -> None:
    """Stop the kernel's worker and remove the magics."""
    stop_worker()
    for kind in ("line", "cell"):
        ipython.magics_manager.magics[kind].pop("sitq", None)
