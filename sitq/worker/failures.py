"""What a task raised, as the worker stores it: ``"Type: message"`` and the task's own traceback.

The traceback starts at the task's code: the runner's frames are dropped, and so
are wrappers that hide themselves with ``__tracebackhide__ = True`` (as in
pytest). Frames in code that a notebook cell defined are shown as IPython shows
them, ``Cell In[7], line 5``, instead of the kernel's temporary file name: the
labels travel with the pickled function (see :data:`sitq.serialization.CODE_LABELS`),
so this works in any worker process and stays in the stored text after the
kernel that enqueued the task has gone. Thread, coroutine and process runners
all describe failures here, so they read the same.
"""

from __future__ import annotations

import re
import traceback
import types

from sitq.serialization import CODE_LABELS

__all__ = ["describe_exception", "describe_failure", "exception_message"]

_FRAME_LINE = re.compile(r'^(?P<indent>\s*)File "(?P<file>[^"]*)", line (?P<line>\d+)(?P<rest>.*)$')


def describe_failure(exc: BaseException, skip_frames: int = 1) -> tuple[str, str | None]:
    """``("Type: message", traceback text)`` of a task's exception, from the task's own code on:
    ``skip_frames`` frames of sitq's are dropped, and so are wrappers that hide themselves."""
    tb = exc.__traceback__
    for _ in range(skip_frames):  # drop sitq's own frame: the user's code comes first
        if tb is not None:
            tb = tb.tb_next
    while tb is not None and tb.tb_next is not None and tb.tb_frame.f_locals.get("__tracebackhide__"):
        tb = tb.tb_next  # wrappers (notebook cells, coroutines in processes) hide themselves
    text = _format_traceback(exc, tb) if tb is not None else None
    return describe_exception(exc), text


def exception_message(exc: BaseException) -> str:
    """``str(exc)``, or a note saying it raised (an exception's ``__str__`` is user code)."""
    try:
        return str(exc)
    except BaseException as inner:
        return f"<str() of the exception raised {type(inner).__name__}>"


def describe_exception(exc: BaseException) -> str:
    """``"Type: message"`` for any exception, also one whose ``__str__`` raises."""
    message = exception_message(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def label_cells(text: str) -> str:
    """``File "/tmp/ipykernel_1/123.py", line 5, in f`` becomes ``Cell In[7], line 5, in f``
    for every file a notebook cell's code came from."""
    if not CODE_LABELS or "File " not in text:
        return text
    lines = text.split("\n")
    for i, line in enumerate(lines):
        match = _FRAME_LINE.match(line)
        if match is not None:
            label = CODE_LABELS.get(match["file"])
            if label is not None:
                lines[i] = f"{match['indent']}{label}, line {match['line']}{match['rest']}"
    return "\n".join(lines)


def _format_traceback(exc: BaseException, tb: types.TracebackType | None) -> str | None:
    try:
        return label_cells("".join(traceback.format_exception(type(exc), exc, tb)))
    except BaseException as inner:
        return f"{describe_exception(exc)}\n(sitq could not format its traceback: {describe_exception(inner)})\n"
